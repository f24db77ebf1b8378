"""Frozen dataclass configs: the whole vocabulary of a quantization run.

Each config validates itself in `__post_init__` so a bad value fails before any work starts, with a
`LowbitError` naming the field and the fix. The CLI maps its flags 1:1 onto these fields.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import LowbitError

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("rtn", "autoround", "awq", "gptq")

# annotation -> (accepts value, what to pass). bool is a subclass of int in Python; here it is not an int.
_TYPES = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a str"),
    "tuple[str, ...]": (lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v), "a tuple of str"),
}


def check_types(config) -> None:
    """Refuse a field whose value has the wrong type, naming the field, the type got and what to pass.

    Run first in every __post_init__: a wrong type must not reach the range checks (`bits="4"` is not
    "an unsupported number of bits") nor the pipeline (`sym="false"` would be truthy)."""
    cls = type(config).__name__
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = f.type.removesuffix(" | None")
        if value is None and f.type.endswith(" | None"):
            continue
        if kind == "str" and isinstance(value, os.PathLike):  # paths (dataset, output_dir) may be Path objects
            object.__setattr__(config, f.name, os.fspath(value))
            continue
        if kind == "int" and isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):  # numpy ints from sweeps
            object.__setattr__(config, f.name, int(value))
            continue
        accepts, expected = _TYPES[kind]
        if not accepts(value):
            none = " or None" if f.type.endswith(" | None") else ""
            got = type(value).__name__
            article = "an" if got[0] in "aeiou" else "a"
            raise LowbitError(f"{cls}({f.name}={value!r}): got {article} {got}, expected {expected}{none}", f"pass e.g. {f.name}={_example(kind, value, f.default)!r}")


def _example(kind: str, value, default):
    """A value of the right type for the error message: the one the user meant when it is clear, else the default."""
    text = str(value).strip().lower()
    if kind == "bool" and text in ("true", "false", "1", "0", "yes", "no"):
        return text in ("true", "1", "yes")
    try:
        if kind == "int" and not isinstance(value, bool) and float(text) == int(float(text)):
            return int(float(text))
        if kind == "float" and not isinstance(value, bool):
            return float(text)
    except (ValueError, OverflowError):
        pass
    if default is not None and default is not dataclasses.MISSING:
        return default
    return {"int": 1, "float": 0.01, "bool": True, "str": "..."}.get(kind, ())


@dataclass(frozen=True)
class Scheme:
    """How one weight matrix W [out_features N, in_features K] is put on an integer grid.

    Args:
        bits: 2, 3, 4 or 8 bits per weight.
        group_size: inputs sharing one (scale, zero) pair along each row; -1 means one group per row
            (per channel). A size that does not divide K leaves a partial last group.
        sym: symmetric grid (zero point fixed at 2**(bits-1)) or asymmetric (zero point per group).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def __post_init__(self):
        check_types(self)
        if self.bits not in SUPPORTED_BITS:
            raise LowbitError(f"bits={self.bits} is not supported", f"use one of {SUPPORTED_BITS}")
        if self.group_size == 0 or self.group_size < -1:
            raise LowbitError(
                f"group_size={self.group_size} is invalid",
                "use a positive size such as 32, 64 or 128, or -1 for one group per output channel",
            )

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        """Number of groups along a row of `in_features` inputs (the last one may be partial)."""
        size = self.group_size_for(in_features)
        return -(-in_features // size)

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    @classmethod
    def from_name(cls, name: str, group_size: int | None = None, sym: bool | None = None) -> "Scheme":
        """auto-round style scheme names: W4A16, W3A16, W2A16, W8A16 (activations stay 16-bit)."""
        upper = name.upper()
        if not (upper.startswith("W") and upper.endswith("A16") and upper[1:-3].isdigit()):
            raise LowbitError(f"unknown scheme {name!r}", "use W2A16, W3A16, W4A16 or W8A16")
        kwargs = {"bits": int(upper[1:-3])}
        if group_size is not None:
            kwargs["group_size"] = group_size
        if sym is not None:
            kwargs["sym"] = sym
        return cls(**kwargs)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: `nsamples` windows of `seqlen` tokens cut from a text.

    Args:
        dataset: "austen" (Emma + Mansfield Park, the ANCHORS calibration text), "kjv", or a path to a
            UTF-8 text file.
        nsamples: number of windows.
        seqlen: tokens per window.
        batch_size: windows per forward pass through a block.
        allow_fewer: when the text is too short for nsamples x seqlen, use as many windows as it makes
            instead of failing.
        images: vision-language models only: calibrate on images with prompts instead of text windows, a
            folder of images or a .jsonl of {"image": path, "text": prompt} lines (calib/images.py); each
            sample is padded to seqlen tokens.
        moe_all_experts: mixture-of-experts models: while a block is calibrated, every token goes through
            every expert (the block's output keeps only the routed result), so the statistics of methods
            that read each linear's inputs (GPTQ, AWQ) cover every expert (llm-compressor's default).
        moe_min_tokens: an expert routed fewer calibration tokens than this, whose method cannot feed it
            every token (AutoRound learns from the block output, which unrouted experts do not reach; any
            method with moe_all_experts off), is quantized with RTN and listed in the summary. With
            moe_all_experts off, an expert routed no token at all stops the run.
        moe_unrouted_tokens: with moe_all_experts, how many routed tokens the tokens not routed to an expert
            count as, together, in its GPTQ Hessian (each routed token counts 1; AWQ's statistics read every
            token alike whatever this is); inf (the default): every
            token alike, llm-compressor's weighting, which measured best (docs/moe.md); 0: routed tokens only.
    """

    dataset: str = "austen"
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    allow_fewer: bool = False
    images: str | None = None
    moe_all_experts: bool = True
    moe_min_tokens: int = 16
    moe_unrouted_tokens: float = float("inf")

    def __post_init__(self):
        check_types(self)
        if self.moe_min_tokens < 0:
            raise LowbitError(f"moe_min_tokens={self.moe_min_tokens} must be >= 0", "pass --moe_min_tokens N with N >= 0")
        if not self.moe_unrouted_tokens >= 0:
            raise LowbitError(f"moe_unrouted_tokens={self.moe_unrouted_tokens} must be >= 0", "pass --moe_unrouted_tokens N with N >= 0 (inf: every token alike)")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) <= 0:
                raise LowbitError(f"{name}={getattr(self, name)} must be positive", f"pass --{name} N with N >= 1")


class MethodConfig:
    """What every method config tells the runner, so the runner names no method.

    needs_calibration: the method reads calibration samples (the runner captures block inputs).
    fp_targets: the method wants the fp model's block outputs on the fp model's own inputs beside the
        quantized chain (the runner then propagates both chains).
    quantized_inputs: the next block sees this block's outputs with quantized weights (else fp weights).
    cache_on_cpu: keep the calibration samples in CPU memory instead of the device's.
    reads_linear_inputs: the method's statistics are each linear's inputs (GPTQ Hessians, AWQ means), so
        running every token through every expert (CalibConfig.moe_all_experts) feeds every expert.
    """

    needs_calibration: ClassVar[bool] = True
    reads_linear_inputs: ClassVar[bool] = False

    @property
    def fp_targets(self) -> bool:
        return False

    @property
    def quantized_inputs(self) -> bool:
        return True

    @property
    def cache_on_cpu(self) -> bool:
        return False

    def metadata(self) -> dict:
        """What ran, for the exports' quantization_config and the run log."""
        return {}

    # memory the method needs per linear, for placing a block (placement.py); bytes, N = out, K = in features
    saves_activations: ClassVar[bool] = False  # runs a backward pass over the block (AutoRound)

    def linear_memory(self, n: int, k: int, weight_bytes: int) -> tuple[int, int]:
        """(held while the block is worked on: the weight and the method's state for it, the most its
        temporaries need while this linear is processed; they are processed one at a time). Default (RTN):
        the weight, and float32 copies of 1024-row chunks (quantize_weight)."""
        return n * k * weight_bytes, 3 * 4 * min(n, 1024) * k


@dataclass(frozen=True)
class RtnConfig(MethodConfig):
    """Round-to-nearest with min/max per group: no calibration data at all."""

    name: str = "rtn"
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self):
        check_types(self)


DEFAULT_LR_ITERS = 200  # AutoRoundConfig's default step is 1 / max(iters, this): never above auto-round's 200-iteration 5e-3


@dataclass(frozen=True)
class AutoRoundConfig(MethodConfig):
    """SignRound (arXiv 2309.05516): learn rounding offsets V and min/max scale factors per block.

    Args:
        iters: signed-gradient steps per block (auto-round's default 200).
        lr: step size for V; None: 1/iters from 200 iterations up (auto-round's default), 5e-3 below (auto-round's
            fast recipe, 50 iterations at 5e-3). A sign step moves every weight's offset at once, so its effect on a
            linear's output grows with lr x sqrt(in_features): 1/iters at few iterations overshoots on wide layers
            (a random Llama block of width 512, 10 iterations: no gain over RTN at 0.1, 0.36x RTN's block MSE at 5e-3;
            a FLUX-width block at 20 iterations: its loss 117x RTN's after the first step; docs/diffusion.md).
        minmax_lr: step size for the min/max factors; None means lr.
        enable_minmax_tuning: also learn the per-group min/max scale factors.
        enable_quanted_input: feed each block the outputs of the already-quantized previous blocks.
        gradient_accumulate_steps: batches per optimizer step.
        seed: seed for sampling batches.
        low_gpu_mem: keep cached inputs on the CPU (pinned) instead of the GPU.
        amp: 16-bit autocast on CUDA while tuning (the block's 16-bit dtype, else bf16); the CPU is fp32.
        compile: torch.compile the fake-quantization math and the block's training forward and backward.
            None (default): on for CUDA, where blocks after the first run ~1.5x faster (H100, Llama-3-8B
            shapes: 7.8 s against 11.8 s eager), and off on the CPU, where compiling costs more than it saves;
            if compiling fails, the eager code runs with a warning.
    """

    name: str = "autoround"
    iters: int = 200
    lr: float | None = None
    minmax_lr: float | None = None
    enable_minmax_tuning: bool = True
    enable_quanted_input: bool = True
    gradient_accumulate_steps: int = 1
    seed: int = 42
    low_gpu_mem: bool = False
    amp: bool = True
    compile: bool | None = None

    def __post_init__(self):
        check_types(self)
        if self.iters < 0:
            raise LowbitError(f"iters={self.iters} must be >= 0", "pass --iters 200 (0 means plain RTN)")
        if self.gradient_accumulate_steps < 1:
            raise LowbitError("gradient_accumulate_steps must be >= 1", "pass --gradient_accumulate_steps 1")

    @property
    def step_size(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, DEFAULT_LR_ITERS)

    @property
    def minmax_step_size(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.step_size

    @property
    def needs_calibration(self) -> bool:  # 0 iterations is plain RTN
        return self.iters > 0

    @property
    def fp_targets(self) -> bool:
        return self.enable_quanted_input and self.iters > 0

    @property
    def quantized_inputs(self) -> bool:
        return self.enable_quanted_input

    @property
    def cache_on_cpu(self) -> bool:
        return self.low_gpu_mem

    saves_activations: ClassVar[bool] = True

    def linear_memory(self, n: int, k: int, weight_bytes: int) -> tuple[int, int]:
        # per weight: its float32 group view (4), V, V's gradient and V's best copy (4 each), the fp16 codes
        # and the clamp mask saved for the grid's backward (2 + 1), the 16-bit fake-quantized weight, the leaf
        # copy the block reads and its gradient (2 each); then the export's 1024-row float32 chunks
        return n * k * (weight_bytes + 25), 3 * 4 * min(n, 1024) * k

    def metadata(self) -> dict:
        return {"iters": self.iters, "lr": self.step_size, "minmax_lr": self.minmax_step_size, "enable_minmax_tuning": self.enable_minmax_tuning,
                "enable_quanted_input": self.enable_quanted_input, "seed": self.seed}


@dataclass(frozen=True)
class AwqConfig(MethodConfig):
    """AWQ (Lin et al., arXiv 2306.00978): activation-aware per-channel scales folded into the preceding op,
    then a per-group clipping search, then round-to-nearest on the scaled and clipped weights.

    Args:
        n_grid: points of the grid over the exponent alpha in [0, 1) (and over the clipping ratios).
        duo_scaling: scale s = x_mean^alpha / w_mean^(1 - alpha) (AutoAWQ) instead of x_mean^alpha (llm-awq).
        apply_clip: search a per-group clipping of max |w| after scaling.
        explicit: the user asked for AWQ by name: an architecture without scale groups is an error
            instead of a logged fallback to RTN.
        search_samples: calibration windows (rounded up to whole batches) that score each scale candidate,
            None for all; the activation statistics always use every window. The search costs about
            n_grid block forwards over these windows, so fewer makes AWQ affordable on a CPU.
    """

    reads_linear_inputs: ClassVar[bool] = True

    name: str = "awq"
    n_grid: int = 20
    duo_scaling: bool = True
    apply_clip: bool = True
    explicit: bool = True
    search_samples: int | None = None

    def __post_init__(self):
        check_types(self)
        if self.n_grid < 1:
            raise LowbitError(f"n_grid={self.n_grid} must be >= 1", "pass --awq_n_grid 20")
        if self.search_samples is not None and self.search_samples < 1:
            raise LowbitError(f"search_samples={self.search_samples} must be >= 1", "pass None to score on every calibration window")

    def linear_memory(self, n: int, k: int, weight_bytes: int) -> tuple[int, int]:
        # the weight and its original kept during the scale search; float32 scaled / fake-quantized copies
        return 2 * n * k * weight_bytes, 4 * 4 * n * k

    def metadata(self) -> dict:
        return {"n_grid": self.n_grid, "duo_scaling": self.duo_scaling, "apply_clip": self.apply_clip}


@dataclass(frozen=True)
class GptqConfig(MethodConfig):
    """GPTQ (Frantar et al., arXiv 2210.17323): column-by-column rounding with second-order error feedback.

    Args:
        damp_percent: dampening added to the Hessian's diagonal, as a fraction of its mean.
        block_size: columns per lazy batch update.
        act_order: quantize columns in order of decreasing Hessian diagonal (default on: plain order lost to
            RTN out of domain at W4 on SmolLM2).
        static_groups: with act_order, compute each group's (scale, zero) up front on the original weight,
            so the export needs no g_idx (lowbit's formats store none, so act_order requires it).
        true_sequential: quantize q/k/v, then o, then gate/up, then down, each with inputs recomputed through
            the linears already quantized in this block.
    """

    reads_linear_inputs: ClassVar[bool] = True

    name: str = "gptq"
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True  # measured: W4 g128 on SmolLM2 29.08 vs 32.61 without (docs/accuracy-awq-gptq.md)
    static_groups: bool = True
    true_sequential: bool = True

    def __post_init__(self):
        check_types(self)
        if not 0 < self.damp_percent < 1:
            raise LowbitError(f"damp_percent={self.damp_percent} must be in (0, 1)", "pass --damp_percent 0.01")
        if self.block_size < 1:
            raise LowbitError(f"block_size={self.block_size} must be >= 1", "pass --gptq_block_size 128")
        if self.act_order and not self.static_groups:
            raise LowbitError("act_order without static_groups needs a g_idx that lowbit's formats do not store", "keep static_groups=True with act_order")

    def linear_memory(self, n: int, k: int, weight_bytes: int) -> tuple[int, int]:
        # the weight and its Hessian [K, K] float32 (held until the stage is solved); the solve's float32 W,
        # codes and errors [N, K] and H, its factor and the Cholesky temporaries [K, K]
        return n * k * weight_bytes + 4 * k * k, 3 * 4 * n * k + 4 * 4 * k * k

    def metadata(self) -> dict:
        # act_order with static groups: codes stay in natural column order (no g_idx permutation is stored)
        return {"damp_percent": self.damp_percent, "desc_act": self.act_order, "static_groups": self.static_groups,
                "true_sequential": self.true_sequential, "block_size": self.block_size}


METHOD_CONFIGS = {"rtn": RtnConfig, "autoround": AutoRoundConfig, "awq": AwqConfig, "gptq": GptqConfig}


def method_config(method) -> MethodConfig:
    """A method name ("rtn", "autoround", "awq", "gptq") or a method config -> the config."""
    if isinstance(method, MethodConfig):
        return method
    if isinstance(method, str) and method in METHOD_CONFIGS:
        return METHOD_CONFIGS[method]()
    hint = " (a scheme goes in scheme=lowbit.Scheme.from_name(...))" if isinstance(method, str) and method.upper().startswith("W") else ""
    raise LowbitError(f"unknown method {method!r}{hint}", f"pass one of {', '.join(METHOD_CONFIGS)} or a method config such as lowbit.AutoRoundConfig(iters=200)")


PRESETS = {
    "light": {"iters": 50},  # with the default step 1/max(50, 200) = 5e-3: auto-round's own fast setting (its README: iters=50, lr=5e-3)
    "default": {},
    "best": {"iters": 1000, "nsamples": 512},
}

FORMATS = ("auto_round", "auto_gptq", "auto_awq", "compressed-tensors")
FORMAT_ALIASES = {"compressed_tensors": "compressed-tensors", "llm_compressor": "compressed-tensors", "gptq": "auto_gptq", "awq": "auto_awq"}


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run happens.

    Args:
        output_dir: target folder; written as `<output_dir>.lowbit-partial` and renamed at the end.
        formats: export formats, e.g. ("auto_round",).
        device: "cpu", "cuda", "cuda:1", or "auto" (first GPU when present, else the CPU).
        device_map: auto-round's spellings of the devices to use: "auto" (every visible GPU), "0,1",
            "cuda:0,cuda:1", or a JSON dict of module -> device; replaces `device` when given. One process runs
            blocks on the first and spreads a block over the others when it does not fit there with the
            method's state (placement.py); data-parallel processes (torchrun / --nproc) take one each (dist.py).
        max_memory: the most memory each device may take, one size per `device_map` entry in its order (or one
            for `device`), e.g. "20GiB,60GiB"; None: each device's free memory. Caps the placement's budgets.
        quant_lm_head: quantize lm_head too (kept in full precision by default).
        overwrite: replace an existing output folder.
        max_shard_bytes: flush an output shard once it holds this many bytes.
    """

    output_dir: str = "out"
    formats: tuple[str, ...] = ("auto_round",)
    device: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None
    quant_lm_head: bool = False
    overwrite: bool = False
    max_shard_bytes: int = 512 * 1024**2

    def __post_init__(self):
        check_types(self)
        if self.device_map is not None:
            from .dist import check_devices

            check_devices(self.devices)  # parses too: a bad spelling or a missing GPU fails here, in one line
        if self.max_memory is not None:
            sizes, entries = self.max_memory_bytes, len(self.devices or (self.device,))
            if len(sizes) != entries:
                raise LowbitError(f"--max_memory {self.max_memory!r} gives {len(sizes)} sizes for {entries} device(s)", "give one size per --device_map entry, in its order, e.g. --max_memory 20GiB,60GiB")
        object.__setattr__(self, "formats", tuple(FORMAT_ALIASES.get(f, f) for f in self.formats))
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise LowbitError(f"unsupported export format {unknown[0]!r}", f"use one of {', '.join(FORMATS)}")
        if not self.formats:
            raise LowbitError("no export format given", "pass --format auto_round")

    @property
    def devices(self) -> tuple[str, ...] | None:
        """The devices `device_map` names, in order (None: use `device`)."""
        from .dist import parse_device_map

        return None if self.device_map is None else parse_device_map(self.device_map)

    @property
    def max_memory_bytes(self) -> tuple[int, ...] | None:
        from .placement import parse_size

        return None if self.max_memory is None else tuple(parse_size(p) for p in self.max_memory.split(","))




def check_quantize_args(method, scheme, calib, run) -> Scheme:
    """Refuse arguments of lowbit.quantize of the wrong kind with one line; returns the Scheme.

    `scheme` may be a scheme name ("W4A16"), the one place where a name means something; `method` takes a
    method name or config, so a scheme name there is refused with how to pass it."""
    if isinstance(method, str):
        if method not in METHODS:
            looks_like_scheme = method.upper().startswith("W") and method.upper().endswith("A16")
            hint = f"; to pass the scheme, use scheme=lowbit.Scheme.from_name({method!r})" if looks_like_scheme else ""
            raise LowbitError(f"method={method!r} is not a method", f"method takes one of {', '.join(METHODS)} or a method config such as lowbit.AutoRoundConfig(iters=50){hint}")
    elif not isinstance(method, MethodConfig):
        what = f"the class {method.__name__}" if isinstance(method, type) else f"a {type(method).__name__}"
        raise LowbitError(f"method is {what}", f"pass a method name ({', '.join(METHODS)}) or a config instance such as lowbit.RtnConfig()")
    if isinstance(scheme, str):
        scheme = Scheme.from_name(scheme)
    for arg, value, cls in (("scheme", scheme, Scheme), ("calib", calib, CalibConfig), ("run", run, RunConfig)):
        if not isinstance(value, cls):
            raise LowbitError(f"{arg}={value!r} is not a {cls.__name__}", f"pass {arg}=lowbit.{cls.__name__}(...)" + (" or a scheme name such as 'W4A16'" if cls is Scheme else ""))
    return scheme


def replace(config, **changes):
    """dataclasses.replace that re-runs validation (frozen dataclasses validate in __post_init__)."""
    return dataclasses.replace(config, **changes)


__all__ = [
    "Scheme",
    "CalibConfig",
    "RtnConfig",
    "AutoRoundConfig",
    "AwqConfig",
    "GptqConfig",
    "RunConfig",
    "PRESETS",
    "FORMATS",
    "SUPPORTED_BITS",
    "METHODS",
    "METHOD_CONFIGS",
    "MethodConfig",
    "method_config",
    "replace",
    "check_quantize_args",
    "field",
]
