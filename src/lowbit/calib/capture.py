"""Capture what each block receives, running only the modules before block 0.

Every block of the skeleton is swapped for a `_Recorder` that stores its call's keyword arguments
(masks, position embeddings, position ids: the same for every sample of equal length, so stored once
per block and shared between blocks when they are the same object) and hands the hidden states on
unchanged; the last one stops the forward. Block 0's recorder also stores the hidden states, one
[1, seqlen, hidden] tensor per sample. Recording every block's kwargs, not only block 0's, is what lets
models with per-layer inputs (Gemma 3's sliding vs full attention masks and rotary tables) work
without a special case.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# kwargs that only matter for generation; blocks are run without a KV cache
_DROPPED = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions")


class _StopForward(Exception):
    pass


class _Recorder(torch.nn.Module):
    def __init__(self, wrapped: torch.nn.Module, index: int, sink: "BlockInputs", last: bool):
        super().__init__()
        self.wrapped = [wrapped]  # a list, so the meta block is not registered as a child
        self.index, self.sink, self.last = index, sink, last

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped[0], name)  # e.g. a layer's attention_type read by the model

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.sink.hidden.append(hidden_states.detach().to(self.sink.storage))
        if len(self.sink.kwargs) == self.index:
            self.sink.kwargs.append({k: v for k, v in kwargs.items() if k not in _DROPPED})
        if self.last:
            raise _StopForward
        return hidden_states


@dataclass
class BlockInputs:
    """Cached inputs of the current block: hidden states per sample and kwargs per block index."""

    storage: torch.device
    hidden: list[torch.Tensor] = field(default_factory=list)  # each [1, seqlen, hidden]
    kwargs: list[dict] = field(default_factory=list)  # kwargs[i] is what block i receives

    def kwargs_for(self, index: int, device) -> dict:
        return {k: _to(v, device) for k, v in self.kwargs[index].items()}


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(model, blocks: torch.nn.ModuleList, windows: torch.Tensor, device, storage) -> BlockInputs:
    """Run `model` on each window [n, seqlen] up to block 0; the pre-block modules must be loaded."""
    sink = BlockInputs(storage=torch.device(storage))
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Recorder(block, i, sink, last=i == len(originals) - 1)
    try:
        for window in windows:
            try:
                model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return sink


def block_output(out):
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block, hidden: list[torch.Tensor], kwargs: dict, batch_size: int, device, storage) -> list[torch.Tensor]:
    """Outputs of `block` for every cached sample, batched; returned per sample on `storage`."""
    outs = []
    for start in range(0, len(hidden), batch_size):
        batch = torch.cat(hidden[start : start + batch_size]).to(device)
        y = block_output(block(batch, **kwargs))
        outs.extend(t.unsqueeze(0).to(storage) for t in y)
    return outs
