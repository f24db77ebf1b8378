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
