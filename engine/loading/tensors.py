"""numpy batches (a reader's output) as the torch tensors models take, on the host or copied to a CUDA device."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from engine.store.format import CSRBlock


def copy_stream(device: Any) -> Any:
    """A CUDA stream of its own for host-to-device copies, or None off CUDA. Copied on the stream that runs the
    model, a batch would wait behind the step before it; on this one it is copied while that step runs."""
    import torch

    if device is None or torch.device(device).type != "cuda":
        return None
    return torch.cuda.Stream(device=torch.device(device))


def to_torch(batch: dict[str, Any], int_keys: Iterable[str] = (), device: Any = None, stream: Any = None) -> dict:
    """Each array as a tensor without copying (a CSRBlock as a torch sparse CSR tensor); `index` and the
    `int_keys` (obs codes) as int64. With a CUDA `device`: each array through pinned memory by a non-blocking copy,
    on `stream` when given (`copy_stream`), which the caller's current stream then waits for on the GPU, not on
    the host."""
    import torch

    int_keys = set(int_keys) | {"index"}
    host: dict[str, Any] = {}
    with warnings.catch_warnings():
        # Ray hands out read-only views of the object store; the tensors never write to them in place.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for key, value in batch.items():
            if isinstance(value, CSRBlock):
                # torch wants signed indices and float values: raw store blocks hold unsigned ones (no-ops
                # for the loader's batches, which are gathered as int32 / float32 already)
                indices = (
                    value.indices if value.indices.dtype in (np.int32, np.int64) else value.indices.astype(np.int32)
                )
                data = value.data if value.data.dtype.kind == "f" else value.data.astype(np.float32)
                parts = [torch.from_numpy(a) for a in (value.indptr, indices, data)]
                host[key] = (parts, (value.n_cells, value.n_genes))
            else:
                arr = np.asarray(value)
                host[key] = torch.from_numpy(
                    arr.astype(np.int64, copy=False) if key in int_keys and arr.dtype.kind in "iu" else arr
                )
    if device is not None and torch.device(device).type == "cuda":
        host = _copy_to_cuda(host, device, stream)
    elif device is not None:
        host = _each_tensor(host, lambda t: t.to(device))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse (invariant checks|CSR tensor support)")
        return {k: torch.sparse_csr_tensor(*v[0], size=v[1]) if isinstance(v, tuple) else v for k, v in host.items()}


def _copy_to_cuda(host: dict[str, Any], device: Any, stream: Any) -> dict[str, Any]:
    """Pinned, non-blocking copies on `stream` (or the current one); the current stream waits for them, and each
    copy is recorded on it, so the allocator keeps its memory until the consumer's kernels are done with it."""
    import contextlib

    import torch

    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        out = _each_tensor(host, lambda t: t.pin_memory().to(device, non_blocking=True))
    if stream is not None:
        consumer = torch.cuda.current_stream(stream.device)
        consumer.wait_stream(stream)
        _each_tensor(out, lambda t: t.record_stream(consumer))
    return out


def _each_tensor(host: dict[str, Any], fn) -> dict[str, Any]:
    """fn over each tensor of `host`, a sparse CSR tensor's (parts, size) as its three parts."""
    return {k: ([fn(p) for p in v[0]], v[1]) if isinstance(v, tuple) else fn(v) for k, v in host.items()}
