"""Several processes, one run: devices from `--device_map`, data-parallel calibration with torch.distributed.

Started by `torchrun` (or `lowbit quantize --nproc N`, which starts the processes itself: launch.py):
every process runs the same block loop on its contiguous share of the calibration windows, and the block
engine's reducer (`DistributedReducer.sum`, an all_reduce) completes the statistics the algorithms reduce
through their BlockContext. One process (no WORLD_SIZE in the environment) keeps engine.LocalReducer.
Only rank 0 writes (runner.py); the others return after the block loop.
"""

from __future__ import annotations

import json
import os
import time

import torch

from .errors import LowbitError
from .launch import RENDEZVOUS_ENV


# ---------------------------------------------------------------- --device_map


def parse_device_map(text: str) -> tuple[str, ...]:
    """auto-round's spellings -> the devices named, in order: 'auto', '0,1,2', 'cuda:0,cuda:1', 'cpu', or a
    JSON dict of module name -> device (int = that GPU). 'auto' is every visible GPU, else the CPU. A GPU
    listed twice is refused; 'cpu' may repeat (each entry is a slot with its own --max_memory: placement
    over slots of one device, which is how the split path runs on a machine without GPUs)."""
    text = text.strip()
    if text == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return tuple(f"cuda:{i}" for i in range(n)) or ("cpu",)
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise LowbitError(f"--device_map {text!r} is not valid JSON ({err.msg})", 'pass e.g. --device_map \'{"model.layers.0": 0, "model.layers.1": 1}\'') from None
        if not isinstance(mapping, dict) or not mapping:
            raise LowbitError(f"--device_map {text!r} is an empty or non-dict JSON value", 'pass a module -> device dict, e.g. \'{"model.layers.0": 0}\'')
        items = list(mapping.values())
    else:
        items = [p for p in text.split(",") if p.strip()]
    devices = []
    for item in items:
        name = device_name(item, text)
        if name in devices:
            if text.startswith("{"):  # a dict names a device once per module
                continue
            if name != "cpu":
                raise LowbitError(f"--device_map {text!r} names {name} twice", "name each GPU once, e.g. --device_map 0,1")
        devices.append(name)
    if not devices:
        raise LowbitError(f"--device_map {text!r} names no device", "pass auto, 0,1 or cuda:0,cuda:1")
    return tuple(devices)


def device_name(item, text: str) -> str:
    """One entry of a device map ('0', 0, 'cuda:1', 'cpu') -> 'cuda:0' / 'cuda:1' / 'cpu'; others refused."""
    item = str(item).strip()
    if item.isdigit():
        item = f"cuda:{item}"
    if item == "cuda":
        item = "cuda:0"
    if item == "cpu" or (item.startswith("cuda:") and item[5:].isdigit()):
        return item
    raise LowbitError(f"--device_map {text!r}: {item!r} is not a device", "use GPU indices (0,1), cuda:N names, cpu, or auto")


def check_devices(devices: tuple[str, ...]) -> None:
    """A GPU that does not exist is refused naming it and the visible ones."""
    cuda = [d for d in devices if d.startswith("cuda")]
    if not cuda:
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = ", ".join(f"cuda:{i}" for i in range(n)) or "none"
    for d in cuda:
        if int(d.split(":")[1]) >= n:
            raise LowbitError(f"--device_map names {d}, which does not exist (visible GPUs: {visible})", "name visible GPUs only, or pass --device_map auto")


# ---------------------------------------------------------------- processes


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError(f"device {device!r} requested but no CUDA GPU is visible", "pass --device cpu")
    return torch.device(device)


def env_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) for a plain process."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))


class DistributedReducer:
    """The block engine's reducer across torch.distributed processes (engine.LocalReducer for one)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist = dist
        self.device = device  # where collectives run: NCCL reduces CUDA tensors only
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.seconds = 0.0  # wall time inside collectives, waiting for the slowest process included
        self.phases = None  # report.BlockPhases of the block loop: its "collectives" phase (set by the runner)

    def _sync(self) -> None:
        if self.device.type == "cuda":  # the loop's stream, not the background writer's (export/shards.py)
            torch.cuda.current_stream(self.device).synchronize()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `t` over every process (a copy; `t` is unchanged), on t's device.

        Every process must call it in the same order with the same shape. On CUDA the device is synchronized
        around the all_reduce, so `seconds` counts the wait for the other processes, not this one's queued work."""
        out = t.detach().to(self.device, copy=True)
        self._timed(self.dist.all_reduce, out, op=self.dist.ReduceOp.SUM)
        return out.to(t.device)

    def _timed(self, collective, t: torch.Tensor, **kwargs) -> None:
        self._sync()
        start = time.perf_counter()
        collective(t, **kwargs)
        self._sync()
        seconds = time.perf_counter() - start
        self.seconds += seconds
        if self.phases is not None:
            self.phases.add("collectives", seconds)

    def start(self, collective: str, t: torch.Tensor, owner: int | None = None):
        """Launch "broadcast" (from owner), "reduce" (onto owner) or "all_reduce" (sum) on `t` in place without
        waiting (t on this reducer's device); returns a handle whose `wait()` must come before `t` is read
        (on CUDA wait() only orders the current stream after the collective: the host does not block).
        Every process must start the same collectives in the same order. The host time spent in wait() is
        counted as collectives (on CUDA ~0: the wait is then inside whatever phase next synchronizes)."""
        dist = self.dist
        if collective == "broadcast":
            work = dist.broadcast(t, src=owner, async_op=True)
        elif collective == "reduce":
            work = dist.reduce(t, dst=owner, async_op=True)
        else:
            work = dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)
        return Pending(work, self)

    def broadcast_(self, t: torch.Tensor, owner: int) -> torch.Tensor:
        """`owner`'s `t` on every process, in place (every process passes a tensor of the same shape)."""
        buf = t if t.device == self.device else t.to(self.device)
        self._timed(self.dist.broadcast, buf, src=owner)
        if buf is not t:
            t.copy_(buf)
        return t

    def reduce_to(self, t: torch.Tensor, owner: int) -> torch.Tensor:
        """The sum of `t` over every process, complete on `owner` only (half an all_reduce's traffic); the
        others get `t` back unchanged in value but must not use it."""
        buf = t.to(self.device, copy=True)
        self._timed(self.dist.reduce, buf, dst=owner)
        return buf.to(t.device)

    def all_objects(self, obj) -> list:
        """Every process's picklable `obj`, in rank order (the run summary's per-process figures)."""
        out = [None] * self.world_size
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's picklable `obj` on every process (the resume state: every rank must see the same one)."""
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

class Pending:
    """An asynchronous collective (DistributedReducer.start): wait() before reading its tensor."""

    def __init__(self, work, reducer: DistributedReducer):
        self.work, self.reducer = work, reducer

    def wait(self) -> None:
        if self.work is None:
            return
        t0 = time.perf_counter()
        self.work.wait()
        self.work = None
        seconds = time.perf_counter() - t0
        self.reducer.seconds += seconds
        if self.reducer.phases is not None:
            self.reducer.phases.add("collectives", seconds)


def start(run_device: str, device_map: tuple[str, ...] | None):
    """This process's (devices, reducer): the devices its blocks run on (the first holds the block's code and
    inputs; placement.py may spread a block over the others), and None (one process: the engine keeps
    LocalReducer) or a DistributedReducer, initialising the process group when torchrun started us.

    One process: every device of the map (or --device). Several: rank r takes the map's r-th device alone
    (CUDA: cuda:LOCAL_RANK when no map is given); more processes than devices is refused, and so is a
    --device naming one GPU for several processes (each needs its own: --device_map lists them)."""
    world, _, local = env_world()
    devices = device_map or (run_device,)
    if world == 1:
        resolved = tuple(resolve_device(d) for d in devices)
        if resolved[0].type == "cuda":
            # current device = the block's (plain "cuda": the current one, named with its index, which
            # set_device needs); this also initialises CUDA, which torch's per-device memory statistics need
            # before they accept an explicit index such as cuda:0
            first = resolved[0] if resolved[0].index is not None else torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(first)
            resolved = (first, *resolved[1:])
        return resolved, None
    first = resolve_device(devices[0])
    if first.type == "cuda":
        if device_map is None:  # --device cuda / auto under torchrun: one GPU per process
            if first.index is not None:
                raise LowbitError(f"--device {run_device} names one GPU for {world} processes", f"pass --device_map with one GPU per process (e.g. --device_map {','.join(str(i) for i in range(world))}), or --device cuda")
            devices = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
        if local >= len(devices):
            per_host = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            raise LowbitError(f"{per_host} processes on this host but only {len(devices)} GPUs ({', '.join(devices)})", f"pass --nproc {len(devices)} (torchrun --nproc_per_node {len(devices)}) or name more GPUs in --device_map")
        device = torch.device(devices[local])
        torch.cuda.set_device(device)
    else:
        device = first
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        rendezvous = os.environ.get(RENDEZVOUS_ENV)
        if rendezvous:  # started by `--nproc` (launch.py): a file store, no TCP port to race for (the path as given:
            # torch's file:// URLs are not unquoted on Linux, so a temporary folder with a space would break one)
            store = dist.FileStore(rendezvous, world)
            dist.init_process_group(backend, store=store, world_size=world, rank=env_world()[1])
        else:  # torchrun (env://: MASTER_ADDR / MASTER_PORT, its store)
            dist.init_process_group(backend)
    return (device,), DistributedReducer(device)


def finish() -> None:
    """Leave the process group, if this process joined one (NCCL warns at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_rank0(reducer: DistributedReducer | None, fn, *args):
    """fn(*args) on rank 0 alone (on the one process without a reducer), its result on every rank. A
    LowbitError there is raised on every rank: none is left waiting in a collective for a rank that stopped."""
    if reducer is None:
        return fn(*args)
    result = None
    if reducer.rank == 0:
        try:
            result = fn(*args)
        except LowbitError as err:
            reducer.broadcast_object(err)
            raise
    result = reducer.broadcast_object(result)
    if isinstance(result, LowbitError):
        raise result
    return result


def share(items: list, rank: int, world: int) -> list:
    """Rank `rank`'s contiguous share of `items` (sizes differ by at most one; earlier ranks take the extra)."""
    if len(items) < world:
        raise LowbitError(f"{len(items)} calibration windows for {world} processes", f"pass --nsamples {world} or more, or fewer processes")
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return items[start : start + base + (rank < extra)]


def check_nproc(nproc: int, run, nsamples: int | None = None) -> None:
    """--nproc before launching: at least 1, at most the calibration windows (nsamples; None: no
    calibration), and on CUDA no more than the devices to use."""
    if nproc < 1:
        raise LowbitError(f"--nproc {nproc} is not a number of processes", "pass --nproc 1 or more")
    if nsamples is not None:
        share(range(nsamples), 0, nproc)  # refuses fewer windows than processes
    devices = run.devices or (run.device,)
    if devices[0] in ("auto", "cuda") and torch.cuda.is_available():
        devices = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    if devices[0].startswith("cuda") and nproc > len(devices):
        raise LowbitError(f"--nproc {nproc} needs {nproc} GPUs but {len(devices)} are given or visible ({', '.join(devices)})", f"pass --nproc {len(devices)} or name more GPUs in --device_map")
