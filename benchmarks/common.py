"""Shared helpers for the benchmark scripts: peers, machine notes, timing, peak memory, worker subprocesses.

Peers (ANTsPy, FireANTs, ...) are installed by the benchmark's user, never required by maskreg: use
:func:`peer_status` to find out whether one is importable and, if not, the exact pip command to print.

Peak memory is measured per method in a fresh worker process (:func:`run_worker`): the worker resets its
resident-set high-water mark right before the measured call (Linux ``/proc/self/clear_refs``, value 5) and
reads ``VmHWM`` after it: the peak includes what the process already held (imports, the loaded images: the
"base"), but not transient peaks of loading.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# The environment the benchmark started with, before anything imported maskreg (which sets OMP_WAIT_POLICY in
# os.environ when the variable is unset): every worker starts from it, so a peer runs as it does out of the box
# and the maskreg worker sets its own policy when it imports maskreg.
START_ENV = dict(os.environ)
DATA = Path(os.environ.get("MASKREG_DATA", HERE.parents[1] / "shared" / "data"))
OUT = Path(os.environ.get("MASKREG_BENCH_OUT", HERE / "out"))

# import name -> (distribution name, pip command)
PEERS: dict[str, tuple[str, str]] = {
    "ants": ("antspyx", "pip install antspyx"),
    "fireants": ("fireants", "pip install fireants"),
}


def peer_status(module: str) -> tuple[bool, str]:
    """``(installed, version or pip hint)`` for a peer's import name, without importing heavy code twice."""
    dist, cmd = PEERS.get(module, (module, f"pip install {module}"))
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"not installed ({type(exc).__name__}: {exc}); install with: {cmd}"
    try:
        return True, md.version(dist)
    except md.PackageNotFoundError:
        return True, "unknown version"


def set_threads(n: int) -> None:
    """Limit every library's thread pools to ``n`` (call before importing numpy/torch/ITK-based peers)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(n)


def machine_note() -> str:
    """One line on the machine: CPU count, load average, python."""
    try:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    return (
        f"{platform.node() or 'host'}: {os.cpu_count()} CPU(s), load average (1/5/15 min) {load}, "
        f"python {platform.python_version()}, {platform.platform(terse=True)}"
    )


def _read_status(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024.0  # kB -> MB
    except OSError:
        pass
    return None


def reset_peak_rss() -> float | None:
    """Reset the RSS high-water mark (Linux >= 4.0) and return the current RSS in MB (None if unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    return _read_status("VmRSS")


def peak_rss() -> float | None:
    """RSS high-water mark in MB since the last :func:`reset_peak_rss` (or process start)."""
    v = _read_status("VmHWM")
    if v is None:
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return v


def measure(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
    """Run ``fn`` ``repeats`` times; best and all wall times (s), peak RSS during the calls (MB), last result."""
    times, peaks, base, out = [], [], None, None
    for _ in range(max(1, repeats)):
        b = reset_peak_rss()
        base = b if base is None else min(base, b or base)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        peaks.append(peak_rss())
    return {
        "best_s": min(times),
        "times_s": times,
        "peak_rss_mb": max(p for p in peaks if p is not None) if any(p is not None for p in peaks) else None,
        "base_rss_mb": base,
        "result": out,
    }


def run_worker(script: Path, spec: dict, timeout: float | None = None) -> dict:
    """Run ``python script --worker JSON`` in a fresh process; the worker prints one JSON line last
    (``RESULT {...}``). Returns that dict, or ``{"error": ...}``."""
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=START_ENV)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return {"error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}


def emit_result(result: dict) -> None:
    """What a worker prints last for :func:`run_worker`."""
    print("RESULT " + json.dumps(result), flush=True)


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain fixed-width table: ``columns`` are ``(key, header)``; missing values print as ``-``."""
    cells = [[h for _, h in columns]] + [
        ["-" if r.get(k) in (None, "") else str(r[k]) for k, _ in columns] for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def standard_main(ap, worker_main: Callable[[dict], Any], timeout: float):
    """Add the options every benchmark shares (--repeats, --threads, --timeout and the hidden --worker),
    parse, run a worker request in this process and return None, or set the threads, print the machine
    note and return the parsed arguments."""
    import argparse
    import json

    if not any(a.dest == "repeats" for a in ap._actions):
        ap.add_argument("--repeats", type=int, default=2, help="best of N wall times (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every method (default 2)")
    ap.add_argument("--timeout", type=float, default=timeout, help=f"seconds per worker (default {timeout:g})")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return None
    set_threads(args.threads)
    print(machine_note())
    return args
