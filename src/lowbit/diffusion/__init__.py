"""Diffusion pipelines: quantize a diffusers pipeline's denoising transformer block by block (runner.py) and
load the result with lowbit's QuantLinear (loading.py). Needs the `diffusers` package (pinned in requirements.txt)."""

from pathlib import Path

from .config import PromptCalib

INDEX = "model_index.json"  # what makes a folder a diffusers pipeline


def is_pipeline(path) -> bool:
    """Here, not in folder.py: the CLI asks before it imports torch (`--nproc` starts its processes first)."""
    return (Path(path) / INDEX).is_file()


__all__ = ["PromptCalib", "is_pipeline", "quantize_pipeline", "load_pipeline"]


def quantize_pipeline(*args, **kwargs):
    from .runner import quantize_pipeline as run

    return run(*args, **kwargs)


def load_pipeline(*args, **kwargs):
    from .loading import load_pipeline as load

    return load(*args, **kwargs)
