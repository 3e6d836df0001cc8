"""Highly variable genes from merged moments, as scanpy's `highly_variable_genes` selects them (seurat_v3 on
counts, seurat on log-normalized data, cell_ranger on normalized data; per batch when asked)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from engine.preprocess.moments import Moments

if TYPE_CHECKING:
    from engine.preprocess.stats import StatsConfig


def _mad(a: np.ndarray) -> float:
    """statsmodels.robust.mad: median absolute deviation / Phi^-1(3/4)."""
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return np.nan
    return float(np.median(np.abs(a - np.median(a))) / 0.6744897501960817)


def _hvg_dispersion(
    mean: np.ndarray, var: np.ndarray, flavor: str, n_bins: int, n_top: int, index: pd.Index
) -> pd.DataFrame:
    """scanpy's `_highly_variable_genes_single_batch` (seurat / cell_ranger) from per-gene mean and variance."""
    mean = mean.copy()
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        if flavor == "seurat":
            dispersion[dispersion == 0] = np.nan
            dispersion = np.log(dispersion)
            mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion}, index=index)
    if flavor == "seurat":
        bins: Any = n_bins
    else:
        bins = np.r_[-np.inf, np.percentile(mean, np.arange(10, 105, 5)), np.inf]
    df["mean_bin"] = pd.cut(df["means"], bins=bins)
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    if flavor == "seurat":
        st = grouped.agg(avg="mean", dev="std")
        one = st["dev"].isnull()
        st.loc[one, "dev"] = st.loc[one, "avg"]
        st.loc[one, "avg"] = 0
    else:
        st = grouped.agg(avg="median", dev=_mad)
    st = st.loc[df["mean_bin"]].set_index(df.index)
    df["dispersions_norm"] = (df["dispersions"] - st["avg"]) / st["dev"]
    dn = df["dispersions_norm"].to_numpy()
    x = dn[~np.isnan(dn)]
    n = min(n_top, len(df), x.size)
    cutoff = np.sort(x)[::-1][n - 1] if n > 0 else np.inf
    df["highly_variable"] = np.nan_to_num(dn, nan=-np.inf) >= cutoff
    return df.drop(columns="mean_bin")


def hvg_dispersion(mom: Moments, layer: int, nnz: np.ndarray, cfg: StatsConfig, index: pd.Index) -> pd.DataFrame:
    """seurat / cell_ranger HVG, batched as scanpy's `_highly_variable_genes_batched` when groups > 1."""
    var, means = mom.var(), mom.means()
    if cfg.batch_key is None:
        tot = mom.total()
        return _hvg_dispersion(tot.means()[layer, 0], tot.var()[layer, 0], cfg.flavor, cfg.n_bins, cfg.hvg, index)
    dfs = []
    for g in np.flatnonzero(mom.n > 0):
        expressed = nnz[g] > 0
        df = _hvg_dispersion(
            means[layer, g, expressed], var[layer, g, expressed], cfg.flavor, cfg.n_bins, cfg.hvg, index[expressed]
        )
        if (~expressed).any():
            missing = pd.DataFrame(
                np.zeros(((~expressed).sum(), len(df.columns))), columns=df.columns, index=index[~expressed]
            )
            missing["highly_variable"] = missing["highly_variable"].astype(bool)
            df = pd.concat([df, missing]).loc[index]
        dfs.append(df)
    df = pd.concat(dfs, axis=0)
    df["highly_variable"] = df["highly_variable"].astype(int)
    df = df.groupby(df.index, observed=True).agg(
        dict(means="mean", dispersions="mean", dispersions_norm="mean", highly_variable="sum")
    )
    df["highly_variable_nbatches"] = df["highly_variable"]
    df.sort_values(["highly_variable_nbatches", "dispersions_norm"], ascending=False, na_position="last", inplace=True)
    df["highly_variable"] = np.arange(df.shape[0]) < cfg.hvg
    return df.loc[index]


def _loess_reg_std(mean: np.ndarray, var: np.ndarray, span: float) -> np.ndarray:
    from skmisc.loess import loess

    not_const = var > 0
    est = np.zeros(len(mean), dtype=np.float64)
    model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
    model.fit()
    est[not_const] = model.outputs.fitted_values
    return np.sqrt(10**est)


def seurat_v3_clip(mom: Moments, cfg: StatsConfig, n_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """seurat_v3, before its second pass: per batch, a loess fit of log variance on log mean gives a regularized
    std; counts are clipped at mean + sqrt(n) * std. Returns (reg_std, clip_val), each (groups, genes)."""
    var, means = mom.var(), mom.means()
    reg_std = np.ones((len(mom.n), n_genes))
    clip_val = np.zeros((len(mom.n), n_genes))
    for g in np.flatnonzero(mom.n > 0):
        reg_std[g] = _loess_reg_std(means[0, g], var[0, g], cfg.span)
        clip_val[g] = reg_std[g] * np.sqrt(mom.n[g]) + means[0, g]
    return reg_std, clip_val


def seurat_v3_select(
    mom: Moments, reg_std: np.ndarray, sums: np.ndarray, sq: np.ndarray, cfg: StatsConfig, index: pd.Index
) -> pd.DataFrame:
    """seurat_v3, after its second pass: normalized variances from the clipped sums, ranks combined over batches
    (median rank, then number of batches) exactly as scanpy does."""
    means = mom.means()
    norm_vars = []
    for g in np.flatnonzero(mom.n > 0):
        n, m = float(mom.n[g]), means[0, g]
        norm_vars.append((1 / ((n - 1) * np.square(reg_std[g]))) * ((n * np.square(m)) + sq[g] - 2 * sums[g] * m))
    norm_vars = np.stack(norm_vars)
    ranked = np.argsort(np.argsort(-norm_vars, axis=1), axis=1).astype(np.float32)
    nbatches = np.sum((ranked < cfg.hvg).astype(int), axis=0)
    ranked[ranked >= cfg.hvg] = np.nan
    median_ranked = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    tot = mom.total()
    df = pd.DataFrame(index=index)
    df["means"] = tot.means()[0, 0]
    df["variances"] = tot.var()[0, 0]
    df["highly_variable_nbatches"] = nbatches
    df["highly_variable_rank"] = median_ranked
    df["variances_norm"] = np.mean(norm_vars, axis=0)
    order = (
        df[["highly_variable_rank", "highly_variable_nbatches"]]
        .sort_values(["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False], na_position="last")
        .index
    )
    df["highly_variable"] = False
    df.loc[order[: int(cfg.hvg)], "highly_variable"] = True
    if cfg.batch_key is None:
        df = df.drop(columns="highly_variable_nbatches")
    return df
