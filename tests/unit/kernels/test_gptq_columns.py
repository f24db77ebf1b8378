"""GPTQ's fused column loop (kernels/triton/gptq.py) against the torch loop it replaces on CUDA
(algorithms.gptq.solve_columns), which tests/unit/algorithms/test_gptq.py holds to a float64 reference."""

import pytest
import torch

from lowbit.algorithms.gptq import gptq_quantize, solve_columns
from lowbit.config import Scheme


def inputs(n: int, b: int, seed: int, per_column: bool, device: str, linears: int = 3):
    """w [L, N, B], u [L, B, B] (each linear its own factor), s / z [L, N, B]."""
    g = torch.Generator().manual_seed(seed)
    us = []
    for _ in range(linears):
        x = torch.randn(64, b, generator=g) * torch.linspace(0.3, 2.0, b)
        h = 2 * x.t() @ x / 64 + 0.01 * torch.eye(b)
        us.append(torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True))  # [B, B] upper
    u = torch.stack(us)
    w = torch.randn(linears, n, b, generator=g)
    maxq = 15
    if per_column:  # act_order: each column its own (static) group
        s = (torch.rand(linears, n, b, generator=g) * 0.3 + 0.05).half().float()
        z = torch.randint(0, maxq + 1, (linears, n, b), generator=g).float()
    else:  # one group for the segment, broadcast with a column stride of 0
        s = (torch.rand(linears, n, 1, generator=g) * 0.3 + 0.05).half().float().expand(linears, n, b)
        z = torch.randint(0, maxq + 1, (linears, n, 1), generator=g).float().expand(linears, n, b)
    return [t.to(device) for t in (w, u, s, z)], maxq


# rows not a multiple of the programs' 16, a full 128-column tile, one column; broadcast and per-column grids;
# several linears at once (small: each case runs in Triton's interpreter in CI)
@pytest.mark.parametrize("n,b,per_column,linears", [(20, 128, False, 1), (37, 24, True, 2), (7, 1, True, 1)])
def test_fused_columns_match_the_torch_loop(device, n, b, per_column, linears):
    from lowbit.kernels.triton.gptq import gptq_columns

    (w, u, s, z), maxq = inputs(n, b, seed=n * b, per_column=per_column, device=device, linears=linears)
    w0 = w.clone()
    q, e = gptq_columns(w, u, s, z, maxq)
    ref_q, ref_e = solve_columns(w.cpu(), u.cpu(), s.cpu(), z.cpu(), maxq)
    assert torch.equal(w, w0)  # the input columns are read, not updated
    # every column's rounding sees the errors of the columns before it: equal codes everywhere means the
    # loop order, the triangular update, each linear's own factor and the broadcast scales are right (a
    # float tie could flip one)
    assert (q.cpu() == ref_q).float().mean() >= 0.999
    assert q.min() >= 0 and q.max() <= maxq
    torch.testing.assert_close(e.cpu(), ref_e, rtol=1e-4, atol=1e-5)
    if linears > 1:  # each linear alone gives its part of the batched result (the linears do not mix)
        q1, _ = gptq_columns(w[1:2], u[1:2], s[1:2], z[1:2], maxq)
        assert torch.equal(q1[0], q[1])


@pytest.mark.gpu
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_cuda_matches_the_cpu(act_order):
    """The whole solve with the fused kernel on the GPU against the torch loop on the CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 384, generator=g) @ (torch.randn(384, 384, generator=g) / 20 + torch.eye(384))
    h = 2 * x.t() @ x / 512
    w = torch.randn(200, 384, generator=g)
    scheme = Scheme(4, 64, sym=False)
    cpu, loss_cpu = gptq_quantize(w, h, scheme, act_order=act_order)
    gpu, loss_gpu = gptq_quantize(w.cuda(), h.cuda(), scheme, act_order=act_order)
    assert (gpu.codes.cpu() == cpu.codes).float().mean() >= 0.995
    torch.testing.assert_close(gpu.scale.cpu(), cpu.scale, rtol=2e-3, atol=0)
    assert abs(loss_gpu - loss_cpu) <= 1e-3 * loss_cpu
