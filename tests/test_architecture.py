"""The layering rules of the tree, checked on every module's imports (module level and inside functions).

- jobs -> engine -> models, never back up: models import neither engine nor jobs; engine never imports jobs.
- engine's stages in data-flow order: store, preprocess, loading, train, infer. A stage imports only itself and the
  stages before it; the root modules (errors, config, runtime, atomic, hashing, progress) import no stage.
- No module imports another package's private (underscore) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["store", "preprocess", "loading", "train", "infer"]
PACKAGES = ("engine", "models", "jobs", "bench")


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import in the source, at any depth."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def stage_of(module: str) -> int | None:
    """Index of an engine module's stage; -1 for engine's root modules; None outside engine."""
    parts = module.split(".")
    if parts[0] != "engine":
        return None
    if len(parts) > 1 and parts[1] in STAGES:
        return STAGES.index(parts[1])
    return -1


def violations(me: str, source: str) -> list[str]:
    """What breaks the rules in module `me` with this source."""
    top, my_stage = me.split(".")[0], stage_of(me)
    found = []
    for line, target, names in imports(source):
        where = f"{me}:{line}: imports {target}"
        target_top = target.split(".")[0]
        if top == "models" and target_top in ("engine", "jobs"):
            found.append(f"{where}: models/ is pure torch and imports neither engine nor jobs")
        if top == "engine" and target_top == "jobs":
            found.append(f"{where}: engine never imports jobs")
        target_stage = stage_of(target)
        if top == "engine" and target_stage is not None and me != "engine" and target_stage > my_stage:
            found.append(f"{where}: a stage imports only the stages before it ({' -> '.join(STAGES)})")
        if target_top in PACKAGES and target_top != top:
            private = [n for n in names if n.startswith("_")]
            if private:
                found.append(f"{where}: private name(s) {private} of another package")
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path):
    assert violations(module_name(path), path.read_text()) == []


def test_the_checker_catches_upward_imports():
    """The rules catch the imports the old layout had (engine.train importing jobs.spec, ingest importing the
    loader's chunk reader, bench using private names, ...)."""
    found = violations(
        "engine.store.ingest",
        "from engine.loading.chunks import StoreBlocks\nimport jobs.spec\nfrom models.base import _x\n",
    )
    assert any("engine never imports jobs" in v for v in found)
    assert any("stages before it" in v for v in found)
    assert any("private name" in v for v in found)
    assert any(
        "pure torch" in v for v in violations("models.vae", "def f():\n    from engine.train import checkpoint\n")
    )
    assert violations("engine.infer.embed", "from engine.train.checkpoint import load_checkpoint\n") == []


def test_no_engine_module_is_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "engine").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}
