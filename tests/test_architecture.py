"""The layering rules of the tree, checked on every module's imports (module level and inside functions).

- jobs -> engine -> models, never back up: models import neither engine nor jobs; engine never imports jobs.
- engine's stages in data-flow order: store, preprocess, loading, train, infer. A stage imports only itself and the
  stages before it; the root modules (errors, config, runtime, atomic, hashing, progress) import no stage.
- No module imports another package's private (underscore) names, nor reads a private attribute (`x._name`) of an
  object it did not define: an attribute a module neither assigns nor defines belongs to someone else's class.
- The jobs wing's modules import one another without cycles (no module of jobs/ imports one that imports it back).
- No function in engine/ or jobs/ is over 100 lines; no engine module over 500.
"""

from __future__ import annotations

import ast
import functools
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


# ------------------------------------------------------------------------------------------------ private attributes


def private_attribute_reads(source: str) -> list[tuple[int, str]]:
    """(line, `x._name`) for each read of a private attribute that this module does not own: not on self/cls, not a
    name the module defines or assigns anywhere (its own classes' attributes), not on a third-party module."""
    tree = ast.parse(source)
    own: set[str] = set()
    third_party: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.Import):
            third_party |= {
                (a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] not in PACKAGES
            }
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] not in PACKAGES:
            third_party |= {a.asname or a.name for a in node.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, (ast.Attribute, ast.Subscript, ast.Call)):
                base = base.func if isinstance(base, ast.Call) else base.value
            name = base.id if isinstance(base, ast.Name) else None
            if name in ("self", "cls") or name in third_party or node.attr in own:
                continue
            found.append((node.lineno, f"{name or '...'}.{node.attr}"))
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_attributes_of_another_modules_objects(path):
    assert private_attribute_reads(path.read_text()) == []


def test_the_private_attribute_check_catches_what_bench_did():
    """bench/loader.py once read `loader._actors`, `loader._reader` and `reader._file`."""
    found = private_attribute_reads(
        "import ray\n"
        "def f(loader, r):\n"
        "    ray._private.worker\n"  # a third-party module's privates: not ours to police
        "    return loader._actors, loader._reader.blocks, r._file(0)\n"
        "class A:\n"
        "    def __init__(self):\n"
        "        self._x = 1\n"
        "    def same(self, other):\n"
        "        return other._x\n"  # its own class's attribute on another instance
    )
    assert [what for _, what in found] == ["loader._actors", "loader._reader", "r._file"]


# ------------------------------------------------------------------------------------------------ jobs import graph


@functools.cache
def jobs_graph() -> dict[str, set[str]]:
    """jobs module -> the jobs modules it imports (at any depth of the source)."""
    mods = {module_name(p): p for p in (ROOT / "jobs").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for me, path in mods.items():
        edges = set()
        for _, target, names in imports(path.read_text()):
            if not target.startswith("jobs"):
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            edges |= set(subs) if subs else {target}
        graph[me] = {e for e in edges if e in mods and e != me}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_jobs_wing_imports_without_cycles():
    assert find_cycle(jobs_graph()) == []


def test_the_cycle_finder_finds_the_old_kinds_and_stage_jobs_pair():
    assert find_cycle({"jobs.kinds": {"jobs.stage_jobs"}, "jobs.stage_jobs": {"jobs.kinds"}}) == [
        "jobs.kinds", "jobs.stage_jobs", "jobs.kinds"
    ]  # fmt: skip
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


# ------------------------------------------------------------------------------------------------ sizes


def test_no_function_in_engine_or_jobs_is_over_100_lines():
    long = {
        f"{p.relative_to(ROOT)}:{node.name}": node.end_lineno - node.lineno + 1
        for pkg in ("engine", "jobs")
        for p in (ROOT / pkg).rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 100
    }
    assert long == {}
