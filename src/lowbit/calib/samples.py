"""Cut a text into `nsamples` non-overlapping windows of `seqlen` tokens (no special tokens)."""

from __future__ import annotations

import torch

from ..config import CalibConfig
from ..errors import LowbitError


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All token ids of `text`, 1-D, without BOS/EOS (the ANCHORS protocol)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_windows(tokenizer, text: str, calib: CalibConfig) -> torch.Tensor:
    """[n, seqlen] token ids: the first `nsamples` consecutive windows of the text."""
    ids = tokenize_text(tokenizer, text)
    available = ids.numel() // calib.seqlen
    if available == 0:
        raise LowbitError(f"calibration text has {ids.numel()} tokens, fewer than one window of seqlen={calib.seqlen}", "pass a longer --dataset text or a smaller --seqlen")
    if available < calib.nsamples:
        if not calib.allow_fewer:
            raise LowbitError(
                f"calibration text makes only {available} samples of {calib.seqlen} tokens, fewer than nsamples={calib.nsamples}",
                f"pass --nsamples {available}, a smaller --seqlen, a longer --dataset, or --allow_fewer_samples to use {available}",
            )
    n = min(available, calib.nsamples)
    return ids[: n * calib.seqlen].reshape(n, calib.seqlen)
