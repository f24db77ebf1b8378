"""Perplexity on the ANCHORS protocol.

Tokenize without special tokens, cut into non-overlapping windows of `window` tokens, prepend BOS only
for tokenizers that add one by default (Gemma yes; SmolLM2 and Qwen no), and report exp(mean NLL) over
every predicted token of the first `max_windows` windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..calib.samples import tokenize_text


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def model_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def check_windows(max_windows) -> None:
    from ..errors import LowbitError

    if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
        raise LowbitError(f"windows={max_windows!r} must be a positive int", "pass --windows 40 (the ANCHORS protocol)")


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 512, max_windows: int = 40, progress: bool = False) -> float:
    check_windows(max_windows)
    ids = tokenize_text(tokenizer, text)
    n = min(max_windows, ids.numel() // window)
    if n == 0:
        from ..errors import LowbitError

        raise LowbitError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {window}", "pass a longer --text")
    windows = ids[: n * window].reshape(n, window)
    if adds_bos(tokenizer):
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id), windows], dim=1)
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="perplexity", unit="window")
    for i in iterator:
        x = windows[i : i + 1].to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()  # [1, T, vocab]
        nll = F.cross_entropy(logits[0, :-1], x[0, 1:].to(logits.device), reduction="sum")
        total_nll += nll.item()
        total_tokens += x.shape[1] - 1
    return math.exp(total_nll / total_tokens)
