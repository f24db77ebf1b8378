"""Calibration for a diffusion transformer: the pipeline itself runs a few denoising steps per prompt, and every
call of the transformer is split into its samples, each recorded block by block (calib/capture.py).

A calibration sample is one transformer call for one prompt at one timestep (and one guidance branch when the
pipeline batches conditional and unconditional inputs, as SD3 does): its image tokens, text tokens, timestep
embedding and rotary tables are what each block receives at that point of the trajectory. Because the
pipeline needs the transformer's output to take its next step, the blocks really run while being recorded
(`recording(run=...)`): resident on the device when they fit, else loaded from the shards for each call and
freed after it (RAM bounded by one block).
"""

from __future__ import annotations

import inspect

import torch

from ..calib.capture import ReplayPlan, recording
from .spec import DiffusionSpec


class PerSample(torch.nn.Module):
    """The transformer as a pipeline calls it, run one sample at a time.

    Each batched call ([B, ...] in the spec's `batch_inputs`) becomes B calls of batch 1 (`new_sample()` before
    each), their outputs concatenated back: the block inputs of every sample are recorded separately, as the
    block engine replays them. Attributes (config, dtype, cache_context ...) are the transformer's."""

    def __init__(self, transformer: torch.nn.Module, spec: DiffusionSpec, new_sample):
        super().__init__()
        self.inner = [transformer]  # a list: not registered as a child (its blocks are swapped for recorders)
        self.spec, self.new_sample = spec, new_sample
        self.signature = inspect.signature(transformer.forward)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner[0], name)

    def forward(self, *args, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        bound = self.signature.bind(*args, **kwargs).arguments
        return_dict = bound.pop("return_dict", True)
        for name in self.spec.none_if_empty:
            if name in bound and not bound[name]:
                bound[name] = None
        n = bound["hidden_states"].shape[0]
        outs = []
        for b in range(n):
            one = {k: v[b : b + 1] if k in self.spec.batch_inputs and isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in bound.items()}
            self.new_sample()
            outs.append(self.inner[0](**one, return_dict=False)[0])
        out = torch.cat(outs)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def block_lists(transformer: torch.nn.Module, spec: DiffusionSpec) -> list[torch.nn.ModuleList]:
    return [transformer.get_submodule(name) for name in spec.block_lists]


def run_in_place(index, block, args, kwargs):
    """Blocks already loaded where they run."""
    return block(*args, **kwargs)


@torch.no_grad()
def capture_transformer(transformer: torch.nn.Module, spec: DiffusionSpec, drive, storage, run_block=run_in_place) -> ReplayPlan:
    """Record every block's inputs while `drive(t)` calls `t` (the transformer, split per sample) as a
    pipeline would; `run_block(index, block, args, kwargs)` computes each real block."""
    with recording(block_lists(transformer, spec), storage, spec.blocks.state_kwargs, spec.blocks.block_outputs, run=run_block) as sink:
        drive(PerSample(transformer, spec, sink.new_sample))
    return sink.plan
