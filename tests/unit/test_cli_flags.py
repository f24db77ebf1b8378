"""The quantize command's flags map onto the method configs (auto-round spellings, both dash styles)."""

from __future__ import annotations

import pytest

from lowbit.cli import build_parser, configs_from_args


@pytest.mark.parametrize(
    "flags,expected",
    [([], None), (["--enable_torch_compile"], True), (["--enable-torch-compile"], True), (["--disable_torch_compile"], False)],
)
def test_torch_compile_flags(flags, expected):
    args = build_parser().parse_args(["quantize", "default", "--method", "autoround", *flags])
    assert args.enable_torch_compile is expected
    assert configs_from_args(args)[0].compile is expected


def test_autoround_flags_reach_the_config():
    args = build_parser().parse_args(
        ["quantize", "default", "--method", "autoround", "--iters", "7", "--lr", "0.01", "--seed", "3", "--disable_minmax_tuning",
         "--gradient-accumulate-steps", "2", "--low_gpu_mem_usage", "--disable_amp"]
    )
    cfg = configs_from_args(args)[0]
    assert (cfg.iters, cfg.lr, cfg.seed, cfg.enable_minmax_tuning, cfg.gradient_accumulate_steps, cfg.low_gpu_mem, cfg.amp) == (
        7, 0.01, 3, False, 2, True, False)


@pytest.mark.parametrize("flags,expected", [([], True), (["--no_true_sequential"], False), (["--no-true-sequential"], False), (["--true_sequential"], True)])
def test_gptq_true_sequential_flag(flags, expected):
    """GPTQModel's `true_sequential` (on by default there and here); off: one statistics pass per block."""
    args = build_parser().parse_args(["quantize", "default", "--method", "gptq", *flags])
    assert configs_from_args(args)[0].true_sequential is expected
