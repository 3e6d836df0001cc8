"""`cellray evaluate`: scIB metrics (scib-metrics' Benchmarker) and 5-fold kNN label transfer of an embed output,
beside HVG-PCA-50 of the same cells' counts read from the store the output records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.infer.config import EvalConfig
from engine.infer.evaluate import BASELINE, KNN, MODEL, evaluate_embedding, pca_baseline, read_sample, sample_counts
from engine.infer.predict import OBSM_KEY
from jobs.cli import main

SCIB = ["Isolated labels", "KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI", "Bio conservation"]
SCIB_BATCH = ["BRAS", "iLISI", "KBET", "Graph connectivity", "PCR comparison", "Batch correction", "Total"]


def _output(path: Path, reference_output: Path, emb: np.ndarray, store: Path | None, names=None) -> Path:
    """An embedding in cellray embed's output layout (obs of the store, obsm X_cellray, uns cellray.store)."""
    import anndata as ad

    ref = ad.read_zarr(reference_output)
    obs = ref.obs.copy()
    if names is not None:
        obs.index = names
    uns = {"cellray": {"store": str(store)}} if store is not None else {}
    ad.AnnData(obs=obs, obsm={OBSM_KEY: emb.astype(np.float32)}, uns=uns).write_h5ad(path)
    return path


def test_cli_table_and_json_hold_scib_metrics_beside_pca(reference_output, tmp_path, capsys):
    report_file = tmp_path / "eval.json"
    args = ["evaluate", str(reference_output), "--label-key", "cell_type", "--batch-key", "batch"]
    assert main([*args, "--json", str(report_file)]) == 0
    printed = capsys.readouterr().out
    for name in [*SCIB, *SCIB_BATCH, KNN, "ratio", "HVG-PCA-50"]:
        assert name in printed
    r = json.loads(report_file.read_text())
    # the third input has no batch column: its 333 cells are left out, the others scored
    assert r["cells_left_out"] == 333 and r["cells"] == r["cells_in_output"] - 333 and r["batches"] == 2
    assert r["labels"] == 5 and r["baseline"] == "HVG-PCA-50" and r["batch_correction"] == "scored"
    for emb in (MODEL, BASELINE):
        scores = r["scores"][emb]
        for name in [*SCIB, *SCIB_BATCH, KNN]:
            if name == "KMeans ARI":
                assert -0.5 <= scores[name] <= 1, (emb, name)  # ARI is chance-adjusted: it may dip below 0
            else:
                assert 0 <= scores[name] <= 1, (emb, name, scores[name])
        assert scores["Total"] == pytest.approx(0.6 * scores["Bio conservation"] + 0.4 * scores["Batch correction"])
    assert r["scores"][BASELINE]["PCR comparison"] == 0  # the baseline is the unintegrated reference itself
    h = r["headline"]
    assert h["scib_is"] == "Total" and h["knn"] == r["scores"][MODEL][KNN]
    assert h["knn_vs_baseline"] == pytest.approx(r["scores"][MODEL][KNN] / r["scores"][BASELINE][KNN])
    # --baseline none: the embedding alone, the same scores (no counts read)
    assert main([*args, "--baseline", "none", "--json", str(report_file)]) == 0
    assert "ratio" not in capsys.readouterr().out
    alone = json.loads(report_file.read_text())
    assert alone["baseline"] is None and list(alone["scores"]) == [MODEL] and alone["ratios"] is None
    assert alone["scores"][MODEL][KNN] == r["scores"][MODEL][KNN]
    assert alone["scores"][MODEL]["Silhouette label"] == pytest.approx(r["scores"][MODEL]["Silhouette label"])


def test_pca_itself_scores_1x_and_a_random_embedding_scores_below(reference_output, tiny_store, tmp_path):
    config = EvalConfig(label_key="cell_type", batch_key="batch")
    s = read_sample(reference_output, "cell_type", "batch")  # the cells evaluate_embedding will score
    pca = pca_baseline(sample_counts(tiny_store, s, "test"))
    emb = np.zeros((s.n_obs, pca.shape[1]), dtype=np.float32)
    emb[s.rows] = pca  # the cells without a batch are left out: their rows stay 0
    # no store recorded in the output: the store argument (--store) names it
    same = evaluate_embedding(_output(tmp_path / "pca.h5ad", reference_output, emb, None), config, store=tiny_store)
    assert set(SCIB) | set(SCIB_BATCH) | {KNN} <= set(same["ratios"])
    for metric, ratio in same["ratios"].items():
        assert ratio == pytest.approx(1.0, abs=1e-6) or (metric == "PCR comparison" and ratio is None), metric
    emb[s.rows] = np.random.default_rng(0).normal(size=pca.shape)
    rand = evaluate_embedding(_output(tmp_path / "rand.h5ad", reference_output, emb, tiny_store), config)
    assert rand["scores"][BASELINE][KNN] > 0.6  # the synthetic cell types are separable from counts
    assert rand["ratios"][KNN] < 0.6 and rand["headline"]["scib_vs_baseline"] < 0.9
    # without a batch key, batch correction (and scIB's total) is absent, not faked
    alone = evaluate_embedding(tmp_path / "rand.h5ad", config.model_copy(update={"batch_key": None, "max_cells": 1150}))
    assert alone["batch_correction"] == "absent: no --batch-key" and alone["headline"]["scib_is"] == "Bio conservation"
    assert "Batch correction" not in alone["scores"][MODEL] and "Total" not in alone["scores"][BASELINE]
    assert set(SCIB) <= set(alone["scores"][MODEL]) and alone["cells"] == 1150


def test_kbet_diffusion_maps_start_from_a_fixed_vector_while_scib_runs():
    """ARPACK's default start vector changes with every call in a process: the same embedding scored twice got two
    kBETs (0.999x against itself in one CI run). Inside the scoring context every eigsh call starts alike."""
    import scipy.sparse
    import scipy.sparse.linalg

    from engine.infer.evaluate import _reproducible_scib

    a = scipy.sparse.random(400, 400, density=0.03, random_state=1)
    a = (a + a.T).tocsr()
    unseeded = [scipy.sparse.linalg.eigsh(a, k=20)[1] for _ in range(2)]
    assert not np.array_equal(unseeded[0], unseeded[1])  # what the scores inherited before
    with _reproducible_scib():
        seeded = [scipy.sparse.linalg.eigsh(a, k=20)[1] for _ in range(2)]
    assert np.array_equal(seeded[0], seeded[1])
    assert scipy.sparse.linalg.eigsh.__module__.startswith("scipy")  # put back afterwards


def test_bad_inputs_are_one_line_exit_2(reference_output, tiny_store, tmp_path, capsys):
    s = read_sample(reference_output, "cell_type")
    shuffled = np.random.default_rng(1).permutation(s.names)
    foreign = _output(tmp_path / "foreign.h5ad", reference_output, s.emb, tiny_store, names=shuffled)
    unrecorded = _output(tmp_path / "unrecorded.h5ad", reference_output, s.emb, None)
    cases = [
        (["--label-key", "tissue"], "--label-key 'tissue': not an obs column of"),
        (["--label-key", "cell_type", "--batch-key", "lane"], "--batch-key 'lane': not an obs column of"),
        (["--label-key", "cell_type", "--max-cells", "20"], "20 cells with a 'cell_type' label in"),
    ]
    for extra, message in cases:
        assert main(["evaluate", str(reference_output), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    others = [
        ([str(tmp_path / "nothing.zarr")], "no such embedding output"),
        ([str(foreign)], "its cells are not those of the store"),
        ([str(unrecorded)], "records no store it was embedded from: pass it as --store"),
    ]
    for target, message in others:
        assert main(["evaluate", *target, "--label-key", "cell_type"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_embed_spec_evaluate_section_writes_json_and_gauges(vae_checkpoint, tiny_store, ray_local, tmp_path, capsys):
    import time
    import urllib.request

    import yaml

    from jobs.spec import load_spec

    out = tmp_path / "emb.zarr"
    spec = tmp_path / "embed.yaml"
    body = {"kind": "embed", "name": "eval-embed", "checkpoint": str(vae_checkpoint), "store": str(tiny_store),
            "out": str(out), "evaluate": {"label_key": "cell_type", "batch_key": "batch"}}  # fmt: skip
    spec.write_text(yaml.safe_dump(body))
    assert load_spec(spec).evaluate == EvalConfig(label_key="cell_type", batch_key="batch")
    assert main(["run", str(spec), "--json"]) == 0
    e = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["evaluation"]
    report = json.loads((tmp_path / "emb.eval.json").read_text())  # beside the output
    assert e["report"] == str(tmp_path / "emb.eval.json") and e["scib_is"] == "Total"
    assert e["scib"] == report["scores"][MODEL]["Total"] and e["knn"] == report["scores"][MODEL][KNN]
    assert e["knn_vs_baseline"] == pytest.approx(report["scores"][MODEL][KNN] / report["scores"][BASELINE][KNN])
    # the headline on Ray's metrics endpoint (the dashboard's source), tagged with the job
    port = ray_local.nodes()[0]["MetricsExportPort"]
    want = "ray_cellray_eval_knn_accuracy{"
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        lines = [ln for ln in text.splitlines() if ln.startswith(want) and 'job="eval-embed"' in ln]
        if lines:
            assert float(lines[0].rsplit(" ", 1)[1]) == pytest.approx(e["knn"])
            break
        time.sleep(1)
    else:
        raise AssertionError("no cellray_eval_knn_accuracy{job=eval-embed} on the metrics endpoint")
    # a label key the store lacks fails before anything is embedded, in one line
    spec.write_text(yaml.safe_dump({**body, "out": str(tmp_path / "x.zarr"), "evaluate": {"label_key": "tissue"}}))
    assert main(["run", str(spec)]) == 2
    assert "evaluate.label_key: 'tissue' is not an obs column of" in capsys.readouterr().err
    assert not (tmp_path / "x.zarr").exists()
