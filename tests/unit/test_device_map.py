"""--device_map in auto-round's spellings, --nproc, and their bad input (one line, exit 2), on any machine:
the visible GPUs are faked where a case needs them."""

import os
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.cli import main, strip_flag
from lowbit.dist import check_nproc, parse_device_map, share
from lowbit.errors import LowbitError


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("text,devices", [
    ("0,1", ("cuda:0", "cuda:1")),
    ("cuda:0,cuda:1", ("cuda:0", "cuda:1")),
    ("1", ("cuda:1",)),
    ("auto", ("cuda:0", "cuda:1")),
    ('{"model.layers.0": 0, "model.layers.1": 1, "lm_head": "cuda:1"}', ("cuda:0", "cuda:1")),
    ("cpu", ("cpu",)),
    ("cpu,cpu", ("cpu", "cpu")),  # two slots of one device, each with its own --max_memory
])
def test_spellings(two_gpus, text, devices):
    assert parse_device_map(text) == devices
    assert lowbit.RunConfig(device_map=text).devices == devices


def test_auto_without_gpus_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_device_map("auto") == ("cpu",)


@pytest.mark.parametrize("text,message", [
    ("0,2", r"names cuda:2, which does not exist \(visible GPUs: cuda:0, cuda:1\)"),
    ("0,cuda:0", r"names cuda:0 twice"),
    ("cuda:0,disk", r"'disk' is not a device"),
    ('{"model.layers.0": 0', r"is not valid JSON"),
    ("{}", r"empty or non-dict"),
])
def test_bad_maps_are_one_line(two_gpus, text, message):
    with pytest.raises(LowbitError, match=message) as err:
        lowbit.RunConfig(device_map=text)
    assert "\n" not in str(err.value)


def test_missing_gpu_on_the_cli(tmp_path, capsys):
    """On this machine no GPU need exist: cuda:0 is then named as missing, with the visible list."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    code = main(["quantize", "default", "--device_map", f"{n},{n + 1}", "--output_dir", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"names cuda:{n}, which does not exist" in err


def test_nproc_checks(two_gpus):
    check_nproc(2, lowbit.RunConfig(device_map="0,1"))
    check_nproc(4, lowbit.RunConfig(device="cpu"))  # gloo processes on the CPU: any number
    with pytest.raises(LowbitError, match=r"--nproc 3 needs 3 GPUs but 2 are given or visible.*pass --nproc 2"):
        check_nproc(3, lowbit.RunConfig(device="cuda"))
    with pytest.raises(LowbitError, match=r"--nproc 2 needs 2 GPUs but 1"):
        check_nproc(2, lowbit.RunConfig(device_map="1"))
    with pytest.raises(LowbitError, match="not a number of processes"):
        check_nproc(0, lowbit.RunConfig(device="cpu"))
    with pytest.raises(LowbitError, match="1 calibration windows for 2 processes; pass --nsamples 2"):
        check_nproc(2, lowbit.RunConfig(device="cpu"), nsamples=1)


def test_shares_are_contiguous_and_cover_everything():
    items = list(range(7))
    parts = [share(items, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(LowbitError, match="2 calibration windows for 3 processes"):
        share(items[:2], 0, 3)


def test_strip_flag():
    assert strip_flag(["quantize", "m", "--nproc", "2", "--bits", "4"], "nproc") == ["quantize", "m", "--bits", "4"]
    assert strip_flag(["quantize", "m", "--nproc=2"], "nproc") == ["quantize", "m"]


def test_more_torchrun_processes_than_gpus(two_gpus, monkeypatch):
    """Started by torchrun with three processes per host on two GPUs: one line before any process group."""
    from lowbit.dist import start

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(LowbitError, match=r"3 processes on this host but only 2 GPUs \(cuda:0, cuda:1\); pass --nproc 2"):
        start("auto", parse_device_map("auto"))


def test_one_gpu_named_for_several_torchrun_processes(two_gpus, monkeypatch):
    """--device cuda:1 under torchrun with two processes would put both on one GPU: refused, naming the fix."""
    from lowbit.dist import start

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(LowbitError, match=r"--device cuda:1 names one GPU for 2 processes; pass --device_map with one GPU per process \(e.g. --device_map 0,1\)"):
        start("cuda:1", None)


@pytest.mark.parametrize("device,want", [("cuda", 1), ("cuda:0", 0)])
def test_one_process_makes_its_gpu_current_by_index(two_gpus, monkeypatch, device, want):
    """One process on --device cuda (no index, the current GPU: 1 here) or cuda:0: that GPU is made current by
    its index (torch.cuda.set_device refuses a bare "cuda", which broke --device cuda on the H200) and
    returned with its index, the key of its VRAM figures."""
    from lowbit.dist import start

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    made = []

    def set_device(d):
        d = torch.device(d) if not isinstance(d, int) else torch.device("cuda", d)
        if d.index is None:  # what torch does
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{d}")
        made.append(d.index)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    devices, reducer = start(device, None)
    assert devices == (torch.device("cuda", want),) and made == [want] and reducer is None


@pytest.mark.parametrize("flags,message", [
    (["--device_map", "cpu,cpu", "--max_memory", "1GiB"], "gives 1 sizes for 2 device(s)"),
    (["--device", "cpu", "--max_memory", "lots"], "'lots' is not a size"),
])
def test_bad_placement_flags_on_the_cli(tmp_path, capsys, flags, message):
    """One line, exit 2, before any work: nothing is written."""
    code = main(["quantize", "default", *flags, "--output_dir", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_cli_imports_no_torch():
    """`lowbit quantize --nproc N` starts its processes before torch / transformers are imported (each took
    seconds in the launching process, which then only waited)."""
    import subprocess
    import sys

    code = "import sys, lowbit.cli, lowbit.launch; sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": os.pathsep.join(sys.path)}).returncode == 0


def test_launch_env_and_bad_nproc():
    from lowbit.launch import launch, worker_env

    env = worker_env(1, 2, Path("/tmp/lowbit-rendezvous-x/store"), 123.5)
    assert (env["WORLD_SIZE"], env["RANK"], env["LOCAL_RANK"], env["LOWBIT_COMMAND_STARTED"]) == ("2", "1", "1", "123.5")
    assert env["LOWBIT_RENDEZVOUS"] == "/tmp/lowbit-rendezvous-x/store"  # a torch.distributed FileStore's path
    with pytest.raises(LowbitError, match="--nproc 0 is not a number of processes"):
        launch(0, ["quantize", "m"])
