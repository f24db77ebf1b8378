"""Write a folder atomically: build it as `<target>.lowbit-partial` beside the target, rename at the end.

A run that dies leaves no half-written target; the partial folder stays so the run can resume, except
after an input error (LowbitError), which no resume can fix. The output's lock (guard.py), when this
process holds one, is released when the folder is done, whatever the outcome.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from .errors import LowbitError
from .guard import release_output_lock


def partial_path(target: Path) -> Path:
    return target.with_name(target.name + ".lowbit-partial")


def check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise LowbitError(f"output folder {target} already exists", "pass --overwrite to replace it, or choose another --output_dir")


def announce_resume(state: dict | None, ckpt, partial: Path) -> None:
    """Say on stderr, in one line, that a run resumes and where (blocks are counted from 0, as named)."""
    if not state:
        return
    n = getattr(ckpt.config.get_text_config(), "num_hidden_layers", None) or "?"  # every HF causal LM config has it
    done = state["blocks_done"]
    print(f"lowbit: resuming at block {done} of {n} (blocks 0-{done - 1} are already written in {partial})", file=sys.stderr)


@contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False, resume: bool = True):
    """Yield the partial folder to fill; on success replace `target` with it."""
    target = Path(target)
    try:
        check_target(target, overwrite)
        partial = partial_path(target)
        if partial.exists() and not resume:
            shutil.rmtree(partial)
        try:
            partial.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LowbitError(f"cannot create {partial}: {err.strerror}", "choose an --output_dir in a folder you can write") from None
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
    finally:
        release_output_lock(target)
