"""What an algorithm sees of one block."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import ArchSpec
from ..config import Scheme


@dataclass
class BlockContext:
    """One block, loaded on `device`, with its calibration data.

    linears: block-relative name -> nn.Linear to quantize (those kept in full precision are absent).
    schemes: block-relative name -> Scheme for that linear.
    inputs: cached block inputs, one [1, seqlen, hidden] tensor per sample on `storage` (None for RTN).
    targets: what the fp model's block produces, [1, seqlen, hidden] per sample on `storage`, when the runner
        keeps an fp chain of inputs beside the quantized one (AutoRound with quantized inputs, as auto-round
        does: the block learns to map quantized inputs to the fp model's outputs); None otherwise.
    kwargs: the block's per-sample-constant keyword arguments, already on `device`.
    """

    index: int
    block: torch.nn.Module
    linears: dict[str, torch.nn.Linear]
    schemes: dict[str, Scheme]
    spec: ArchSpec
    device: torch.device
    storage: torch.device
    batch_size: int = 8
    inputs: list[torch.Tensor] | None = None
    targets: list[torch.Tensor] | None = None  # fp block outputs on the fp chain's inputs (AutoRound), per sample
    kwargs: dict | None = None
    log: object = None  # callable(str) for per-block progress lines
    losses: tuple[float, float] | None = None  # (loss at start, best loss), set by calibrated methods
