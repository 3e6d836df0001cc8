"""Peer: annbatch's DatasetCollection.add_adatas (zarrs codec pipeline on). Run with the peers' Python >= 3.12."""

import json
import sys
import time
import warnings

import zarr

warnings.filterwarnings("ignore")
zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
from annbatch import DatasetCollection  # noqa: E402

out, inputs = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
DatasetCollection(out).add_adatas(inputs, shuffle=True)
print(json.dumps({"seconds": time.perf_counter() - t0}))
