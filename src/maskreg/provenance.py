"""Which software produced a result: maskreg's version and, when it runs from a git checkout, the commit.

The workflow puts :func:`software_tag` into the params of every rule whose output depends on the engine, so an
upgrade (a new version, or a new commit of a checkout) reruns those jobs and a cohort never mixes the outputs
of two versions silently; :func:`software` goes into each ``registration.json``.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

from maskreg import __version__


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout that holds this package's source, or ``(None, None)`` when it
    is not in one (an installed wheel) or git is missing. ``dirty``: tracked files under ``src/`` differ from
    the commit (other files, such as docs or tests, cannot change a result)."""
    here = Path(__file__).resolve().parent
    try:
        top = _git(here, "rev-parse", "--show-toplevel")
        if top is None or not (Path(top) / "src" / "maskreg" / "__init__.py").resolve() == here / "__init__.py":
            return None, None  # some other repository that happens to contain an installed copy
        commit = _git(here, "rev-parse", "HEAD")
        changed = _git(here, "status", "--porcelain", "--untracked-files=no", "--", str(Path(top) / "src"))
    except OSError:
        return None, None
    if commit is None:
        return None, None
    return commit, bool(changed)


def _git(cwd: Path, *args: str) -> str | None:
    """``git args`` in ``cwd``: its stripped output, or ``None`` when it fails."""
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def software() -> dict[str, Any]:
    """``{"maskreg": version, "commit": sha or None, "dirty": bool or None}`` for a report."""
    commit, dirty = git_state()
    return {"maskreg": __version__, "commit": commit, "dirty": dirty}


def software_tag() -> str:
    """One string that changes with the version and, in a checkout, with the commit: ``0.1.0`` or
    ``0.1.0+g<12 hex digits>`` (PEP 440's local-version form, as setuptools-scm writes it). Uncommitted edits
    are not in it: a rerun after each edit would be a nuisance while developing, and a release has none."""
    commit, _ = git_state()
    return __version__ if commit is None else f"{__version__}+g{commit[:12]}"
