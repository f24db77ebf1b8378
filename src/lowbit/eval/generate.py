"""Greedy generation of a short answer, through the chat template when the tokenizer has one."""

from __future__ import annotations

import torch

from ..errors import LowbitError
from .perplexity import model_device


def check_max_new_tokens(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise LowbitError(f"max_new_tokens={n!r} must be a positive int", "pass --max_new_tokens 48")


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    check_max_new_tokens(max_new_tokens)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(model_device(model))
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
