"""Calibration prompts: a UTF-8 file with one prompt per line (blank lines and lines starting with # skipped),
or the small default set shipped with lowbit (calib/prompts.txt: varied subjects, styles and lengths)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LowbitError

DEFAULT = Path(__file__).resolve().parent.parent / "calib" / "prompts.txt"


def load_prompts(path: str | None, limit: int | None = None) -> list[str]:
    file = Path(path) if path else DEFAULT
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LowbitError(f"cannot read the prompt file {file}: {err}", "pass --prompt_file with a UTF-8 text file, one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise LowbitError(f"the prompt file {file} holds no prompt", "write one prompt per line (blank and # lines are skipped)")
    return prompts[:limit] if limit else prompts
