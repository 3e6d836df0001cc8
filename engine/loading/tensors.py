"""numpy batches (a reader's output) as the torch tensors models take."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from engine.store.format import CSRBlock


def to_torch(
    batch: dict[str, Any], int_keys: Iterable[str] = (), pin: bool = False, device: Any = None
) -> dict[str, Any]:
    """Each array as a tensor without copying (a CSRBlock as a torch sparse CSR tensor); `index` and the
    `int_keys` (obs codes) as int64; pinned and moved to `device` when asked (non-blocking copies)."""
    import torch

    int_keys = set(int_keys) | {"index"}
    out = {}
    with warnings.catch_warnings():
        # Ray hands out read-only views of the object store; the tensors never write to them in place.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        warnings.filterwarnings("ignore", message="Sparse (invariant checks|CSR tensor support)")
        for key, value in batch.items():
            if isinstance(value, CSRBlock):
                # torch wants signed indices and float values: raw store blocks hold unsigned ones (no-ops
                # for the loader's batches, which are gathered as int32 / float32 already)
                indices = (
                    value.indices if value.indices.dtype in (np.int32, np.int64) else value.indices.astype(np.int32)
                )
                data = value.data if value.data.dtype.kind == "f" else value.data.astype(np.float32)
                t = torch.sparse_csr_tensor(
                    torch.from_numpy(value.indptr),
                    torch.from_numpy(indices),
                    torch.from_numpy(data),
                    size=(value.n_cells, value.n_genes),
                )
            else:
                arr = np.asarray(value)
                t = torch.from_numpy(
                    arr.astype(np.int64, copy=False) if key in int_keys and arr.dtype.kind in "iu" else arr
                )
            if pin and t.layout == torch.strided:
                t = t.pin_memory()
            if device is not None:
                t = t.to(device, non_blocking=True)
            out[key] = t
    return out
