"""A fingerprint of the engine's results, to check that a refactoring changes nothing: 11 registrations through
``maskreg.register`` (2D and 3D; translation, rigid, similarity, affine, greedy, SyN; mse, cc, mi, nmi; no, fixed,
both, roi, eroded and valid masks; search; random and fraction sampling; labels; the compiled kernels and the
torch path), each one's linear matrix, forward and inverse fields and level reports (iterations, losses,
overlaps), saved to an ``.npz`` or compared bit for bit with one.

Run: ``.venv/bin/python benchmarks/fingerprint.py save before.npz`` on the old code, then
``.venv/bin/python benchmarks/fingerprint.py check before.npz [CASE ...]`` on the new; it prints every array that
differs (with its largest difference) and the count. Data: ``resources/demo`` through ``matrix_cells``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CASES = [
    # (name, pair, masks, stages, sampling, code path, labels)
    (
        "b2d_syn_cc",
        "b2d_16_64",
        "both",
        [{"type": "affine", "loss": "mi"}, {"type": "syn", "loss": "cc"}],
        "dense",
        "kernels",
        False,
    ),
    (
        "b2d_greedy_mi_roi",
        "b2d_16_64",
        "roi",
        [{"type": "rigid", "loss": "mse"}, {"type": "greedy", "loss": "mi"}],
        "dense",
        "torch",
        False,
    ),
    (
        "b2d_syn_nmi_fixed",
        "b2d_27_30",
        "fixed",
        [{"type": "similarity", "loss": "nmi"}, {"type": "syn", "loss": "nmi", "masks": "fixed"}],
        "dense",
        "kernels",
        False,
    ),
    (
        "b2d_affine_search",
        "b2d_27_30",
        "roi",
        [{"type": "rigid", "loss": "cc", "search": True}, {"type": "affine", "loss": "mi"}],
        "dense",
        "kernels",
        False,
    ),
    (
        "b2d_random",
        "b2d_16_64",
        "valid",
        [{"type": "affine", "loss": "mi"}, {"type": "syn", "loss": "mse"}],
        {"random": 2000},
        "kernels",
        False,
    ),
    (
        "head_syn_mi",
        "head2d",
        "both",
        [{"type": "translation", "loss": "mi"}, {"type": "affine", "loss": "mi"}, {"type": "syn", "loss": "mi"}],
        "dense",
        "kernels",
        False,
    ),
    (
        "brain3d_syn_cc",
        "brain3d",
        "both",
        [{"type": "affine", "loss": "mi"}, {"type": "syn", "loss": "cc"}],
        "dense",
        "kernels",
        False,
    ),
    (
        "brain3d_syn_mi_torch",
        "brain3d",
        "eroded",
        [{"type": "affine", "loss": "cc"}, {"type": "syn", "loss": "mi"}],
        "dense",
        "torch",
        False,
    ),
    (
        "brain3d_greedy_valid",
        "brain3d",
        "valid",
        [{"type": "affine", "loss": "mse"}, {"type": "greedy", "loss": "cc"}],
        {"fraction": 0.3},
        "kernels",
        False,
    ),
    (
        "abdomen_syn_labels",
        "abdomen",
        "both",
        [{"type": "affine", "loss": "mi"}, {"type": "syn", "loss": "cc", "label_weight": 0.5}],
        "dense",
        "kernels",
        True,
    ),
    (
        "abdomen_greedy_labels_torch",
        "abdomen",
        "both",
        [{"type": "rigid", "loss": "mi"}, {"type": "greedy", "loss": "mse", "label_weight": 1.0}],
        "dense",
        "torch",
        True,
    ),
]


def run(case: tuple) -> dict:
    """Every output array of one case, keyed ``name/what``."""
    import numpy as np
    import SimpleITK as sitk

    import maskreg
    import matrix_cells as mx

    name, pair, masks, stages, sampling, path, labels = case
    sit = mx.load_situation(pair, masks)
    p = mx.load_pair(pair)
    kw = dict(fixed_labels=p.fixed_labels, moving_labels=p.moving_labels) if labels else {}
    with mx.code_path(path) as device:
        res = maskreg.register(
            sit.fixed,
            sit.moving,
            sit.fixed_mask,
            sit.moving_mask,
            stages=[{"type": "moments"}] + stages,
            device=device,
            sampling=sampling,
            mask_kinds=sit.kinds,
            threads=2,
            seed=3,
            subject=name,
            **kw,
        )
    out = {f"{name}/linear": np.asarray(res.linear.homogeneous())}
    if res.has_fields:
        out[f"{name}/disp"] = sitk.GetArrayFromImage(res.displacement)
        out[f"{name}/inv"] = sitk.GetArrayFromImage(res.inverse_displacement)
    levels = [
        [lv.iterations, lv.loss_first, lv.loss_last, lv.overlap_weight, lv.overlap_voxels, *lv.losses]
        for st in res.stages
        for lv in st.levels
    ]
    out[f"{name}/levels"] = np.asarray([x for lv in levels for x in lv], dtype=np.float64)
    return out


def compare(found: dict, reference_file: str) -> int:
    """Print the arrays of ``found`` that differ from the reference; returns how many."""
    import numpy as np

    ref = np.load(reference_file)
    bad = 0
    for key, value in found.items():
        r = ref[key]
        if r.shape != value.shape or not np.array_equal(r, value, equal_nan=r.dtype.kind == "f"):
            bad += 1
            diff = np.nanmax(np.abs(r - value)) if r.shape == value.shape else "shape"
            print("DIFF", key, diff)
    print(f"compared {len(found)} arrays; {bad} differ")
    return bad


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[1] not in ("save", "check"):
        print(__doc__)
        return 2
    mode, file, only = sys.argv[1], sys.argv[2], sys.argv[3:]
    common.set_threads(2)
    import numpy as np

    found: dict = {}
    for case in CASES:
        if not only or case[0] in only:
            found.update(run(case))
            print(case[0], "done", flush=True)
    if mode == "save":
        np.savez(file, **found)
        return 0
    return 1 if compare(found, file) else 0


if __name__ == "__main__":
    sys.exit(main())
