"""The diffusion flags of `lowbit quantize` and the run they start when MODEL is a pipeline folder.

auto-round's diffusion spellings are accepted (`--prompt_file`, `--num_inference_steps`, `--guidance_scale`)."""

from __future__ import annotations


def add_flags(parser, flag) -> None:
    group = parser.add_argument_group("diffusion pipelines (MODEL is a folder with model_index.json)")
    flag(group, "prompt_file", default=None, help="calibration prompts, one per line (default: lowbit's shipped set)")
    flag(group, "nprompts", type=int, default=8, help="prompts used (default 8)")
    flag(group, "num_inference_steps", type=int, default=4, help="denoising steps per prompt while calibrating (default 4)")
    flag(group, "height", type=int, default=512, help="calibration image height (default 512)")
    flag(group, "width", type=int, default=512, help="calibration image width (default 512)")
    flag(group, "guidance_scale", type=float, default=None, help="default: the pipeline's")
    flag(group, "max_sequence_length", type=int, default=None, help="text tokens of the T5 encoder (default: the pipeline's)")


def quantize_from_args(args, method, scheme, run) -> None:
    from .config import PromptCalib
    from .runner import quantize_pipeline

    calib = PromptCalib(prompt_file=args.prompt_file, nprompts=args.nprompts, steps=args.num_inference_steps, height=args.height, width=args.width,
                        guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length, batch_size=args.batch_size, seed=args.seed)
    if args.nproc != 1:
        from ..errors import LowbitError

        raise LowbitError("--nproc is not supported for pipelines", "drop --nproc; --device_map spreads the pipeline over GPUs while calibrating")
    summary = quantize_pipeline(args.model, method, scheme, calib, run)
    print("\n".join(summary.lines()))
