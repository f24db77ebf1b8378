"""Bad input: one line naming the problem and the fix, exit status 2, no traceback, nothing left or changed.

Every case checks, besides the line: the output (and its `.lowbit-partial`, `.lowbit-lock`, `.lowbit-old`
siblings) is absent, and the source checkpoint is byte-for-byte what it was (an autouse fixture hashes it
after each test). CLI cases call `lowbit.cli.main` in-process (its return value is the exit status; an
escaping exception fails the test); real subprocesses are used only where another process is the point.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import AutoRoundConfig, AwqConfig, CalibConfig, GptqConfig, LowbitError, RtnConfig, RunConfig, Scheme
from lowbit.cli import main
from tests.conftest import save_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
CALIB_TEXT = " ".join(f"The {w} walked to the {v} and said {n} words." for w, v, n in zip(["cat", "dog", "man"] * 40, ["shop", "park"] * 60, range(120)))


# ---------------------------------------------------------------- fixtures and helpers

def snapshot(folder: Path) -> dict:
    """Every file under `folder` -> sha256 of its bytes (links -> their target), to prove nothing changed."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One small 2-block Llama checkpoint without tokenizer files, shared by the whole module."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_tiny_llama(path, hidden=64, intermediate=128, layers=2, vocab=128, heads=2, kv_heads=1)
    return path


@pytest.fixture(scope="module")
def tiny_hash(tiny):
    return snapshot(tiny)


@pytest.fixture(autouse=True)
def source_unchanged(tiny, tiny_hash):
    yield
    assert snapshot(tiny) == tiny_hash, "the source checkpoint was changed"


def copy_model(tiny: Path, to: Path) -> Path:
    shutil.copytree(tiny, to)
    return to


def leftovers(out: Path) -> list[str]:
    """The output and anything lowbit puts beside it (partial, lock, old)."""
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(out.name + ".lowbit-"))


def cli(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def assert_one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "block/s]" not in line]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def refused(call, *needles: str) -> str:
    """A Python-API call refused with a one-line LowbitError naming every needle."""
    with pytest.raises(LowbitError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def quantize_cli(capsys, model, out, *extra):
    return cli(capsys, "quantize", model, "--method", "rtn", "--output_dir", out, "--device", "cpu", "--group_size", "32", *extra)


def api_quantize(model, out, method="rtn", scheme=None, **run):
    return lowbit.quantize(str(model), method, scheme or Scheme(4, 32, False), run=RunConfig(output_dir=str(out), device="cpu", **run), progress=False)


# ---------------------------------------------------------------- the model argument

def test_missing_model_path(capsys, tmp_path):
    out = tmp_path / "o"
    assert_one_line(*quantize_cli(capsys, tmp_path / "nope", out), "does not exist")
    assert leftovers(out) == []


def test_empty_model_path(capsys, tmp_path):
    out = tmp_path / "o"
    assert_one_line(*quantize_cli(capsys, "", out), "empty model path")
    assert leftovers(out) == []


def test_model_is_a_file_but_not_gguf(capsys, tmp_path, tiny):
    out = tmp_path / "o"
    assert_one_line(*quantize_cli(capsys, tiny / "config.json", out), "is a file but not a .gguf model", "folder")
    assert leftovers(out) == []


def test_folder_without_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line(*quantize_cli(capsys, tmp_path / "empty", tmp_path / "o"), "no config.json")
    assert leftovers(tmp_path / "o") == []


def test_folder_without_weights(capsys, tmp_path, tiny):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny / "config.json", bare)
    assert_one_line(*quantize_cli(capsys, bare, tmp_path / "o"), "no *.safetensors weights")
    assert leftovers(tmp_path / "o") == []


def test_folder_with_only_bin_weights(capsys, tmp_path, tiny):
    bins = tmp_path / "bins"
    bins.mkdir()
    shutil.copy(tiny / "config.json", bins)
    torch.save(load_file(tiny / "model.safetensors"), bins / "pytorch_model.bin")
    assert_one_line(*quantize_cli(capsys, bins, tmp_path / "o"), "no *.safetensors weights", "safe_serialization=True")
    assert leftovers(tmp_path / "o") == []


def test_truncated_safetensors(capsys, tmp_path, tiny):
    bad = copy_model(tiny, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line(*quantize_cli(capsys, bad, tmp_path / "o"), "corrupt safetensors file model.safetensors")
    assert leftovers(tmp_path / "o") == []


def test_config_json_not_json(capsys, tmp_path, tiny):
    bad = copy_model(tiny, tmp_path / "bad")
    (bad / "config.json").write_text("{ not json")
    assert_one_line(*quantize_cli(capsys, bad, tmp_path / "o"), "cannot read", "config.json")
    assert leftovers(tmp_path / "o") == []


def test_unknown_architecture(capsys, tmp_path, tiny):
    other = copy_model(tiny, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    assert_one_line(*quantize_cli(capsys, other, tmp_path / "o"), "unknown architecture FancyNewForCausalLM", "ArchSpec")
    assert leftovers(tmp_path / "o") == []


def test_tensor_missing_from_checkpoint(capsys, tmp_path, tiny):
    cut = copy_model(tiny, tmp_path / "cut")
    tensors = load_file(cut / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, cut / "model.safetensors", metadata={"format": "pt"})
    assert_one_line(*quantize_cli(capsys, cut, tmp_path / "o"), "model.layers.1.mlp.down_proj.weight", "missing")
    assert leftovers(tmp_path / "o") == []


# ---------------------------------------------------------------- NaN / inf, found before block 0

def with_value(tiny: Path, to: Path, name: str, index: tuple, value: float, dtype=None) -> Path:
    bad = copy_model(tiny, to)
    tensors = load_file(bad / "model.safetensors")
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors[name][index] = value
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def test_nan_in_the_last_block_is_found_before_block_0(capsys, tmp_path, tiny, monkeypatch):
    import lowbit.runner as runner

    bad = with_value(tiny, tmp_path / "nan", "model.layers.1.mlp.up_proj.weight", (3, 5), float("nan"))
    loaded = []
    real = runner.load_module
    monkeypatch.setattr(runner, "load_module", lambda *a, **k: loaded.append(a[1]) or real(*a, **k))
    assert_one_line(*quantize_cli(capsys, bad, tmp_path / "o"), "model.layers.1.mlp.up_proj.weight contains NaN or inf")
    assert loaded == []  # no block (nor the embedding) was loaded: the scan reads the shards directly
    assert leftovers(tmp_path / "o") == []


def test_inf_in_a_bf16_embedding(capsys, tmp_path, tiny):
    bad = with_value(tiny, tmp_path / "inf", "model.embed_tokens.weight", (7, 1), float("inf"), dtype=torch.bfloat16)
    assert_one_line(*quantize_cli(capsys, bad, tmp_path / "o"), "model.embed_tokens.weight contains NaN or inf")
    assert leftovers(tmp_path / "o") == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2])
def test_chunk_check_agrees_with_isfinite(dtype):
    """The scan's per-chunk check (min and max finite) against torch.isfinite(...).all() on the same values:
    NaN, +inf and -inf at the start, middle and end of a chunk, one at a time, and none."""
    import lowbit.model.scan as scan

    base = torch.randn(4099, generator=torch.Generator().manual_seed(0)).clamp(-2, 2)
    specials = [float("nan")] + ([] if dtype == torch.float8_e4m3fn else [float("inf"), float("-inf")])  # e4m3fn has no inf
    cases = [base] + [base.clone().index_fill_(0, torch.tensor([i]), v) for v in specials for i in (0, 2048, 4098)]
    for values in cases:
        chunk = values.to(dtype)
        assert scan._finite(chunk) == bool(torch.isfinite(chunk.float()).all())
    assert sum(not scan._finite(v.to(dtype)) for v in cases) == len(cases) - 1  # every special value is caught


def test_nan_past_the_first_read_chunk(tmp_path, tiny, monkeypatch):
    """The scan reads a tensor in chunks: a NaN in a later chunk of one tensor is found too."""
    import lowbit.model.scan as scan

    bad = with_value(tiny, tmp_path / "nan", "lm_head.weight", (127, 63), float("nan"))
    monkeypatch.setattr(scan, "CHUNK_BYTES", 1024)  # lm_head is 128 x 64 fp32 = 32 KiB: the NaN is in chunk 32
    assert scan.first_nonfinite(bad / "model.safetensors") == "lm_head.weight"
    assert scan.first_nonfinite(tiny / "model.safetensors") is None


# ---------------------------------------------------------------- scheme / method / format flags

@pytest.mark.parametrize("flags,needle", [
    (["--group_size", "0"], "group_size=0 is invalid"),
    (["--group-size", "-4"], "group_size=-4 is invalid"),
    (["--bits", "5"], "bits=5 is not supported"),
    (["--scheme", "W4A8"], "unknown scheme"),
    (["--format", "onnx"], "unsupported export format 'onnx'"),
    (["--format", "auto_awq", "--sym"], "auto_awq holds only asymmetric"),
    (["--format", "auto_gptq", "--asym"], "auto_gptq (GPTQ v1"),
    (["--format", "auto_awq", "--asym", "--bits", "3"], "auto_awq holds only 4-bit"),
    (["--method", "autoround", "--iters", "-1"], "iters=-1 must be >= 0"),
    (["--method", "autoround", "--nsamples", "0"], "nsamples=0 must be positive"),
    (["--method", "gptq", "--damp_percent", "2"], "damp_percent=2.0 must be in (0, 1)"),
    (["--method", "awq", "--awq_n_grid", "0"], "n_grid=0 must be >= 1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_flags(capsys, tmp_path, tiny, flags, needle):
    assert_one_line(*quantize_cli(capsys, tiny, tmp_path / "o", *flags), needle)
    assert leftovers(tmp_path / "o") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu(capsys, tmp_path, tiny):
    assert_one_line(*quantize_cli(capsys, tiny, tmp_path / "o", "--device", "cuda"), "no CUDA GPU is visible", "--device cpu")
    assert leftovers(tmp_path / "o") == []


# ---------------------------------------------------------------- the output target

def test_existing_output_needs_overwrite(capsys, tmp_path, tiny):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_line(*quantize_cli(capsys, tiny, out), "already exists", "--overwrite")
    assert snapshot(out) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()} and leftovers(out) == ["o"]


def test_output_is_the_model_folder(capsys, tiny):
    assert_one_line(*quantize_cli(capsys, tiny, tiny, "--overwrite"), "is the model folder")
    assert leftovers(tiny) == ["tiny"]


def test_output_is_the_model_folder_by_another_spelling(capsys, tiny):
    alias = tiny.parent / ".." / tiny.parent.name / "." / tiny.name
    assert_one_line(*quantize_cli(capsys, tiny, alias, "--overwrite"), "is the model folder")
    assert leftovers(tiny) == ["tiny"]


def test_output_inside_the_model_folder(capsys, tiny):
    assert_one_line(*quantize_cli(capsys, tiny, tiny / "quantized"), "inside the model folder")
    assert not (tiny / "quantized").exists() and leftovers(tiny / "quantized") == []


def test_output_containing_the_model_folder(capsys, tiny):
    assert_one_line(*quantize_cli(capsys, tiny, tiny.parent, "--overwrite"), "contains the model folder")
    assert leftovers(tiny.parent / "x") == []


def test_output_is_a_symlink_to_a_folder(capsys, tmp_path, tiny):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    link = tmp_path / "o"
    link.symlink_to(real)
    assert_one_line(*quantize_cli(capsys, tiny, link, "--overwrite"), "is a symbolic link")
    assert link.is_symlink() and os.readlink(link) == str(real) and snapshot(real) == {"keep.txt": hashlib.sha256(b"mine").hexdigest()}
    assert leftovers(link) == ["o"]


def test_output_is_a_dangling_symlink(capsys, tmp_path, tiny):
    link = tmp_path / "o"
    link.symlink_to(tmp_path / "nowhere")
    assert_one_line(*quantize_cli(capsys, tiny, link), "is a symbolic link")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists() and leftovers(link) == ["o"]


def test_output_is_a_file(capsys, tmp_path, tiny):
    out = tmp_path / "o"
    out.write_text("mine")
    assert_one_line(*quantize_cli(capsys, tiny, out, "--overwrite"), "exists and is not a folder")
    assert out.read_text() == "mine" and leftovers(out) == ["o"]


def test_output_parent_is_a_file(capsys, tmp_path, tiny):
    (tmp_path / "f").write_text("mine")
    assert_one_line(*quantize_cli(capsys, tiny, tmp_path / "f" / "o"), "is not a folder")
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("out", ["", ".", "/"])
def test_output_names_no_folder(tiny, out):
    refused(lambda: api_quantize(tiny, out, overwrite=True), "names no folder")


def userns_available() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def test_read_only_output_parent(capsys, tmp_path, tiny):
    """A folder the process cannot write: mode 0555 for a normal user; root ignores modes, so as root the CLI
    runs in a mount namespace where the folder is a read-only file system."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        try:
            rc, err = quantize_cli(capsys, tiny, ro / "o")
        finally:
            ro.chmod(0o755)
    elif userns_available():
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PYTHONWARNINGS": "ignore"}
        mount_then_run = 'mount -t tmpfs -o ro tmpfs "$0" && exec "$@"'
        result = subprocess.run(["unshare", "-rm", "sh", "-c", mount_then_run, str(ro), sys.executable, "-m", "lowbit.cli", "quantize", str(tiny),
                                 "--output_dir", str(ro / "o"), "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
        rc, err = result.returncode, result.stderr
    else:
        pytest.skip("running as root without user namespaces: no way to make a folder read-only")
    assert_one_line(rc, err, f"output parent {ro} is not writable")
    assert list(ro.iterdir()) == []


# ---------------------------------------------------------------- the output lock

def hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding the output's lock as lowbit does: flock on OUT.lowbit-lock, its pid inside."""
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out.with_name(out.name + ".lowbit-lock"))], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_a_locked_output_refuses_naming_the_holder(capsys, tmp_path, tiny):
    out = tmp_path / "o"
    holder = hold_lock(out)
    try:
        started = time.time()
        assert_one_line(*quantize_cli(capsys, tiny, out), "being written by another lowbit run", f"pid {holder.pid}")
        assert time.time() - started < 10  # at once, not after the work
        assert leftovers(out) == ["o.lowbit-lock"]  # the holder's lock, untouched
        assert (tmp_path / "o.lowbit-lock").read_text() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()


def test_same_process_run_on_an_output_it_is_writing(tmp_path, tiny):
    from lowbit.guard import OutputLock

    lock = OutputLock.acquire(tmp_path / "o")
    try:
        refused(lambda: api_quantize(tiny, tmp_path / "o"), "already being written by this process")
    finally:
        lock.release()
    assert leftovers(tmp_path / "o") == []


def test_file_system_without_flock_is_one_line(capsys, tmp_path, tiny, monkeypatch):
    """flock(2) failing as on an NFS mount without locking (ENOLCK): one line, nothing left behind."""
    import errno

    import lowbit.guard as guard

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(guard.fcntl, "flock", no_locks)
    assert_one_line(*quantize_cli(capsys, tiny, tmp_path / "o"), "cannot lock", "no flock", "local file system")
    assert leftovers(tmp_path / "o") == []


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, tiny):
    out = tmp_path / "o"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "o.lowbit-lock").write_text(str(dead.pid))
    api_quantize(tiny, out)
    assert (out / "config.json").is_file() and leftovers(out) == ["o"]  # lock file removed at the end


def test_lock_is_released_after_a_refusal_inside_the_run(tmp_path, tiny):
    """A refusal that comes after the lock was taken (NaN scan) releases it: the next run is not blocked."""
    bad = with_value(tiny, tmp_path / "nan", "model.norm.weight", (0,), float("nan"))
    refused(lambda: api_quantize(bad, tmp_path / "o"), "model.norm.weight contains NaN or inf")
    assert leftovers(tmp_path / "o") == []
    api_quantize(tiny, tmp_path / "o")
    assert leftovers(tmp_path / "o") == ["o"]


# ---------------------------------------------------------------- tokenizer-less folders, eval / generate flags

@pytest.mark.parametrize("method", ["autoround", "awq", "gptq"])
def test_calibrated_method_without_tokenizer(capsys, tmp_path, tiny, method):
    out = tmp_path / "o"
    assert_one_line(*quantize_cli(capsys, tiny, out, "--method", method, "--iters", "1", "--nsamples", "2", "--seqlen", "16"), "has no tokenizer files")
    assert leftovers(out) == []  # no empty partial folder


def test_eval_without_tokenizer(capsys, tmp_path, tiny):
    (tmp_path / "t.txt").write_text(CALIB_TEXT)
    assert_one_line(*cli(capsys, "eval", tiny, "--text", tmp_path / "t.txt"), "has no tokenizer files")


def test_generate_without_tokenizer(capsys, tiny):
    assert_one_line(*cli(capsys, "generate", tiny, "--prompt", "hi"), "has no tokenizer files")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_generate_max_new_tokens_not_positive(capsys, tiny, n):
    assert_one_line(*cli(capsys, "generate", tiny, "--prompt", "hi", "--max_new_tokens", n), f"max_new_tokens={n}", "--max_new_tokens 48")


def test_eval_zero_windows(capsys, tiny):
    assert_one_line(*cli(capsys, "eval", tiny, "--windows", "0"), "windows=0 must be a positive int")


def test_eval_text_missing(capsys, tmp_path, tiny):
    assert_one_line(*cli(capsys, "eval", tiny, "--text", tmp_path / "none.txt"), "neither a file nor a known corpus")


def test_eval_of_missing_folder(capsys, tmp_path):
    (tmp_path / "t.txt").write_text(CALIB_TEXT)
    assert_one_line(*cli(capsys, "eval", tmp_path / "nothing", "--text", tmp_path / "t.txt"), "does not exist")


# ---------------------------------------------------------------- Python configs: types checked at construction

@pytest.mark.parametrize("make,needles", [
    (lambda: Scheme(bits=4.0), ["Scheme(bits=4.0)", "got a float", "expected an int", "bits=4"]),
    (lambda: Scheme(bits="4"), ["Scheme(bits='4')", "got a str", "bits=4"]),
    (lambda: Scheme(bits=True), ["Scheme(bits=True)", "got a bool", "expected an int"]),
    (lambda: Scheme(sym="false"), ["Scheme(sym='false')", "got a str", "True or False", "sym=False"]),
    (lambda: Scheme(group_size="128"), ["Scheme(group_size='128')", "got a str", "group_size=128"]),
    (lambda: Scheme(group_size=128.0), ["Scheme(group_size=128.0)", "got a float", "group_size=128"]),
    (lambda: CalibConfig(nsamples=1.5), ["CalibConfig(nsamples=1.5)", "got a float", "expected an int"]),
    (lambda: CalibConfig(seqlen="2048"), ["CalibConfig(seqlen='2048')", "seqlen=2048"]),
    (lambda: CalibConfig(allow_fewer="yes"), ["CalibConfig(allow_fewer='yes')", "allow_fewer=True"]),
    (lambda: AutoRoundConfig(iters=50.0), ["AutoRoundConfig(iters=50.0)", "iters=50"]),
    (lambda: AutoRoundConfig(lr="0.01"), ["AutoRoundConfig(lr='0.01')", "a number or None", "lr=0.01"]),
    (lambda: AutoRoundConfig(enable_quanted_input="false"), ["enable_quanted_input='false'", "enable_quanted_input=False"]),
    (lambda: AwqConfig(n_grid=2.5), ["AwqConfig(n_grid=2.5)", "expected an int"]),
    (lambda: GptqConfig(act_order="true"), ["GptqConfig(act_order='true')", "act_order=True"]),
    (lambda: GptqConfig(damp_percent=True), ["GptqConfig(damp_percent=True)", "got a bool", "expected a number"]),
    (lambda: RunConfig(overwrite="false"), ["RunConfig(overwrite='false')", "overwrite=False"]),
    (lambda: RunConfig(formats="auto_round"), ["RunConfig(formats='auto_round')", "formats=('auto_round',)"]),
    (lambda: RunConfig(max_shard_bytes=1.5e9), ["RunConfig(max_shard_bytes=1500000000.0)", "max_shard_bytes=1500000000"]),
    (lambda: RunConfig(quant_lm_head=1), ["RunConfig(quant_lm_head=1)", "got an int", "True or False"]),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_config_types(make, needles):
    refused(make, *needles)


def test_method_given_a_scheme_name(tiny, tmp_path):
    refused(lambda: lowbit.quantize(str(tiny), "W4A16", run=RunConfig(output_dir=str(tmp_path / "o"))),
            "method='W4A16' is not a method", "rtn, autoround, awq, gptq", "lowbit.Scheme.from_name('W4A16')")
    assert leftovers(tmp_path / "o") == []


@pytest.mark.parametrize("kwargs,needles", [
    ({"method": RtnConfig}, ["the class RtnConfig", "lowbit.RtnConfig()"]),
    ({"method": "round"}, ["method='round' is not a method"]),
    ({"scheme": 4}, ["scheme=4 is not a Scheme", "'W4A16'"]),
    ({"calib": {"nsamples": 8}}, ["is not a CalibConfig"]),
], ids=["method-class", "method-unknown", "scheme-int", "calib-dict"])
def test_quantize_arguments_of_the_wrong_kind(tiny, tmp_path, kwargs, needles):
    args = {"method": "rtn", "run": RunConfig(output_dir=str(tmp_path / "o"), device="cpu"), **kwargs}
    refused(lambda: lowbit.quantize(str(tiny), progress=False, **args), *needles)
    assert leftovers(tmp_path / "o") == []


def test_calibration_text_too_short():
    from lowbit.calib.samples import calibration_windows

    class WordTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}

    text = "word " * 1000  # 1000 tokens -> 3 windows of 300
    refused(lambda: calibration_windows(WordTokenizer(), text, CalibConfig(nsamples=8, seqlen=300)), "makes only 3 samples", "--allow_fewer_samples")
    assert calibration_windows(WordTokenizer(), text, CalibConfig(nsamples=8, seqlen=300, allow_fewer=True)).shape == (3, 300)


# ---------------------------------------------------------------- what is not an error: the controls

def test_numpy_ints_and_paths_are_accepted():
    import numpy as np

    scheme = Scheme(bits=np.int64(4), group_size=np.int32(64))
    assert (type(scheme.bits), scheme.bits, type(scheme.group_size), scheme.group_size) == (int, 4, int, 64)
    assert RunConfig(output_dir=Path("out"), formats=["auto_round"]) == RunConfig(output_dir="out", formats=("auto_round",))


def test_scheme_name_is_accepted_as_scheme(tiny, tmp_path):
    summary = lowbit.quantize(str(tiny), "rtn", "W8A16", run=RunConfig(output_dir=str(tmp_path / "o"), device="cpu"), progress=False)
    assert summary.scheme.startswith("W8A16") and json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["bits"] == 8


def test_output_in_folders_that_do_not_exist_yet(tmp_path, tiny):
    out = tmp_path / "a" / "b" / "o"
    api_quantize(tiny, out)
    assert (out / "config.json").is_file() and leftovers(out) == ["o"]


def test_overwrite_replaces_a_folder_and_leaves_nothing_beside_it(capsys, tmp_path, tiny):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = quantize_cli(capsys, tiny, out, "--overwrite")
    assert rc == 0, err
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists() and leftovers(out) == ["o"]


def test_interrupted_run_announces_its_resume(capsys, tmp_path, tiny, monkeypatch):
    import lowbit.runner as runner

    real, calls = runner.block_tensors, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C in block 1, after block 0's shard was flushed
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "block_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        api_quantize(tiny, tmp_path / "o", max_shard_bytes=1)
    assert leftovers(tmp_path / "o") == ["o.lowbit-partial"]  # kept for the resume; the lock is released
    monkeypatch.setattr(runner, "block_tensors", real)
    capsys.readouterr()
    api_quantize(tiny, tmp_path / "o", max_shard_bytes=1)
    resumed = [line for line in capsys.readouterr().err.splitlines() if "resuming" in line]
    assert len(resumed) == 1 and resumed[0].startswith("lowbit: resuming at block 1 of 2"), resumed
    assert leftovers(tmp_path / "o") == ["o"]


@pytest.mark.parametrize("record", [b"{not json", b"\xff\xfe", b"[1, 2]"])
def test_unreadable_resume_record_is_one_line(capsys, tmp_path, tiny, monkeypatch, record):
    """A partial output whose lowbit_progress.json someone damaged: one line naming the file and the fix, and
    the partial output left as it was (not resumed from garbage, not deleted)."""
    import lowbit.runner as runner

    real, calls = runner.block_tensors, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "block_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        api_quantize(tiny, tmp_path / "o", max_shard_bytes=1)
    monkeypatch.setattr(runner, "block_tensors", real)
    partial = tmp_path / "o.lowbit-partial"
    (partial / runner.PROGRESS).write_bytes(record)
    before = sorted(p.name for p in partial.iterdir())
    assert_one_line(*quantize_cli(capsys, tiny, tmp_path / "o"), "lowbit_progress.json", "unreadable", f"delete {partial}")
    assert sorted(p.name for p in partial.iterdir()) == before
    shutil.rmtree(partial)  # the fix the line names
    rc, err = quantize_cli(capsys, tiny, tmp_path / "o")
    assert rc == 0 and leftovers(tmp_path / "o") == ["o"], err
