"""Peer: annbatch's DatasetCollection.add_adatas (zarrs codec pipeline on). Run with the peers' Python >= 3.12.

Inputs are loaded with a custom load_adata, as annbatch's docs suggest: X, obs and var read into memory
(its default, anndata's read_lazy, and a lazily read X both fail in ad.concat on these files with "zero-
dimensional arrays cannot be concatenated"; annbatch holds up to dataset_size rows in memory anyway).
The source name is added as obs `dataset`, as cellray does.
"""

import json
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import pandas as pd
import zarr

warnings.filterwarnings("ignore")
zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
from annbatch import DatasetCollection  # noqa: E402


def load(path):
    f = h5py.File(path, "r")
    obs = ad.io.read_elem(f["obs"])
    obs["dataset"] = pd.Categorical([Path(path).stem] * len(obs))
    return ad.AnnData(X=ad.io.read_elem(f["X"]), obs=obs, var=ad.io.read_elem(f["var"]))


out, inputs = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
DatasetCollection(out).add_adatas(inputs, load_adata=load, shuffle=True)
print(json.dumps({"seconds": time.perf_counter() - t0}))
