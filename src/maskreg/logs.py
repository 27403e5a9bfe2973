"""Logging for jobs: one log file per job, and a last line that says why a job failed.

A failed job's log ends with ``ERROR: <one-line message>`` so the cohort report can list it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator

ERROR_PREFIX = "ERROR: "


def setup(log_path: str | os.PathLike | None, level: int = logging.INFO) -> logging.Logger:
    """Send the ``maskreg`` logger to ``log_path`` (if given) and to stderr; return it."""
    logger = logging.getLogger("maskreg")
    logger.setLevel(level)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logging.captureWarnings(True)
    wlog = logging.getLogger("py.warnings")
    wlog.handlers = list(handlers)
    return logger


def one_line(exc: BaseException) -> str:
    """The exception as one line: type for unexpected errors, message only for maskreg's own."""
    from maskreg.errors import MaskregError

    msg = " ".join(str(exc).split())
    return msg if isinstance(exc, MaskregError) else f"{type(exc).__name__}: {msg}"


@contextlib.contextmanager
def job(log_path: str | os.PathLike | None) -> Iterator[logging.Logger]:
    """Run a job's body with logging set up; on failure write the traceback and a final ``ERROR:`` line to
    the log, then re-raise so the job fails."""
    logger = setup(log_path)
    try:
        yield logger
    except BaseException as exc:
        logger.debug("".join(traceback.format_exception(exc)))
        if log_path:
            with open(log_path, "a") as fh:
                fh.write("".join(traceback.format_exception(exc)))
                fh.write(f"{ERROR_PREFIX}{one_line(exc)}\n")
        raise


def last_error(log_path: str | os.PathLike) -> str | None:
    """The ``ERROR:`` line of a job log, if any."""
    try:
        with open(log_path) as fh:
            lines = [ln[len(ERROR_PREFIX) :].strip() for ln in fh if ln.startswith(ERROR_PREFIX)]
    except OSError:
        return None
    return lines[-1] if lines else None
