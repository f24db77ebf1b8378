"""Export formats: each module turns QuantResults into exactly the tensors and config its loaders read.

A format module provides:
    NAME
    refuse(scheme, in_features) -> str | None     scheme-level refusal before any work (names the format that can)
    can_hold(scheme, out_features, in_features)   per-layer: None, or why the layer stays in full precision
    zero_offset(scheme)                          stored zero = zero - offset (GPTQ v1: 1)
    layer_tensors(name, QuantResult) -> dict      the exact tensors of one quantized linear
    quantization_config(...) -> dict              config.json's quantization_config
    extra_files(folder, config)                   files beside config.json (quantize_config.json)
"""

from . import auto_awq, auto_gptq, auto_round, compressed_tensors
from .shards import ShardWriter

FORMAT_WRITERS = {m.NAME: m for m in (auto_round, auto_gptq, auto_awq, compressed_tensors)}

__all__ = ["ShardWriter", "FORMAT_WRITERS"]
