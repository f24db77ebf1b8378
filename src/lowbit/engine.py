"""The block engine: the one place that runs a block on the calibration samples.

Every algorithm reaches it through its BlockContext (algorithms/base.py) and the runner uses it to carry
the samples from block to block; nothing else runs a block. It owns:
- the samples: a `Stream` (the hidden states of every sample, [1, T, H] each, the other arguments blocks
  return for the next one, e.g. a diffusion transformer's encoder hidden states, plus the state that earlier
  blocks wrote for each sample, e.g. Gemma 4's shared KV) on the storage device;
- the outputs: a block returns the hidden states (first item), or, when the plan names several `outputs`
  (FLUX / SD3 joint blocks return `(encoder_hidden_states, hidden_states)`), one tensor per carried
  argument; `call` gives them to algorithms as one tensor per sample (`joint`), `propagate` splits them;
- the arguments: the captured `ReplayPlan` (calib/capture.py) gives each block its constants (stored once,
  moved to the device once per block), its per-sample arguments (concatenated per batch) and fresh
  state containers filled with the batch's own state;
- batching: contiguous batches of `batch_size` samples, or any index list (AutoRound's random batches);
- reduction: `reduce_sum` over statistics (and `counts` / `gather_rows`, built on it), `reduce_to` /
  `from_rank` for work split by owner (GPTQ's solves, AutoRound's linears). Locally the
  identity; data-parallel processes (dist.py) plug in here with a reducer whose `sum` is torch.distributed's
  all_reduce, each process holding its contiguous share of the samples. A block spread over several
  devices (placement.py) is placed when the runner loads it: its code, inputs and outputs stay on this
  engine's device, so `call` (the only place a block is invoked) is the same either way.
The contract, tested for every registered architecture (tests/arch): propagating the samples through the
blocks one by one reproduces the full model's forward, at every batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calib.capture import ReplayPlan
from .calib.tree import cat_samples, split_samples, to_device
from .report import BlockPhases


def block_output(out) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class Stream:
    """One chain of per-sample block inputs.

    hidden: per sample [1, T, H] on the storage device.
    state: per sample, state argument name -> {key: tree of [1, ...] tensors} written by earlier blocks.
    extra: other carried argument name -> per sample [1, T', H'] (None once a block stops returning it:
        SD3's last block returns no encoder hidden states).
    """

    hidden: list
    state: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.state:
            self.state = [{} for _ in self.hidden]

    def copy(self) -> "Stream":
        return Stream(list(self.hidden), [{name: dict(d) for name, d in s.items()} for s in self.state], {k: list(v) for k, v in self.extra.items()})


def joint(outputs: list, weights: list | None = None) -> torch.Tensor:
    """Several per-sample block outputs as one tensor per sample for losses: each [b, ...] flattened to
    [b, n_i], multiplied by its weight, and concatenated, [b, sum n_i]; one output as is."""
    pairs = [(t, w) for t, w in zip(outputs, weights or [1.0] * len(outputs)) if t is not None]
    return pairs[0][0] if len(pairs) == 1 else torch.cat([t.flatten(1) * w for t, w in pairs], dim=1)


def stream_weights(outputs: list) -> list:
    """1 / RMS of each output (from the first outputs a block's loss sees): an MSE over the weighted joint is
    then each stream's relative error, weighted by its element count. Without it the stream with the larger
    values decides alone: a FLUX transformer's text tokens run ~8x the image tokens' RMS, and AutoRound then
    fits the text stream at the image stream's expense (the image tokens are what the denoiser outputs)."""
    return [None if t is None else 1.0 / max(t.detach().float().pow(2).mean().sqrt().item(), 1e-12) for t in outputs]


class LocalReducer:
    """Statistics of one process are already complete."""

    world_size, rank = 1, 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast_(self, t: torch.Tensor, owner: int) -> torch.Tensor:
        return t

    def reduce_to(self, t: torch.Tensor, owner: int) -> torch.Tensor:
        return t


class BlockEngine:
    def __init__(self, plan: ReplayPlan, device, storage, batch_size: int, reducer=None, phases: BlockPhases | None = None):
        self.plan = plan
        self.phases = phases or BlockPhases()  # the run's per-phase seconds (algorithms: BlockContext.phase)
        self.device, self.storage = torch.device(device), torch.device(storage)
        self.batch_size = batch_size
        self.reducer = reducer or LocalReducer()
        self._const: tuple[int, dict] | None = None  # (block index, constants on the device)
        self._weights: dict[int, list] = {}  # block index -> per-output loss weights (stream_weights), fixed once seen

    # ------------------------------------------------------------ storage
    def store(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor as the cache keeps it (detached, on the storage device)."""
        return t.detach().to(self.storage)

    def to_storage(self, value):
        return to_device(value, self.storage)

    def to_device(self, value):
        return to_device(value, self.device)

    def stream(self) -> Stream:
        """The captured inputs of block 0."""
        extra = {name: [None if v is None else self.store(v) for v in values] for name, values in self.plan.streams.items()}
        return Stream([self.store(h) for h in self.plan.hidden], extra=extra)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The carried arguments a block returns, in return order (one: the hidden states, first item)."""
        return self.plan.outputs or (self.plan.hidden_name,)

    def weights(self, index: int, outputs: list) -> list:
        """Block `index`'s per-output loss weights, set from the first outputs seen for it (the fp targets)."""
        if index not in self._weights:
            self._weights = {index: stream_weights(outputs)}
        return self._weights[index]

    def joint(self, stream: Stream, index: int) -> list:
        """Per sample, what `call` returns for block `index`, which produced this stream: the fp targets of
        AutoRound. One output: the hidden states themselves; several: weighted so each stream counts by its
        relative error (stream_weights, from all the samples' values)."""
        if len(self.outputs) == 1:
            return stream.hidden
        per_name = {name: stream.hidden if name == self.plan.hidden_name else stream.extra[name] for name in self.outputs}
        columns = [per_name[name] for name in self.outputs]
        weights = self.weights(index, [None if col[0] is None else torch.cat(col) for col in columns])
        return [joint([col[i] for col in columns], weights) for i in range(len(stream.hidden))]

    # ------------------------------------------------------------ batches and calls
    def batches(self, n: int) -> list[list[int]]:
        return [list(range(s, min(s + self.batch_size, n))) for s in range(0, n, self.batch_size)]

    def hidden(self, stream: Stream, indices: list[int]) -> torch.Tensor:
        """[len(indices), T, H] on the device."""
        return torch.cat([stream.hidden[i].to(self.device, non_blocking=True) for i in indices])

    def kwargs(self, index: int, stream: Stream, indices: list[int]) -> dict:
        """Block `index`'s keyword arguments for these samples, on the device; state containers are fresh
        (what the block writes to them is read back by `propagate`, or dropped)."""
        args = self.plan.blocks[index]
        if self._const is None or self._const[0] != index:
            self._const = (index, self.to_device(args.const))
        out = dict(self._const[1])
        for name, values in stream.extra.items():
            out[name] = None if values[indices[0]] is None else torch.cat([values[i].to(self.device, non_blocking=True) for i in indices])
        for name, values in args.sample.items():
            out[name] = self.to_device(cat_samples([values[i] for i in indices]))
        for name, cls in args.state.items():
            container = cls()
            written = [stream.state[i].get(name, {}) for i in indices]
            for key in written[0]:
                container[key] = self.to_device(cat_samples([w[key] for w in written]))
            out[name] = container
        return out

    def outputs_of(self, block: torch.nn.Module, index: int, stream: Stream, indices: list[int], kwargs: dict | None = None) -> list:
        """The block's carried outputs for these samples, in `outputs` order: [len(indices), ...] each or None."""
        kwargs = self.kwargs(index, stream, indices) if kwargs is None else kwargs
        out = block(self.hidden(stream, indices), **kwargs)
        if len(self.outputs) == 1:
            return [block_output(out)]
        return list(out)

    def call(self, block: torch.nn.Module, index: int, stream: Stream, indices: list[int], kwargs: dict | None = None) -> torch.Tensor:
        """Block output for these samples (forward hooks on the block fire): [len(indices), T, H], or with
        several outputs their weighted `joint` [len(indices), n] (the weights of `joint(stream, index)`)."""
        outputs = self.outputs_of(block, index, stream, indices, kwargs)
        if len(self.outputs) == 1:
            return outputs[0]
        return joint(outputs, self.weights(index, outputs))

    @torch.no_grad()
    def propagate(self, block: torch.nn.Module, index: int, stream: Stream) -> Stream:
        """The next block's inputs: this block's outputs for every sample, and the state it wrote."""
        out = stream.copy()
        for indices in self.batches(len(stream.hidden)):
            kwargs = self.kwargs(index, stream, indices)
            before = {name: dict(kwargs[name]) for name in self.plan.blocks[index].state}
            for name, y in zip(self.outputs, self.outputs_of(block, index, stream, indices, kwargs)):
                column = out.hidden if name == self.plan.hidden_name else out.extra[name]
                for k, j in enumerate(indices):
                    column[j] = None if y is None else self.store(y[k : k + 1])
            for name, old in before.items():
                for key, value in kwargs[name].items():
                    if old.get(key) is not value:  # written by this block: keep it per sample
                        for j, part in zip(indices, split_samples(value, len(indices))):
                            out.state[j].setdefault(name, {})[key] = self.to_storage(part)
        return out

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.reducer.sum(t)

    @property
    def world_size(self) -> int:
        return self.reducer.world_size

    def counts(self, n: int) -> list[int]:
        """Every process's `n`, in rank order (one process: [n])."""
        if self.world_size == 1:
            return [n]
        mine = torch.zeros(self.world_size, dtype=torch.float64)  # [world]: n at this rank's slot
        mine[self.reducer.rank] = n
        return [int(c) for c in self.reduce_sum(mine).tolist()]

    @property
    def rank(self) -> int:
        return getattr(self.reducer, "rank", 0)

    def from_rank(self, owner: int, t: torch.Tensor | None, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        """`owner`'s tensor on every process (a broadcast: exact). t: the owner's tensor (None elsewhere);
        shape / dtype / device: what every other process allocates to receive it."""
        if self.world_size == 1:
            return t
        buf = t.to(dtype).contiguous() if self.rank == owner else torch.empty(shape, dtype=dtype, device=device)
        return self.reducer.broadcast_(buf, owner)

    def reduce_to(self, t: torch.Tensor, owner: int) -> torch.Tensor:
        """The sum of `t` over the processes, complete on `owner` (one process: `t`)."""
        return self.reducer.reduce_to(t, owner)

    def start(self, collective: str, t: torch.Tensor, owner: int | None = None):
        """An asynchronous "broadcast" / "reduce" (from / onto owner) or "all_reduce" on `t`, in place; wait()
        on the returned handle before reading `t` (dist.DistributedReducer.start; several processes only)."""
        return self.reducer.start(collective, t, owner)

    def broadcast_(self, t: torch.Tensor, owner: int) -> torch.Tensor:
        """`owner`'s `t` into every process's `t` (same shape everywhere; one process: unchanged)."""
        return self.reducer.broadcast_(t, owner)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's rows x [m_p, K], concatenated in rank order: [sum_p m_p, K] on x's device.

        Each process writes its rows into its own slice of a zero buffer and the buffers are summed, so the
        result is exact (x + 0 = x) and identical on every process."""
        if self.world_size == 1:
            return x
        counts = self.counts(x.shape[0])
        start = sum(counts[: self.reducer.rank])
        buf = torch.zeros(sum(counts), *x.shape[1:], dtype=x.dtype, device=x.device)
        buf[start : start + x.shape[0]] = x
        return self.reduce_sum(buf)
