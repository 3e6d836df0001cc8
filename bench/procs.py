"""Run a command and measure it from outside: wall time and the peak RSS of its whole process tree."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def normalized_counts(n: int = 1_000_000):
    """float32 counts divided by cells' size factors (scaled to 10,000): what log1p sees in a pipeline."""
    import numpy as np

    rng = np.random.default_rng(0)
    counts = rng.integers(1, 1000, n).astype(np.float64)
    return (counts / (rng.integers(100, 100_000, n) / 1e4).astype(np.float32)).astype(np.float32)


def speed_probe() -> float:
    """This machine's speed now: ns per value of numpy's float32 log1p over `normalized_counts()`, the median of 7
    (`bench/kernels.py`'s "numpy float32" figure). These 2-core VMs have run 3-4x slower than usual for hours at a
    time (0.34 ns in the kernels run of a usual day, 1.09 on such a one), and a run's figures compare with
    another's only at like probes."""
    import numpy as np

    v = normalized_counts()
    out = np.empty_like(v)
    np.log1p(v, out=out)
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        np.log1p(v, out=out)
        ts.append(time.perf_counter() - t0)
    return median(ts) / v.size * 1e9


def peer_python() -> str | None:
    """The Python >= 3.12 venv that holds annbatch (`make peers`), if any."""
    for p in (ROOT / ".venv-peers" / "bin" / "python", Path("/tmp/venvpeer/bin/python")):
        if p.exists():
            return str(p)
    return None


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; return seconds, peak summed RSS of the tree (MB), peak of its largest process (MB), stdout."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    root = psutil.Process(proc.pid)
    peak_tree, peak_one = 0, 0
    done = threading.Event()

    def sample():
        nonlocal peak_tree, peak_one
        while not done.wait(0.05):
            try:
                procs = [root, *root.children(recursive=True)]
                rss = []
                for p in procs:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
                peak_tree, peak_one = max(peak_tree, sum(rss)), max(peak_one, max(rss, default=0))
            except psutil.Error:
                return

    t0 = time.perf_counter()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise RuntimeError(f"{cmd[:3]}... exited {proc.returncode}")
    return {"seconds": seconds, "peak_tree_mb": peak_tree / 2**20, "peak_process_mb": peak_one / 2**20, "stdout": out}


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def median(xs) -> float:
    return float(statistics.median(xs))
