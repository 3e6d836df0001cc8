"""The store commands as a user runs them: `cellray ingest/info/verify/synth` through the real entry point."""

import json
import shutil

import anndata as ad
import pytest

from jobs.cli import main


def test_synth_ingest_info_verify(tmp_path, ray_local, capsys):
    h5ad = tmp_path / "synth.h5ad"
    assert main(["synth", "--out", str(h5ad), "--cells", "500", "--genes", "120", "--nnz-per-cell", "30"]) == 0
    assert ad.read_h5ad(h5ad).shape == (500, 120)
    store = tmp_path / "s.store"
    assert main(["ingest", str(h5ad), "--out", str(store), "--obs", "cell_type", "--shard-size", "200"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["info", str(store), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["n_cells"] == 500 and len(manifest["shards"]) == 3
    assert main(["info", str(store)]) == 0
    assert "cell_type" in capsys.readouterr().out
    assert main(["verify", str(store)]) == 0
    shutil.rmtree(store / "shards" / "00001" / "X" / "indices")
    assert main(["verify", str(store)]) == 1
    assert "shards/00001" in capsys.readouterr().err


def test_bad_input_exits_2_with_one_clear_line(tmp_path, ray_local, capsys):
    h5ad = tmp_path / "synth.h5ad"
    main(["synth", "--out", str(h5ad), "--cells", "50", "--genes", "20"])
    assert main(["ingest", str(h5ad), "--out", str(tmp_path / "x.store"), "--layer", "counts"]) == 2
    err = capsys.readouterr().err
    assert "synth.h5ad: field 'layers/counts' not found (layers present: [])" in err and "Traceback" not in err
    assert main(["info", str(tmp_path / "nothing.store")]) == 2
    assert main(["ingest", str(h5ad), "--out", str(tmp_path / "y.store"), "--shard-size", "lots"]) == 2
    assert "--shard-size 'lots': expected a positive cell count" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown option
        main(["ingest", str(h5ad), "--out", str(tmp_path / "y.store"), "--shard-sise", "10"])
