"""Where a pipeline's parts run over several devices, with every part's memory counted.

auto-round's multi-GPU diffusion runs once went out of memory because the transformer was spread over the GPUs
as if it were alone: the text encoders and the VAE beside it were not counted. Here the plan is a pure function
of sizes: every component (text encoders, VAE) is placed whole, first, where it fits; the transformer's own
modules outside its blocks (embedders, final norm / projection, small) go to the home device, the one blocks
are quantized on; then the blocks, in forward order, fill the devices that remain in order (consecutive blocks
share a device, so activations cross devices as rarely as possible). A block that fits nowhere is `STREAM`:
read from the shards onto the home device for each call and freed after (RAM bounded by one block); a
component that fits on no GPU runs on the CPU.

Sizes come from accelerate (`compute_module_sizes` on the meta modules, `convert_file_size_to_int` for
"20GiB"-style budgets); the plan is applied by loading each component straight onto its device with hooks
that return its outputs to the caller's device (components.py) and, when loading, the transformer's blocks
through `loading.dispatch` (module pre-hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LowbitError

STREAM = "stream"


@dataclass
class Placement:
    components: dict[str, str] = field(default_factory=dict)  # component -> device
    blocks: dict[str, str] = field(default_factory=dict)  # block name -> device or STREAM
    used: dict[str, int] = field(default_factory=dict)  # device -> bytes planned on it

    def block_map(self, home: str) -> dict[str, str]:
        """The transformer as an accelerate device map: everything on `home`, each placed block on its device."""
        return {"": home, **{name: (home if dev == STREAM else dev) for name, dev in self.blocks.items()}}


def budget(max_memory: dict) -> dict[str, int]:
    """{device: bytes}; values may be ints or "20GiB"-style strings, device keys ints (GPU index) or names."""
    from accelerate.utils import convert_file_size_to_int

    out = {}
    for dev, value in max_memory.items():
        name = f"cuda:{dev}" if isinstance(dev, int) or str(dev).isdigit() else str(dev)
        out[name] = convert_file_size_to_int(value) if isinstance(value, str) else int(value)
    return out


def plan_placement(components: dict[str, int], transformer_rest: int, blocks: list[tuple[str, int]], max_memory: dict, home: str,
                   workspace: int = 0, reserve: int = 0) -> Placement:
    """Place a pipeline over `max_memory`'s devices (in their order; "cpu" is never given blocks).

    components: component name -> bytes (placed whole, largest first); transformer_rest: bytes of the
    transformer outside its blocks (on `home`); blocks: (name, bytes) in forward order; workspace: bytes kept
    free on `home` for the block being quantized and its activations; reserve: bytes kept free on every other
    GPU the plan puts anything on, for the activations of what runs there (a block's forward, a text encoder's).
    Raises when `home` cannot hold the transformer's own modules plus the workspace."""
    free = budget(max_memory)
    if home not in free:
        raise LowbitError(f"the device {home} has no memory budget in {sorted(free)}", f"give max_memory an entry for {home}")
    plan = Placement(used={d: 0 for d in free})

    def take(dev: str, n: int) -> None:
        free[dev] -= n
        plan.used[dev] += n

    need = transformer_rest + workspace
    if free[home] < need:
        raise LowbitError(f"{home} has {free[home] / 2**30:.2f} GiB for the transformer's own modules and a block's workspace, which need {need / 2**30:.2f} GiB",
                          "give the first device more memory (--device_map / max_memory)")
    take(home, need)
    gpus = [d for d in free if d != "cpu"]
    reserved = {home, "cpu"}  # home's workspace already holds its activations; the CPU runs what fits nowhere

    def room(dev: str) -> int:  # what `dev` can still take, its reserve counted on first use
        return free[dev] - (0 if dev in reserved else reserve)

    def put(dev: str, n: int) -> None:
        if dev not in reserved:
            reserved.add(dev)
            take(dev, reserve)
        take(dev, n)

    for name, size in sorted(components.items(), key=lambda kv: -kv[1]):
        dev = next((d for d in gpus if room(d) >= size), "cpu")
        plan.components[name] = dev
        if dev in free:
            put(dev, size)
    order = iter(gpus)
    dev = next(order, None)
    for name, size in blocks:
        while dev is not None and room(dev) < size:
            dev = next(order, None)
        if dev is None:
            plan.blocks[name] = STREAM
            continue
        plan.blocks[name] = dev
        put(dev, size)
    return plan


def module_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Parameters and buffers of a (meta) module at `dtype` (accelerate's count)."""
    from accelerate.utils import compute_module_sizes

    return int(compute_module_sizes(module, dtype=dtype)[""])

