"""The path matrix shared by tests/e2e/test_path_matrix.py (CPU, in CI) and bench/path_matrix.py (CPU and CUDA):
every method x every format that can hold its scheme, on a tiny random Llama with a tokenizer.

One cell = one method, one scheme, the formats written side by side in one run. For each format the export is
loaded with `lowbit.load` and its logits are compared with the same model class filled with a dequantization
of the written tensors done by tests/reference.py (never lowbit's readers); the formats of one run must also
decode to the same weights (they hold the same QuantResults).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import lowbit
from tests.reference import dequantized_state_dict

CALIB_TEXT = " ".join(
    f"The {w} walked to the {v} and said {n} words." for w, v, n in zip(["cat", "dog", "man", "girl"] * 60, ["shop", "park", "sea"] * 80, range(240))
)
# method name -> its config with the fewest iterations / grid points that still exercise the whole path
METHODS = {
    "rtn": lambda: lowbit.RtnConfig(),
    "autoround": lambda: lowbit.AutoRoundConfig(iters=2, compile=False),
    "awq": lambda: lowbit.AwqConfig(n_grid=2),
    "gptq": lambda: lowbit.GptqConfig(),
}
# scheme -> the formats that can hold it (auto_gptq: sym only; auto_awq: 4-bit asym)
RUNS = [
    (lowbit.Scheme(4, 32, False), ("auto_round", "auto_awq", "compressed-tensors")),
    (lowbit.Scheme(4, 32, True), ("auto_round", "auto_gptq", "compressed-tensors")),
]


@dataclass
class Cell:
    method: str
    scheme: lowbit.Scheme
    fmt: str
    device: str  # where it was quantized, and where lowbit.load put it
    seconds: float = 0.0  # the quantize call (every format of the run together)
    err_vs_reference: float = float("nan")  # max |lowbit.load logits - independent dequantization's logits| / max |ref|
    weights_match_first_format: bool = True
    logits: torch.Tensor | None = field(default=None, repr=False)

    @property
    def scheme_name(self) -> str:
        return f"W{self.scheme.bits} g{self.scheme.group_size} {'sym' if self.scheme.sym else 'asym'}"


def make_model(folder: Path) -> Path:
    from tests.conftest import save_tiny_model_with_tokenizer

    save_tiny_model_with_tokenizer(folder, CALIB_TEXT, hidden=64, intermediate=128, heads=2, kv_heads=1)
    (folder.parent / "calib.txt").write_text(CALIB_TEXT)
    return folder


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def reference_logits(src: Path, folder: Path, fmt: str, scheme: lowbit.Scheme, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits of the plain transformers model filled with tests/reference.py's dequantization of the export."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = dequantized_state_dict(folder, fmt, scheme.bits, scheme.group_size, scheme.sym)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head may be tied
    with torch.no_grad():
        return model(x).logits, state


def run_cell(src: Path, work: Path, method: str, scheme: lowbit.Scheme, formats: tuple[str, ...], device: str, x: torch.Tensor,
             calib_text: Path | None = None) -> list[Cell]:
    """Quantize `src` once with `method` into every format of `formats` on `device`, load each format there
    (fp32 on the CPU, fp16 on a GPU) and compare it with the independent dequantization (CPU, fp32).
    calib_text: the calibration text (default: make_model's, beside the model)."""
    out = work / f"{method}-w{scheme.bits}{'s' if scheme.sym else 'a'}-{device.replace(':', '')}"
    calib = lowbit.CalibConfig(dataset=str(calib_text or src.parent / "calib.txt"), nsamples=2, seqlen=32, batch_size=2)
    started = time.time()
    lowbit.quantize(str(src), METHODS[method](), scheme, calib=calib, run=lowbit.RunConfig(output_dir=str(out), formats=formats, device=device, overwrite=True), progress=False)
    seconds = time.time() - started
    cells, first_state = [], None
    for fmt in formats:
        folder = out / fmt if len(formats) > 1 else out
        cell = Cell(method, scheme, fmt, device, seconds)
        want, state = reference_logits(src, folder, fmt, scheme, x)
        with torch.no_grad():
            cell.logits = lowbit.load(folder, device_map=None if device == "cpu" else device)(x.to(device)).logits.float().cpu()
        cell.err_vs_reference = rel_err(cell.logits, want)
        if first_state is None:
            first_state = state
        else:
            cell.weights_match_first_format = all(torch.equal(state[k], first_state[k]) for k in state)
        cells.append(cell)
    return cells
