"""Image-text calibration samples for vision-language models, through the model's own AutoProcessor.

`--images` names a folder of images (each paired with a default prompt) or a .jsonl file of
{"image": path, "text": prompt} lines (paths relative to the file). Each sample is the processor's output
for one image and its prompt in the chat template, padded to `seqlen` tokens so that samples batch
together: input_ids / attention_mask [1, seqlen] plus what the vision tower reads (pixel_values, image
grids). The capture then runs the vision tower and the projector before block 0, and per-sample block
arguments (image-dependent position ids, padding masks) are kept per sample by the capture's classifier.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LowbitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
DEFAULT_PROMPT = "Describe this image in detail."


def image_prompts(source: str) -> list[tuple[Path, str]]:
    """(image path, prompt) pairs from a folder or a jsonl file."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise LowbitError(f"image folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})", "put calibration images in it, or drop --images for text calibration")
        return [(f, DEFAULT_PROMPT) for f in files]
    if path.is_file() and path.suffix == ".jsonl":
        pairs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((path.parent / row["image"], str(row.get("text", DEFAULT_PROMPT))))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LowbitError(f"{path} line {n} is not a JSON object with an \"image\" key", 'write one {"image": "a.png", "text": "..."} per line') from None
        if not pairs:
            raise LowbitError(f"{path} has no samples", 'write one {"image": "a.png", "text": "..."} per line')
        return pairs
    raise LowbitError(f"--images {source!r} is neither a folder of images nor a .jsonl file", "pass a folder of images or a jsonl of {\"image\", \"text\"} lines")


def open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise LowbitError(f"cannot decode image {path}: {err}", "pass PNG / JPEG / WebP files, or remove the file") from None


def load_processor(folder: Path):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
    except Exception as err:  # transformers raises many types for a missing / partial processor
        raise LowbitError(f"{folder} has no usable processor ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})",
                          "copy the original model's processor_config.json / preprocessor_config.json / chat template files into the checkpoint") from None
    if not hasattr(processor, "image_processor"):
        raise LowbitError(f"the processor in {folder} reads no images", "copy the original model's processor files, or calibrate on text")
    return processor


def prompt_text(processor, prompt: str) -> str:
    """The prompt with one image, in the processor's chat template (or the image token then the prompt)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{getattr(processor, 'image_token', '<image>')}{prompt}"


def image_samples(folder: Path, source: str, nsamples: int, seqlen: int) -> list[dict]:
    """Up to `nsamples` processor outputs, each padded to `seqlen` tokens (batch 1)."""
    processor = load_processor(folder)
    samples = []
    for image, prompt in image_prompts(source)[:nsamples]:
        inputs = processor(images=open_image(image), text=prompt_text(processor, prompt), padding="max_length", max_length=seqlen, return_tensors="pt")
        if inputs["input_ids"].shape[1] != seqlen:
            raise LowbitError(f"image {image.name} with its prompt takes {inputs['input_ids'].shape[1]} tokens, more than seqlen={seqlen}", "pass a larger --seqlen")
        samples.append(dict(inputs))
    return samples
