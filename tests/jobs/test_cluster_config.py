"""cluster.yaml: the shipped config passes Ray's own offline validation and cellray's rules; broken ones are refused,
one line per problem."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from jobs.cluster.launcher import capacity_of, check_cluster_yaml

SHIPPED = Path(__file__).resolve().parents[2] / "cluster.yaml"


def shipped() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def test_shipped_cluster_yaml_validates(capsys):
    assert check_cluster_yaml(SHIPPED) == []
    assert main(["cluster", "check", str(SHIPPED)]) == 0
    assert "ok" in capsys.readouterr().out


def test_capacity_of_the_largest_cluster():
    cap = capacity_of(SHIPPED)  # head + every worker type at max_workers, within max_workers: 12
    assert cap["GPU"] == 4 * 4 + 4 * 1 and cap["CPU"] == 8 + 4 * 48 + 4 * 4 + 4 * 32


def _break(edit) -> dict:
    config = copy.deepcopy(shipped())
    edit(config)
    return config


def _replace_in(key: str, old: str, new: str):
    def edit(c):
        c[key] = [cmd.replace(old, new) for cmd in c[key]]

    return edit


BROKEN = {
    "fractional GPU": (
        lambda c: c["available_node_types"]["gpu_1x"]["resources"].update(GPU=0.5),
        "Ray's cluster schema",
    ),
    "unknown key": (lambda c: c.update(max_wrokers=3), "Additional properties are not allowed"),
    "head type missing": (lambda c: c.update(head_node_type="nope"), "head_node_type"),
    "no GPU worker": (lambda c: [c["available_node_types"].pop(k) for k in ("gpu_1x", "gpu_4x")], "no GPU worker type"),
    "GPU head": (lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1), "should be a CPU node"),
    "dashboard on all addresses": (
        _replace_in("head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
        "--dashboard-host=0.0.0.0",
    ),
    "no dashboard host": (
        _replace_in("head_start_ray_commands", "--dashboard-host=127.0.0.1", ""),
        "needs --dashboard-host=127.0.0.1",
    ),
    "token auth off": (
        _replace_in("worker_start_ray_commands", "export RAY_AUTH_MODE=token;", ""),
        "worker_start_ray_commands: token auth is off",
    ),
    "token not shipped": (lambda c: c["file_mounts"].pop("~/.ray/auth_token"), "no token for the nodes"),
    "cellray not installed": (lambda c: c.update(setup_commands=c["setup_commands"][:1]), "cellray is not installed"),
    "state on the head's disk": (
        _replace_in("head_start_ray_commands", "/mnt/shared/cellray", "/tmp/cellray"),
        "--state-dir /tmp/cellray is on the head's own disk",
    ),
    "no scheduler": (
        lambda c: c.update(head_start_ray_commands=c["head_start_ray_commands"][:2]),
        "the scheduler is not started",
    ),
    "min_workers: two": (
        lambda c: c["available_node_types"]["gpu_1x"].update(min_workers="two"),
        "available_node_types.gpu_1x.min_workers: 'two' is not a count",
    ),
    "max_workers: -1": (lambda c: c["available_node_types"]["gpu_4x"].update(max_workers=-1), "gpu_4x.max_workers"),
    "no node types": (lambda c: c.pop("available_node_types"), "available_node_types: missing"),
    "no head type": (lambda c: c.pop("head_node_type"), "head_node_type: missing"),
    "min above max": (lambda c: c["available_node_types"]["gpu_1x"].update(min_workers=5), "min_workers"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_variants_are_refused(name, tmp_path, capsys):
    edit, expected = BROKEN[name]
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(_break(edit)))
    problems = check_cluster_yaml(path)
    assert problems and any(expected in p for p in problems), problems
    assert all(p.startswith(f"{path}: ") and "\n" not in p for p in problems)
    assert main(["cluster", "check", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == problems


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("a: [1, 2\n")
    assert "not valid YAML" in check_cluster_yaml(bad)[0]
    assert check_cluster_yaml(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file"]


def test_grafana_dashboard_charts_exactly_the_cellray_series():
    """Every cellray_* metric the code records is charted, and every charted series is one the code records."""
    import json
    import re

    root = SHIPPED.parent
    dash = json.loads((root / "jobs" / "grafana" / "cellray.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    charted = {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in re.findall(r"ray_(cellray_\w+)", exprs)}
    source = " ".join(p.read_text() for d in ("jobs", "engine") for p in (root / d).rglob("*.py"))
    recorded = set(re.findall(r"""["'](cellray_\w+)["'],\s*["']""", source))  # ("name", "description"...
    assert recorded and charted == recorded, (charted - recorded, recorded - charted)
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"] if p["type"] != "row")


def test_bucket_variant_validates_and_keeps_its_queue_in_the_bucket():
    """jobs/cluster/bucket.yaml: no shared filesystem; the scheduler's state dir is a bucket prefix."""
    variant = SHIPPED.parent / "jobs" / "cluster" / "bucket.yaml"
    assert check_cluster_yaml(variant) == []
    text = variant.read_text()
    assert "--state-dir s3://" in text and "/mnt/shared" not in text and "nfs" not in text
