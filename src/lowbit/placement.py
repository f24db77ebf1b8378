"""Where a block runs: on one device when it fits with the method's state, else spread over the given devices.

The decision is a pure function of sizes (`plan`), unit-tested without any GPU: a block needs its weights,
the method's state per linear (`MethodConfig.linear_memory`: GPTQ's Hessians, AWQ's weight copies,
AutoRound's V and gradients), the activations of one batch (saved for the backward pass when the method
trains) and, when the calibration cache lives on the same device, the cache. Budgets are each device's free
memory (`free_bytes`), capped by `--max_memory`.

- The calibration cache (the samples' hidden states, one chain or two with AutoRound's fp targets) goes on
  the first device if it fits there beside the block, else on the first other device it fits on, else on the
  CPU (`plan_storage`).
- A block that fits on the first device runs there, as before. Otherwise its quantized linears are placed in
  forward order: on the first device as long as they fit beside everything else of the block (norms,
  attention, embeddings-free parts, the batch's activations), then on the next device, and so on. A linear
  placed elsewhere gets accelerate's `AlignDevicesHook` with `io_same_device`: its input is moved to its
  device and its output back, so the block's own code (residual adds, gate * up) always meets its tensors
  on the first device, whatever the architecture. The algorithms work on each weight's own device (GPTQ's
  Hessians, AWQ's statistics and searches, AutoRound's parameters live beside their linear).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import LowbitError

UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TB": 1000**4, "TIB": 1024**4}
HEADROOM = 0.9  # of a device's free memory: the allocator's fragmentation and the estimates' roughness


# ---------------------------------------------------------------- sizes and budgets


def parse_size(text: str) -> int:
    """'20GiB', '512MB', '1e9' -> bytes; a bad size is one line."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in UNITS:
        raise LowbitError(f"--max_memory entry {text!r} is not a size", "write sizes like 20GiB or 512MB, one per --device_map entry")
    try:
        return int(float(m.group(1)) * UNITS[unit])
    except ValueError:
        raise LowbitError(f"--max_memory entry {text!r} is not a size", "write sizes like 20GiB or 512MB, one per --device_map entry") from None


def free_bytes(device: torch.device) -> int:
    """Memory a block could still take on `device`: free device memory plus what torch's caching allocator
    holds unused (CUDA), or the memory the OS reports available (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    return psutil.virtual_memory().available


@dataclass(frozen=True)
class BlockSizes:
    """What a block is made of, for the estimate (shapes only: taken from the meta skeleton).

    linears: quantized linear name -> (N out, K in), in forward (declaration) order.
    other_bytes: every other parameter and buffer of the block (norms, routers, biases, kept linears).
    weight_bytes: bytes per weight element while the block is worked on (2 for 16-bit, 4 for float32).
    batch_tokens: tokens of one batch (batch_size x seqlen); 0 without calibration.
    """

    linears: dict[str, tuple[int, int]]
    other_bytes: int
    weight_bytes: int
    batch_tokens: int = 0
    routed: dict[str, float] = field(default_factory=dict)  # expert linear -> share of the batch's tokens it sees (top_k / E)

    @classmethod
    def of(cls, block: torch.nn.Module, linears: dict[str, torch.nn.Linear], dtype: torch.dtype, batch_tokens: int) -> "BlockSizes":
        weight_bytes = torch.empty((), dtype=dtype).element_size()
        quantized = {id(m.weight) for m in linears.values()}
        tensors = [t for t in list(block.parameters()) + list(block.buffers()) if id(t) not in quantized]
        other = sum(t.numel() * (weight_bytes if t.is_floating_point() else t.element_size()) for t in tensors)
        return cls({n: (m.out_features, m.in_features) for n, m in linears.items()}, other, weight_bytes, batch_tokens, routed_shares(block, linears))


EXPERT = re.compile(r"(^|\.)experts\.(\d+)\.")


def routed_shares(block: torch.nn.Module, linears: dict) -> dict[str, float]:
    """Mixture of experts: each expert linear sees about top_k / E of a batch's tokens (top_k read from the
    block's router or MoE module, E the experts counted by name); without a top_k, every token (an upper bound)."""
    experts = {m.group(2) for n in linears for m in [EXPERT.search(n)] if m}
    top_k = next((v for m in block.modules() for v in [getattr(m, "top_k", getattr(m, "num_experts_per_tok", None))] if isinstance(v, int) and v > 0), None)
    if not experts or top_k is None:
        return {}
    return {n: min(1.0, top_k / len(experts)) for n in linears if EXPERT.search(n)}


def activation_bytes(sizes: BlockSizes, training: bool) -> int:
    """One batch through the block, H the first linear's input width. Without a backward pass: the hidden
    states in and out, the residual and a norm's output [t, H] float32, and the widest linears' outputs (gate,
    up, their product) [t, N]. With
    one (AutoRound): every linear's saved input and output [t, K + N] (an expert's: its routed share of
    the tokens) plus the float32 prediction, target and loss terms [t, H] x 4, and the experts' weights twice:
    stacked per projection for the grouped GEMMs (arch/experts.dense_grouped_forward, saved for the backward)
    and their gradient stacked in it."""
    if not sizes.linears or not sizes.batch_tokens:
        return 0
    t = sizes.batch_tokens
    hidden = next(iter(sizes.linears.values()))[1]  # the first linear reads the (normed) block input: K = H
    widest = max(n for n, _ in sizes.linears.values())
    if training:
        saved = sum(sizes.routed.get(name, 1.0) * (n + k) for name, (n, k) in sizes.linears.items())
        stacked = sum(n * k for name, (n, k) in sizes.linears.items() if name in sizes.routed)
        return int(t * saved * sizes.weight_bytes) + t * 4 * hidden * 4 + 2 * stacked * sizes.weight_bytes
    return t * (4 * hidden + 3 * widest) * 4


def block_bytes(sizes: BlockSizes, method) -> int:
    """Everything the block needs on one device (the cache excluded)."""
    held, temp = _linear_needs(sizes, method)
    return sizes.other_bytes + activation_bytes(sizes, method.saves_activations) + sum(held.values()) + max(temp.values(), default=0)


def _linear_needs(sizes: BlockSizes, method) -> tuple[dict[str, int], dict[str, int]]:
    needs = {name: method.linear_memory(n, k, sizes.weight_bytes) for name, (n, k) in sizes.linears.items()}
    return {n: v[0] for n, v in needs.items()}, {n: v[1] for n, v in needs.items()}


# ---------------------------------------------------------------- the plan (pure)


@dataclass
class Placement:
    """main: where the block's own code, its inputs and every unlisted tensor live; linears: quantized
    linears placed on another device (name -> device); empty when the block runs on `main` alone."""

    main: torch.device
    linears: dict[str, torch.device] = field(default_factory=dict)
    overcommitted: bool = False  # the estimate exceeded every budget: placed as evenly as possible anyway

    @property
    def split(self) -> bool:
        return bool(self.linears)

    def device_of(self, block_prefix: str):
        """full tensor name -> device, for loading the block's tensors where they will run."""
        prefixes = [(f"{block_prefix}.{n}.", d) for n, d in self.linears.items()]

        def device(full_name: str) -> torch.device:
            for prefix, d in prefixes:
                if full_name.startswith(prefix):
                    return d
            return self.main

        return device


def plan_storage(cache_bytes: int, block_need: int, budgets: list[tuple[torch.device, int]]) -> torch.device:
    """Where the calibration cache lives: the first device if it fits beside the block, else the first other
    device it fits on, else the CPU."""
    (main, main_budget), others = budgets[0], budgets[1:]
    if main.type == "cpu" or cache_bytes + block_need <= main_budget:
        return main
    for device, budget in others:
        if device.type != "cpu" and cache_bytes <= budget:
            return device
    return torch.device("cpu")


def plan(sizes: BlockSizes, method, budgets: list[tuple[torch.device, int]]) -> Placement:
    """Place one block. budgets: (device, bytes it may take) in the user's order, the first being where the
    block's code and inputs run (cache already deducted where it lives).

    Fits on the first: everything there. Else the quantized linears fill the devices in forward order, the
    first device holding also the rest of the block and the batch's activations; each device must hold its
    linears' state plus the largest temporary among them. When even that does not fit, the remaining
    linears go where the most budget is left (overcommitted: the run may still fit, the estimate is rough)."""
    main = budgets[0][0]
    if block_bytes(sizes, method) <= budgets[0][1] or len(budgets) == 1:
        return Placement(main, overcommitted=block_bytes(sizes, method) > budgets[0][1])
    held, temp = _linear_needs(sizes, method)
    left = [budgets[0][1] - sizes.other_bytes - activation_bytes(sizes, method.saves_activations)] + [b for _, b in budgets[1:]]
    peak = [0] * len(budgets)  # largest temporary of the linears placed on each device so far
    where: dict[str, int] = {}
    slot, overcommitted = 0, False
    for name in sizes.linears:
        while slot < len(budgets) and held[name] + max(peak[slot], temp[name]) - peak[slot] > left[slot]:
            slot += 1
        if slot == len(budgets):  # nothing fits: the device with the most left
            overcommitted = True
            target = max(range(len(budgets)), key=lambda s: (left[s], -s))
            slot = len(budgets)
        else:
            target = slot
        grow = max(peak[target], temp[name]) - peak[target]
        left[target] -= held[name] + grow
        peak[target] += grow
        where[name] = target
    return Placement(main, {n: budgets[s][0] for n, s in where.items() if s != 0}, overcommitted)


# ---------------------------------------------------------------- applying it to a loaded block


def attach(block: torch.nn.Module, placement: Placement) -> None:
    """Hooks on the linears placed off the first device: inputs moved to the linear's device, outputs back to
    the caller's (accelerate's AlignDevicesHook with io_same_device). Their tensors are already there."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for name, device in placement.linears.items():
        add_hook_to_module(block.get_submodule(name), AlignDevicesHook(execution_device=device, io_same_device=True))


def detach(block: torch.nn.Module, placement: Placement) -> None:
    from accelerate.hooks import remove_hook_from_module

    for name in placement.linears:
        remove_hook_from_module(block.get_submodule(name))


def budgets_for(devices: tuple[torch.device, ...], max_memory: tuple[int, ...] | None) -> list[tuple[torch.device, int]]:
    """(device, bytes a block may take) per device: HEADROOM of its free memory, capped by --max_memory."""
    out = []
    for i, d in enumerate(devices):
        budget = int(free_bytes(d) * HEADROOM)
        if max_memory is not None:
            budget = min(budget, max_memory[i])
        out.append((d, budget))
    return out


def describe(placement: Placement) -> str:
    devices = {}
    for name, d in placement.linears.items():
        devices.setdefault(str(d), []).append(name)
    return "; ".join(f"{d}: {', '.join(names)}" for d, names in devices.items())


def cache_bytes(nsamples: int, seqlen: int, hidden: int, dtype: torch.dtype, chains: int) -> int:
    """The calibration cache: hidden states [n, T, H] per chain (AutoRound keeps the fp chain beside)."""
    return nsamples * seqlen * hidden * torch.empty((), dtype=dtype).element_size() * chains


class Placer:
    """The run's placement decisions: budgets read from the devices when asked (after the previous block was
    freed), capped by --max_memory; `storage` once before capture, `place` per block."""

    def __init__(self, devices, max_memory: tuple[int, ...] | None, method, dtype: torch.dtype, batch_tokens: int):
        self.devices = tuple(torch.device(d) for d in devices)
        self.max_memory, self.method, self.dtype, self.batch_tokens = max_memory, method, dtype, batch_tokens
        self.cache_slot: int | None = None  # which device entry holds the calibration cache
        self.cache_bytes = 0

    def budgets(self) -> list[tuple[torch.device, int]]:
        out = budgets_for(self.devices, self.max_memory)
        if self.max_memory is not None and self.cache_slot is not None:  # an explicit cap counts the cache too
            device, budget = out[self.cache_slot]
            out[self.cache_slot] = (device, budget - self.cache_bytes)
        return out

    def storage(self, cache: int, block: torch.nn.Module, linears: dict) -> torch.device:
        need = block_bytes(BlockSizes.of(block, linears, self.dtype, self.batch_tokens), self.method)
        device = plan_storage(cache, need, self.budgets())
        self.cache_slot = next((i for i, d in enumerate(self.devices) if d == device), None)
        self.cache_bytes = cache
        return device

    def room_for_next(self, block: torch.nn.Module, linears: dict, following: torch.nn.Module) -> bool:
        """Whether the next block's weights (`following`, still on meta) fit on the one device beside what the
        loaded `block` will still take while it is worked on (its estimated need less the weights it already
        holds), with a quarter to spare (the need is an estimate): prefetch.BlockPrefetch loads them early only then."""
        if len(self.devices) != 1 or self.devices[0].type != "cuda":
            return False
        weight_bytes = torch.empty((), dtype=self.dtype).element_size()
        held = sum(t.numel() * t.element_size() for t in list(block.parameters()) + list(block.buffers()) if t.device.type != "meta")
        coming = sum(t.numel() * (weight_bytes if t.is_floating_point() else t.element_size()) for t in list(following.parameters()) + list(following.buffers()))
        still = max(0, block_bytes(BlockSizes.of(block, linears, self.dtype, self.batch_tokens), self.method) - held)
        return 1.25 * (still + coming) <= self.budgets()[0][1]

    def place(self, block: torch.nn.Module, linears: dict) -> Placement:
        if len(self.devices) == 1:
            return Placement(self.devices[0])
        return plan(BlockSizes.of(block, linears, self.dtype, self.batch_tokens), self.method, self.budgets())
