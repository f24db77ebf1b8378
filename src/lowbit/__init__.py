"""lowbit: low-bit weight quantization for LLMs, block by block, with memory bounded by one block.

Public API:
    lowbit.quantize(model, method, scheme, calib, run) -> RunSummary
    lowbit.load(output_dir, device_map=None) -> transformers model with QuantLinear layers
    lowbit.quantize_pipeline(pipeline_dir, ...) / lowbit.load_pipeline(output_dir): diffusers pipelines (diffusion/)
"""

__version__ = "0.1.0"

from .config import AutoRoundConfig, AwqConfig, CalibConfig, GptqConfig, RtnConfig, RunConfig, Scheme  # noqa: E402
from .errors import LowbitError  # noqa: E402
from .diffusion import PromptCalib, load_pipeline, quantize_pipeline  # noqa: E402  (diffusers is imported on use)

# imported on first use (PEP 562): `lowbit quantize --nproc N` starts its processes before torch is imported
_LAZY = {"quantize": ("runner", "quantize"), "load": ("loading", "load")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lowbit' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value

__all__ = ["quantize", "load", "quantize_pipeline", "load_pipeline", "PromptCalib", "Scheme", "CalibConfig", "RtnConfig", "AutoRoundConfig", "AwqConfig", "GptqConfig", "RunConfig", "LowbitError", "__version__"]
