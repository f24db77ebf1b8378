"""The checkpoint's tokenizer, or one line saying why there is none (calibration, eval and generate need it)."""

from __future__ import annotations

from pathlib import Path

from ..errors import LowbitError

# a folder holding none of these has no tokenizer transformers could build
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")


def load_tokenizer(folder: str | Path):
    """AutoTokenizer for a local checkpoint folder; a missing or unreadable tokenizer is a LowbitError."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LowbitError(
            f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)",
            "copy them from the original model into the folder; calibration, eval and generate need the tokenizer",
        )
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises ValueError / OSError / TypeError here; the text is what matters
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LowbitError(f"cannot load the tokenizer in {folder}: {first}", "re-save it with tokenizer.save_pretrained(folder)") from None
