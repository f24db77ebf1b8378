"""lowbit.load: open a quantized checkpoint as a transformers model whose quantized linears are QuantLinear.

Reads every format lowbit writes, from lowbit or from other tools: auto_round (quant_method
"auto-round"), auto_gptq ("gptq", no act-order), auto_awq ("awq", GEMM) and compressed-tensors
("pack-quantized"). The model is built on `meta`; linears that have quantized tensors in the checkpoint
become QuantLinear; then every tensor is streamed from the shards straight to the device the device map
gives its module (formats other than the GPTQ layout are converted layer by layer on the way), and
`dispatch` adds the module hooks that move activations between devices.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch.utils._pytree import tree_map_only
from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from .config import Scheme
from .errors import LowbitError
from .export import auto_awq, auto_gptq, auto_round, compressed_tensors
from .arch import spec_for
from .kernels.fuse import fuse_shared_inputs
from .kernels.linear import QuantLinear
from .kernels.moe import group_experts
from .model.checkpoint import Checkpoint
from .model.skeleton import build_skeleton
from .quant import QuantResult, quantize_weight
from .quant.pack import pack_bitstream


def read_quantization_config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config")
    if not qc:
        raise LowbitError(f"{path} is not a quantized checkpoint (config.json has no quantization_config)", "quantize it first with `lowbit quantize`")
    return qc


def checkpoint_format(qc: dict):
    """(format module, global Scheme, marker tensor suffix) for a quantization_config."""
    method = qc.get("quant_method")
    if method == "auto-round":
        fmt = qc.get("packing_format", "auto_round:auto_gptq")
        if fmt not in ("auto_round", "auto_round:auto_gptq", "auto_round:gptq"):
            raise LowbitError(f"unsupported auto-round packing_format {fmt!r}", "lowbit reads auto_round and auto_round:auto_gptq")
        module = auto_round if fmt == "auto_round" else auto_gptq
        return module, Scheme(int(qc["bits"]), int(qc["group_size"]), fmt != "auto_round" if "sym" not in qc else bool(qc["sym"])), ".qweight"
    if method == "gptq":
        if qc.get("desc_act") and not qc.get("static_groups"):
            raise LowbitError("act-order GPTQ checkpoints (desc_act without static_groups) are not supported yet", "re-export with desc_act=false or static_groups=true")
        return auto_gptq, Scheme(int(qc["bits"]), int(qc["group_size"]), bool(qc.get("sym", True))), ".qweight"
    if method == "awq":
        if qc.get("version", "gemm").lower() != "gemm":
            raise LowbitError(f"unsupported AWQ version {qc.get('version')!r}", "lowbit reads AWQ GEMM checkpoints")
        return auto_awq, Scheme(int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128))), not qc.get("zero_point", True)), ".qweight"
    if method == "compressed-tensors":
        if qc.get("format") != "pack-quantized" or len(qc.get("config_groups", {})) != 1:
            raise LowbitError("only single-group pack-quantized compressed-tensors checkpoints are supported", "re-export with one weight-only int scheme")
        w = next(iter(qc["config_groups"].values()))["weights"]
        return compressed_tensors, Scheme(int(w["num_bits"]), int(w.get("group_size") or -1), bool(w["symmetric"])), ".weight_packed"
    raise LowbitError(f"unsupported quant_method {method!r}", "lowbit loads auto-round, gptq, awq and compressed-tensors checkpoints")


def layer_scheme(qc: dict, name: str, scheme: Scheme) -> Scheme:
    """auto-round's extra_config may override bits / group size per layer."""
    extra = (qc.get("extra_config") or {}).get(name, {})
    if not extra:
        return scheme
    return Scheme(int(extra.get("bits", scheme.bits)), int(extra.get("group_size", scheme.group_size)), bool(extra.get("sym", scheme.sym)))


def cast_floats(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast full-precision tensors to `dtype` in place; QuantLinear scales stay fp16 as the format defines.

    Buffers the model computes itself (non-persistent: rotary `inv_freq`) keep the dtype its own init gave
    them, as transformers' `from_pretrained(dtype=...)` leaves them: the skeleton is built at `dtype`, so only
    the ones its code makes float32 on purpose stay float32. Cast to fp16, Llama-3's smallest rotary
    frequencies (~2e-6 at theta 500000) fall below fp16's normal range and lose their precision."""
    for module in model.modules():
        skip = {"scales"} if isinstance(module, QuantLinear) else set()
        skip |= module._non_persistent_buffers_set
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.is_floating_point() and name not in skip and t.dtype != dtype:
                t.data = t.data.to(dtype)


def device_for(device_map: dict, name: str):
    """The device of the longest device-map prefix that contains `name`."""
    best, device = -1, "cpu"
    for prefix, dev in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best:
                best, device = len(prefix), dev
    return device if not isinstance(device, int) else f"cuda:{device}"


def layer_buffers(fmt, ckpt: Checkpoint, name: str, scheme: Scheme, layer: QuantLinear) -> dict[str, torch.Tensor]:
    """The QuantLinear buffers of one layer: GPTQ-layout formats pass through, others are repacked."""
    if fmt in (auto_round, auto_gptq):
        return {b: ckpt.tensor(f"{name}.{b}") for b in ("qweight", "qzeros", "scales")}
    return result_buffers(fmt.read_layer(ckpt.tensor, name, scheme, layer.out_features, layer.in_features))


def result_buffers(result: QuantResult) -> dict[str, torch.Tensor]:
    """A QuantResult (codes / zeros [N, K] / [N, G], scales [N, G]) as QuantLinear buffers with zero_offset 0:
    qweight int32 [K*bits/32, N], qzeros int32 [G, N*bits/32], scales fp16 [G, N]."""
    bits = result.scheme.bits
    return {
        "qweight": pack_bitstream(result.codes.t(), bits, 0),
        "qzeros": pack_bitstream(result.zero.t(), bits, 1),
        "scales": result.scale.t().to(torch.float16).contiguous(),
    }


def quantize_head(model: torch.nn.Module, name: str, scheme: Scheme) -> bool:
    """Replace the full-precision linear `name` (the lm_head) by a QuantLinear holding its RTN codes, on its
    device; returns False where there is nothing to do (already quantized). A head tied to the input embedding
    is untied: the embedding keeps the full-precision Parameter, and the config says the two are no longer tied,
    so a later `tie_weights()` does not put that Parameter back into the head."""
    head = model.get_submodule(name)
    if isinstance(head, QuantLinear):
        return False
    if not isinstance(head, torch.nn.Linear):
        raise LowbitError(f"quant_lm_head: {name} is a {type(head).__name__}, not a linear layer", "load without quant_lm_head")
    n, k = head.weight.shape
    if (n * scheme.bits) % 32 or (k * scheme.bits) % 32:
        raise LowbitError(f"quant_lm_head: {name} [{n}, {k}] does not pack into 32-bit words at {scheme.bits} bits",
                          "pass a Scheme with other bits, or load without quant_lm_head")
    device = head.weight.device
    # W [N, K] upcast to fp32 a 1024-row chunk at a time inside quantize_weight, on the head's device
    result = quantize_weight(head.weight.detach(), scheme)
    layer = QuantLinear(k, n, scheme.bits, scheme.group_size, bias=head.bias is not None, dtype=head.weight.dtype, device=device)
    for buf, value in result_buffers(result).items():
        setattr(layer, buf, value.to(device))
    if head.bias is not None:
        layer.bias = head.bias.detach().clone()
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)
    for config in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    return True


def load(path: str | Path, device_map=None, dtype: torch.dtype | None = None, max_memory: dict | None = None, cpu_cache_dequantized: bool = True,
         fuse: bool | None = None, grouped_experts: bool | None = None, quant_lm_head: bool | Scheme = False):
    """Load a quantized folder. Returns a transformers model in eval mode.

    Args:
        path: output folder of `lowbit quantize`, or an auto_round / gptq / awq / compressed-tensors export.
        device_map: None (CPU), "auto" (spread over the GPUs by free memory), a device string, or an
            accelerate device map dict.
        dtype: activation dtype; default float32 on the CPU, float16 on GPUs.
        max_memory: with device_map="auto", the most memory per device (accelerate's form, e.g.
            {0: "2GiB", 1: "2GiB", "cpu": "30GiB"}); None lets accelerate use what is free.
        cpu_cache_dequantized: layers on the CPU keep their dequantized weight after the first call (fast
            CPU evaluation at the cost of one full-precision copy of those weights); False dequantizes per call.
        fuse: run the quantized linears that read one input (q/k/v, gate/up: the architecture spec's scale
            groups) as one layer each (kernels/fuse.py): fewer, larger launches for decode. None (default):
            on when the model goes to GPUs (decode 1.53x fp16 against 1.47x unfused at batch 1, block
            linears 2.15x against 1.73x, H100, docs/kernels.md r4), off on the CPU. The fused model is for
            running, not for saving: pass fuse=False to get the checkpoint's module layout.
        grouped_experts: run each mixture-of-experts layer's quantized experts with the grouped MoE kernel
            (kernels/moe.py: one launch per projection for all experts, tokens sorted by expert on the device,
            CUDA-graph and torch.compile safe) instead of expert by expert. The experts' buffers are stacked
            per layer and each expert keeps views of its slice (no second copy). None (default): on when the
            model goes to GPUs. It applies to fp16 / bf16 activations where Triton runs; elsewhere, and while
            calibrating, the per-expert loop runs.
        quant_lm_head: quantize a full-precision lm_head at load (round to nearest), so it runs on the same
            kernels as the block linears: at batch 1 decode reads the whole head once per token (Llama-3-8B:
            128256 x 4096, 1.05 GB in fp16, 0.27 GB at W4 g128). True: W4 g128 symmetric (`Scheme()`); a
            Scheme: that one. It changes the logits (accuracy), hence off by default, as in lowbit's own
            quantize (`quant_lm_head`). A head tied to the input embedding is untied: the embedding stays
            full precision. A head the checkpoint already holds quantized is left as it is.
    """
    if not isinstance(quant_lm_head, (bool, Scheme)):
        raise LowbitError(f"quant_lm_head={quant_lm_head!r} is not a bool or a Scheme", "pass True (W4 g128), False, or lowbit.Scheme(bits=..., group_size=...)")
    path = Path(path)
    ckpt = Checkpoint(path)
    qc = read_quantization_config(path)
    on_gpu = device_map not in (None, "cpu") and torch.cuda.is_available()
    dtype = dtype or (torch.float16 if on_gpu else torch.float32)
    config = ckpt.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we install our own modules; transformers must not
    model = build_skeleton(config, dtype=dtype)
    tied = {f"{n}.weight" for n in ("lm_head",)} if getattr(config, "tie_word_embeddings", False) else set()
    fuse_spec = spec_for(config) if (on_gpu if fuse is None else fuse) else None
    head = None
    if quant_lm_head is not False:
        head = (spec_for(config).lm_head, Scheme() if quant_lm_head is True else quant_lm_head)
    return fill_quantized(model, ckpt, qc, device_map, dtype, max_memory, cpu_cache_dequantized, fuse_spec, tied,
                          on_gpu if grouped_experts is None else grouped_experts, head)


def fill_quantized(model, ckpt: Checkpoint, qc: dict, device_map, dtype: torch.dtype, max_memory: dict | None = None, cpu_cache_dequantized: bool = True,
                   fuse_spec=None, tied: set = frozenset(), grouped_experts: bool = False, head: tuple[str, Scheme] | None = None):
    """A meta `model` made runnable from a quantized checkpoint: linears with quantized tensors become
    QuantLinear, every tensor is streamed to the device `device_map` gives it (see `load`), and the model
    dispatched over several devices when the map names several. fuse_spec: fuse the linears of its scale
    groups (None: do not fuse); tied: names read from their tied source, not the checkpoint; head: (lm_head
    name, scheme) to quantize at load (`quantize_head`), None to keep it as the checkpoint has it."""
    path = ckpt.path
    fmt, scheme, marker = checkpoint_format(qc)
    quantized = {}
    offset = fmt.zero_offset(scheme) if fmt in (auto_round, auto_gptq) else 0
    for name in sorted(n[: -len(marker)] for n in ckpt.index if n.endswith(marker)):
        parent_name, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        s = layer_scheme(qc, name, scheme)
        with init_empty_weights(include_buffers=True):
            layer = QuantLinear(old.in_features, old.out_features, s.bits, s.group_size, bias=old.bias is not None, zero_offset=offset, dtype=dtype)
        setattr(model.get_submodule(parent_name), child, layer)
        quantized[name] = (layer, s)

    no_split = getattr(model, "_no_split_modules", None) or []
    if device_map is None:
        device_map = {"": "cpu"}
    elif device_map == "auto":
        getattr(model, "tie_weights", lambda: None)()
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    elif isinstance(device_map, (str, torch.device, int)):
        device_map = {"": device_map}

    for name, (layer, s) in quantized.items():
        device = device_for(device_map, name)
        for buf, value in layer_buffers(fmt, ckpt, name, s, layer).items():
            set_module_tensor_to_device(model, f"{name}.{buf}", device, value=value)
        if layer.bias is not None:
            set_module_tensor_to_device(model, f"{name}.bias", device, value=ckpt.tensor(f"{name}.bias").to(dtype))
    state_names = list(model.state_dict().keys())
    for name in state_names:
        if name.rpartition(".")[0] in quantized or name in tied or not ckpt.has(name):
            continue  # absent tensors stay on meta and are reported below
        value = ckpt.tensor(name)
        set_module_tensor_to_device(model, name, device_for(device_map, name), value=value.to(dtype) if value.is_floating_point() else value)
    saved = set(state_names)
    for name, t in list(model.named_buffers()):  # computed buffers (rotary tables), built on the CPU: beside their module
        if name not in saved and t.device.type != "meta" and t.device != torch.device(device_for(device_map, name)):
            set_module_tensor_to_device(model, name, device_for(device_map, name))
    ckpt.close()
    getattr(model, "tie_weights", lambda: None)()  # transformers models; diffusers ones tie nothing
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if still_meta:
        raise LowbitError(f"{path} lacks tensors the model needs, e.g. {still_meta[0]} ({len(still_meta)} in all)", "the checkpoint is incomplete or for another architecture")
    if head is not None:  # after tying (the head's weight is real) and before dispatch (hooks see the new module)
        quantize_head(model, *head)
    if fuse_spec is not None:  # before dispatch: the fused layer lives in its first member, on the block's one device
        fuse_shared_inputs(model, fuse_spec)
    devices = {str(d) for d in device_map.values()}
    if len(devices) > 1:
        model = dispatch(model, device_map)
    cast_floats(model, dtype)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.post_load()  # the kernels' internal layout, built once on the layer's device
            module.cache_dequantized = module.qweight.device.type == "cpu" and cpu_cache_dequantized
    if grouped_experts:  # after post_load: the stacks take each expert's kernel layout
        group_experts(model)
    model.lowbit_quantization_config = qc
    return model.eval()


def to_device(device, tree):
    """`tree` (tensors in tuples, lists, dicts, ModelOutputs) with every tensor on `device`; other leaves
    (a Cache object, None, ints) as they are."""
    return tree_map_only(torch.Tensor, lambda t: t.to(device), tree)


def inputs_to(device, module, args, kwargs):
    """Forward pre-hook (with_kwargs): the module's tensor arguments moved to `device`."""
    return to_device(device, args), to_device(device, kwargs)


def output_to(device, module, args, output):
    """Forward hook: the module's output moved to `device`."""
    return to_device(device, output)


def dispatch(model: torch.nn.Module, device_map: dict) -> torch.nn.Module:
    """Run `model`, whose tensors already sit where `device_map` (module name -> device) put them, across those
    devices. Every module that holds no entry of the map below it while its parent does (each block of an
    `infer_auto_device_map` map, the embeddings, the final norm, lm_head; under a "" entry, the modules it
    keeps) gets a forward pre-hook moving its tensor arguments to its device; the model's own hooks move its
    inputs to the map's first device and its output back there, as accelerate's `io_same_device` did.
    Nothing is moved; `hf_device_map` is set, as transformers' `generate` reads it (a static cache then makes
    each layer's tensors on that layer's device).

    Not accelerate's `dispatch_model` hooks (measured, torch 2.13 / accelerate 1.15): they replace every
    module's `forward` (each block and each of its submodules) with a closure over one code object
    (`add_hook_to_module`'s `new_forward`), and their pre/post steps are `torch.compiler.disable`d. Under
    `generate`'s compile, dynamo breaks the graph at each hooked module, the break inside the decoder layers'
    loop drops the whole loop to eager, and `new_forward` is recompiled for each module it wraps (its guards on
    the module's type and arguments) until the recompile limit (8). Module hooks calling shared functions are
    inlined by dynamo: the forward is one graph, the device copies inside it, whatever the number of layers.
    The model's two hooks run outside any compiled frame (`torch.compiler.disable`): generate compiles
    `model.__call__`, where they would be frames of their own. Maps that put weights on the CPU or the disk
    beside a GPU still go through accelerate, which moves such weights to the GPU per call (transformers
    does not compile those models)."""
    devices = {str(d) for d in device_map.values()}
    if devices & {"cpu", "disk"} and devices - {"cpu"}:
        return dispatch_model(model, device_map=device_map)
    placed = {name: torch.device(f"cuda:{d}" if isinstance(d, int) else d) for name, d in device_map.items()}  # accelerate names GPUs by index
    split = {".".join(name.split(".")[:i]) for name in placed if name for i in range(name.count(".") + 1)}  # "" and the entries' ancestors
    for name, module in model.named_modules():
        if not name or name in split or name.rpartition(".")[0] not in split:
            continue  # the model, a module with entries below it, or one inside a placed module
        covering = max((e for e in placed if e == "" or name == e or name.startswith(e + ".")), key=len, default=None)
        if covering is not None:  # None: a module the map leaves out (it holds no tensors)
            module.register_forward_pre_hook(partial(inputs_to, placed[covering]), with_kwargs=True)
    first = placed.get("", next(iter(placed.values())))
    model.register_forward_pre_hook(partial(torch.compiler.disable(inputs_to), first), with_kwargs=True)
    model.register_forward_hook(partial(torch.compiler.disable(output_to), first))
    model.hf_device_map = dict(device_map)
    return model
