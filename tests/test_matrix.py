"""The differential matrix's quick subset (issue 25): one test per cell, each compared with ANTsPy run in the
same test session under the same masks.

Cells, data (``resources/demo``), the ANTsPy settings, the evaluation and the criteria live in
``benchmarks/matrix_cells.py``; ``benchmarks/bench_matrix.py`` prints the whole matrix (``--quick``: these
cells). A cell passes when maskreg raises nothing, its metric (mean Dice where labels exist, else the NCC inside
the fixed mask) is at least ANTsPy's - 0.02 with cc, mi and moments, a deformable stage ends at or above its
linear start, and nothing folds; a linear cc stage with random sampling must be refused with a ConfigError.
Everything runs on one thread (about 60-90 s on 2 cores for the 27 cells, ANTsPy included).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("ants", reason="antspyx is the reference of the matrix (pip install antspyx)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # at import: the cells parametrize
import matrix_cells as mx  # noqa: E402

# Quick cells that fail a criterion at the time of writing, with the numbers measured (benchmarks/HISTORY.md,
# "bench_matrix.py"): they run and are reported as expected failures (an XPASS is reported, not an error: the
# one cell here passes when ANTsPy's own run goes worse, which it did in a clean-clone CI run, its CC metric
# finding "no valid points"; maskreg's figure was the same). The criteria themselves are not relaxed for them.
KNOWN_FAILURES: dict[str, str] = {
    # 2026-12-05, working tree on 121c868: mean Dice in the liver ROI 0.279 vs ANTsPy 0.306 (linear start 0.250);
    # liver 0.672 vs 0.618, stomach 0.02 vs 0.25; ANTsPy's own result spreads 0.13-0.37 over seeds 1-4
    "abdomen-both-syn-cc-dense-kernels": "Dice 0.279 < ANTsPy 0.306 - 0.02 (abdomen liver ROI)",
}

CELLS = [
    pytest.param(c, id=c.id, marks=pytest.mark.xfail(strict=False, reason=KNOWN_FAILURES[c.id]))
    if c.id in KNOWN_FAILURES
    else pytest.param(c, id=c.id)
    for c in mx.quick_cells(cuda=True)
]  # the CUDA cells skip themselves without a GPU


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for maskreg, ITK (SimpleITK and ANTs) and torch during these tests; restored afterwards."""
    import os

    import SimpleITK as sitk
    import torch

    saved_env = {
        k: os.environ.get(k)
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")
    }
    saved_torch, saved_itk = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    mx.configure_threads(1)
    from maskreg.engine import cpu_kernels

    cpu_kernels.warm_up()
    yield
    torch.set_num_threads(saved_torch)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved_itk)
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("cell", CELLS)
def test_matrix_cell(cell):
    row = mx.run_cell(cell, threads=1)
    shown = mx.format_rows([row])[0]
    numbers = (
        f"{row.get('metric', 'metric')}: maskreg {shown['mr_f']}, ANTsPy {shown['ants_f']} "
        f"({shown['ants']}), linear only {shown['lin_f']}, fold % {shown['fold_f']}"
    )
    if row["status"] == "SKIP":
        pytest.skip(row["reason"])
    if row["status"] == "NO-REF":
        pytest.skip(f"no ANTsPy reference: {row['reason']}")
    assert row["status"] == "PASS", f"{cell.id}: {row['reason']} [{numbers}]" + (
        "\n" + row["error"] if row.get("error") else ""
    )


def test_cc_with_random_sampling_is_refused_before_any_work():
    """The refusal is a ConfigError naming the stage and the reason, raised before the images are read."""
    import maskreg
    from maskreg.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stage 1 \(rigid\): loss 'cc' needs dense sampling"):
        maskreg.register(
            None,
            None,
            stages=[{"type": "moments"}, {"type": "rigid", "loss": "cc"}],
            sampling={"random": 100},
            device="cpu",
            threads=1,
        )


def test_quick_subset_covers_the_matrix():
    """The CI subset keeps every pair, mask situation, stage type, loss, sampling and CPU code path."""
    cells = mx.quick_cells(cuda=False)
    assert {c.pair for c in cells} == set(mx.PAIRS)
    assert {c.masks for c in cells} == set(mx.SITUATIONS)
    assert {c.stage for c in cells} == set(mx.STAGES)
    assert {c.loss for c in cells} - {None} == set(mx.LINEAR_LOSSES)
    assert {c.sampling for c in cells} == {"dense", "random"}
    assert {c.path for c in cells} == {"kernels", "torch"}
    assert any(c.rejected for c in cells)
    assert len({c.id for c in cells}) == len(cells)
    assert set(KNOWN_FAILURES) <= {c.id for c in cells}
    full = mx.full_cells(cuda=False)
    assert set(cells) <= set(full)
    # every stage type x every loss on a pair with masks; every situation with cc and mi, affine and syn
    for st in mx.LINEAR + mx.DEFORMABLE:
        for loss in mx.LINEAR_LOSSES if st in mx.LINEAR else mx.LOSSES:
            assert mx.Cell("b2d_16_64", "both", st, loss) in full
    for pair in mx.PAIRS:
        for masks in mx.PAIR_SITUATIONS[pair]:
            for st in ("affine", "syn"):
                for loss in ("cc", "mi"):
                    assert mx.Cell(pair, masks, st, loss) in full
            assert mx.Cell(pair, masks, "affine", "gc") in full


def test_a_failing_cell_says_whether_the_loss_or_the_optimiser_lost():
    """A linear cell below ANTsPy is diagnosed with maskreg's own loss at both poses, measured by the probe
    ``objective_at``; a deformable cell below its linear start, with its loss at that start and at its end. On
    the two-contrast head pair with its cone-shaped valid masks, gc puts maskreg's pose at a lower loss than
    ANTsPy's (-0.632 vs -0.613, measured) though ANTsPy's Dice is higher (0.941 vs 0.910); syn with mse lowers its
    loss while the heads' Dice falls below the linear start (0.9565 vs 0.9643)."""
    gc = mx.Cell("head2d", "valid", "affine", "gc")
    row = mx.run_cell(gc, threads=1)
    own, ref = row["obj"]
    assert own < ref and row["mr"] < row["ants_v"] - mx.MARGIN, row
    assert "the loss prefers maskreg's pose" in row["reason"]
    # the probe measures the loss where it is started: the moments start is worse than the optimised pose
    start = mx.run_maskreg(gc, [{"type": "moments"}])[0].transform()
    assert mx.objective_at(gc, mx.common.as_sitk(start)) > own
    syn = mx.Cell("head2d", "both", "syn", "mse")
    row = mx.run_cell(syn, threads=1)
    start, end = row["obj_deformable"]
    assert row["mr"] < row["lin"] and end < start, row
    assert "the loss improved while the metric fell" in row["reason"]


def test_a_reference_that_folds_space_is_no_reference():
    """linear_determinant is the transform's determinant (an affine with a reflection, on an oblique,
    anisotropic grid); on the abdominal slab without masks ANTsPy's GC affine flips and squashes z (det -0.30,
    measured; Dice 0.289 against maskreg's 0.266 with det 1.03), so the cell has no reference, and maskreg's own
    transform is checked for the same."""
    import numpy as np
    import SimpleITK as sitk

    grid = sitk.Image([20, 30, 10], sitk.sitkFloat32)
    grid.SetSpacing((0.8, 1.1, 3.0))
    grid.SetDirection(sitk.VersorTransform((0.2, 0.1, 0.4), 0.5).GetMatrix())
    matrix = np.array([[1.1, 0.2, 0.0], [0.1, 0.9, 0.3], [0.0, 0.2, -0.4]])
    affine = sitk.AffineTransform(matrix.flatten().tolist(), (3.0, -2.0, 7.0), (5.0, 5.0, 5.0))
    assert mx.linear_determinant(affine, grid) == pytest.approx(np.linalg.det(matrix), rel=1e-9)
    row = mx.run_cell(mx.Cell("abdomen", "none", "affine", "gc"), threads=1)
    assert row["status"] == "NO-REF" and row["ants_det"] < 0 < row["det"], row
    assert "folds space" in row["reason"]
    bad = mx.verdict(mx.Cell("abdomen", "none", "affine", "gc"), {**row, "det": -0.5})
    assert bad[0] == "FAIL" and "maskreg's transform folds space (det -0.500)" in bad[1][0]
