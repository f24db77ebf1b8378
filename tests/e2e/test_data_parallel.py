"""Data-parallel quantization (two gloo processes on the CPU) against one process, on a tiny Llama.

Two processes are spawned once for the module (torch.multiprocessing.spawn, a file store); each runs
RTN, GPTQ, AWQ and AutoRound on its half of the calibration windows, and rank 0 writes the outputs. The
one-process runs of the same settings, in this process, are the reference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.errors import LowbitError
from lowbit.algorithms.gptq import DEAL_OUT_PER_PROCESS, SOLVE_BATCH
from tests.arch.tiny import save_tiny_checkpoint
from tests.conftest import dying_on, save_tiny_model_with_tokenizer

# seeded random words: windows that differ (a repeated sentence gives every process the same statistics, and
# processes that never reduce would still agree)
WORDS = "the a man woman house garden fortune letter walked said wrote read ran quickly slowly old young near far under over and but".split()
TEXT = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (2500,), generator=torch.Generator().manual_seed(0)).tolist())
SCHEME = lowbit.Scheme(4, 32, False)
# 8 windows in batches of 2: each of two processes holds 4, i.e. 2 whole batches, so AWQ's mean batch loss
# is the same mean as one process's (a split inside a batch would change what is averaged)
CALIB = dict(nsamples=8, seqlen=32, batch_size=2)
METHODS = {
    "rtn": lambda: lowbit.RtnConfig(),
    "gptq": lambda: lowbit.GptqConfig(),
    # one stage per block (llm-compressor's way): its four units (q/k/v, o, gate/up, down) dealt out whole
    "gptq_one_stage": lambda: lowbit.GptqConfig(true_sequential=False),
    "awq": lambda: lowbit.AwqConfig(n_grid=6),
    # every step on all windows (4 batches of 2; each of two processes: its 2 batches), so the step's loss is
    # a function of the parameters alone and the two-process gradient mean is one process's gradient
    "autoround": lambda: lowbit.AutoRoundConfig(iters=6, gradient_accumulate_steps=4),
    # the same through torch.compile (inductor on the CPU): two processes wait for W_hat in module pre-hooks
    # (graph breaks) and launch the gradient sums from the compiled backward's pieces
    "autoround_compiled": lambda: lowbit.AutoRoundConfig(iters=6, gradient_accumulate_steps=4, compile=True),
    # auto-round's usual steps on a random batch: 2 windows per step for one process, 1 per process for two
    "autoround_sampled": lambda: lowbit.AutoRoundConfig(iters=6),
}
# a tiny Qwen3-MoE with as many experts as Qwen3-30B-A3B: GPTQ's gate / up stage is then 8 solve batches of up to
# 32 experts, dealt out whole between two processes (gptq.DEAL_OUT_PER_PROCESS), its down stage 4 batches split by rows
MOE_EXPERTS = 128


def quantize(model, text_file, out, method: str, **run):
    calib = lowbit.CalibConfig(dataset=str(text_file), **CALIB)
    run = lowbit.RunConfig(output_dir=str(out), device="cpu", **run)
    return lowbit.quantize(str(model), METHODS[method](), SCHEME, calib, run, progress=False)


def worker(rank: int, store: str, model: str, text_file: str, root: str, phase: str):
    """One of two torchrun-like processes: the environment torchrun would set, then the phase's runs.

    "methods": every method, then a GPTQ run whose rank 0 dies while writing block 1 (block 0's shard and
    the progress file are on disk); "resume": that GPTQ run again, which resumes at block 1."""
    import lowbit.blockstep as blockstep
    import lowbit.runner as runner

    os.environ.update(LOWBIT_RENDEZVOUS=store, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on two cores
    if phase == "methods":
        # what each process quantized every block to, kept per rank: the processes must decide identically,
        # since rank 1's inputs to the next block assume the weights rank 0 writes
        real_handler, decided = blockstep.handler_for, []

        def recording(config):
            block_fn = real_handler(config)

            def fn(ctx, cfg):
                results = block_fn(ctx, cfg)
                decided.append({n: r.dequantize() for n, r in results.items()})
                return results

            return fn

        blockstep.handler_for = recording
        for method in METHODS:
            summary = quantize(model, text_file, f"{root}/{method}", method)
            torch.save(decided, f"{root}/{method}.rank{rank}")
            decided.clear()
            if rank == 0:
                torch.save(summary.block_losses, f"{root}/{method}.losses")
        quantize(f"{root}/moe-model", text_file, f"{root}/moe-gptq", "gptq")  # MOE_EXPERTS: solves dealt out whole
        torch.save(decided, f"{root}/moe-gptq.rank{rank}")
        decided.clear()
        summary = quantize(f"{root}/moe-model", text_file, f"{root}/moe-autoround", "autoround")  # experts trained expert-parallel
        torch.save(decided, f"{root}/moe-autoround.rank{rank}")
        decided.clear()
        if rank == 0:
            torch.save(summary.block_losses, f"{root}/moe-autoround.losses")
        blockstep.handler_for = real_handler
        # NaN in a tensor of rank 1's half of the bytes: rank 1 finds it, both processes stop with its line
        try:
            quantize(f"{root}/nan-model", text_file, f"{root}/nan", "rtn")
        except LowbitError as err:
            torch.save(str(err), f"{root}/nan.rank{rank}")
        # last (the process group is not usable after it): rank 0 dies writing block 1
        real = runner.block_tensors
        runner.block_tensors = dying_on(real, 2)  # dies writing block 1
        try:
            quantize(model, text_file, f"{root}/crashed", "gptq", max_shard_bytes=1)
        except RuntimeError as err:
            # only rank 0 writes, so only rank 0 meets the crash; rank 1 then loses its peer at the
            # end-of-loop gather of the per-process figures
            assert ("simulated crash" in str(err)) == (rank == 0), err
        runner.block_tensors = real
    else:
        quantize(model, text_file, f"{root}/crashed", "gptq", max_shard_bytes=1)
    torch.distributed.destroy_process_group()


def nan_model(model, to):
    """The model with one NaN in the tensor whose bytes lie last in the file: in the second process's share of
    the NaN/inf scan (each process scans half of the bytes)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lowbit.model.scan import float_tensors

    shutil.copytree(model, to)
    last = float_tensors(to / "model.safetensors")[-1][1]
    tensors = load_file(to / "model.safetensors")
    tensors[last].view(-1)[0] = float("nan")
    save_file(tensors, to / "model.safetensors", metadata={"format": "pt"})
    return last


def spawn(model, text_file, root, phase: str) -> None:
    torch.multiprocessing.spawn(worker, args=(rendezvous(Path(root).parent), str(model), str(text_file), str(root), phase), nprocs=2, join=True)


def rendezvous(folder) -> str:
    """A new file store's path for one process group (what `--nproc` gives its processes: no TCP port to race for)."""
    return str(Path(tempfile.mkdtemp(dir=folder, prefix="rendezvous-")) / "store")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder of the one-process outputs, folder of the two-process outputs), one subfolder per method."""
    root = tmp_path_factory.mktemp("dp")
    model, text_file = root / "m", root / "t.txt"
    text_file.write_text(TEXT)
    save_tiny_model_with_tokenizer(model, TEXT, hidden=64, intermediate=128, heads=2, kv_heads=1)
    two = root / "two"
    two.mkdir()
    nan_model(model, two / "nan-model")
    save_tiny_checkpoint("Qwen3MoeForCausalLM", two / "moe-model", TEXT, num_experts=MOE_EXPERTS)
    spawn(model, text_file, two, "methods")
    one = root / "one"
    for method in METHODS:
        summary = quantize(model, text_file, one / method, method)
        torch.save(summary.block_losses, one / f"{method}.losses")
    quantize(two / "moe-model", text_file, one / "moe-gptq", "gptq")
    summary = quantize(two / "moe-model", text_file, one / "moe-autoround", "autoround")
    torch.save(summary.block_losses, one / "moe-autoround.losses")
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
    finished = sorted(p.name for p in two.iterdir() if p.is_dir() and not p.name.startswith(("crashed", "nan", "moe-model")))
    assert finished == sorted([*METHODS, "moe-gptq", "moe-autoround"])
    assert not [p for p in two.glob("*.lowbit-*") if not p.name.startswith("crashed")]
    log = json.loads((two / "gptq" / "lowbit_log.json").read_text())
    assert log["method"] == "gptq"


@pytest.mark.parametrize("method", ["gptq", "gptq_one_stage", "awq", "autoround", "autoround_compiled", "autoround_sampled"])
def test_processes_stay_in_lockstep(runs, method):
    """Every process quantizes a block to the same weights as rank 0 (which alone writes them): GPTQ's
    reduced Hessians, AWQ's reduced scale losses and gathered clip samples, AutoRound's averaged gradients
    and losses leave no process-dependent decision."""
    _, two = runs
    a, b = torch.load(two / f"{method}.rank0"), torch.load(two / f"{method}.rank1")
    assert len(a) == len(b) == 2  # both blocks
    assert all(x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x) for x, y in zip(a, b))


@pytest.mark.parametrize("method", ["gptq", "gptq_one_stage", "awq", "autoround", "autoround_compiled"])
def test_matches_one_process(runs, method):
    """Within reduction-order noise: the two processes' statistics (GPTQ's H as sum_p n_p H_p / n, AWQ's
    channel sums and candidate losses, AutoRound's full-batch gradients and losses as the mean of the two
    halves' means) differ from one process's only in the order of float32 additions (~1e-7 relative). That can move a value that sits on a rounding boundary by one code, so codes
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


def test_moe_gptq_solves_dealt_out_whole_match_one_process(runs):
    """GPTQ on a 128-expert MoE: each expert's gate / up (one unit: they share its Hessian) and the downs in
    batches dealt out whole to their owners, each Hessian reduced onto its solver, the results shared back in two
    broadcasts per batch; both processes hold every expert's result, and the export is one process's within
    reduction-order noise (as test_matches_one_process)."""
    assert -(-MOE_EXPERTS // SOLVE_BATCH) < DEAL_OUT_PER_PROCESS * 2  # full batches would be too few: smaller ones are dealt out
    one, two = runs
    a, b = torch.load(two / "moe-gptq.rank0"), torch.load(two / "moe-gptq.rank1")
    assert len(a) == len(b) == 2 and all(x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x) for x, y in zip(a, b))
    assert sum("experts.127.up_proj" in n for n in a[0]) == 1
    ta, tb = tensors(one / "moe-gptq"), tensors(two / "moe-gptq")
    assert ta.keys() == tb.keys()
    for name in ta:
        if not ta[name].is_floating_point():
            assert (ta[name] != tb[name]).float().mean() <= 0.02, name
        else:
            torch.testing.assert_close(tb[name].float(), ta[name].float(), rtol=1e-3, atol=1e-4, msg=name)


def test_moe_autoround_expert_parallel_matches_one_process(runs):
    """AutoRound on a 128-expert MoE with two processes: each trains the experts it owns (0-63 / 64-127) on the
    tokens of both processes routed to them (arch/expert_parallel.py: all-to-alls instead of W_hat broadcasts and
    gradient sums), the attention as before. Every process decides the same weights, and the block losses and the
    export are one process's within reduction-order noise (the gradient of an expert is summed over the pairs in
    another order)."""
    one, two = runs
    a, b = torch.load(two / "moe-autoround.rank0"), torch.load(two / "moe-autoround.rank1")
    assert len(a) == len(b) == 2 and all(x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x) for x, y in zip(a, b))
    for (_, first1, best1), (_, first2, best2) in zip(torch.load(one / "moe-autoround.losses"), torch.load(two / "moe-autoround.losses")):
        assert abs(first2 - first1) <= 1e-4 * first1 and abs(best2 - best1) <= 1e-3 * best1
    ta, tb = tensors(one / "moe-autoround"), tensors(two / "moe-autoround")
    assert ta.keys() == tb.keys()
    for name in ta:
        if not ta[name].is_floating_point():
            assert (ta[name] != tb[name]).float().mean() <= 0.02, name
        else:
            torch.testing.assert_close(tb[name].float(), ta[name].float(), rtol=1e-3, atol=1e-4, msg=name)


def test_sampled_autoround_agrees_loosely(runs):
    """Same seed, each process sampling its own batches of its own windows: not the batches one process
    draws, so only a loose check: finite losses that improve, an output that loads, and logits whose
    distance from one process's is of the order of the quantization error itself."""
    one, two = runs
    losses = torch.load(two / "autoround_sampled.losses")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor([a, b])).all() and b <= a for _, a, b in losses)
    la, lb, fp = logits(one / "autoround_sampled"), logits(two / "autoround_sampled"), logits(one.parent / "m")
    assert torch.isfinite(lb).all()
    assert (lb - la).abs().max() < 2 * (la - fp).abs().max()


def test_nan_found_by_the_second_process_stops_both(runs):
    """The NaN/inf scan is split by bytes between the processes: a NaN only rank 1 reads is found there, and
    both processes stop with its line (none waits in a collective); nothing is left behind."""
    _, two = runs
    messages = [torch.load(two / f"nan.rank{r}") for r in (0, 1)]
    assert messages[0] == messages[1] and "contains NaN or inf" in messages[0]
    assert not list(two.glob("nan*.lowbit-*")) and not (two / "nan").exists()


def test_resume_with_another_world_size_is_refused(tmp_path):
    from lowbit.runner import PROGRESS, load_progress

    key_of = lambda n: f"key-{n}"  # noqa: E731
    (tmp_path / PROGRESS).write_text(json.dumps({"fingerprint": "key-2", "world_size": 2, "blocks_done": 1, "writers": {}}))
    assert load_progress(tmp_path, key_of, 2)["blocks_done"] == 1
    with pytest.raises(LowbitError, match="used 2 process.* this one uses 1.*--nproc 2"):
        load_progress(tmp_path, key_of, 1)
    (tmp_path / PROGRESS).write_text(json.dumps({"fingerprint": "other", "world_size": 2, "blocks_done": 1, "writers": {}}))
    assert load_progress(tmp_path, key_of, 1) is None  # other settings: start over, as before


def test_resume_of_a_two_process_run(runs):
    """Rank 0 died in block 1: one process may not resume it (the windows were split in two; one line, the
    partial folder kept), two processes do, rank 1 replaying block 0 from rank 0's shard, and the result is
    the uninterrupted two-process run's."""
    one, two = runs
    model, text_file = one.parent / "m", one.parent / "t.txt"
    partial = two / "crashed.lowbit-partial"
    assert partial.is_dir() and not (two / "crashed").exists()
    with pytest.raises(LowbitError, match=r"used 2 process\(es\) and this one uses 1; resume it with --nproc 2"):
        quantize(model, text_file, two / "crashed", "gptq", max_shard_bytes=1)
    assert partial.is_dir()
    spawn(model, text_file, two, "resume")
    assert (two / "crashed").is_dir() and not partial.exists()
    a, b = tensors(two / "gptq"), tensors(two / "crashed")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_nproc_launches_two_processes(runs, tmp_path):
    """`lowbit quantize --nproc 2` (launch.py: two gloo processes) writes the same RTN bytes, and its log
    records the command's startup before the run (the launcher's start, not each process's)."""
    from lowbit.cli import main

    one, _ = runs
    out = tmp_path / "q"
    code = main(["quantize", str(one.parent / "m"), "--nproc", "2", "--device", "cpu", "--bits", "4", "--group_size", "32", "--asym", "--output_dir", str(out)])
    assert code == 0
    assert (out / "model.safetensors").read_bytes() == (one / "rtn" / "model.safetensors").read_bytes()
    log = json.loads((out / "lowbit_log.json").read_text())
    assert log["phases"]["startup"] > 0 and len(log["ranks"]) == 2


def test_nproc_meets_at_a_file_not_a_port(runs, tmp_path, monkeypatch):
    """The launched processes rendezvous at a file store in a private folder, removed afterwards: a port another
    program holds (here the very MASTER_PORT the environment names) does not matter, since none is bound; a
    temporary folder whose path has a space neither (torch's file:// URLs are not unquoted on Linux)."""
    from lowbit.cli import main

    one, _ = runs
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(held.getsockname()[1]))
    temporary = tmp_path / "tmp dir"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    try:
        code = main(["quantize", str(one.parent / "m"), "--nproc", "2", "--device", "cpu", "--bits", "4", "--group_size", "32", "--asym", "--output_dir", str(tmp_path / "q")])
    finally:
        held.close()
    assert code == 0
    assert (tmp_path / "q" / "model.safetensors").read_bytes() == (one / "rtn" / "model.safetensors").read_bytes()
    assert list(temporary.iterdir()) == []  # the rendezvous folder is gone


def test_nproc_input_error_is_one_line_from_rank0(runs, tmp_path):
    """Both processes meet the same input error (1 window for 2 processes); rank 0 alone prints its line, the
    command exits 2, and the other process does not hang waiting for it."""
    one, _ = runs
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(one.parent / "m"), "--nproc", "2", "--device", "cpu", "--method", "gptq",
           "--dataset", str(one.parent / "t.txt"), "--nsamples", "1", "--seqlen", "32", "--output_dir", str(tmp_path / "q")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["lowbit: error: 1 calibration windows for 2 processes; pass --nsamples 2 or more, or fewer processes"]
    assert not (tmp_path / "q").exists()


def nccl_sum_worker(rank: int, store: str, root: str):
    torch.distributed.init_process_group("nccl", store=torch.distributed.FileStore(store, 2), rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    g = torch.Generator().manual_seed(rank)
    # gradients of very different sizes, so sums round (and cancel) in every way
    x = (torch.randn(1 << 20, generator=g) * torch.logspace(-8, 4, 1 << 20)).bfloat16().cuda()
    for dtype in (torch.bfloat16, torch.float16):
        v = x.to(dtype)
        mine, wide = v.clone(), v.float()
        torch.distributed.reduce(mine, dst=0)
        torch.distributed.reduce(wide, dst=0)
        if rank == 0:
            torch.save({"sum16": mine.cpu(), "sum32_rounded": wide.to(dtype).cpu()}, f"{root}/{dtype}".replace("torch.", ""))
    torch.distributed.destroy_process_group()


@pytest.mark.multigpu
def test_nccl_sums_two_16bit_gradients_as_float32_rounded_once(tmp_path):
    """AutoRound's two-process gradient sum runs in the gradients' own 16-bit dtype (Trainer._launch_sums):
    NCCL's sum of two bf16 / fp16 values must be the float32 sum rounded once, what the float32 reduction
    gave before, bit for bit."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.multiprocessing.spawn(nccl_sum_worker, args=(rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)
    for dtype in ("bfloat16", "float16"):
        out = torch.load(tmp_path / dtype)
        assert torch.equal(out["sum16"], out["sum32_rounded"]), dtype
