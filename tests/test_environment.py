"""The software environment, declared four times, says one thing: requirements.lock (what make and CI install),
pyproject.toml's ranges, workflow/envs/maskreg.yaml (--sdm conda) and the Dockerfile (--sdm apptainer)."""

from __future__ import annotations

import re
from importlib import metadata

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def pins(lines: list[str]) -> dict[str, str]:
    """``name==version`` lines (comments and blanks skipped) as ``{canonical name: version}``."""
    out = {}
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not a pin: {line!r}"
            out[canonicalize_name(name)] = version
    return out


@pytest.fixture(scope="module")
def lock(repo) -> dict[str, str]:
    return pins((repo / "requirements.lock").read_text().splitlines())


@pytest.fixture(scope="module")
def torch_pin(repo) -> str:
    """The torch version make installs where none is found (Makefile's TORCH)."""
    return re.search(r"^TORCH := (\S+)$", (repo / "Makefile").read_text(), re.M).group(1)


def test_the_conda_environment_has_the_locks_packages_and_versions(repo, lock, torch_pin):
    env = yaml.safe_load((repo / "workflow/envs/maskreg.yaml").read_text())
    pip_list = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda
    assert pins(pip_list) == {**lock, "torch": torch_pin}


def test_every_rule_names_the_conda_environment_and_lint_is_clean(repo, tmp_path, snakemake):
    config = yaml.safe_load((repo / "config/config.yaml").read_text())
    config["cohort"] = str(repo / "config/cohort.tsv")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path, "--lint")
    assert proc.returncode == 0 and "Congratulations" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    rules = "".join(p.read_text() for p in (repo / "workflow/rules").glob("*.smk"))
    n_rules = len(re.findall(r"^[ \t]*rule \w+:", rules, re.M))
    assert len(re.findall(r"^[ \t]+conda:\s+CONDA_ENV$", rules, re.M)) == n_rules > 5


def test_the_lock_satisfies_pyproject_and_is_what_is_installed(repo, lock):
    """Every requirement of maskreg and of its extras test, learn and bids is pinned in the lock (torch aside) at a
    version inside pyproject's range, and the running environment has those versions (make installs them)."""
    extras = ("test", "learn", "bids")
    reqs = [Requirement(r) for r in metadata.requires("maskreg") or []]
    wanted = [r for r in reqs if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras)]
    assert len(wanted) > 15
    for r in wanted:
        name = canonicalize_name(r.name)
        if name == "torch":
            assert name not in lock  # the machine's own build is kept (Makefile)
            continue
        assert name in lock, f"{r.name} is not in requirements.lock (make lock)"
        assert r.specifier.contains(lock[name], prereleases=True), f"{r.name} {lock[name]} outside '{r.specifier}'"
    stale = {n: (v, installed(n)) for n, v in lock.items() if installed(n) != v}
    assert not stale, f"installed versions differ from requirements.lock (run make setup): {stale}"


def installed(name: str) -> str | None:
    """The version of ``name`` that an import finds (the first on sys.path: a venv's before the system's)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_the_dockerfile_installs_the_lock_and_makes_torch(repo, torch_pin):
    text = (repo / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M)
    assert f"pip install torch=={torch_pin}" in text
    assert re.search(r"pip install -c requirements\.lock \"\.\[[a-z,]*\]\"", text)
    assert "COPY pyproject.toml README.md requirements.lock ./" in text
