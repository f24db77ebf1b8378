"""Block i + 1 read by a loader thread while block i computes (prefetch.BlockPrefetch). The runner enables it on
one CUDA device only; here it is forced on for the CPU, so the loop's order is tested without a GPU: a run
with it writes the same tensors as the plain loop (a calibrated method, whose next block must not change under
the one computing, and a run resumed after a crash, whose replayed blocks free memory the loader may take), and
the loader's errors reach the caller. The GPU test runs it as users get it."""

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from lowbit.prefetch import BlockPrefetch
from tests.conftest import dying_on, save_tiny_model_with_tokenizer

TEXT = " ".join(f"The {w} walked to the {v} and said {n} words." for w, v, n in zip(["cat", "dog", "man", "girl"] * 60, ["shop", "park", "sea"] * 80, range(240)))


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_tensors(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "calib.txt").write_text(TEXT)
    src = tmp_path / "tiny"
    save_tiny_model_with_tokenizer(src, TEXT, layers=3)
    return src, lowbit.CalibConfig(dataset=str(tmp_path / "calib.txt"), nsamples=4, seqlen=64, batch_size=2)


def forced_on(monkeypatch) -> list:
    """The runner's prefetch enabled on the CPU with room always; returns the blocks `take` handed over."""
    import lowbit.runner as runner
    from lowbit.placement import Placer

    taken = []

    class Forced(BlockPrefetch):
        def __init__(self, device, enabled):
            super().__init__(device, enabled=True)

        def take(self, index):
            module = super().take(index)
            if module is not None:
                taken.append(index)
            return module

    monkeypatch.setattr(runner, "BlockPrefetch", Forced)
    monkeypatch.setattr(Placer, "room_for_next", lambda self, block, linears, following: True)
    return taken


def run(src, calib, out, **kw):
    return lowbit.quantize(str(src), lowbit.GptqConfig(), lowbit.Scheme(4, 64, False), calib=calib,
                           run=lowbit.RunConfig(output_dir=str(out), device="cpu", **kw), progress=False)


def test_prefetched_blocks_give_the_plain_loops_output(tiny, tmp_path, monkeypatch):
    src, calib = tiny
    run(src, calib, tmp_path / "plain")
    taken = forced_on(monkeypatch)
    run(src, calib, tmp_path / "prefetched")
    assert taken == [1, 2]  # every block after the first came from the loader thread
    assert_same_tensors(tmp_path / "plain", tmp_path / "prefetched")


def test_a_resumed_run_with_prefetch_gives_the_clean_output(tiny, tmp_path, monkeypatch):
    import lowbit.runner as runner

    src, calib = tiny
    run(src, calib, tmp_path / "clean", max_shard_bytes=1)
    taken = forced_on(monkeypatch)
    real = runner.block_tensors
    monkeypatch.setattr(runner, "block_tensors", dying_on(real, 2))  # dies writing block 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(src, calib, tmp_path / "resumed", max_shard_bytes=1)
    monkeypatch.setattr(runner, "block_tensors", real)
    taken.clear()
    run(src, calib, tmp_path / "resumed", max_shard_bytes=1)
    assert taken == [1, 2]  # block 0 replayed from its shard, blocks 1 and 2 prefetched
    assert_same_tensors(tmp_path / "clean", tmp_path / "resumed")


def test_a_prefetch_that_runs_out_of_memory_leaves_the_block_to_the_loop(tiny, tmp_path, monkeypatch):
    """The room is an estimate: a load that runs out of device memory is dropped (its tensors back on meta) and the
    loop loads the block itself; the output is the plain loop's."""
    import threading

    import lowbit.runner as runner

    src, calib = tiny
    run(src, calib, tmp_path / "plain")
    taken = forced_on(monkeypatch)
    real, failed, freed = runner.load_module, [], []

    def short_of_memory(skeleton, prefix, *args):
        if threading.current_thread().name.startswith("lowbit-load"):
            real(skeleton, prefix, *args)  # part of the way: the block's tensors are loaded, then the allocator fails
            failed.append(prefix)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        # the loop's own load: what the failed prefetch had loaded was released (back on meta)
        freed.append(all(p.device.type == "meta" for p in skeleton.get_submodule(prefix).parameters()))
        return real(skeleton, prefix, *args)

    monkeypatch.setattr(runner, "load_module", short_of_memory)
    run(src, calib, tmp_path / "short")
    assert failed == ["model.layers.1", "model.layers.2"] and taken == [] and freed == [True, True, True]
    assert_same_tensors(tmp_path / "plain", tmp_path / "short")


def test_the_loaders_errors_reach_the_loop():
    prefetch = BlockPrefetch(torch.device("cpu"), enabled=True)
    module = torch.nn.Linear(2, 2)
    prefetch.start(1, lambda: module)
    prefetch.join()
    assert prefetch.take(2) is None  # another block: loaded on the loop, the prefetched one dropped
    assert prefetch.take(1) is None

    def broken():
        raise ValueError("tensor x has shape (3,) in the checkpoint")

    prefetch.start(1, broken)
    with pytest.raises(ValueError, match="shape"):
        prefetch.take(1)
    prefetch.start(2, broken)
    prefetch.close()  # a load the loop never took: its error is not the run's


@pytest.mark.gpu
def test_prefetch_on_a_gpu_gives_the_same_output_as_without(tiny, tmp_path, monkeypatch):
    """On CUDA the runner turns the prefetch on by itself (room checked): the output must equal a run whose
    prefetch is switched off."""
    import lowbit.runner as runner

    src, calib = tiny
    kw = dict(device="cuda")
    lowbit.quantize(str(src), lowbit.GptqConfig(), lowbit.Scheme(4, 64, False), calib=calib, run=lowbit.RunConfig(output_dir=str(tmp_path / "on"), **kw), progress=False)
    monkeypatch.setattr(runner, "BlockPrefetch", lambda device, enabled: BlockPrefetch(device, enabled=False))
    lowbit.quantize(str(src), lowbit.GptqConfig(), lowbit.Scheme(4, 64, False), calib=calib, run=lowbit.RunConfig(output_dir=str(tmp_path / "off"), **kw), progress=False)
    assert_same_tensors(tmp_path / "on", tmp_path / "off")
