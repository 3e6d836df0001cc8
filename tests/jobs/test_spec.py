"""Job specs: the example YAMLs validate; bad specs fail with the file and the field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.errors import SpecError
from jobs.spec import check_spec, load_spec, parse_spec

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def base(store: str = "data/demo.store") -> dict:
    return {
        "kind": "pretrain",
        "name": "t",
        "data": {"store": store, "batch_size": 32, "obs_keys": ["cell_type"]},
        "model": {"name": "vae", "config": {"n_latent": 4}},
        "train": {"max_steps": 5, "output": "runs/t"},
        "resources": {"workers": 2, "cpus_per_worker": 0.5},
    }


@pytest.mark.parametrize("name", ["pretrain_vae.yaml", "pretrain_transformer.yaml", "pretrain_transformer_binned.yaml"])
def test_example_specs_validate(name):
    spec = load_spec(JOBS / name)
    assert spec.kind == "pretrain" and spec.resources.workers == 2 and spec.data.store == "data/demo.store"
    assert spec.train.output.startswith("runs/")


def test_gpu_spec_is_the_gpu_preset_one_gpu_per_worker():
    """jobs/pretrain_transformer_gpu.yaml spells out TransformerConfig.gpu(): the two cannot drift apart."""
    import dataclasses

    from models.transformer import TransformerConfig

    spec = load_spec(JOBS / "pretrain_transformer_gpu.yaml")
    preset = dataclasses.asdict(TransformerConfig.gpu(input="rank"))
    assert {k: preset[k] for k in spec.model.config} == spec.model.config
    assert spec.resources.gpus_per_worker == 1 and spec.train.precision == "auto"


def edit(d: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[last] = value
    return d


@pytest.mark.parametrize(
    "path,value,message",
    [
        (
            "model.name",
            "gpt9",
            r"spec.yaml: model.name: unknown model 'gpt9': expected one of \['probe', 'transformer', 'vae'\]",
        ),
        ("model.config", {"n_latnet": 4}, r"spec.yaml: model: model 'vae' has no config field\(s\) \['n_latnet'\]"),
        ("model.config", {"likelihood": "poisson"}, r"spec.yaml: model: model 'vae': likelihood is 'poisson'"),
        ("data.batch_size", 0, r"spec.yaml: data.batch_size: Input should be greater than 0"),
        ("train.lr", "fast", r"spec.yaml: train.lr: Input should be a valid number"),
        ("train.max_stesp", 3, r"spec.yaml: train.max_stesp: Extra inputs are not permitted"),
        ("resources.workers", -1, r"spec.yaml: resources.workers: Input should be greater than or equal to 0"),
        ("kind", "inference", r"spec.yaml: kind: is 'inference', expected one of \[.*'pretrain'.*\]"),
    ],
)
def test_bad_fields_name_the_field_path(path, value, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(edit(base(), path, value), source="spec.yaml")


def write(tmp_path: Path, d: dict) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_missing_store_and_spec_file(tmp_path):
    with pytest.raises(
        SpecError, match=r"spec.yaml: data.store: no such store '.*nowhere.store' \(run `cellray ingest` first\)"
    ):
        check_spec(load_spec(write(tmp_path, base(str(tmp_path / "nowhere.store")))))
    with pytest.raises(SpecError, match="no such job spec"):
        load_spec(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("kind: [pretrain\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_unknown_transform_and_obs_key_against_a_real_store(tmp_path, tiny_store):
    d = base(str(tiny_store))
    d["data"]["transforms"] = ["log1p", "normalise_total"]
    with pytest.raises(SpecError, match=r"spec.yaml: data.transforms: .*unknown step 'normalise_total'"):
        check_spec(load_spec(write(tmp_path, d)))
    d = base(str(tiny_store))
    d["data"]["obs_keys"] = ["cell_type", "donor"]
    with pytest.raises(SpecError, match=r"data.obs_keys: the store has no obs column\(s\) \['donor'\]"):
        check_spec(load_spec(write(tmp_path, d)))
    d = base(str(tiny_store))
    d["model"]["config"]["batch_key"] = "batch"
    with pytest.raises(
        SpecError, match=r"model.config: the model reads obs column 'batch': list it in data.obs_keys too"
    ):
        check_spec(load_spec(write(tmp_path, d)))
    d["data"]["obs_keys"] = ["cell_type", "batch"]
    d["data"]["transforms"] = [{"normalize_total": {"target_sum": 1e4}}, "log1p"]
    spec = load_spec(write(tmp_path, d))
    check_spec(spec)
    assert spec.model.config["batch_key"] == "batch" and spec.source.endswith("spec.yaml")
