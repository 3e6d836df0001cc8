"""Ingest inputs: .h5ad files and AnnData .zarr stores, read lazily by row range, and the one gene vocabulary
they are mapped onto."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from engine.errors import InputError

SYMBOL_COLUMNS = ("gene_symbols", "feature_name", "gene_symbol", "symbol", "gene_name")


class Source:
    """One input file: its obs/var in memory, its count matrix read lazily by row range."""

    def __init__(self, path: Path, layer: str | None, annotations: bool = True):
        """`annotations=False` (the scatter tasks) opens the count matrix only: obs and var are read once, by
        the driver, not again by every task."""
        import anndata as ad

        self.path = path
        self.field = "X" if layer is None else f"layers/{layer}"
        self._file = self._open(path)
        if annotations:
            try:
                self.obs = ad.io.read_elem(self._file["obs"])
                self.var = ad.io.read_elem(self._file["var"])
                if not (isinstance(self.obs, pd.DataFrame) and isinstance(self.var, pd.DataFrame)):
                    raise TypeError("obs/var are not dataframes")
            except Exception:  # pre-0.7 h5ad (structured arrays): let anndata convert it
                backed = ad.read_h5ad(path, backed="r")
                self.obs, self.var = backed.obs, backed.var
                backed.file.close()
            self.n_obs = len(self.obs)
        if self.field not in self._file:
            have = list(self._file["layers"].keys()) if "layers" in self._file else []
            raise InputError(f"{path}: field '{self.field}' not found (layers present: {have})")
        self._element = self._file[self.field]

    @staticmethod
    def _open(path: Path):
        if not path.exists():
            raise InputError(f"{path}: no such file")
        try:
            if path.suffix == ".h5ad" or path.is_file():
                import h5py

                return h5py.File(path, "r")
            import zarr

            return zarr.open_group(str(path), mode="r")
        except Exception as e:
            raise InputError(f"{path}: cannot be read as .h5ad or AnnData .zarr (truncated or corrupt?): {e}") from e

    @property
    def nnz_estimate(self) -> int:
        """Stored values of a sparse matrix; every entry of a dense one."""
        if hasattr(self._element, "keys"):
            return int(self._element["data"].shape[0])
        return int(np.prod(self._element.shape))

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        import anndata as ad

        try:
            if hasattr(self._element, "keys"):  # sparse group (csr or csc)
                block = ad.io.sparse_dataset(self._element)[start:stop]
            else:  # dense array
                block = np.asarray(self._element[start:stop])
        except Exception as e:
            raise InputError(f"{self.path}: field '{self.field}' rows [{start}, {stop}) could not be read: {e}") from e
        return sp.csr_matrix(block)

    def close(self) -> None:
        if hasattr(self._file, "close"):
            self._file.close()


def gene_symbols(var: pd.DataFrame) -> pd.Series:
    for c in SYMBOL_COLUMNS:
        if c in var.columns:
            return var[c].astype(str)
    return pd.Series(var.index.astype(str), index=var.index)


def build_vocabulary(sources: list[Source], vocab: str) -> pd.DataFrame:
    """The store's var: index = gene ids, column gene_symbols."""
    if vocab in ("union", "intersection"):
        ids = pd.Index(sources[0].var.index.astype(str))
        for s in sources[1:]:
            other = pd.Index(s.var.index.astype(str))
            ids = (
                ids.append(other.difference(ids, sort=False))
                if vocab == "union"
                else ids.intersection(other, sort=False)
            )
        if len(ids) == 0:
            raise InputError(f"inputs {[str(s.path) for s in sources]}: the intersection of their var indexes is empty")
    else:
        path = Path(vocab)
        if not path.exists():
            raise InputError(
                f"{path}: vocabulary file not found (expected 'union', 'intersection' or a file of gene ids)"
            )
        if path.suffix in (".csv", ".tsv"):
            ids = pd.Index(pd.read_csv(path, sep="," if path.suffix == ".csv" else "\t").iloc[:, 0].astype(str))
        else:
            ids = pd.Index([line.strip() for line in path.read_text().splitlines() if line.strip()])
        if ids.has_duplicates:
            raise InputError(f"{path}: vocabulary has duplicate gene ids, e.g. {list(ids[ids.duplicated()][:5])}")
    symbols = pd.Series(ids, index=ids, dtype=object)
    for s in reversed(sources):
        sym = gene_symbols(s.var)
        sym.index = sym.index.astype(str)
        common = ids.intersection(sym.index)
        symbols.loc[common] = sym.loc[common].values
    return pd.DataFrame({"gene_symbols": symbols.astype(str).values}, index=pd.Index(ids, name=None))


def check_source(source: Source, vocabulary: pd.Index, obs_keys: Sequence[str]) -> np.ndarray:
    """Validate one input's vocabulary and obs; return its gene map (input column -> store gene, -1 = dropped)."""
    for names, what in ((source.var.index, "var index has empty gene ids"), (source.obs.index, "obs index has empty "
                         "cell names")):  # fmt: skip
        empty = np.flatnonzero(pd.isna(names) | (pd.Index(names).astype(str).str.strip() == ""))
        if len(empty):
            raise InputError(f"{source.path}: {what} ({len(empty)}, the first at position {int(empty[0])})")
    var_ids = pd.Index(source.var.index.astype(str))
    if var_ids.has_duplicates:
        dups = list(var_ids[var_ids.duplicated()].unique()[:5])
        raise InputError(f"{source.path}: var index has duplicate gene ids, e.g. {dups}: gene ids must be unique")
    if pd.Index(source.obs.index).has_duplicates:
        dups = list(source.obs.index[source.obs.index.duplicated()][:5])
        raise InputError(f"{source.path}: obs index has duplicate cell names, e.g. {dups}: cell names must be unique")
    gene_map = vocabulary.get_indexer(var_ids)
    if (gene_map < 0).all():
        raise InputError(
            f"{source.path}: none of its {len(var_ids)} var ids (e.g. {list(var_ids[:3])}) is in the store vocabulary"
            f" (e.g. {list(vocabulary[:3])})"
        )
    for key in obs_keys:
        if key in ("dataset", "obs_name"):
            raise InputError(f"--obs {key}: this column is added by cellray itself; drop it from --obs")
    return gene_map.astype(np.int64)


def validate_counts(block: sp.csr_matrix, source: str, fld: str, row0: int, allow_non_integer: bool) -> None:
    data = block.data
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data)
        if bad.any():
            row = row0 + int(np.searchsorted(block.indptr, np.flatnonzero(bad)[0], side="right") - 1)
            raise InputError(f"{source}: field '{fld}' has NaN or inf (first at row {row}): counts must be finite")
    if data.size and data.min() < 0:
        row = row0 + int(np.searchsorted(block.indptr, np.flatnonzero(data < 0)[0], side="right") - 1)
        raise InputError(f"{source}: field '{fld}' has negative values (first at row {row}): counts must be >= 0")
    if not allow_non_integer and data.dtype.kind == "f":
        frac = data != np.floor(data)
        if frac.any():
            row = row0 + int(np.searchsorted(block.indptr, np.flatnonzero(frac)[0], side="right") - 1)
            raise InputError(
                f"{source}: field '{fld}' has non-integer values (first at row {row}, e.g. {data[frac][0]:g}): raw "
                "integer"
                " counts expected (choose a counts layer with --layer, or pass --allow-non-integer)"
            )
