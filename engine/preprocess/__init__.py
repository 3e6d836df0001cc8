"""Stage 2, preprocessing: per-cell numba kernels (kernels.py) behind transform pipelines (transforms.py) that the
loader runs, and the offline corpus statistics (stats.py with moments.py, hvg.py, stats_kernels.py)."""
