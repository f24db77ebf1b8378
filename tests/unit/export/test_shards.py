"""ShardWriter's copies to the host: every tensor back with its values, dtype and shape, in its own storage
(safetensors refuses tensors sharing memory; a view would pin a checkpoint's whole map)."""

import pytest
import torch
from safetensors.torch import load_file

from lowbit.export.shards import BackgroundWrites, ShardWriter, host_copies, staged


def mixed(device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.qweight": torch.randint(-(2**31), 2**31 - 1, (16, 8), generator=g, dtype=torch.int64).to(torch.int32).to(device),
        "a.scales": torch.randn(2, 8, generator=g).half().to(device),
        "a.flag": torch.tensor(True, device=device),  # 0-dim, one byte
        "b.weight": torch.randn(3, 5, generator=g).to(device).t(),  # not contiguous
        "b.codes": torch.randint(0, 16, (7,), generator=g, dtype=torch.uint8).to(device),
        "c.bias": torch.randn(5, generator=g, dtype=torch.float64).bfloat16().to(device),
    }


def check(copies: dict, originals: dict) -> None:
    assert list(copies) == list(originals)
    pointers = set()
    for name, t in originals.items():
        c = copies[name]
        assert c.device.type == "cpu" and c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous(), name
        assert torch.equal(c, t.cpu()), name
        pointers.add(c.untyped_storage().data_ptr())
    assert len(pointers) == len(originals)  # each its own storage


def test_cpu_tensors_copied_not_viewed(tmp_path):
    tensors = mixed("cpu")
    copies = host_copies(tensors)
    check(copies, tensors)
    assert all(copies[n].untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for n, t in tensors.items())
    writer = ShardWriter(tmp_path, 1 << 30)
    writer.add(tensors)
    writer.finish()
    written = load_file(tmp_path / "model.safetensors")  # safetensors' own reader
    assert all(torch.equal(written[n], t) for n, t in tensors.items())


@pytest.mark.gpu
def test_gpu_tensors_come_back_in_one_joined_transfer(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    tensors = mixed("cuda")
    tensors["cpu.side"] = torch.arange(4)  # a CPU tensor among them keeps its place
    check(host_copies(tensors), tensors)
    writer = ShardWriter(tmp_path, 1 << 30)
    writer.add(tensors)
    writer.finish()
    written = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(written[n], t.cpu()) for n, t in tensors.items())


def test_staged_cpu_tensors_are_copies_taken_at_staging(tmp_path):
    """A staged CPU tensor is copied when staged (the block loop unmaps the checkpoint shard it may view right
    after): changing the source afterwards does not change what is written."""
    tensors = mixed("cpu")
    staged_tensors, ready = staged(tensors)
    expected = {n: t.clone() for n, t in tensors.items()}
    for t in tensors.values():
        t.zero_() if t.dtype != torch.bool else t.fill_(False)
    writer = ShardWriter(tmp_path, 1 << 30)
    writer.add(staged_tensors, ready)
    writer.finish()
    written = load_file(tmp_path / "model.safetensors")
    assert not ready and all(torch.equal(written[n], t) for n, t in expected.items())


def test_background_writes_run_in_order_one_at_a_time_and_raise_in_the_loop():
    """Writes run in submit order, never two at once (submit waits for the one in flight), and a failed write's
    exception reaches the loop at the next submit, not silently lost; a closed writer has nothing pending."""
    import threading
    import time

    log, running, overlap = [], [0], []
    lock = threading.Lock()

    def write(i, fail=False):
        def fn():
            with lock:
                running[0] += 1
                overlap.append(running[0])
            time.sleep(0.02)
            log.append(i)
            with lock:
                running[0] -= 1
            if fail:
                raise OSError(f"disk full at block {i}")

        return fn

    writes = BackgroundWrites()
    for i in range(4):
        writes.submit(write(i))
    writes.close()
    assert log == [0, 1, 2, 3] and max(overlap) == 1
    writes = BackgroundWrites()
    writes.submit(write(0, fail=True))
    with pytest.raises(OSError, match="disk full at block 0"):
        writes.submit(write(1))
    assert log[-1] == 0  # the next write did not start
    writes.close()


def test_a_failed_run_waits_for_the_write_in_flight_and_reports_its_own_error():
    """Leaving the with-block on an error waits for the write in flight (no write continues into a folder
    being removed) and the run's own error is the one raised."""
    import time

    done = []
    with pytest.raises(ValueError, match="the run's error"):
        with BackgroundWrites() as writes:
            writes.submit(lambda: (time.sleep(0.05), done.append(1), (_ for _ in ()).throw(OSError("late"))))
            raise ValueError("the run's error")
    assert done == [1]


@pytest.mark.gpu
def test_staged_gpu_tensors_are_copied_on_a_side_stream_after_their_event(tmp_path):
    """GPU tensors staged with an event are copied from a side stream once the event passed, while the main
    stream is still busy with later work: the values written are those at staging."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    tensors = mixed("cuda")
    expected = {n: t.cpu() for n, t in tensors.items()}
    staged_tensors, ready = staged(tensors)
    assert set(ready) == {torch.device("cuda", torch.cuda.current_device())}
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # later work queued on the main stream
        big = big @ big / 64
    writes = BackgroundWrites()
    writer = ShardWriter(tmp_path, 1 << 30)
    writes.submit(lambda: writer.add(staged_tensors, ready))
    writes.close()
    writer.finish()
    written = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(written[n], t) for n, t in expected.items())
