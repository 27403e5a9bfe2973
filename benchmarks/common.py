"""What the benchmark scripts share: threads, machine notes, timing and peak memory, the worker subprocess,
running maskreg and ANTsPy, Dice, shared data, and the one table writer.

Peers (ANTsPy, FireANTs, ...) are installed by the benchmark's user, never required by maskreg: use
:func:`peer_status` / :func:`check_peers` to find out whether one is importable and, if not, the exact pip
command to print.

Peak memory is measured per method in a fresh worker process (:func:`run_worker`, :func:`worker_main`): the
worker resets its resident-set high-water mark right before the measured call (Linux ``/proc/self/clear_refs``,
value 5) and reads ``VmHWM`` after it: the peak includes what the process already held (imports, the loaded
images: the "base"), but not transient peaks of loading.

Nothing heavy is imported at module level: the scripts import this module before they limit the threads, and
numpy, SimpleITK, torch and maskreg read their thread settings (and maskreg sets ``OMP_WAIT_POLICY``) when
they are first imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# The environment the benchmark started with, before anything imported maskreg (which sets OMP_WAIT_POLICY in
# os.environ when the variable is unset): every worker starts from it, so a peer runs as it does out of the box
# and the maskreg worker sets its own policy when it imports maskreg.
START_ENV = dict(os.environ)
DATA = Path(os.environ.get("MASKREG_DATA", REPO.parent / "shared" / "data"))
OUT = Path(os.environ.get("MASKREG_BENCH_OUT", HERE / "out"))
CONFIG = REPO / "config" / "config.yaml"

# import name -> (distribution name, pip command)
PEERS: dict[str, tuple[str, str]] = {
    "ants": ("antspyx", "pip install antspyx"),
    "fireants": ("fireants", "pip install fireants"),
}
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)


# --------------------------------------------------------------------------------------- peers, machine


def peer_status(module: str) -> tuple[bool, str]:
    """``(installed, version or pip hint)`` for a peer's import name."""
    dist, cmd = PEERS.get(module, (module, f"pip install {module}"))
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"not installed ({type(exc).__name__}: {exc}); install with: {cmd}"
    try:
        return True, md.version(dist)
    except md.PackageNotFoundError:
        return True, "unknown version"


def pip_hint(module: str) -> str:
    """What a table's note says for a method whose peer is missing."""
    return "not installed: " + PEERS.get(module, (module, f"pip install {module}"))[1]


def check_peers(methods: Iterable[str], peer_of: dict[str, str]) -> dict[str, tuple[bool, str]]:
    """``method -> (available, version or pip hint)``; a method not in ``peer_of`` (maskreg's) is available.
    Prints one line per peer method."""
    out: dict[str, tuple[bool, str]] = {}
    for m in methods:
        mod = peer_of.get(m)
        out[m] = peer_status(mod) if mod else (True, "")
        if mod:
            print(f"peer {m}: {out[m][1]}")
    return out


def set_threads(n: int, libraries: bool = False) -> None:
    """Limit every library's thread pools to ``n``: the environment variables that OpenMP, BLAS and ITK read
    when they start (call this before importing numpy/torch/ITK-based peers), and with ``libraries`` also
    torch's and SimpleITK's pools in this process (importing both)."""
    for var in THREAD_VARIABLES:
        os.environ[var] = str(n)
    if libraries:
        import SimpleITK as sitk
        import torch

        torch.set_num_threads(n)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, ``"n/a"`` where the system has none."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_note() -> str:
    """One line on the machine: CPU count, load average, python."""
    return (
        f"{platform.node() or 'host'}: {os.cpu_count()} CPU(s), load average (1/5/15 min) {load_average()}, "
        f"python {platform.python_version()}, {platform.platform(terse=True)}"
    )


def device_note() -> str:
    """The GPU (name, memory) and torch's version, or "CPU only"."""
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}"
        return f"CPU only, torch {torch.__version__}"
    except Exception as exc:  # torch missing or broken: say so, the scripts will too
        return f"unknown ({exc})"


def commit(changed_sources: bool = False) -> str:
    """The checkout's commit, ``$MASKREG_COMMIT`` where the tree travelled without its .git (a GPU machine);
    then "(with uncommitted changes)", or with ``changed_sources`` the files under ``src/`` that differ from
    it (the engine is edited while benchmarks run)."""
    if os.environ.get("MASKREG_COMMIT"):
        return os.environ["MASKREG_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout

    try:
        rev = git("rev-parse", "--short", "HEAD").strip()
        if changed_sources:
            changed = [ln[3:] for ln in git("status", "--porcelain", "--", "src").split("\n") if ln.strip()]
            return rev + (f", {len(changed)} source file(s) changed: {' '.join(changed)}" if changed else "")
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def shown_path(path: str | os.PathLike) -> str:
    """A path as the scripts print it (their output goes into RESULTS.md): relative to the checkout, or to
    ``$MASKREG_BENCH_OUT`` or the data folder, never the machine's absolute path."""
    p = Path(path).resolve()
    data = "$MASKREG_DATA" if "MASKREG_DATA" in os.environ else "../shared/data"
    for root, name in ((REPO, None), (OUT, "$MASKREG_BENCH_OUT"), (DATA, data)):
        try:
            rel = p.relative_to(root.resolve())
        except ValueError:
            continue
        return str(rel if name is None else Path(name, rel))
    return str(Path("...", *p.parts[-2:]))


# ----------------------------------------------------------------------------------- timing and memory


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


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), its wall time in s)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure(fn: Callable[[], Any], repeats: int, device: str | None = None) -> dict[str, Any]:
    """Run ``fn`` ``repeats`` times; best and all wall times (s), peak RSS during the calls (MB), the RSS
    before them, the last result, and on a CUDA ``device`` the peak GPU memory (MB, torch's allocator)."""
    cuda = str(device or "cpu").startswith("cuda")
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    times, peaks, base, out = [], [], None, None
    for _ in range(max(1, repeats)):
        b = reset_peak_rss()
        base = b if base is None else min(base, b or base)
        out, seconds = timed(fn)
        times.append(seconds)
        peaks.append(peak_rss())
    meas = {
        "best_s": min(times),
        "times_s": times,
        "peak_rss_mb": max(p for p in peaks if p is not None) if any(p is not None for p in peaks) else None,
        "base_rss_mb": base,
        "result": out,
    }
    if cuda:
        meas["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return meas


# ------------------------------------------------------------------------------------- worker processes


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


def worker_main(spec: dict, workers: dict[str, Callable[[dict], dict]]) -> None:
    """The worker side of :func:`run_worker`: ``workers[spec["method"]](spec)`` in this process, its threads
    limited to ``spec["threads"]`` before anything is imported, the libraries' warnings off, the folder
    ``spec["out"]`` created when given. An exception becomes ``{"error": ...}`` (the table still prints);
    ``worker_s`` is the worker's whole time."""
    set_threads(spec["threads"])
    import logging

    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    try:
        if spec.get("out"):
            Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        out = workers[spec["method"]](spec)
    except Exception as exc:  # report, do not crash the table
        import traceback

        traceback.print_exc()
        out = {"error": f"{type(exc).__name__}: {exc}"}
    out["worker_s"] = time.perf_counter() - t0
    emit_result(out)


def standard_main(ap, workers: dict[str, Callable[[dict], dict]], timeout: float):
    """Add the options every worker-based benchmark shares (--repeats, --threads, --timeout and the hidden
    --worker), parse, run a worker request in this process (:func:`worker_main`) and return None, or set the
    threads, print the machine note and return the parsed arguments."""
    import argparse

    if not any(a.dest == "repeats" for a in ap._actions):
        ap.add_argument("--repeats", type=int, default=2, help="best of N wall times (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="threads for every method (default 2)")
    ap.add_argument("--timeout", type=float, default=timeout, help=f"seconds per worker (default {timeout:g})")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker), workers)
        return None
    set_threads(args.threads)
    print(machine_note())
    return args


# ---------------------------------------------------------------------------------- maskreg and ANTsPy


def read_pair(paths: dict) -> tuple:
    """SimpleITK ``(fixed, moving, fixed_mask, moving_mask)`` from a pair's files (a missing mask: None)."""
    import SimpleITK as sitk

    return tuple(
        sitk.ReadImage(str(paths[k])) if paths.get(k) else None
        for k in ("fixed", "moving", "fixed_mask", "moving_mask")
    )


def maskreg_call(fixed, moving, fixed_mask, moving_mask, stages, *, device="cpu", warm: bool = True, **options):
    """A no-argument call of ``maskreg.register(fixed, moving, fixed_mask, moving_mask, stages=stages,
    device=device, **options)`` that returns its result, with nothing left to load inside it: the torch
    engine is imported now and, with ``warm``, the compiled CPU kernels are loaded from numba's cache (~0.6 s
    once per process). On CUDA the call waits for the GPU before it returns."""
    import maskreg

    register = maskreg.register  # loads the torch engine here, not inside the timed call
    if warm:
        from maskreg.engine import cpu_kernels

        cpu_kernels.warm_up()
    cuda = str(device).startswith("cuda")

    def run():
        res = register(fixed, moving, fixed_mask, moving_mask, stages=stages, device=device, **options)
        if cuda:
            import torch

            torch.cuda.synchronize()
        return res

    return run


def stage_report(res) -> list[dict]:
    """A registration result's stages: type, seconds, iterations and seconds per level (JSON-able)."""
    return [
        {
            "type": s.type,
            "seconds": s.seconds,
            "iterations": [lv.iterations for lv in s.levels],
            "level_seconds": [lv.seconds for lv in s.levels],
        }
        for s in res.stages
    ]


def default_stages() -> list[dict]:
    """The project's default stage list: ``registration.stages`` of ``config/config.yaml``."""
    import yaml

    return yaml.safe_load(CONFIG.read_text())["registration"]["stages"]


def stages_text(stages: list[dict]) -> str:
    """The stages as maskreg runs them: the given settings, then under ``defaults`` the ones they leave out
    (settings that are off, 0 or None, omitted)."""
    from maskreg.engine import resolved_stage

    parts = []
    for s in stages:
        extra = {k: v for k, v in s.items() if k != "type"}
        defaults = {k: v for k, v in resolved_stage(s).items() if k not in s and v not in (None, 0.0, False)}
        if defaults:
            extra["defaults"] = defaults
        parts.append(s["type"] + (" " + json.dumps(extra, separators=(",", ":")) if extra else ""))
    return " → ".join(parts)


def ants_pair(paths: dict, pixeltype: str | None = None) -> tuple:
    """ANTsPy ``(fixed, moving, fixed_mask, moving_mask)`` from a pair's files: the images with ``pixeltype``
    (None: as stored), the masks as stored; a missing mask: None."""
    import ants

    return tuple(
        (ants.image_read(str(paths[k]), pixeltype=pixeltype) if "mask" not in k else ants.image_read(str(paths[k])))
        if paths.get(k)
        else None
        for k in ("fixed", "moving", "fixed_mask", "moving_mask")
    )


def ants_call(fixed, moving, outdir: str | os.PathLike, **kwargs):
    """A no-argument call of ``ants.registration(fixed, moving, **kwargs)`` that writes its transforms under
    ``outdir`` (a new prefix at every call) and returns ANTsPy's output (``fwdtransforms``: fixed -> moving)."""
    import ants

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    count = itertools.count(1)

    def run():
        return ants.registration(fixed, moving, outprefix=str(out / f"r{next(count)}_"), **kwargs)

    return run


def as_sitk(tx):
    """A SimpleITK transform for what ``maskreg.transforms.read_transform`` or ``result.transform()`` gave."""
    return tx.to_sitk() if hasattr(tx, "to_sitk") else tx


def read_transform_files(files) -> Any:
    """The fixed -> moving map of ANTs-ordered transform files (first listed applied first to points) as one
    SimpleITK transform, read with ``maskreg.transforms.read_transform``: the same reader for every method."""
    from maskreg.transforms import read_transform

    return as_sitk(read_transform(list(files) if not isinstance(files, (str, os.PathLike)) else files))


# ---------------------------------------------------------------------------------------------- Dice


def _values(labels) -> Any:
    import numpy as np
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(labels) if isinstance(labels, sitk.Image) else np.asarray(labels)


def dice(reference, test, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice per label of two label maps on one grid (SimpleITK images or arrays), by
    ``maskreg.qc.metrics.dice_per_label``: of ``labels``, or by default of every nonzero value in either map
    (a label that one map lacks counts 0)."""
    import numpy as np

    from maskreg.qc.metrics import dice_per_label

    if labels is None:
        values = np.union1d(np.unique(_values(reference)), np.unique(_values(test)))
        labels = [int(v) for v in values if v != 0]
    return dice_per_label(reference, test, labels)


def mean_dice(per_label: dict[int, float]) -> float:
    """Mean of the finite values of :func:`dice`'s result (``maskreg.qc.metrics.mean_dice``)."""
    from maskreg.qc import metrics

    return metrics.mean_dice(per_label)


# ------------------------------------------------------------------------------------------------ data


def write_image(img, path: Path) -> None:
    """Write ``img`` compressed, atomically (a reader never sees half a file)."""
    import SimpleITK as sitk

    tmp = path.with_name(".tmp_" + path.name)
    sitk.WriteImage(img, str(tmp), useCompression=True)
    os.replace(tmp, path)


def smooth_resample(img, spacing: float, interp=None, sigma_mm: float | None = None):
    """``img`` on a grid of isotropic ``spacing`` over the same physical box (same direction); Gaussian
    anti-alias first for intensity images."""
    import numpy as np
    import SimpleITK as sitk

    sp = np.array(img.GetSpacing())
    size = np.array(img.GetSize())
    new_size = [int(math.ceil(n * s / spacing)) for n, s in zip(size, sp, strict=False)]
    d = np.array(img.GetDirection()).reshape(3, 3)
    # keep the box's corner: first voxel's outer edge
    corner = np.array(img.GetOrigin()) - d @ (sp / 2)
    origin = corner + d @ (np.full(3, spacing) / 2)
    if sigma_mm:
        img = sitk.SmoothingRecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), sigma_mm)
    ref = sitk.Image(new_size, sitk.sitkUInt8)
    ref.SetSpacing([spacing] * 3)
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(img.GetDirection())
    return sitk.Resample(
        img, ref, sitk.Transform(), interp if interp is not None else sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )


def mask_resample(mask, spacing: float):
    """A mask on the :func:`smooth_resample` grid: resampled linearly, then > 0.5."""
    import SimpleITK as sitk

    m = smooth_resample(sitk.Cast(mask, sitk.sitkFloat32), spacing)
    return sitk.Cast(m > 0.5, sitk.sitkUInt8)


def image_resample(img, spacing: float):
    """An intensity image on the :func:`smooth_resample` grid, Gaussian anti-alias σ = ½·√(s_new² − s²) mm."""
    s = min(img.GetSpacing())
    return smooth_resample(img, spacing, sigma_mm=0.5 * math.sqrt(max(spacing**2 - s**2, 0.0)))


def mni_brain():
    """MNI ICBM152 2009a at 1 mm: the float32 T1, its brain mask (gm_prob + wm_prob > 0) and GM/WM labels
    (gm_prob > 0.5 -> 1, wm_prob > 0.5 -> 2, WM winning where both are), uint8."""
    import numpy as np
    import SimpleITK as sitk

    mni = DATA / "mni_icbm152_2009a" / "template"
    img = sitk.Cast(sitk.ReadImage(str(mni / "image.nii.gz")), sitk.sitkFloat32)
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(mni / "gm_prob.nii.gz"))).astype(np.float32)
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(mni / "wm_prob.nii.gz"))).astype(np.float32)
    scale = 255.0 if max(gm.max(), wm.max()) > 1.5 else 1.0
    gm, wm = gm / scale, wm / scale
    mask = sitk.GetImageFromArray(((gm + wm) > 0).astype(np.uint8))
    mask.CopyInformation(img)
    lab = np.zeros(gm.shape, np.uint8)
    lab[gm > 0.5] = 1
    lab[wm > 0.5] = 2
    labels = sitk.GetImageFromArray(lab)
    labels.CopyInformation(img)
    return img, mask, labels


def voxelmorph_gm_wm():
    """The voxelmorph test scan's FreeSurfer labels as GM/WM: cortex 3, 42 -> 1; cerebral white matter 2, 41
    -> 2 (uint8, the label map's grid)."""
    import numpy as np
    import SimpleITK as sitk

    src = sitk.ReadImage(str(DATA / "voxelmorph_brain_t1" / "test_scan" / "labels.nii.gz"))
    fs = sitk.GetArrayFromImage(src)
    out = np.zeros(fs.shape, np.uint8)
    out[np.isin(fs, (3, 42))] = 1
    out[np.isin(fs, (2, 41))] = 2
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(src)
    return img


def fireants_images(img_path: str, mask_path: str, device: str = "cpu"):
    """One image for FireANTs' masked mode: ``(BatchedImages of [image, mask] channels, BatchedImages of
    image × mask)`` (the second for its moments). Intensities are scaled to [0, 1] by the 0.5/99.5
    percentiles inside the mask, as FireANTs' MI bins expect (maskreg does the same; CC does not care)."""
    import numpy as np
    import SimpleITK as sitk
    from fireants.io.image import BatchedImages, Image

    img = sitk.Cast(sitk.ReadImage(img_path), sitk.sitkFloat32)
    msk = sitk.Cast(sitk.ReadImage(mask_path) > 0, sitk.sitkFloat32)
    a, m = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(msk)
    lo, hi = np.percentile(a[m > 0], [0.5, 99.5])
    a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    norm = sitk.GetImageFromArray(a)
    norm.CopyInformation(img)
    prod = sitk.GetImageFromArray(a * m)
    prod.CopyInformation(img)
    im_masked = Image(norm, device=device).concatenate(Image(msk, device=device))  # last channel = mask
    return BatchedImages([im_masked]), BatchedImages([Image(prod, device=device)])


# ---------------------------------------------------------------------------------------------- tables


def fmt(v, nd: int = 2, sign: bool = False) -> str:
    """A table cell for a number: ``-`` for None, ``nan`` for a non-finite float, else ``nd`` decimals."""
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan"
    return f"{v:+.{nd}f}" if sign else f"{v:.{nd}f}"


def timing_cells(result: dict, nd: int = 1) -> dict:
    """A worker result's time columns: ``time_s`` (best), ``runs_s`` (every call), ``peak_mb`` (peak RSS with
    the base in brackets), ``gpu_mb``, and ``_t`` (best, unformatted, for :func:`add_ratio`)."""
    row = {
        "_t": result["best_s"],
        "time_s": f"{result['best_s']:.{nd}f}",
        "runs_s": "/".join(f"{t:.{nd}f}" for t in result["times_s"]),
    }
    if result.get("peak_rss_mb") is not None:
        row["peak_mb"] = f"{result['peak_rss_mb']:.0f} ({result['base_rss_mb']:.0f})"
    if result.get("gpu_peak_mb") is not None:
        row["gpu_mb"] = f"{result['gpu_peak_mb']:.0f}"
    return row


def add_ratio(rows: Iterable[dict], reference_s: float | None, key: str) -> None:
    """``row[key]`` = the row's best time / ``reference_s``, for the rows with a time."""
    for r in rows:
        if reference_s and "_t" in r:
            r[key] = f"{r['_t'] / reference_s:.2f}"


def format_table(rows: list[dict], columns: list[tuple[str, str]], markdown: bool = False) -> str:
    """The one table writer: ``columns`` are ``(key, header)``, missing values print as ``-``; a fixed-width
    plain table, or with ``markdown`` a markdown one."""
    cells = [["-" if r.get(k) in (None, "") else str(r[k]) for k, _ in columns] for r in rows]
    headers = [h for _, h in columns]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    cells = [headers] + cells
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
