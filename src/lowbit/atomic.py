"""Write a folder atomically: build it as `<target>.lowbit-partial` beside the target, rename at the end.

A run that dies leaves no half-written target; the partial folder stays so the run can resume, except
after an input error (LowbitError), which no resume can fix.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import LowbitError


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".lowbit-partial")


def check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise LowbitError(f"output folder {target} already exists", "pass --overwrite to replace it, or choose another --output_dir")


@contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False, resume: bool = True):
    """Yield the partial folder to fill; on success replace `target` with it."""
    target = Path(target)
    check_target(target, overwrite)
    partial = partial_path(target)
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    except LowbitError:
        # bad input is not resumable (the input must change): leave nothing behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(target.name + ".lowbit-old")
        os.replace(target, old)
        os.replace(partial, target)
        shutil.rmtree(old)
    else:
        os.replace(partial, target)
