"""Data-parallel quantization (two gloo processes on the CPU) against one process, on a tiny Llama.

Two processes are spawned once for the module (torch.multiprocessing.spawn, a free TCP port); each runs
RTN, GPTQ, AWQ and AutoRound on its half of the calibration windows, and rank 0 writes the outputs. The
one-process runs of the same settings, in this process, are the reference.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.errors import LowbitError
from tests.conftest import save_tiny_model_with_tokenizer

TEXT = " ".join(["it is a truth universally acknowledged that a single man in possession of a good fortune must be in want of a wife"] * 80)
SCHEME = lowbit.Scheme(4, 32, False)
# 8 windows in batches of 2: each of two processes holds 4, i.e. 2 whole batches, so AWQ's mean batch loss
# is the same mean as one process's (a split inside a batch would change what is averaged)
CALIB = dict(nsamples=8, seqlen=32, batch_size=2)
METHODS = {
    "rtn": lambda: lowbit.RtnConfig(),
    "gptq": lambda: lowbit.GptqConfig(),
    "awq": lambda: lowbit.AwqConfig(n_grid=10),
    "autoround": lambda: lowbit.AutoRoundConfig(iters=20),
}


def quantize(model, text_file, out, method: str):
    calib = lowbit.CalibConfig(dataset=str(text_file), **CALIB)
    run = lowbit.RunConfig(output_dir=str(out), device="cpu")
    return lowbit.quantize(str(model), METHODS[method](), SCHEME, calib, run, progress=False)


def worker(rank: int, port: int, model: str, text_file: str, root: str):
    """One of two torchrun-like processes: the environment torchrun would set, then every method."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on two cores
    for method in METHODS:
        summary = quantize(model, text_file, f"{root}/{method}", method)
        if rank == 0:
            torch.save(summary.block_losses, f"{root}/{method}.losses")
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder of the one-process outputs, folder of the two-process outputs), one subfolder per method."""
    root = tmp_path_factory.mktemp("dp")
    model, text_file = root / "m", root / "t.txt"
    text_file.write_text(TEXT)
    save_tiny_model_with_tokenizer(model, TEXT, hidden=64, intermediate=128, heads=2, kv_heads=1)
    two = root / "two"
    two.mkdir()
    torch.multiprocessing.spawn(worker, args=(free_port(), str(model), str(text_file), str(two)), nprocs=2, join=True)
    one = root / "one"
    for method in METHODS:
        summary = quantize(model, text_file, one / method, method)
        torch.save(summary.block_losses, one / f"{method}.losses")
    return one, two


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def logits(folder) -> torch.Tensor:
    """[2, 24, vocab] logits of a quantized output (lowbit.load) or of the fp checkpoint (transformers)."""
    from transformers import AutoModelForCausalLM

    x = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    quantized = "quantization_config" in json.loads((folder / "config.json").read_text())
    model = lowbit.load(folder) if quantized else AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits.float()


def test_rtn_is_byte_identical(runs):
    one, two = runs
    files = sorted(p.name for p in (one / "rtn").iterdir() if p.name != "lowbit_log.json")
    assert files == sorted(p.name for p in (two / "rtn").iterdir() if p.name != "lowbit_log.json")
    for name in files:
        assert (one / "rtn" / name).read_bytes() == (two / "rtn" / name).read_bytes(), name


def test_only_rank0_writes_and_nothing_is_left(runs):
    _, two = runs
    assert sorted(p.name for p in two.iterdir() if p.is_dir()) == sorted(METHODS)
    assert not list(two.glob("*.lowbit-partial")) and not list(two.glob("*.lowbit-lock"))
    log = json.loads((two / "gptq" / "lowbit_log.json").read_text())
    assert log["method"] == "gptq"


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_awq_match_one_process(runs, method):
    """Within reduction-order noise: the two processes' statistics (GPTQ's H as sum_p n_p H_p / n, AWQ's
    channel sums and candidate losses) differ from one process's running sums only in the order of float32
    additions (~1e-7 relative). That can move a value that sits on a rounding boundary by one code, so codes
    may differ in a few entries, by one step; the loaded models' logits then agree to far less than the
    quantization error itself (measured against the fp logits)."""
    one, two = runs
    a, b = tensors(one / method), tensors(two / method)
    assert a.keys() == b.keys()
    for name in a:
        if not a[name].is_floating_point():
            # packed 4-bit codes / zeros: an int32 word differs when any of its 8 entries does
            assert (a[name] != b[name]).float().mean() <= 0.02, name
        else:
            torch.testing.assert_close(b[name].float(), a[name].float(), rtol=1e-3, atol=1e-4, msg=name)
    la, lb, fp = logits(one / method), logits(two / method), logits(one.parent / "m")
    assert (lb - la).abs().max() < 0.05 * (la - fp).abs().max()


def test_autoround_agrees_loosely(runs):
    """Same seed, each process sampling its own batches of its own windows: not the same batches as one
    process, so only a loose check: finite losses that improve, an output that loads, and logits whose
    distance from one process's is of the order of the quantization error itself."""
    one, two = runs
    losses = torch.load(two / "autoround.losses")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor([a, b])).all() and b <= a for _, a, b in losses)
    la, lb, fp = logits(one / "autoround"), logits(two / "autoround"), logits(one.parent / "m")
    assert torch.isfinite(lb).all()
    assert (lb - la).abs().max() < 2 * (la - fp).abs().max()


def test_resume_with_another_world_size_is_refused(tmp_path):
    from lowbit.runner import PROGRESS, load_progress

    key_of = lambda n: f"key-{n}"  # noqa: E731
    (tmp_path / PROGRESS).write_text(json.dumps({"fingerprint": "key-2", "world_size": 2, "blocks_done": 1, "writers": {}}))
    assert load_progress(tmp_path, key_of, 2)["blocks_done"] == 1
    with pytest.raises(LowbitError, match="used 2 process.* this one uses 1.*--nproc 2"):
        load_progress(tmp_path, key_of, 1)
    (tmp_path / PROGRESS).write_text(json.dumps({"fingerprint": "other", "world_size": 2, "blocks_done": 1, "writers": {}}))
    assert load_progress(tmp_path, key_of, 1) is None  # other settings: start over, as before
