"""Unfusing experts: the layout comes from transformers' experts metadata; one it cannot map is refused."""

import pytest
import torch

from lowbit.arch.experts import ExpertLayout, unfuse_experts
from lowbit.errors import LowbitError


class Unmappable(torch.nn.Module):
    """Looks like a transformers experts module (decorated: `has_gate`) but has no down projection."""

    def __init__(self):
        super().__init__()
        self.has_gate = True
        self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 16, 8))
        self.w_out = torch.nn.Parameter(torch.zeros(4, 8, 8))


def test_an_experts_layout_lowbit_cannot_map_is_refused_naming_it():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Unmappable())
    with pytest.raises(LowbitError, match=r"experts module 1 \(Unmappable\) has a layout lowbit cannot map \(no down_proj\)"):
        unfuse_experts(model)


@pytest.mark.parametrize("concatenated", [True, False])
def test_split_and_join_are_inverse_and_follow_the_layout(concatenated):
    """gate/up rows of a fused projection: [gate; up] when concatenated, g0, u0, g1, u1 ... when interleaved
    (gpt-oss); join puts the two outputs back in the order the module's gate function reads."""
    layout = ExpertLayout("gate_up_proj", {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}, False, concatenated, False, 2)
    fused = torch.arange(12.0).reshape(6, 2)  # [2I = 6, H = 2]
    gate, up = layout.split("gate_up_proj", fused)
    want_gate = fused[:3] if concatenated else fused[0::2]
    assert torch.equal(gate, want_gate) and torch.equal(up, fused[3:] if concatenated else fused[1::2])
    x = torch.randn(5, 2)
    torch.testing.assert_close(layout.join([x @ gate.t(), x @ up.t()]), x @ fused.t())
