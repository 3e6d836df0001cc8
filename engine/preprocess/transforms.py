"""Declarative per-cell preprocessing, as written in job specs, compiled into the fewest fused kernel calls.

A spec is a list of steps, each a bare name or a one-key mapping ``{name: params}``::

    - normalize_total: {target_sum: 1.0e+4}   # null: the store's median library size (needs stats)
    - log1p
    - select_genes: hvg                       # or a list of gene ids, or {genes: [...]} / {file: genes.txt}
    - scale: {max_value: 10}                  # needs stats of the values at this point
    - densify
    - binning: {n_bins: 51}                   # scGPT value bins   } at most one tokeniser
    - rank_tokens: {max_len: 2048}            # Geneformer tokens  }
    - mask: {fraction: 0.15, seed: 0}

Value steps (select_genes, normalize_total, log1p, scale) run in one fused kernel over the batch; a tokeniser
and the mask are one kernel each. `pipeline(block, cell_index)` returns:
  X       float32 dense (cells, n_genes_out) when densify/scale/binning is in the spec, else a float32 CSRBlock
  values  binning: int64 bins (cells, n_genes_out); rank_tokens: float32 x / gene median (cells, max_len)
  genes   int64 gene tokens = output column + offset (offset 0: the model's vocabulary is the output columns and
          its special tokens come after it); rank_tokens pads with pad_id (-1)
  lengths rank_tokens: int64 number of real tokens per cell
  mask    bool, same shape as `genes` (or X): exactly int(length * fraction) positions per cell
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.errors import TransformError
from engine.preprocess import kernels
from engine.store.format import CSRBlock

if TYPE_CHECKING:
    from engine.preprocess.stats import GeneStats
    from engine.store.format import Store

log = logging.getLogger(__name__)


VALUE_STEPS = ("select_genes", "normalize_total", "log1p", "scale")
TOKENISERS = ("binning", "rank_tokens")
STEP_NAMES = VALUE_STEPS + ("densify",) + TOKENISERS + ("mask",)
# Parameters of each step and their defaults.
DEFAULTS: dict[str, dict[str, Any]] = {
    "select_genes": {"genes": None, "file": None, "hvg": False},
    "normalize_total": {"target_sum": 1e4},
    "log1p": {},
    "scale": {"max_value": None, "zero_center": True},
    "densify": {},
    "binning": {"n_bins": 51, "offset": 0},
    "rank_tokens": {"max_len": 2048, "offset": 0, "pad_id": -1},
    "mask": {"fraction": 0.15, "seed": 0},
}


@dataclass(frozen=True)
class Step:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


def parse_spec(spec: list) -> list[Step]:
    """YAML-shaped spec -> steps with defaults filled in; unknown names and parameters are errors."""
    if not isinstance(spec, (list, tuple)):
        raise TransformError(f"transform spec: expected a list of steps, got {type(spec).__name__}")
    steps = []
    for pos, item in enumerate(spec):
        where = f"transform spec step {pos + 1}"
        if isinstance(item, str):
            name, raw = item, None
        elif isinstance(item, dict) and len(item) == 1:
            ((name, raw),) = item.items()
        else:
            raise TransformError(f"{where}: expected a step name or a one-key mapping {{name: params}}, got {item!r}")
        if name not in DEFAULTS:
            raise TransformError(f"{where}: unknown step {name!r}; known steps: {', '.join(STEP_NAMES)}")
        if name == "select_genes" and not isinstance(raw, dict):  # shorthand: `hvg` or a list of gene ids
            if raw == "hvg":
                raw = {"hvg": True}
            elif isinstance(raw, (list, tuple)):
                raw = {"genes": list(raw)}
            else:
                raise TransformError(
                    f"{where}: select_genes expects 'hvg', a list of gene ids, {{genes: [...]}} or {{file: PATH}}, "
                    f"got {raw!r}"
                )
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise TransformError(f"{where}: parameters of {name!r} must be a mapping, got {raw!r}")
        unknown = set(raw) - set(DEFAULTS[name])
        if unknown:
            raise TransformError(
                f"{where}: {name!r} has no parameter(s) {sorted(unknown)}; it takes {sorted(DEFAULTS[name]) or 'none'}"
            )
        steps.append(Step(name, {**DEFAULTS[name], **raw}))
    _check_order(steps)
    return steps


def _check_order(steps: list[Step]) -> None:
    names = [s.name for s in steps]
    for n in set(names):
        if names.count(n) > 1:
            raise TransformError(f"transform spec: step {n!r} appears {names.count(n)} times; at most once")
    pos = {n: i for i, n in enumerate(names)}

    def before(a: str, b: str, why: str) -> None:
        if a in pos and b in pos and pos[a] > pos[b]:
            raise TransformError(
                f"transform spec: bad order, {a!r} (step {pos[a] + 1}) must come before {b!r} (step {pos[b] + 1}): "
                f"{why}"
            )

    before("normalize_total", "log1p", "normalize counts, then take the log")
    for v in VALUE_STEPS:
        if v != "scale":
            before(v, "scale", "scale standardises the final values")
        for later in ("densify",) + TOKENISERS + ("mask",):
            before(v, later, "value steps come first")
    for t in TOKENISERS:
        before("densify", t, "densify precedes tokenising")
        before(t, "mask", "mask the tokens")
    before("densify", "mask", "mask the dense values")
    if "binning" in pos and "rank_tokens" in pos:
        raise TransformError("transform spec: 'binning' and 'rank_tokens' are two tokenisers; use one")
    if "binning" in pos and "scale" in pos:
        raise TransformError("transform spec: 'binning' needs non-negative values; remove 'scale'")
    for bad in ("log1p", "scale", "densify"):
        if "rank_tokens" in pos and bad in pos:
            raise TransformError(f"transform spec: 'rank_tokens' ranks normalized counts (Geneformer); remove {bad!r}")
    if "mask" in pos and not ({"densify", "scale"} | set(TOKENISERS)) & set(pos):
        raise TransformError(
            "transform spec: 'mask' needs dense values or tokens: add 'densify' or a tokeniser before it"
        )
    for s in steps:
        if s.name == "normalize_total":
            t = s.params["target_sum"]
            if t is not None and not (isinstance(t, (int, float)) and t > 0):
                raise TransformError(
                    "transform spec: normalize_total.target_sum must be > 0 (or null for the median library size), "
                    f"got {t!r}"
                )
        if s.name == "binning" and not (isinstance(s.params["n_bins"], int) and s.params["n_bins"] >= 3):
            raise TransformError(f"transform spec: binning.n_bins must be an integer >= 3, got {s.params['n_bins']!r}")
        if s.name == "rank_tokens" and not (isinstance(s.params["max_len"], int) and s.params["max_len"] >= 1):
            raise TransformError(
                f"transform spec: rank_tokens.max_len must be a positive integer, got {s.params['max_len']!r}"
            )
        if s.name == "mask" and not 0.0 <= float(s.params["fraction"]) <= 1.0:
            raise TransformError(f"transform spec: mask.fraction must be in [0, 1], got {s.params['fraction']!r}")
        if s.name == "scale":
            mv = s.params["max_value"]
            if mv is not None and not (isinstance(mv, (int, float)) and mv > 0):
                raise TransformError(f"transform spec: scale.max_value must be > 0 or null, got {mv!r}")


def _need_stats(store: Store | None, why: str) -> GeneStats:
    if store is None:
        raise TransformError(f"transform spec: {why} needs the store's statistics; build the pipeline with a store")
    from engine.preprocess.stats import load_stats

    stats = load_stats(store, required=False)
    if stats is None:
        raise TransformError(
            f"{store.path}: {why} needs gene statistics, and the store has none: run `cellray stats {store.path}` first"
        )
    return stats


class Pipeline:
    """A validated transform spec, bound to a store's vocabulary and statistics; call it on CSR batches."""

    def __init__(self, steps: list[Step], store: Store | None = None):
        self.steps = steps
        names = {s.name: s for s in steps}
        self._n_in = store.n_genes if store is not None else None
        self._where = str(store.path) if store is not None else "batch"

        # gene selection: store gene -> output column
        self.gene_map: np.ndarray | None = None
        self._n_out: int | None = self._n_in
        self._sort_rows = False
        if "select_genes" in names:
            self.gene_map, self._n_out = self._gene_map(names["select_genes"].params, store)
            kept = np.flatnonzero(self.gene_map >= 0)
            self._sort_rows = bool(np.any(np.diff(self.gene_map[kept]) < 0))
        order = [s.name for s in steps]
        self._lib_selected = (
            "select_genes" in names
            and "normalize_total" in names
            and order.index("select_genes") < order.index("normalize_total")
        )

        self.do_norm = "normalize_total" in names
        self.target = 1.0
        if self.do_norm:
            t = names["normalize_total"].params["target_sum"]
            if t is None:
                t = _need_stats(store, "normalize_total with target_sum null (median library size)").library_median
            self.target = float(np.float32(t))  # scanpy divides float32 by a float32 target
        self.do_log = "log1p" in names

        self.do_scale = "scale" in names
        self.mean = self.std = np.zeros(0)
        self.max_value = 0.0
        self.zero_center = True
        if self.do_scale:
            p = names["scale"].params
            self.max_value = float(p["max_value"] or 0.0)
            self.zero_center = bool(p["zero_center"])
            self.mean, self.std = self._scale_moments(store, order, names)

        self.dense = bool({"densify", "scale", "binning"} & set(names))
        self.binning = names.get("binning")
        self.rank = names.get("rank_tokens")
        self.medians = None
        if self.rank is not None:
            med = _need_stats(store, "rank_tokens (per-gene medians)").median
            self.medians = self._to_out_order(med)
        self.mask = names.get("mask")

    @classmethod
    def from_spec(cls, spec: list, store: Store | None = None) -> Pipeline:
        return cls(parse_spec(spec), store)

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(s.name for s in self.steps)}], n_genes_out={self._n_out})"

    @property
    def bound(self) -> bool:
        """Built with a store: its vocabulary, hence its output width, is known."""
        return self._n_out is not None

    @property
    def n_genes_out(self) -> int:
        if self._n_out is None:
            raise TransformError("pipeline built without a store: n_genes_out is known after the first batch")
        return self._n_out

    def bytes_per_cell(self, n_genes: int, nnz_per_cell: float, dense_x: bool = False) -> float:
        """About how many bytes one cell's outputs take, for input cells of `n_genes` genes (the output's width until
        a pipeline built without a store has seen a batch) and `nnz_per_cell` non-zeros: X (dense float32 when the
        spec or `dense_x` densifies it, else CSR of float32 values and their indices) and the token arrays of
        binning (int64 bins and genes a column) or rank_tokens (int64 genes, float32 values), and mask."""
        width = self._n_out if self.bound else n_genes
        x = 4.0 * width if self.dense or dense_x else 8.0 + 8.0 * nnz_per_cell
        if self.binning is not None:
            x += 16.0 * width
        elif self.rank is not None:
            width = int(self.rank.params["max_len"])
            x += 12.0 * width + 8.0
        return x + (width if self.mask is not None else 0.0)

    def selected_genes(self, gene_ids: Sequence[str]) -> list[str] | None:
        """The ids of the output columns, in column order, when the pipeline selects genes (select_genes) of the
        store whose vocabulary is `gene_ids`; None without a selection, or when a listed gene is not in the store
        (its column has no id)."""
        if self.gene_map is None or len(self.gene_map) != len(gene_ids):
            return None
        kept = np.flatnonzero(self.gene_map >= 0)
        if len(kept) != self.n_genes_out:
            return None
        out = [""] * self.n_genes_out
        for g in kept:
            out[self.gene_map[g]] = str(gene_ids[g])
        return out

    # -- binding to the store

    def _gene_map(self, p: dict[str, Any], store: Store | None) -> tuple[np.ndarray, int]:
        """(store gene -> output column or -1, number of output columns)."""
        if store is None:
            raise TransformError(
                "transform spec: select_genes needs the store's gene vocabulary; build the pipeline with a store"
            )
        vocab = store.gene_ids
        if p["hvg"]:
            hv = _need_stats(store, "select_genes: hvg").highly_variable
            if hv is None:
                raise TransformError(
                    f"{store.path}: select_genes: hvg, but the statistics hold no highly variable genes: run "
                    f"`cellray stats {store.path} --hvg N`"
                )
            keep = np.flatnonzero(hv)
            gmap = np.full(len(vocab), -1, dtype=np.int64)
            gmap[keep] = np.arange(len(keep))
            return gmap, len(keep)
        if p["file"] is not None:
            path = Path(p["file"])
            if not path.exists():
                raise TransformError(f"select_genes.file: {path}: no such file (expected one gene id per line)")
            genes = [g.strip() for g in path.read_text().splitlines() if g.strip()]
            where = f"select_genes.file {path}"
        elif p["genes"] is not None:
            genes = [str(g) for g in p["genes"]]
            where = "select_genes.genes"
        else:
            raise TransformError("transform spec: select_genes needs 'hvg', 'genes' or 'file'")
        if len(set(genes)) != len(genes):
            raise TransformError(f"{where}: the gene list has duplicates; each model gene must appear once")
        pos = vocab.get_indexer(genes)
        missing = int((pos < 0).sum())
        if missing == len(genes):
            raise TransformError(
                f"{where}: none of the {len(genes)} genes is in the vocabulary of {store.path} (e.g. {genes[:3]})"
            )
        if missing:
            log.warning(
                "%s: %d of %d genes are not in the vocabulary of %s; they stay zero",
                where,
                missing,
                len(genes),
                store.path,
            )
        gmap = np.full(len(vocab), -1, dtype=np.int64)
        gmap[pos[pos >= 0]] = np.flatnonzero(pos >= 0)
        return gmap, len(genes)

    def _to_out_order(self, per_store_gene: np.ndarray) -> np.ndarray:
        """A per-store-gene array reindexed to output columns (genes the store lacks get 0)."""
        if self.gene_map is None:
            return np.ascontiguousarray(per_store_gene, dtype=np.float64)
        out = np.zeros(self.n_genes_out, dtype=np.float64)
        kept = self.gene_map >= 0
        out[self.gene_map[kept]] = per_store_gene[kept]
        return out

    def _scale_moments(
        self, store: Store | None, order: list[str], names: dict[str, Step]
    ) -> tuple[np.ndarray, np.ndarray]:
        stats = _need_stats(store, "scale (gene means and variances)")
        before = [n for n in order[: order.index("scale")] if n != "select_genes"]
        if self._lib_selected:
            raise TransformError(
                "transform spec: scale after select_genes -> normalize_total needs statistics of that normalization, "
                "which `cellray stats` does not compute; put select_genes after normalize_total"
            )
        if before == []:
            layer = "counts"
        elif before in (["normalize_total"], ["normalize_total", "log1p"]):
            if float(np.float32(stats.target_sum)) != self.target:
                raise TransformError(
                    f"{stats.where}: statistics were computed with target_sum {stats.target_sum}, the spec "
                    f"normalizes to {self.target}: run `cellray stats --target-sum {self.target:g}`"
                )
            layer = "norm" if before == ["normalize_total"] else "lognorm"
        else:
            raise TransformError(
                f"transform spec: scale after {before} has no matching statistics (counts, normalized, or "
                "log-normalized)"
            )
        mean, var = stats.moments(layer)
        std = np.sqrt(var)
        std[std == 0] = 1.0
        mean, std = self._to_out_order(mean), self._to_out_order(std)
        std[std == 0] = 1.0  # genes the store lacks
        return mean, std

    # -- running

    def __call__(
        self, block: CSRBlock, cell_index: np.ndarray, out: np.ndarray | None = None
    ) -> dict[str, np.ndarray | CSRBlock]:
        """Transform one batch. `out`: an optional reusable float32 (n_cells, n_genes_out) buffer for the dense X
        (saves the page faults of a fresh array; the caller must not still hold the previous batch in it)."""
        if self._n_in is None:
            self._n_in = self._n_out = block.n_genes
        if block.n_genes != self._n_in:
            raise TransformError(
                f"{self._where}: batch has {block.n_genes} genes, the pipeline was built for {self._n_in}"
            )
        cell_index = np.asarray(cell_index, dtype=np.int64)
        if len(cell_index) != block.n_cells:
            raise TransformError(f"{self._where}: cell_index has {len(cell_index)} entries for {block.n_cells} cells")
        if self.do_log and block.data.dtype.kind in "fi" and kernels.any_negative(block.data):
            raise TransformError(
                f"{self._where}: log1p on a batch with negative values (cells {cell_index[0]}..{cell_index[-1]}): "
                "counts must be >= 0"
            )
        has_map = self.gene_map is not None
        gmap = self.gene_map if has_map else np.zeros(1, dtype=np.int64)
        n = block.n_cells
        res: dict[str, Any] = {}
        if self.dense:
            fresh = out is None
            if fresh:
                X = np.zeros(
                    (n, self.n_genes_out), dtype=np.float32
                )  # fresh zero pages: the kernel skips clearing rows
            elif out.shape != (n, self.n_genes_out) or out.dtype != np.float32 or not out.flags.c_contiguous:
                raise TransformError(
                    f"out buffer: expected C-contiguous float32 {(n, self.n_genes_out)}, got {out.dtype} {out.shape}"
                )
            else:
                X = out
            kernels.transform_dense(
                block.indptr, block.indices, block.data, gmap, has_map, self._lib_selected, self.do_norm, self.target,
                self.do_log, self.do_scale, self.mean, self.std, self.max_value, self.zero_center, X, fresh,
            )  # fmt: skip
            res["X"] = X
        else:
            if has_map:
                counts = kernels.kept_per_row(block.indptr, block.indices, gmap, np.empty(n, dtype=np.int64))
                indptr = np.zeros(n + 1, dtype=np.int64)
                np.cumsum(counts, out=indptr[1:])
            else:
                indptr = np.asarray(block.indptr, dtype=np.int64)
            nnz = int(indptr[-1])
            idx_dtype = np.uint16 if self.n_genes_out <= 1 << 16 else np.uint32
            indices = np.empty(nnz, dtype=idx_dtype)
            data = np.empty(nnz, dtype=np.float32)
            kernels.transform_csr(
                block.indptr, block.indices, block.data, gmap, has_map, self._sort_rows, self._lib_selected,
                self.do_norm, self.target, self.do_log, indptr, indices, data,
            )  # fmt: skip
            res["X"] = CSRBlock(indptr=indptr, indices=indices, data=data, n_genes=self.n_genes_out)
        if self.binning is not None:
            p = self.binning.params
            res["values"] = kernels.bin_values(res["X"], int(p["n_bins"]), np.empty(res["X"].shape, dtype=np.int64))
            res["genes"] = np.broadcast_to(
                np.arange(self.n_genes_out, dtype=np.int64) + int(p["offset"]), res["values"].shape
            ).copy()
            lengths = np.full(n, self.n_genes_out, dtype=np.int64)
        elif self.rank is not None:
            p = self.rank.params
            L = int(p["max_len"])
            x = res["X"]
            genes = np.empty((n, L), dtype=np.int64)
            values = np.empty((n, L), dtype=np.float32)
            lengths = np.empty(n, dtype=np.int64)
            kernels.rank_tokens(
                x.indptr, x.indices, x.data, self.medians, L, int(p["offset"]), int(p["pad_id"]), genes, values, lengths
            )
            res.update(genes=genes, values=values, lengths=lengths)
        else:
            lengths = np.full(n, self.n_genes_out, dtype=np.int64)
        if self.mask is not None:
            width = res["genes"].shape[1] if "genes" in res else self.n_genes_out
            p = self.mask.params
            res["mask"] = kernels.random_mask(
                cell_index, lengths, float(p["fraction"]), int(p["seed"]), np.empty((n, width), dtype=np.bool_)
            )
        return res
