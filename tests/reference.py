"""Independent reference implementations the tests compare lowbit against (written from the definitions)."""

import torch


def reference_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Plain loops: each group's range includes 0; scale rounded to fp16; partial last group."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    maxq = 2**bits - 1
    out = torch.empty_like(w, dtype=torch.float64)
    for row in range(n):
        for start in range(0, k, gs):
            g = w[row, start : start + gs].double()
            lo, hi = min(g.min().item(), 0.0), max(g.max().item(), 0.0)
            if sym:
                scale = 2 * max(-lo, hi) / maxq
                zero = (maxq + 1) // 2
            else:
                scale = (hi - lo) / maxq
            scale = float(torch.tensor(max(scale, 1e-5), dtype=torch.float32).half())
            if not sym:
                zero = min(max(round(-lo / scale), 0), maxq)
            q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
            out[row, start : start + gs] = scale * (q - zero)
    return out


@torch.no_grad()
def reference_rtn_model(model, bits: int, group_size: int, sym: bool, blocks: str = "model.layers"):
    """Fake-quantize every Linear inside the blocks of an in-memory fp model with reference_rtn."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(blocks + "."):
            module.weight.data = reference_rtn(module.weight.data, bits, group_size, sym).to(module.weight.dtype)
    return model


# ---- the written tensors read from the formats' definitions (never through lowbit's readers)

def unpack_stream(words: torch.Tensor, bits: int, dim: int, count: int) -> torch.Tensor:
    """`count` values packed along `dim` as a little-endian bit stream: value i is stream bits
    [i*bits, (i+1)*bits), and stream bit j is bit j % 32 of word j // 32. Returns int64."""
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF  # [..., W] unsigned words
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # a zero word past the end for the straddle read
    start = torch.arange(count) * bits
    word, shift = start // 32, start % 32
    pair = w[..., word] | (w[..., word + 1] << 32)  # the 64 stream bits from the value's first word on
    return ((pair >> shift) & ((1 << bits) - 1)).movedim(-1, dim)


AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AutoAWQ's unpack: column 8c + j of a run is nibble AWQ_REVERSE_ORDER[j]


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's reading of int32 [R, N/8]: shift out the 8 nibbles of each word, undo the interleave."""
    nibbles = torch.stack([(words.to(torch.int64) >> (4 * j)) & 0xF for j in range(8)], dim=-1)  # [R, N/8, 8]
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(words.shape[0], -1)


QUANT_MARKER = {"auto_round": ".qweight", "auto_gptq": ".qweight", "auto_awq": ".qweight", "compressed-tensors": ".weight_packed"}


def dequantize_written(fmt: str, get, layer: str, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """W [N, K] float64 = scale * (code - zero) per group, from one layer's written tensors (`get(name)`),
    each format as its peer defines it (fmt: auto_round | auto_gptq | auto_awq | compressed-tensors)."""
    if fmt == "compressed-tensors":
        n, k = get(f"{layer}.weight_shape").tolist()
        codes = unpack_stream(get(f"{layer}.weight_packed"), bits, 1, k)  # [N, K]
        scale = get(f"{layer}.weight_scale").double()  # [N, G]
        zero = unpack_stream(get(f"{layer}.weight_zero_point"), bits, 0, n) if not sym else torch.full_like(scale, 2 ** (bits - 1))
    elif fmt == "auto_awq":
        codes = unpack_awq(get(f"{layer}.qweight")).t()  # [K, N] -> [N, K]
        zero = unpack_awq(get(f"{layer}.qzeros")).t()  # [G, N] -> [N, G]
        scale = get(f"{layer}.scales").double().t()
        n, k = codes.shape
    else:  # auto_round / auto_gptq: qweight along K, qzeros along N; GPTQ v1 (and sym auto_round) store zero - 1
        q = get(f"{layer}.qweight")
        k, n = q.shape[0] * 32 // bits, q.shape[1]
        codes = unpack_stream(q, bits, 0, k).t()
        zero = unpack_stream(get(f"{layer}.qzeros"), bits, 1, n).t() + (1 if fmt == "auto_gptq" or sym else 0)
        scale = get(f"{layer}.scales").double().t()
    gs = k if group_size == -1 else group_size
    if fmt == "auto_gptq":
        assert get(f"{layer}.g_idx").tolist() == [i // gs for i in range(k)], f"{layer}.g_idx is not k // group_size"
    group = torch.arange(k) // gs
    return scale[:, group] * (codes.double() - zero[:, group].double())


def dequantized_state_dict(folder, fmt: str, bits: int, group_size: int, sym: bool) -> dict[str, torch.Tensor]:
    """Every tensor of an exported folder, each quantized linear's packed tensors replaced by `<layer>.weight`
    dequantized as above: a plain fp state dict for the model class, built without lowbit."""
    from pathlib import Path

    from safetensors import safe_open

    files = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            files.update({name: f.get_tensor(name) for name in f.keys()})
    marker = QUANT_MARKER[fmt]
    layers = [name[: -len(marker)] for name in files if name.endswith(marker)]
    packed = {f"{layer}.{s}" for layer in layers for s in ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
    out = {name: t for name, t in files.items() if name not in packed}
    for layer in layers:
        out[f"{layer}.weight"] = dequantize_written(fmt, files.__getitem__, layer, bits, group_size, sym).float()
    return out
