"""What an algorithm sees of one block: the block, its linears, and the block engine's samples."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ..arch import ArchSpec
from ..config import Scheme
from ..engine import BlockEngine, Stream
from ..quant import QuantResult


@dataclass
class BlockContext:
    """One block, loaded on `device`, with its calibration samples.

    linears: block-relative name -> nn.Linear to quantize (those kept in full precision are absent).
    schemes: block-relative name -> Scheme for that linear.
    engine / stream: the block engine and this block's inputs (None for methods without calibration).
    targets: what the fp model's block produces, [1, T, H] per sample on the storage device, when the
        runner keeps an fp chain beside the quantized one (AutoRound with quantized inputs, as auto-round
        does: the block learns to map quantized inputs to the fp model's outputs); None otherwise.
    """

    index: int
    block: torch.nn.Module
    linears: dict[str, torch.nn.Linear]
    schemes: dict[str, Scheme]
    spec: ArchSpec
    device: torch.device
    engine: BlockEngine | None = None
    stream: Stream | None = None
    targets: list[torch.Tensor] | None = None
    log: object = None  # callable(str) for per-block progress lines
    losses: tuple[float, float] | None = None  # (loss at start, best loss), set by calibrated methods
    run_state: dict = field(default_factory=dict)  # what an algorithm keeps across the blocks of one run (compiled code)
    routed: dict[str, list[int]] | None = None  # MoE: experts module -> routed calibration pairs per expert (all processes)

    @property
    def calibrated(self) -> bool:
        return self.stream is not None and len(self.stream.hidden) > 0

    @property
    def n_samples(self) -> int:
        return len(self.stream.hidden) if self.stream is not None else 0

    @property
    def storage(self) -> torch.device:
        return self.engine.storage

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    def batches(self) -> list[list[int]]:
        return self.engine.batches(self.n_samples)

    def kwargs(self, indices: list[int]) -> dict:
        return self.engine.kwargs(self.index, self.stream, indices)

    def hidden(self, indices: list[int]) -> torch.Tensor:
        return self.engine.hidden(self.stream, indices)

    def forward(self, indices: list[int], block: torch.nn.Module | None = None) -> torch.Tensor:
        """The block (or a stand-in for it, e.g. a compiled copy) on these samples: [b, T, H]."""
        return self.engine.call(self.block if block is None else block, self.index, self.stream, indices)

    def phase(self, name: str):
        """Time what runs inside as phase `name` of this process's block loop (report.BlockPhases: stats,
        solve, train, ...); a context manager."""
        return self.engine.phases(name) if self.engine is not None else nullcontext()

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the data-parallel processes (one process: `t`). Every process must call it
        in the same order with the same shape."""
        return self.engine.reduce_sum(t)

    @property
    def world_size(self) -> int:
        """Data-parallel processes sharing the samples (each holds `n_samples` of its own)."""
        return self.engine.world_size if self.engine is not None else 1

    # ------------------------------------------------------------ work split between data-parallel processes

    def owners(self, keys: list, cost) -> dict:
        """Which process does the work that does not shrink with the samples (GPTQ's solves, AutoRound's fake
        quantization and sign steps), per key (a linear's name, a batch of linears): greedy by cost(key),
        largest first, onto the least-loaded process; the same answer on every process (one process: all 0)."""
        load = [0] * self.world_size
        out = {}
        for key in sorted(keys, key=lambda k: (-cost(k), str(k))):
            rank = min(range(self.world_size), key=lambda r: (load[r], r))
            out[key] = rank
            load[rank] += cost(key)
        return out

    def shared_results(self, owner: int, results: list[QuantResult] | None, values: list[float], linears: list[torch.nn.Linear],
                       rows: int | None = None) -> tuple[list[QuantResult], list[float]]:
        """The owner's QuantResults of `linears` (all on one device; and a float per linear, e.g. a loss) on every
        process, broadcast exactly in two collectives for all of them: the codes (uint8) as one buffer, then
        every scale, zero and float as one float32 buffer; one host sync for the floats. A MoE stage's batch of
        32 experts is 2 broadcasts, not 64 and 32 syncs. results: the owner's (None elsewhere). rows: each result
        holds that many output rows (a share, `row_share`; or stacked linears' rows), not its linear's N."""
        if self.world_size == 1:
            return list(results), list(values)
        names = {id(l): n for n, l in self.linears.items()}
        schemes = [self.schemes[names[id(l)]] for l in linears]
        shapes = [(l.out_features if rows is None else rows, l.in_features, s.groups(l.in_features)) for l, s in zip(linears, schemes)]
        device = linears[0].weight.device
        codes = flat = None
        if results is not None:
            codes = torch.cat([r.codes.reshape(-1) for r in results])
            flat = torch.cat([*(t.float().reshape(-1) for r in results for t in (r.scale, r.zero)), torch.tensor(values, dtype=torch.float32, device=device)])
        codes = self.engine.from_rank(owner, codes, (sum(n * k for n, k, _ in shapes),), dtype=torch.uint8, device=device)
        flat = self.engine.from_rank(owner, flat, (sum(2 * n * g for n, _, g in shapes) + len(linears),), device=device)
        out, c, f = [], 0, 0
        for (n, k, g), scheme in zip(shapes, schemes):
            out.append(QuantResult(scheme, codes[c : c + n * k].view(n, k), flat[f : f + n * g].view(n, g), flat[f + n * g : f + 2 * n * g].view(n, g).to(torch.uint8)))
            c, f = c + n * k, f + 2 * n * g
        return out, flat[f:].tolist()

    def row_share(self, n: int, rank: int | None = None) -> slice:
        """A process's contiguous share of n output rows (this process's by default): for work whose rows are
        independent (GPTQ solves each row of W against the same H) when there are too few pieces to deal out."""
        if self.world_size == 1:
            return slice(0, n)
        w, r = self.world_size, self.engine.rank if rank is None else rank
        return slice(n * r // w, n * (r + 1) // w)

    def joined_rows(self, results: list[QuantResult], values: list[float], linears: list[torch.nn.Linear], rows: int | None = None) -> tuple[list[QuantResult], list[float]]:
        """Every process's row share of each of `linears`' QuantResults (this process's are `results`), joined in
        row order on every process, and the sums of their values (e.g. losses); `shared_results` per process.
        rows: the solved weight's rows when not the linear's own (linears sharing an input, stacked; scheme and
        device are the linear's). One process: unchanged."""
        if self.world_size == 1:
            return list(results), list(values)
        parts = []
        for r in range(self.world_size):
            share = self.row_share(linears[0].out_features if rows is None else rows, r)
            parts.append(self.shared_results(r, results if r == self.engine.rank else None, values, linears, rows=share.stop - share.start))
        joined = [QuantResult(results[i].scheme, *(torch.cat([getattr(p[0][i], f) for p in parts]) for f in ("codes", "scale", "zero"))) for i in range(len(linears))]
        return joined, [sum(p[1][i] for p in parts) for i in range(len(linears))]
