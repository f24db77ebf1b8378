"""Greedy generation about an image with a vision-language model (an export or an fp checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..arch import spec_for
from ..calib.images import load_processor, open_image, prompt_text
from ..errors import LowbitError
from ..model.checkpoint import Checkpoint
from ..model.source import resolve_model


@torch.no_grad()
def generate_with_image(model_path: str, image: str, prompt: str, max_new_tokens: int = 48, device: str = "cpu") -> str:
    """Open the model (lowbit.load for a quantized folder, transformers otherwise), process the image and
    the prompt with the checkpoint's own processor, and decode the greedy continuation."""
    import json

    from transformers import AutoModelForImageTextToText

    from ..loading import load

    folder = resolve_model(model_path)
    ckpt = Checkpoint(folder)
    if not spec_for(ckpt.config).media:
        raise LowbitError(f"--image given but {ckpt.config.architectures[0]} reads text only", "drop --image")
    picture = open_image(Path(image))
    processor = load_processor(folder)
    if "quantization_config" in json.loads((folder / "config.json").read_text()):
        model = load(folder, device_map=None if device == "cpu" else device)
    else:
        dtype = torch.float32 if device == "cpu" else torch.float16
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, device_map=None if device == "cpu" else device).eval()
    dtype = next(model.parameters()).dtype
    inputs = processor(images=picture, text=prompt_text(processor, prompt), return_tensors="pt")
    inputs = {k: (v.to(model.device, dtype) if v.is_floating_point() else v.to(model.device)) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
