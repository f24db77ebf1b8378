"""Diffusion pipelines: quantize a diffusers pipeline's denoising transformer block by block (runner.py) and
load the result with lowbit's QuantLinear (loading.py). Needs the `diffusers` package (pinned in requirements.txt)."""

from .config import PromptCalib
from .folder import is_pipeline

__all__ = ["PromptCalib", "is_pipeline", "quantize_pipeline", "load_pipeline"]


def quantize_pipeline(*args, **kwargs):
    from .runner import quantize_pipeline as run

    return run(*args, **kwargs)


def load_pipeline(*args, **kwargs):
    from .loading import load_pipeline as load

    return load(*args, **kwargs)
