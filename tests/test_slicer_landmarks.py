"""3D Slicer landmark files (issue 28): ``.fcsv`` and ``.mrk.json`` read by extension as LPS mm.

* The same points written as LPS CSV, as ``.fcsv`` in RAS, LPS and the old numeric coordinate systems, and as
  ``.mrk.json`` in RAS and LPS (and in micrometres) read back identical.
* A real Slicer file (AFIDs consensus on MNI152NLin6Asym, ``CoordinateSystem = 0``) reads as the LPS columns of
  the shared CSV made from it.
* The QC's TRE (``io.read_landmark_pair`` → ``metrics.tre`` before and after ``warp.warp_points``, as
  ``qc.evaluate`` computes it) is the same from Slicer files as from CSV.
* Malformed files raise ``InputError`` naming subject, role, file and what is wrong.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from maskreg import io, warp
from maskreg.errors import InputError
from maskreg.qc.metrics import tre

# LPS mm, six decimals at most: every writer below prints them exactly, so the readers return identical floats
POINTS = np.array(
    [
        [-0.402, -2.5665, -5.312751],
        [12.5, 25.466712, -2.261],
        [-91.75, 37.5, 0.0],
        [0.000125, -123.456789, 72.5],
        [45.0, 0.0, -11.653],
    ]
)
FCSV_HEADER = "# Markups fiducial file version = {version}\n# CoordinateSystem = {system}\n"
FCSV_COLUMNS = "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"


def _ras(points: np.ndarray) -> np.ndarray:
    return points * np.array([-1.0, -1.0, 1.0])


def _fcsv(path, points: np.ndarray, system: str, version: str = "5.6", extra: str = ",2,0") -> None:
    """A Slicer-style .fcsv: node ids, a quoted label with a comma, empty description, Slicer 5's trailing
    fields; coordinates in ``system`` (``LPS``, ``RAS``, ``0`` or ``1``)."""
    pts = _ras(points) if system in ("RAS", "0") else points
    lines = [
        f'vtkMRMLMarkupsFiducialNode_{i},{x:.6f},{y:.6f},{z:.6f},0,0,0,1,1,1,0,"P-{i}, left",,'
        f"vtkMRMLScalarVolumeNode1{extra}"
        for i, (x, y, z) in enumerate(pts)
    ]
    path.write_text(FCSV_HEADER.format(version=version, system=system) + FCSV_COLUMNS + "\n".join(lines) + "\n")


def _mrk_json(path, points: np.ndarray, system: str | None, units: str | None = None) -> None:
    """A Slicer-style markups JSON point list (the fields Slicer 5 writes for each control point)."""
    pts = _ras(points) if system == "RAS" else points
    scale = 1000.0 if units == "um" else 1.0
    markup = {
        "type": "Fiducial",
        "name": "F",
        "locked": False,
        "labelFormat": "%N-%d",
        "controlPoints": [
            {
                "id": str(i + 1),
                "label": f"F-{i + 1}",
                "description": "",
                "associatedNodeID": "vtkMRMLScalarVolumeNode1",
                "position": [round(float(c) * scale, 6) for c in p],
                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": True,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined",
            }
            for i, p in enumerate(pts)
        ],
        "measurements": [],
        "display": {"visibility": True, "opacity": 1.0},
    }
    if system is not None:
        markup["coordinateSystem"] = system
    if units is not None:
        markup["coordinateUnits"] = units
    doc = {"@schema": io.SLICER_SCHEMA, "markups": [markup]}
    path.write_text(json.dumps(doc, indent=4))


@pytest.fixture
def files(tmp_path) -> dict:
    """The same points in every supported way of writing them."""
    out = {"csv": tmp_path / "lps.csv"}
    out["csv"].write_text(
        "label,x,y,z\n" + "".join(f"P{i},{x:.6f},{y:.6f},{z:.6f}\n" for i, (x, y, z) in enumerate(POINTS))
    )
    for system in ("RAS", "LPS", "0", "1"):
        out[f"fcsv-{system}"] = tmp_path / f"points_{system}.fcsv"
        _fcsv(out[f"fcsv-{system}"], POINTS, system)
    for system in ("RAS", "LPS", None):
        out[f"json-{system}"] = tmp_path / f"points_{system}.mrk.json"
        _mrk_json(out[f"json-{system}"], POINTS, system)
    return out


def test_every_format_reads_the_same_lps_points(files):
    for name, path in files.items():
        got = io.read_landmarks(path, 3, subject="s1", role="fixed_landmarks")
        assert got.dtype == np.float64 and got.shape == POINTS.shape, name
        assert np.array_equal(got, POINTS), name
    assert ",0.402000,2.566500,-5.312751," in files["fcsv-RAS"].read_text()  # it does hold RAS numbers


def test_old_fcsv_versions_and_micrometre_json(tmp_path):
    """Slicer 4.x files (numeric system, no trailing fields), upper/lower-case suffixes, and 'um' units."""
    old = tmp_path / "OLD.FCSV"
    _fcsv(old, POINTS, "0", version="4.6", extra="")
    assert np.array_equal(io.read_landmarks(old, 3), POINTS)
    um = tmp_path / "um.mrk.json"
    _mrk_json(um, POINTS, "RAS", units="um")
    np.testing.assert_allclose(io.read_landmarks(um, 3), POINTS, rtol=0, atol=1e-9)


def test_two_dimensional_images_keep_lps_x_and_y(files):
    """For a 2D image the LPS x and y are kept and Slicer's z is ignored, as a CSV's z column is."""
    for name, path in files.items():
        assert np.array_equal(io.read_landmarks(path, 2), POINTS[:, :2]), name


def test_real_afids_fcsv_matches_its_lps_csv(shared_data):
    """AFIDs consensus file (Slicer 4.6, ``CoordinateSystem = 0`` = RAS) against the LPS columns of the shared
    CSV written from it (4 decimals)."""
    import pandas as pd

    fcsv = shared_data("afids_templates", "source_fcsv", "tpl-MNI152NLin6Asym_res-01_desc-groundtruth_afids.fcsv")
    table = pd.read_csv(shared_data("afids_templates", "mni152nlin6asym", "landmarks.csv"))
    got = io.read_landmarks(fcsv, 3, subject="mni", role="fixed_landmarks")
    assert got.shape == (32, 3)
    np.testing.assert_allclose(got, table[["x_lps", "y_lps", "z_lps"]].to_numpy(), atol=5e-5 + 1e-9, rtol=0)


@pytest.mark.parametrize("suffix", [".fcsv", ".mrk.json", ".json", ".csv"])
@pytest.mark.parametrize("dim", [2, 3])
def test_write_landmarks_round_trip(tmp_path, suffix, dim):
    path = tmp_path / f"out{suffix}"
    io.write_landmarks(POINTS[:, :dim], path)
    assert np.array_equal(io.read_landmarks(path, dim), POINTS[:, :dim])
    if suffix == ".fcsv":
        assert "# CoordinateSystem = LPS" in path.read_text()
    if suffix.endswith("json"):
        doc = json.loads(path.read_text())
        assert doc["markups"][0]["coordinateSystem"] == "LPS"
        assert len(doc["markups"][0]["controlPoints"]) == len(POINTS)


def test_qc_tre_is_the_same_from_slicer_files_and_csv(tmp_path):
    """TRE as ``qc.evaluate`` computes it: read the pair, TRE of the raw points (before) and of the fixed
    points mapped by the transform (after), from CSV, .fcsv (RAS) and .mrk.json (RAS) files of the same points."""
    rng = np.random.default_rng(28)
    fixed = POINTS
    truth = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.05, -0.03, 0.1, (2.0, -3.0, 1.5))
    moving = np.round(warp.warp_points(fixed, truth) + rng.normal(0, 0.5, fixed.shape), 6)
    estimate = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.045, -0.03, 0.09, (1.8, -3.1, 1.4))
    pairs = {}
    for kind in ("csv", "fcsv", "mrk.json"):
        paths = []
        for role, pts in (("fixed", fixed), ("moving", moving)):
            p = tmp_path / f"{role}.{kind}"
            if kind == "csv":
                io.write_landmarks(pts, p)
            elif kind == "fcsv":
                _fcsv(p, pts, "RAS")
            else:
                _mrk_json(p, pts, "RAS")
            paths.append(p)
        pairs[kind] = io.read_landmark_pair(*paths, 3, subject="s1")
    results = {}
    for kind, (f, m) in pairs.items():
        before, after = tre(f, m, subject="s1"), tre(warp.warp_points(f, estimate), m, subject="s1")
        results[kind] = (before["tre_mean_mm"], before["tre_max_mm"], after["tre_mean_mm"], after["tre_max_mm"])
    assert results["fcsv"] == results["csv"] == results["mrk.json"], results
    assert results["csv"][2] < results["csv"][0]  # the estimate is closer than no registration


# ------------------------------------------------------------------------------------------ malformed files
def _fcsv_text(system_line: str, *rows: str) -> str:
    return f"# Markups fiducial file version = 5.6\n{system_line}{FCSV_COLUMNS}" + "".join(r + "\n" for r in rows)


GOOD_ROW = "0,1.5,2.5,3.5,0,0,0,1,1,1,0,F-1,,"


@pytest.mark.parametrize(
    "text, what",
    [
        (_fcsv_text("", GOOD_ROW), "has no '# CoordinateSystem = LPS' (or RAS) header line"),
        (_fcsv_text("# CoordinateSystem = IJK\n", GOOD_ROW), "'# CoordinateSystem' is 'IJK'; expected LPS or RAS"),
        (_fcsv_text("# CoordinateSystem = 2\n", GOOD_ROW), "expected LPS or RAS (or, in older .fcsv files"),
        (_fcsv_text("# CoordinateSystem = LPS\n"), "holds no points"),
        (_fcsv_text("# CoordinateSystem = LPS\n", GOOD_ROW, "1,abc,2,3,0,0,0,1,1,1,0,F-2,,"), "line 5: x, y, z are"),
        (_fcsv_text("# CoordinateSystem = LPS\n", "0,1.5,2.5"), "line 4 has 3 field(s)"),
        (_fcsv_text("# CoordinateSystem = RAS\n", "0,nan,2,3,0,0,0,1,1,1,0,F-1,,"), "non-finite coordinate"),
    ],
)
def test_malformed_fcsv(tmp_path, text, what):
    p = tmp_path / "fixed.fcsv"
    p.write_text(text)
    with pytest.raises(InputError) as info:
        io.read_landmarks(p, 3, subject="sub-28", role="fixed_landmarks")
    msg = str(info.value)
    assert f"subject 'sub-28', fixed_landmarks '{p}'" in msg and what in msg, msg


def _markups(**markup) -> dict:
    base = {"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": [{"label": "A", "position": [1, 2, 3]}]}
    return {"@schema": io.SLICER_SCHEMA, "markups": [{**base, **markup}]}


@pytest.mark.parametrize(
    "doc, what",
    [
        ('{"markups": [', "is not valid JSON"),
        ("[1, 2, 3]", "has no top-level 'markups' list"),
        ({"@schema": "x", "markups": []}, "holds 0 point list(s)"),
        (_markups(type="Curve"), "holds 0 point list(s) (markups of type 'Fiducial') among its 1 markup(s) (Curve)"),
        ({"markups": _markups()["markups"] * 2}, "holds 2 point list(s)"),
        (_markups(coordinateSystem="XYZ"), "'coordinateSystem' is 'XYZ'"),
        (_markups(coordinateUnits="cm"), "'coordinateUnits' is 'cm'"),
        (_markups(controlPoints=[]), "holds no control points"),
        (_markups(controlPoints=[{"label": "AC", "positionStatus": "undefined"}]), "control point 1 ('AC') has"),
        (_markups(controlPoints=[{"label": "AC", "position": [1, 2]}]), "'position' is [1, 2]; expected a list of 3"),
        (_markups(controlPoints=[{"position": ["1", 2, 3]}]), "control point 1: 'position' is ['1', 2, 3]"),
        (_markups(controlPoints=[{"position": [1, 2, 3]}, "B"]), "control point 2 is str"),
        ('{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [NaN, 0, 0]}]}]}', "non-finite"),
    ],
)
def test_malformed_markups_json(tmp_path, doc, what):
    p = tmp_path / "moving.mrk.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(InputError) as info:
        io.read_landmarks(p, 3, subject="sub-28", role="moving_landmarks")
    msg = str(info.value)
    assert f"subject 'sub-28', moving_landmarks '{p}'" in msg and what in msg, msg
    assert "Traceback" not in msg


def test_missing_file_names_the_formats(tmp_path):
    with pytest.raises(InputError, match=r"file not found\. Landmarks are .*\.mrk\.json.*\.fcsv"):
        io.read_landmarks(tmp_path / "absent.fcsv", 3, subject="s", role="fixed_landmarks")


def test_json_is_parsed_not_evaluated(tmp_path):
    """A Python expression in place of JSON is a JSON error, never run."""
    p = tmp_path / "evil.mrk.json"
    p.write_text("__import__('os').getcwd()")
    with pytest.raises(InputError, match="is not valid JSON"):
        io.read_landmarks(p, 3)
