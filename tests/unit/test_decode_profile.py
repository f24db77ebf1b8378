"""bench/decode_profile.py: kernel names put in the right category, busy time as a union, per-token differences."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from decode_profile import OURS, Categoriser, Record, Trace, busy_us, lowbit_kernel_names, per_token, summarise, table, top_level, trace_of  # noqa: E402

# Kernel names as CUPTI / kineto report them on H100 / H200 (torch 2.11, CUDA 13), one or more per category.
NAMES = {
    OURS: ["_gemv_kernel", "_qmm_kernel", "_swap_kernel", "_dequant4_kernel", "_qmm_kernel_0d1d2d3d4d5d6d7d8c9c"],
    "gemm": [
        "nvjet_hsh_64x8_64x16_4x1_v_bz_splitK_TNT",
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
        "void gemv2T_kernel_val<int, int, __half, __half, float, 128, 16, 4, 4, false, false, false, cublasGemvParams<cublasGemvTensorStridedBatched<__half const>, cublasGemvTensorStridedBatched<__half const>, cublasGemvTensorStridedBatched<__half>, float> >(cublasGemvParams<cublasGemvTensorStridedBatched<__half const>, cublasGemvTensorStridedBatched<__half const>, cublasGemvTensorStridedBatched<__half>, float>, float, float)",
        "void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_64x64_32x6_tn_align8>(cutlass_80_tensorop_f16_s16816gemm_relu_f16_64x64_32x6_tn_align8::Params)",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __half, float, __half, true, false, false>(cublasLt::cublasSplitKParams<float>, float const*, __half const*, __half*, float const*, float const*, __half const*, __half*, void*, long, float*, int*)",
        "ampere_fp16_s16816gemm_fp16_128x64_ldg8_f2f_stages_64x4_tn",
        "triton_tem_fused_mm_0",
        "aten::mm",
    ],
    "attention": [
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_6_64x64x64_4x1x1_kernel0_0",
        "void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, false, cutlass::half_t, Flash_kernel_traits<128, 64, 128, 4, cutlass::half_t> >, false, false, false, false, true, true, false, false>(Flash_fwd_params)",
        "fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t, cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)",
        "aten::scaled_dot_product_attention",
    ],
    "inductor": [
        "triton_red_fused__to_copy_add_embedding_mean_mul_pow_rsqrt_0",
        "triton_poi_fused_cat_index_copy_mul_1",
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_2",
        "triton_poi_fused__scaled_dot_product_cudnn_attention_3",  # named after the op it feeds: still inductor's
    ],
    "aten": [
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<long>, std::array<char*, 1ul> >(int, at::native::FillFunctor<long>, std::array<char*, 1ul>)",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType<8u>, unsigned int, 2, 128, 1>(at::native::(anonymous namespace)::OpaqueType<8u>*, at::native::(anonymous namespace)::CatArrInputTensorMetadata<at::native::(anonymous namespace)::OpaqueType<8u>, unsigned int, 128, 1>, at::native::(anonymous namespace)::TensorSizeStride<unsigned int, 4u>, int, unsigned int)",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(c10::Half)#1}, std::array<char*, 2ul>, 4, TrivialOffsetCalculator<1, unsigned int>, TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<1>, at::native::memory::StoreWithCast<1> >(int, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(c10::Half)#1}, std::array<char*, 2ul>, TrivialOffsetCalculator<1, unsigned int>, TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<1>, at::native::memory::StoreWithCast<1>)",
        "aten::cat",
    ],
    "sampling": [
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::Half, at::native::ArgMaxOps<c10::Half>, unsigned int, long, 4, 4> >(at::native::ReduceOp<c10::Half, at::native::ArgMaxOps<c10::Half>, unsigned int, long, 4, 4>)",
        "aten::argmax",
    ],
    "memcpy": ["Memcpy DtoH (Device -> Pinned)", "Memcpy HtoD (Pageable -> Device)", "Memset (Device)", "Memcpy DtoD (Device -> Device)"],
    "other": ["some_kernel_nobody_knows"],
}


def test_categories_of_real_kernel_names():
    cat = Categoriser(("_gemv_kernel", "_qmm_kernel", "_swap_kernel", "_dequant4_kernel"))
    wrong = {n: (want, cat(n)) for want, names in NAMES.items() for n in names if cat(n) != want}
    assert not wrong


def test_our_kernel_names_found_in_the_package():
    pytest.importorskip("triton")
    names = lowbit_kernel_names()
    assert {"_gemv_kernel", "_qmm_kernel", "_swap_kernel", "_dequant_kernel", "_moe_kernel"} <= set(names)
    assert all(n.endswith("_kernel") for n in names)  # helpers such as `_dot` never launch: left out
    assert Categoriser()("_gemv_kernel") == OURS
    assert Categoriser()("_gemv") != OURS  # a prefix of a name is not the name


def test_busy_is_the_union_of_intervals():
    recs = [Record("a", 0, 10), Record("b", 5, 10), Record("c", 20, 5), Record("d", 21, 1), Record("e", 30, 0)]
    assert busy_us(recs) == 15 + 5  # [0, 15) and [20, 25)
    assert busy_us([]) == 0


def test_top_level_keeps_the_roots():
    recs = [Record("linear", 0, 10), Record("mm", 1, 8), Record("argmax", 12, 3), Record("inner", 13, 1)]
    assert [r.name for r in top_level(recs)] == ["linear", "argmax"]


def test_per_token_is_the_difference_over_tokens():
    cat = Categoriser(("_gemv_kernel",))

    def step_trace(steps: int) -> Trace:
        """A prefill (one GEMM, 100 µs), then per step: two of ours from a graph, one argmax and one sync."""
        t = Trace(device=[Record("nvjet_hsh_prefill", 0, 100, "host")], runtime=[Record("cudaLaunchKernel", 0, 1)])
        for s in range(steps):
            base = 200 + 50 * s
            t.device += [Record("_gemv_kernel", base, 10, "graph"), Record("_gemv_kernel", base + 10, 10, "graph"),
                         Record("void at::native::reduce_kernel<ArgMaxOps<c10::Half>>", base + 30, 2, "host")]
            t.runtime += [Record("cudaGraphLaunch", base, 3), Record("cudaLaunchKernel", base + 25, 1), Record("cudaStreamSynchronize", base + 40, 7)]
        return t

    short, long = summarise(step_trace(4), cat), summarise(step_trace(10), cat)
    step = per_token(short, long, 6)
    assert step["device_us"][OURS] == pytest.approx(20) and step["device_us"]["sampling"] == pytest.approx(2)
    assert step["device_us"]["gemm"] == pytest.approx(0)  # the prefill cancels
    assert step["busy_us"] == pytest.approx(22) and step["kernels"] == pytest.approx(3)
    assert step["origin_us"] == pytest.approx({"graph": 20, "host": 2})
    assert step["device_n"][OURS] == pytest.approx(2) and step["name_us"]["lowbit: _gemv_kernel"] == pytest.approx(20)
    assert (step["graph_launches"], step["host_launches"], step["syncs"], step["sync_us"]) == pytest.approx((1, 1, 1, 7))
    step.update(wall_us=60.0, idle_us=38.0)
    line = table({"w4fused_b8": step}).splitlines()[1].split()
    assert line[:5] == ["w4fused", "8", "60", "22", "38"]


def test_trace_of_a_cpu_profile():
    """The CPU smoke path: top-level aten ops of a real profile, categorised."""
    from torch.profiler import ProfilerActivity, profile

    x, w = torch.randn(4, 64), torch.randn(64, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = torch.mm(x, w)
        y.argmax(-1)
    trace = trace_of(prof, on_cuda=False)
    cats = [Categoriser(())(r.name) for r in trace.device]
    assert "gemm" in cats and "sampling" in cats
    assert summarise(trace, Categoriser(()))["busy_us"] > 0


def test_time_limit_seen_through_compile_wrappers():
    """bench/decode.py keeps what it measured when the time limit fires inside torch.compile, which re-raises
    it wrapped (InductorError's inner_exception) and `from None` (the context stays)."""
    import decode

    def wrapped():
        try:
            raise decode._TimeUp
        except decode._TimeUp as e:
            err = RuntimeError("_TimeUp: ")
            err.inner_exception = e
            raise err from None

    try:
        try:
            wrapped()
        except RuntimeError as e:
            raise ValueError("dynamo's re-raise") from None  # as dynamo does: the context stays, no cause
    except ValueError as outer:
        assert decode._timed_out(outer)
    assert not decode._timed_out(RuntimeError("a real failure"))
