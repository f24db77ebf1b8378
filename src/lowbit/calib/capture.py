"""Capture what every block receives, running only the modules before block 0.

Every block of the skeleton is swapped for a `_Recorder` that binds its call's arguments to the block
forward's signature (positional ones included: Gemma 4 passes `per_layer_input` positionally) and hands
the hidden states on unchanged; the last one stops the forward. Each argument is classified across the
calibration samples, as it arrives:
- the first parameter is the hidden states: block 0's are kept per sample, [1, T, H] each;
- `const`: equal for every sample (rotary tables, masks and position ids of equal-length windows): stored
  once, and shared between blocks that receive the same object (one copy of the sliding-window mask for
  all sliding layers);
- `sample`: differs between samples and is tensors with a batch dimension of 1 (Gemma 4's per-layer
  inputs; image-dependent position ids): stored per sample, batched together at replay;
- `state`: the spec's `state_kwargs`, containers that blocks write and later blocks read (Gemma 4's
  shared KV states): not recorded; the block engine gives every sample its own, carried across blocks.
- streams: the spec's `block_outputs` beyond the hidden states, i.e. arguments a block returns for the next
  one (a diffusion transformer's joint blocks take and return `encoder_hidden_states` beside the image's
  `hidden_states`): kept per sample for block 0, like the hidden states; later blocks get them from the
  block engine.
Anything else (an argument that differs between samples but cannot be split by sample, an undeclared
mutable container) cannot be replayed exactly: `ReplayPlan.refusal` says why, and the runner refuses
to calibrate with it.

Two ways to drive the capture: `capture_block_inputs` runs a causal LM per sample and stops the forward
at the last block (nothing after it is needed); `recording(..., run=...)` lets a caller drive the model
itself and runs each real block after recording it, so the model's forward completes (a diffusion
pipeline's denoising loop needs the transformer's output to take its next step).
"""

from __future__ import annotations

import inspect
from collections import UserDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LowbitError
from .tree import tree_equal, tree_map, tree_leaves

# arguments that only matter for generation; blocks are replayed without a KV cache
DROPPED = ("cache", "past_key_values", "past_key_value", "use_cache", "output_attentions", "cache_position")


class _StopForward(Exception):
    pass


@dataclass
class BlockArgs:
    """How block i's arguments are replayed. const: name -> value (batch dim 1 or none, broadcast);
    sample: name -> per-sample values; state: name -> the container class to instantiate per sample."""

    const: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)


@dataclass
class ReplayPlan:
    """Everything captured: block 0's hidden states per sample, every block's argument plan."""

    hidden: list  # [1, T, H] per sample, on the storage device
    blocks: list  # BlockArgs per block index
    hidden_name: str = "hidden_states"
    refusal: str = ""  # why replay cannot be exact ("" = it can)
    streams: dict = field(default_factory=dict)  # other carried argument -> block 0's value per sample ([1, T', H'])
    outputs: tuple = ()  # the arguments a block's return values feed, in return order; () = (hidden_name,)


def _movable(value) -> bool:
    """Tensors (and Nones) only: can be copied to the storage device and compared."""
    leaves = tree_leaves(value)
    return any(isinstance(t, torch.Tensor) for t in leaves) and all(t is None or isinstance(t, torch.Tensor) for t in leaves)


def _per_sample(value) -> bool:
    """Tensors that all carry a batch dimension of 1 (so samples can be concatenated along it)."""
    leaves = [t for t in tree_leaves(value) if t is not None]
    return bool(leaves) and all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1 for t in leaves)


class _Sink:
    """Classifies the arguments of every block as the samples arrive (see the module docstring)."""

    def __init__(self, n_blocks: int, storage: torch.device, state_kwargs: tuple[str, ...], outputs: tuple[str, ...] = ()):
        self.storage, self.state_kwargs = storage, state_kwargs
        self.plan = ReplayPlan(hidden=[], blocks=[BlockArgs() for _ in range(n_blocks)], outputs=tuple(outputs))
        self.sample = -1
        self._stored: dict[int, object] = {}  # id(original object) -> stored copy, within one sample
        self._shared: list = []  # stored constants, for sharing equal ones between blocks
        self._same: dict = {}

    def new_sample(self) -> None:
        self.sample += 1
        self._stored.clear()
        self._same.clear()

    def same(self, stored, value) -> bool:
        """tree_equal, once per (stored constant, object) pair in a sample: every sliding layer receives the
        same mask object, which is compared (and copied to the storage device) once, not once per layer."""
        key = (id(stored), id(value))
        if key not in self._same:
            self._same[key] = (tree_equal(stored, value), value)  # keep `value` alive: its id stays unique
        return self._same[key][0]

    def store(self, value):
        key = id(value)
        if key not in self._stored:
            stored = tree_map(lambda t: t.detach().to(self.storage) if isinstance(t, torch.Tensor) else t, value)
            self._stored[key] = (value, stored)  # keep `value` alive so its id is not reused this sample
        return self._stored[key][1]

    def share(self, value):
        """A constant equal to one stored for another block is that one (one copy of each mask)."""
        for known in self._shared:
            if known is value or tree_equal(known, value):
                return known
        self._shared.append(value)
        return value

    def refuse(self, reason: str) -> None:
        if not self.plan.refusal:
            self.plan.refusal = reason

    def record(self, index: int, block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bound = _bind(block, args, kwargs)
        hidden_name = next(iter(bound))
        hidden = bound.pop(hidden_name)
        carried = {name: bound.pop(name, None) for name in self.plan.outputs if name != hidden_name}
        if index == 0:
            self.plan.hidden.append(hidden.detach().to(self.storage))
            self.plan.hidden_name = hidden_name
            for name, value in carried.items():
                self.plan.streams.setdefault(name, []).append(value.detach().to(self.storage) if isinstance(value, torch.Tensor) else value)
        plan = self.plan.blocks[index]
        for name, value in bound.items():
            if name in DROPPED:
                continue
            if name in self.state_kwargs:
                plan.state[name] = type(value) if value is not None else dict
                continue
            if isinstance(value, (dict, UserDict)) and not _movable(value):
                self.refuse(f"block {index}'s argument {name!r} is a container ({type(value).__name__}) that blocks may share; "
                            "declare it in the spec's state_kwargs if blocks pass state through it")
                continue
            if not _movable(value):
                if self.sample == 0:
                    plan.const[name] = value
                elif not (plan.const.get(name) is value or tree_equal(plan.const.get(name), value)) and name not in plan.sample:
                    self.refuse(f"block {index}'s argument {name!r} ({type(value).__name__}) differs between samples")
                continue
            if name in plan.sample:
                plan.sample[name].append(self.store(value))
            elif self.sample == 0:
                plan.const[name] = self.share(self.store(value))
            elif not self.same(plan.const[name], value):
                if not _per_sample(value):
                    self.refuse(f"block {index}'s argument {name!r} differs between samples and has no batch dimension of 1")
                    continue
                first = plan.const.pop(name)  # was the same for samples 0 .. sample-1
                plan.sample[name] = [first] * self.sample + [self.store(value)]


def _bind(block: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """name -> value of one block call, bound to its forward's signature (**kwargs flattened in)."""
    signature = inspect.signature(block.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise LowbitError(f"cannot bind the arguments of {type(block).__name__}.forward: {err}", "this transformers version calls its blocks differently; report it") from None
    out = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise LowbitError(f"{type(block).__name__}.forward takes extra positional arguments lowbit cannot name", "report this architecture")
        else:
            out[name] = value
    return out


class _Recorder(torch.nn.Module):
    """Stands in for block `index`: records the call, then stops the forward (`last`), runs the real block
    (`run(index, block, args, kwargs)`, when the caller's forward must complete) or hands the hidden states on."""

    def __init__(self, wrapped: torch.nn.Module, index: int, sink: _Sink, last: bool, run: Callable | None = None):
        super().__init__()
        self.wrapped = [wrapped]  # a list, so the meta block is not registered as a child
        self.index, self.sink, self.last, self.run = index, sink, last, run

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.wrapped[0], name)  # e.g. a layer's attention_type read by the model

    def forward(self, *args, **kwargs):
        self.sink.record(self.index, self.wrapped[0], args, kwargs)
        if self.run is not None:
            return self.run(self.index, self.wrapped[0], args, kwargs)
        if self.last:
            raise _StopForward
        return args[0] if args else next(iter(kwargs.values()))


def _as_input(value, device, dtype):
    """A model input on the device; floating ones (pixel values) in the model's dtype."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def block_slots(block_lists) -> list[tuple[torch.nn.ModuleList, int]]:
    """(list, position) of every block in model order; `block_lists` is one ModuleList or several (a FLUX
    transformer's double-stream blocks, then its single-stream ones): global index = position in this list."""
    lists = [block_lists] if isinstance(block_lists, torch.nn.ModuleList) else list(block_lists)
    return [(blocks, i) for blocks in lists for i in range(len(blocks))]


@contextmanager
def recording(block_lists, storage, state_kwargs: tuple[str, ...] = (), outputs: tuple[str, ...] = (), run: Callable | None = None):
    """Swap every block for a recorder while the caller drives the model; yields the `_Sink` (call
    `new_sample()` before each sample's forward); its `plan` is complete when the block is left.
    run: None stops the forward at the last block; else `run(index, block, args, kwargs)` computes each block."""
    slots = block_slots(block_lists)
    sink = _Sink(len(slots), torch.device(storage), state_kwargs, outputs)
    originals = [blocks[i] for blocks, i in slots]
    for index, ((blocks, i), block) in enumerate(zip(slots, originals)):
        blocks[i] = _Recorder(block, index, sink, last=index == len(slots) - 1, run=run)
    try:
        yield sink
    finally:
        for (blocks, i), block in zip(slots, originals):
            blocks[i] = block
        sink.new_sample()


@torch.no_grad()
def capture_block_inputs(model, blocks: torch.nn.ModuleList, samples: list[dict], device, storage, state_kwargs: tuple[str, ...] = ()) -> ReplayPlan:
    """Run `model` on each sample (a dict of model inputs with batch 1, e.g. {"input_ids": [1, T]}) up to
    the last block, recording what every block receives; the modules before block 0 must be loaded."""
    with recording(blocks, storage, state_kwargs) as sink:
        for sample in samples:
            sink.new_sample()
            try:
                model(**{k: _as_input(v, device, model.dtype) for k, v in sample.items()}, use_cache=False)
            except _StopForward:
                pass
    return sink.plan
