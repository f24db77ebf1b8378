"""Calibration of a diffusion pipeline, validated on construction like the other configs (config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_types
from ..errors import LowbitError


@dataclass(frozen=True)
class PromptCalib:
    """The pipeline runs `steps` denoising steps per prompt; each transformer call of each prompt (and
    guidance branch) is one calibration sample: nprompts x steps samples (x 2 with classifier-free guidance).

    Args:
        prompt_file: a UTF-8 file, one prompt per line; None: lowbit's default set (calib/prompts.txt).
        nprompts: use the first N prompts (None: all).
        steps: denoising steps per prompt (the pipeline's scheduler spaces them over the whole trajectory).
        height / width: image size in pixels (None: the pipeline's default).
        guidance_scale: None: the pipeline's default.
        max_sequence_length: text tokens of the second text encoder (FLUX / SD3's T5; None: the pipeline's default).
        batch_size: samples per block forward while quantizing.
        seed: the generator of the initial latents.
    """

    prompt_file: str | None = None
    nprompts: int | None = 8
    steps: int = 4
    height: int | None = 512
    width: int | None = 512
    guidance_scale: float | None = None
    max_sequence_length: int | None = None
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self):
        check_types(self)
        for name in ("nprompts", "steps", "height", "width", "max_sequence_length", "batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise LowbitError(f"{name}={value} must be positive", f"pass --{name} N with N >= 1")

    def call_kwargs(self) -> dict:
        """The pipeline call's keyword arguments that these settings fix."""
        out = {"num_inference_steps": self.steps}
        for name in ("height", "width", "guidance_scale", "max_sequence_length"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out
