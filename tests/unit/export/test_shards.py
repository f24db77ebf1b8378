"""ShardWriter's copies to the host: every tensor back with its values, dtype and shape, in its own storage
(safetensors refuses tensors sharing memory; a view would pin a checkpoint's whole map)."""

import pytest
import torch
from safetensors.torch import load_file

from lowbit.export.shards import ShardWriter, host_copies


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
