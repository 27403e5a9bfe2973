"""Real Snakemake runs of the demo cohort in a temporary folder (the workflow as a user runs it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

pytestmark = pytest.mark.workflow
SUBJECTS = ["brain2d_r16", "brain2d_r27", "brain2d_r30", "headct2d", "abdomen3d", "brain3d"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, repo, snakemake):
    work = tmp_path_factory.mktemp("demo")
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cfg["cohort"] = str(repo / "config/cohort.tsv")
    cfg["device"] = "cpu"
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(work, "--cores", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cohort = pd.read_csv(repo / "config/cohort.tsv", sep="\t", dtype=str, keep_default_na=False)
    cohort["fixed"] = [str((repo / "config" / p).resolve()) for p in cohort["fixed"]]
    cohort["moving"] = [str((repo / "config" / p).resolve()) for p in cohort["moving"]]
    return work, cohort.set_index("subject")


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )


def ncc(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> float:
    x, y = a[m].astype(float), b[m].astype(float)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def test_every_warped_output_is_on_its_fixed_grid(demo_run):
    work, cohort = demo_run
    for s in SUBJECTS:
        fixed = sitk.ReadImage(cohort.loc[s, "fixed"])
        names = ["image", "mask"] + (["labels"] if cohort.loc[s, "moving_labels"] else [])
        for name in names:
            out = sitk.ReadImage(str(work / f"results/{s}/warped/{name}.nii.gz"))
            assert same_grid(out, fixed), f"{s} warped/{name} is not on the fixed grid"
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"results/{s}/warped/mask.nii.gz")))
        assert set(np.unique(mask)) <= {0, 1} and mask.sum() > 0


def test_masked_ncc_improves_for_every_pair(demo_run):
    """Recomputed here from the files: fixed vs moving at its scanner position, and vs the warped image."""
    work, cohort = demo_run
    metrics = pd.read_csv(work / "results/cohort/metrics.tsv", sep="\t").set_index("subject")
    for s in SUBJECTS:
        fixed = sitk.ReadImage(cohort.loc[s, "fixed"], sitk.sitkFloat32)
        moving = sitk.ReadImage(cohort.loc[s, "moving"], sitk.sitkFloat32)
        fmask = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"results/{s}/masks/fixed_mask.nii.gz"))) > 0
        mmask = sitk.ReadImage(str(work / f"results/{s}/masks/moving_mask.nii.gz"), sitk.sitkFloat32)
        before = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
        before_m = sitk.GetArrayFromImage(sitk.Resample(mmask, fixed, sitk.Transform(), sitk.sitkLinear)) >= 0.5
        warped = sitk.ReadImage(str(work / f"results/{s}/warped/image.nii.gz"))
        warped_m = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"results/{s}/warped/mask.nii.gz"))) > 0
        f = sitk.GetArrayFromImage(fixed)
        n0 = ncc(f, sitk.GetArrayFromImage(before), fmask & before_m)
        n1 = ncc(f, sitk.GetArrayFromImage(warped), fmask & warped_m)
        assert n1 > n0 + 0.02, f"{s}: masked NCC {n0:.3f} -> {n1:.3f}"
        assert metrics.loc[s, "status"] == "ok"
        assert metrics.loc[s, "ncc_after"] == pytest.approx(n1, abs=1e-3)
        assert metrics.loc[s, "ncc_before"] == pytest.approx(n0, abs=1e-3)


def label_dice(repo, work, cohort, s):
    """Dice per label common to both label maps: before (identity) and after (warped labels file)."""
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(repo / "config" / cohort.loc[s, "fixed_labels"])))
    moving_labels = sitk.ReadImage(str(repo / "config" / cohort.loc[s, "moving_labels"]))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"results/{s}/warped/labels.nii.gz")))
    fixed = sitk.ReadImage(cohort.loc[s, "fixed"])
    before = sitk.GetArrayFromImage(sitk.Resample(moving_labels, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    # no new label values appear
    assert set(np.unique(warped)) <= set(np.unique(sitk.GetArrayFromImage(moving_labels)))
    common = sorted(set(np.unique(fixed_labels)) & set(np.unique(sitk.GetArrayFromImage(moving_labels))) - {0})

    def dice(a, b, v):
        return 2 * np.sum((a == v) & (b == v)) / (np.sum(a == v) + np.sum(b == v))

    return (
        common,
        {v: dice(fixed_labels, before, v) for v in common},
        {v: dice(fixed_labels, warped, v) for v in common},
    )


def test_dice_improves_for_every_brain_label_and_on_average_for_the_abdomen(demo_run, repo):
    work, cohort = demo_run
    common, d0, d1 = label_dice(repo, work, cohort, "brain3d")
    assert common == [1, 2]
    for v in common:  # grey and white matter, inter-subject
        assert d1[v] > d0[v] + 0.05, (v, d0[v], d1[v])
    # the abdominal pair is two patients and a 40 mm slab: the mean over its organs must improve clearly
    common, d0, d1 = label_dice(repo, work, cohort, "abdomen3d")
    assert len(common) >= 5
    assert np.mean(list(d1.values())) > np.mean(list(d0.values())) + 0.1
    table = pd.read_csv(work / "results/cohort/dice.tsv", sep="\t")
    assert sorted(table[table.subject == "abdomen3d"].label) == common


def test_deformable_fields_are_diffeomorphic_and_invertible(demo_run):
    work, cohort = demo_run
    metrics = pd.read_csv(work / "results/cohort/metrics.tsv", sep="\t").set_index("subject")
    assert (metrics.jacobian_nonpositive_fraction == 0).all()
    s = "brain3d"
    fwd = sitk.ReadImage(str(work / f"results/{s}/transforms/warp.nii.gz"))
    inv = sitk.ReadImage(str(work / f"results/{s}/transforms/inverse_warp.nii.gz"))
    fixed = sitk.ReadImage(cohort.loc[s, "fixed"])
    assert same_grid(fwd, fixed) and same_grid(inv, fixed) and fwd.GetNumberOfComponentsPerPixel() == 3
    u = sitk.DisplacementFieldTransform(sitk.Cast(fwd, sitk.sitkVectorFloat64))
    w = sitk.DisplacementFieldTransform(sitk.Cast(inv, sitk.sitkVectorFloat64))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"results/{s}/masks/fixed_mask.nii.gz")))
    idx = np.argwhere(mask > 0)[::5][:, ::-1].astype(float)
    pts = np.array([fixed.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in idx])
    back = np.array([w.TransformPoint(u.TransformPoint(p.tolist())) for p in pts])
    assert np.abs(sitk.GetArrayFromImage(fwd)).max() > 1.0  # a real deformation
    assert np.linalg.norm(back - pts, axis=1).mean() < 0.1 * min(fixed.GetSpacing())


def test_jacobian_maps_are_on_the_fixed_grid_and_give_the_qc_folding_figures(demo_run):
    """results/{subject}/transforms/jacobian.nii.gz: float32 on the fixed grid, det J of x ↦ A(x + u(x)); its
    share ≤ 0 and its minimum inside the fixed mask are the QC metrics' folding figure and jacobian_min, and
    it is det(A) times SimpleITK's filter on warp.nii.gz (on the demo's axis-aligned 3D grid)."""
    work, cohort = demo_run
    metrics = pd.read_csv(work / "results/cohort/metrics.tsv", sep="\t").set_index("subject")
    for s in SUBJECTS:
        jac = sitk.ReadImage(str(work / f"results/{s}/transforms/jacobian.nii.gz"))
        assert same_grid(jac, sitk.ReadImage(cohort.loc[s, "fixed"])) and jac.GetPixelID() == sitk.sitkFloat32, s
        det = sitk.GetArrayFromImage(jac)
        inside = det[sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"results/{s}/masks/fixed_mask.nii.gz"))) > 0]
        assert np.mean(inside <= 0) == metrics.loc[s, "jacobian_nonpositive_fraction"], s
        assert np.isclose(inside.min(), metrics.loc[s, "jacobian_min"], rtol=1e-5), s
        assert np.isfinite(det).all() and np.ptp(det) > 0.01, s  # a deformation, not a constant
    s = "abdomen3d"  # identity direction: SimpleITK's filter applies to the field as it is
    folder = work / f"results/{s}/transforms"
    field = sitk.ReadImage(str(folder / "warp.nii.gz"), sitk.sitkVectorFloat64)
    assert np.allclose(field.GetDirection(), np.eye(3).ravel())
    det_a = np.linalg.det(np.reshape(sitk.ReadTransform(str(folder / "affine.mat")).GetParameters()[:9], (3, 3)))
    ref = det_a * sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field, True))
    det = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "jacobian.nii.gz")))
    assert np.abs(det - ref).max() < 1e-5 * np.abs(ref).max()


def test_demo_cohort_flags(demo_run, snakemake):
    """results/cohort/metrics.tsv has the flags column (also each subject's qc/metrics.tsv); the demo's good
    registrations raise no flag, and changing a flag threshold reruns only qc_subject and cohort."""
    work, _ = demo_run
    metrics = pd.read_csv(work / "results/cohort/metrics.tsv", sep="\t", keep_default_na=False).set_index("subject")
    assert "flags" in metrics.columns and "displacement_max_mm" in metrics.columns
    for s in SUBJECTS:
        assert metrics.loc[s, "status"] == "ok"
        assert metrics.loc[s, "flags"] == "", (s, metrics.loc[s].to_dict())
        assert float(metrics.loc[s, "overlap_fraction"]) > 0.3
        shift, size = float(metrics.loc[s, "displacement_max_mm"]), float(metrics.loc[s, "fixed_mask_diagonal_mm"])
        assert 0 < shift < 0.1 * size
        own = pd.read_csv(work / f"results/{s}/qc/metrics.tsv", sep="\t", keep_default_na=False)
        assert own["flags"].iloc[0] == ""
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["qc"]["flags"]["folding"] = 0.5
    (work / "flags.yaml").write_text(yaml.safe_dump(cfg))
    dry = snakemake(work, "-n", "--cores", "1", "--configfile", str(work / "flags.yaml"))
    assert dry.returncode == 0, dry.stderr[-2000:]
    out = dry.stdout + dry.stderr
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)$", out, re.M))  # the job stats table
    assert jobs == {"qc_subject": "6", "cohort": "1", "all": "1", "total": "8"}, out[-3000:]


def test_transform_files_reproduce_warped_image_with_simpleitk(demo_run):
    """ITK's own reader and resampler applying our files (affine.mat, then warp.nii.gz first to points:
    T(x) = A(x + u(x))) reproduce our warped image."""
    work, cohort = demo_run
    for s in ("brain2d_r16", "abdomen3d", "brain3d"):
        affine = sitk.ReadTransform(str(work / f"results/{s}/transforms/affine.mat"))
        field = sitk.ReadImage(str(work / f"results/{s}/transforms/warp.nii.gz"))
        chain = sitk.CompositeTransform(affine.GetDimension())
        chain.AddTransform(affine)
        chain.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
        fixed = sitk.ReadImage(cohort.loc[s, "fixed"])
        moving = sitk.ReadImage(cohort.loc[s, "moving"], sitk.sitkFloat32)
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"results/{s}/warped/image.nii.gz")))
        theirs = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, chain, sitk.sitkLinear, 0.0))
        assert np.allclose(ours, theirs, atol=1e-4 * max(1.0, float(np.abs(theirs).max())))


def test_qc_outputs_have_content(demo_run):
    work, _ = demo_run
    import matplotlib.image as mpimg

    for s in SUBJECTS:
        for name in ("registration", "masks"):
            png = mpimg.imread(work / f"results/{s}/qc/{name}.png")
            assert png.std() > 0.05, f"{s} {name}.png looks blank"
        m = pd.read_csv(work / f"results/{s}/qc/metrics.tsv", sep="\t")
        assert list(m.subject) == [s] and m.overlap_voxels.iloc[0] > 1000
    png = mpimg.imread(work / "results/cohort/summary.png")
    assert png.std() > 0.05


def test_rerun_is_a_no_op_and_report_lists_every_subject(demo_run, snakemake):
    work, _ = demo_run
    dry = snakemake(work, "-n", "--cores", "1")
    assert dry.returncode == 0
    assert "Nothing to be done" in dry.stdout + dry.stderr
    rep = snakemake(work, "--report", str(work / "report.html"), timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    html = (work / "report.html").read_text(errors="ignore")
    for s in SUBJECTS:
        assert s in html


def _replace_in_snakemake_records(work, old: str, new: str) -> int:
    """Replace ``old`` by ``new`` in Snakemake's job records of ``work`` (its SQLite database,
    ``.snakemake/metadata.db``, since Snakemake 9; JSON files in ``.snakemake/metadata/`` before); the count."""
    import sqlite3

    count = 0
    db = work / ".snakemake" / "metadata.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
                info = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
                for col in [r[1] for r in info if r[2].upper() in ("TEXT", "JSON", "VARCHAR")]:
                    cur = conn.execute(
                        f'UPDATE "{table}" SET "{col}" = replace("{col}", ?, ?) WHERE instr("{col}", ?) > 0',
                        (old, new, old),
                    )
                    count += cur.rowcount
    folder = work / ".snakemake" / "metadata"
    for path in folder.iterdir() if folder.is_dir() else ():
        text = path.read_text()
        if old in text:
            path.write_text(text.replace(old, new))
            count += 1
    return count


def test_reports_name_the_software_and_an_upgrade_reruns_the_registrations(demo_run, repo, snakemake):
    """Each registration.json names maskreg's version and the checkout's commit, and the register jobs carry
    them in their params: Snakemake's record of a run by another version asks for those jobs again."""
    from maskreg import __version__, provenance

    work, _ = demo_run
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    tag = provenance.software_tag()
    assert tag == f"{__version__}+g{head[:12]}"
    for s in SUBJECTS:
        sw = json.loads((work / f"results/{s}/transforms/registration.json").read_text())["software"]
        assert sw["maskreg"] == __version__ and sw["commit"] == head and isinstance(sw["dirty"], bool)
    old = "0.0.1+g000000000000"  # as if an older maskreg had made the files
    assert _replace_in_snakemake_records(work, tag, old) > 0  # the register jobs' params hold the tag
    try:
        plan = snakemake(work, "-n", "--cores", "1")
        out = plan.stdout + plan.stderr
        counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out.split("Job stats:")[1].split("total")[0], re.M))
        assert counts.get("register") == str(len(SUBJECTS)), out[-3000:]  # every registration again
        assert "prepare_mask" not in counts and "params have changed" in out  # not the masks: the tag is not theirs
    finally:
        _replace_in_snakemake_records(work, old, tag)
    again = snakemake(work, "-n", "--cores", "1")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_dry_run_plans_every_job(tmp_path, repo, snakemake):
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    cfg["cohort"] = str(repo / "config/cohort.tsv")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", "--cores", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for rule, count in [
        ("prepare_mask", 12),
        ("register", 6),
        ("warp_image", 6),
        ("warp_labels", 2),
        ("qc_subject", 6),
        ("qc_masks", 6),
        ("cohort", 1),
    ]:
        assert any(line.split() == [rule, str(count)] for line in out.splitlines()), f"{rule} x{count}"


def test_report_opens_in_a_real_browser(demo_run, tmp_path, snakemake):
    """Headless Chromium renders report.html: the screenshot is not blank and the page holds every subject."""
    import shutil

    import matplotlib.image as mpimg

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium: install Debian's 'chromium' package (.ci/run does) to render the report")
    work, _ = demo_run
    report = work / "report.html"
    if not report.exists():
        assert snakemake(work, "--report", str(report), timeout=300).returncode == 0
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        "--virtual-time-budget=15000",
    ]
    shot = tmp_path / "report.png"
    subprocess.run(
        flags + [f"--user-data-dir={tmp_path / 'p1'}", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        timeout=180,
    )
    png = mpimg.imread(shot)
    assert png.shape[0] > 500 and png.std() > 0.05, "the rendered report looks blank"
    dom = subprocess.run(
        flags + [f"--user-data-dir={tmp_path / 'p2'}", "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout
    assert "Snakemake" in dom and "Subjects" in dom and "Cohort" in dom
    for s in SUBJECTS:
        assert s in dom


@pytest.mark.parametrize(
    "script,heavy",
    [
        ("register.py", ("torch", "pandas", "scipy")),
        ("register_batch.py", ("torch", "pandas", "scipy")),
        ("warp_image.py", ("torch", "pandas")),
        ("warp_labels.py", ("torch", "pandas")),
        ("prepare_mask.py", ("torch", "pandas")),
    ],
)
def test_job_scripts_start_without_the_heavy_imports_they_do_not_need(script, heavy, repo):
    """Every job pays its script's imports (the demo's 38 jobs run one interpreter each): a script's maskreg
    imports must not pull in torch or pandas unless it uses them (pandas alone was 0.2 of a warp job's 0.4 s
    of imports; a register job imports torch inside the registration, or publishes a batch's files)."""
    text = (repo / "workflow" / "scripts" / script).read_text()
    imports = [line for line in text.splitlines() if line.startswith(("from maskreg", "import maskreg"))]
    assert imports, f"{script} imports nothing from maskreg"
    code = "\n".join(imports + ["import sys", f"print(sorted(m for m in {heavy!r} if m in sys.modules))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"{script}: {out.stdout.strip()} imported by {imports}"
