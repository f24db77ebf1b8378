"""`lowbit quantize PIPELINE_DIR`: the denoising transformer of a diffusers pipeline, one block at a time.

The flow is the LLM runner's (runner.py), on the transformer's folder: a meta skeleton whose blocks are
loaded from the shards when their turn comes and freed after; calibration (calibrated methods) records the
block inputs while the pipeline itself denoises the prompts (capture.py); each block goes through the same
block engine, algorithm handlers and export writers; the transformer is written in the chosen format under the
pipeline's layout and every other component (text encoders, VAE, tokenizers, scheduler) is copied as it is.
Not supported here (the LLM runner has them): resuming an interrupted run and data-parallel processes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import atomic_folder, check_target
from ..blockstep import BlockStep
from ..calib.tree import to_device
from ..config import CalibConfig, MethodConfig, RunConfig, Scheme, check_quantize_args, method_config
from ..dist import env_world, start
from ..engine import BlockEngine
from ..errors import LowbitError
from ..export import FORMAT_WRITERS, ShardWriter
from ..guard import OutputLock, refuse_source_overlap, refuse_unsafe_target
from ..model.names import check_complete
from ..model.scan import check_all_finite
from ..model.skeleton import free_module, free_tensors, load_tensors
from ..report import RssSampler, RunSummary, peak_vram_bytes, release_freed_memory
from ..runner import block_tensors, method_metadata, plan_linears
from .capture import block_lists, capture_transformer
from .config import PromptCalib
from .folder import INDEX, PipelineFolder, open_pipeline
from .model import build_transformer, identity_names, open_transformer, source_dtype
from .components import assemble, io_on_caller, load_components
from .components import sizes as component_sizes
from .placement import STREAM, module_bytes, plan_placement
from .prompts import load_prompts

WEIGHTS_STEM = "diffusion_pytorch_model"
LOG = "lowbit_log.json"


class _Prefixed:
    """A NameMap seen from inside one block (block-relative name -> checkpoint key)."""

    def __init__(self, names, prefix: str):
        self.names, self.prefix = names, prefix

    def get(self, name: str):
        return self.names.get(f"{self.prefix}.{name}")

    def has(self, name: str) -> bool:
        return self.names.has(f"{self.prefix}.{name}")

    def read(self, ckpt, name: str):
        return self.names.read(ckpt, f"{self.prefix}.{name}")


def load_block(block: torch.nn.Module, prefix: str, ckpt, names, device, dtype) -> torch.nn.Module:
    load_tensors(block, list(block.named_parameters()) + list(block.named_buffers()), ckpt, _Prefixed(names, prefix), device, dtype)
    return block


def block_slots(transformer, folder: PipelineFolder) -> list[tuple[str, torch.nn.Module]]:
    """(prefix, block) in forward order over the spec's block lists."""
    return [(f"{name}.{i}", block) for name, blocks in zip(folder.spec.block_lists, block_lists(transformer, folder.spec)) for i, block in enumerate(blocks)]


def compute_dtype(device: torch.device, source: torch.dtype, calibrated: bool) -> torch.dtype:
    """As the LLM runner: RTN keeps the checkpoint's dtype; calibrated methods fp32 on the CPU, 16-bit on GPUs."""
    if not calibrated:
        return source
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if source == torch.bfloat16 else torch.float16


def max_memory_of(devices: tuple[str, ...], home: torch.device, caps: tuple[int, ...] | None = None) -> dict[str, int]:
    """What each GPU has free now (x 0.9), capped by --max_memory (`caps`, one per device); the CPU is where
    streamed blocks come from, not a placement target."""
    if home.type != "cuda":
        return {"cpu": 1 << 62}
    out = {}
    for i, dev in enumerate(devices):
        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        out[dev] = min(int(free * 0.9), caps[i]) if caps else int(free * 0.9)
    return out


@torch.no_grad()
def calibrate(folder: PipelineFolder, transformer, ckpt, names, prompts: list[str], calib: PromptCalib, home: torch.device, devices: tuple[str, ...],
              dtype: torch.dtype, storage, progress: bool, caps: tuple[int, ...] | None = None):
    """Run the pipeline on the prompts, recording every block's inputs at every denoising step; returns the
    ReplayPlan and the placement record (component / block -> device or "stream", the bytes planned per
    device, the peak memory each GPU reached during the capture).

    The plan (placement.py) counts the other components (sized from their files) with the transformer; each
    component is then loaded straight onto its device (components.py: RAM never holds a whole one on GPUs);
    blocks that fit stay resident for the whole capture, the others are streamed from the shards per call."""
    spec = folder.spec
    slots = block_slots(transformer, folder)
    rest = [(n, t) for n, t in list(transformer.named_parameters()) + list(transformer.named_buffers()) if not spec.in_blocks(n)]
    rest_bytes = sum(t.numel() for _, t in rest) * dtype.itemsize
    block_bytes = [(prefix, module_bytes(block, dtype)) for prefix, block in slots]
    largest = max(b for _, b in block_bytes)
    plan = plan_placement(component_sizes(folder, dtype), rest_bytes, block_bytes, max_memory_of(devices, home, caps), str(home), workspace=4 * largest,
                          reserve=2 * largest)  # measured at FLUX.1-dev on a second H200: the capture peaked 0.9 GiB over its planned weights
    on_gpu = home.type == "cuda"
    components = load_components(folder, {n: d if on_gpu else "cpu" for n, d in plan.components.items()}, dtype)
    for name, module in components.items():
        io_on_caller(module, plan.components[name] if on_gpu else "cpu")
    pipe = assemble(folder, transformer, components, dtype)
    pipe.set_progress_bar_config(disable=not progress, desc="lowbit calibration (pipeline steps)")
    load_tensors(transformer, rest, ckpt, names, home, dtype)
    resident = {}
    for prefix, block in slots:
        where = plan.blocks[prefix]
        if where != STREAM:
            resident[prefix] = torch.device(where if on_gpu else home)
            load_block(block, prefix, ckpt, names, resident[prefix], dtype)
    ckpt.close()  # unmap the shards: the resident blocks hold copies; pages left mapped count in RSS (22 GiB at FLUX.1-dev)
    prefixes = [prefix for prefix, _ in slots]
    placed = {"devices": {**plan.components, **{p: str(resident.get(p, STREAM)) for p in prefixes}},
              "planned_bytes": {d: b for d, b in plan.used.items() if d != "cpu"}}

    def run_block(index, block, args, kwargs):
        prefix = prefixes[index]
        device = resident.get(prefix)
        if device is None:  # streamed: from the shards to the home device, for this call only
            load_block(block, prefix, ckpt, names, home, dtype)
        out = block(*to_device(args, device or home), **to_device(kwargs, device or home))
        if device is None:
            free_module(block)
            ckpt.close()  # as after each block of the LLM runner: the streamed block's pages leave RSS
        return to_device(out, home)

    def drive(t):
        io_on_caller(t, home)  # the pipeline may compute on another component's device (diffusers picks it)
        object.__setattr__(pipe, "transformer", t)  # the pipeline calls the per-sample splitter (not registered in its config)
        pipe(prompt=prompts, generator=torch.Generator("cpu").manual_seed(calib.seed), output_type="latent", **calib.call_kwargs())

    try:
        replay = capture_transformer(transformer, spec, drive, storage, run_block)
        placed["capture_peak_vram_bytes"] = peak_vram_bytes() if on_gpu else {}
    finally:
        for prefix, block in slots:
            if prefix in resident:
                free_module(block)
        free_tensors(transformer, [n for n, _ in rest if names.get(n) is not None])
        del pipe, components
        ckpt.close()
        release_freed_memory()
    if replay.refusal:
        raise LowbitError(f"{type(transformer).__name__}'s blocks cannot be replayed exactly: {replay.refusal}", "quantize it with --method rtn (no calibration)")
    return replay, placed


def refuse_formats(slots, scheme: Scheme, formats) -> None:
    in_features = {m.in_features for _, block in slots for m in block.modules() if isinstance(m, torch.nn.Linear)}
    for fmt in formats:
        reason = fmt.refuse(scheme, in_features)
        if reason:
            raise LowbitError(reason)


def copy_pipeline(folder: PipelineFolder, target: Path) -> None:
    """Everything of the pipeline but the transformer's weights and config, as it is."""
    for item in folder.path.iterdir():
        if item.name == folder.transformer:
            for f in item.iterdir():  # files beside the weights (none usually), never the weights or config
                if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",) and not f.name.endswith(".index.json"):
                    shutil.copy2(f, target / folder.transformer / f.name)
        elif item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)


def quantize_pipeline(
    pipeline: str,
    method: str | MethodConfig = "rtn",
    scheme: Scheme = Scheme(),
    calib: PromptCalib = PromptCalib(),
    run: RunConfig = RunConfig(),
    progress: bool = True,
) -> RunSummary:
    """Quantize a diffusers pipeline folder's transformer block by block; returns the run summary.

    Args:
        pipeline: a folder with model_index.json (DiffusionPipeline.save_pretrained).
        method / scheme / run: as lowbit.quantize (run.device_map: the GPUs the calibration spreads the
            pipeline over; blocks are quantized on the first).
        calib: prompts and denoising settings (ignored by RTN).
    """
    started = time.time()
    scheme = check_quantize_args(method, scheme, CalibConfig(), run)
    if not isinstance(calib, PromptCalib):
        raise LowbitError(f"calib is a {type(calib).__name__}", "pass lowbit.diffusion.PromptCalib(...) for a pipeline")
    if env_world()[0] > 1:
        raise LowbitError("pipelines are quantized by one process", "run lowbit quantize without torchrun / --nproc (use --device_map to spread the pipeline over GPUs)")
    target = Path(run.output_dir)
    refuse_unsafe_target(target)
    check_target(target, run.overwrite)
    folder = open_pipeline(pipeline)  # a missing component or no supported transformer: one line, before any output
    refuse_source_overlap(target, folder.path)
    method_cfg = method_config(method)
    why = dict(folder.spec.unsupported).get(method_cfg.name)
    if why:
        raise LowbitError(f"--method {method_cfg.name} cannot quantize {folder.components[folder.transformer][1]}: {why}", "use --method gptq, autoround or rtn")
    needs_calib = method_cfg.needs_calibration
    prompts = load_prompts(calib.prompt_file, calib.nprompts) if needs_calib else []
    formats = [FORMAT_WRITERS[f] for f in run.formats]
    ckpt = open_transformer(folder.path / folder.transformer)
    resolved, _ = start(run.device, run.devices)  # one process (refused above otherwise): also makes the first GPU current
    device, devices = resolved[0], tuple(str(d) for d in resolved)
    source = source_dtype(ckpt)
    dtype = compute_dtype(device, source, needs_calib)
    storage = torch.device("cpu") if device.type == "cpu" or method_cfg.cache_on_cpu else device
    spec = folder.spec
    summary = RunSummary(method=method_cfg.name, scheme=f"W{scheme.bits}A16 g{scheme.group_size} {'sym' if scheme.sym else 'asym'}", output_dir=str(target),
                         checkpoint_bytes=ckpt.total_bytes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lock = OutputLock.acquire(target)
    lock.release_if_fails(check_all_finite, ckpt)

    with RssSampler() as rss, atomic_folder(target, run.overwrite, resume=False) as out_root:
        skeleton = build_transformer(ckpt.config, dtype)
        names = identity_names(skeleton, ckpt)
        check_complete(skeleton, names, ckpt.path)
        slots = block_slots(skeleton, folder)
        refuse_formats(slots, scheme, formats)
        roots = {fmt.NAME: (out_root / fmt.NAME if len(formats) > 1 else out_root) for fmt in formats}
        writers = {}
        for fmt in formats:
            (roots[fmt.NAME] / folder.transformer).mkdir(parents=True)
            writers[fmt.NAME] = ShardWriter(roots[fmt.NAME] / folder.transformer, run.max_shard_bytes, stem=WEIGHTS_STEM)
        engine = None
        timings = {"calibration_seconds": 0.0, "block_seconds": [], "placement": {}}
        if needs_calib:
            t0 = time.time()
            replay, timings["placement"] = calibrate(folder, skeleton, ckpt, names, prompts, calib, device, devices, dtype, storage, progress,
                                                          run.max_memory_bytes)
            engine = BlockEngine(replay, device, storage, calib.batch_size)
            timings["calibration_seconds"] = round(time.time() - t0, 2)

        bar = tqdm(slots, desc=f"lowbit {method_cfg.name}", unit="block", disable=not progress)
        step = BlockStep(method_cfg, scheme, spec.blocks, device, summary, engine, log=bar.write)
        for i, (prefix, block) in enumerate(bar):
            t0 = time.time()
            load_block(block, prefix, ckpt, names, device, dtype)
            linears, kept = plan_linears(block, prefix, spec.blocks, scheme, formats)
            results = step.quantize(block, i, linears, step.begin(block, i, prefix, linears, kept), last=i == len(slots) - 1)
            for fmt in formats:
                writers[fmt.NAME].add(block_tensors(block, prefix, linears, results, fmt, source))
                if writers[fmt.NAME].full:
                    writers[fmt.NAME].flush()
            free_module(block)
            ckpt.close()
            release_freed_memory()
            timings["block_seconds"].append(round(time.time() - t0, 3))
        bar.close()
        engine = step = None

        for name, m in skeleton.named_modules():
            if isinstance(m, torch.nn.Linear) and not spec.in_blocks(name):
                summary.kept_fp[name] = "outside the transformer's blocks (embedders, final projection): kept in full precision"
        for name in folder.models():
            if name != folder.transformer:
                summary.kept_fp[name] = "pipeline component (text encoder / VAE): kept in full precision, copied as it is"
        kept_linears = sorted(k for k in summary.kept_fp if k in dict(skeleton.named_modules()))
        for fmt in formats:
            writer = writers[fmt.NAME]
            for tensor_name, key in list(names.to_checkpoint.items()):
                if not spec.in_blocks(tensor_name):
                    writer.add({tensor_name: ckpt.tensor(key)})
            for key in names.unmapped:
                writer.add({key: ckpt.tensor(key)})
            writer.finish()
            ckpt.close()
            config = dict(ckpt.config)
            config["quantization_config"] = fmt.quantization_config(scheme, spec.block_names, kept_linears, method_metadata(method_cfg, None), __version__)
            if needs_calib:
                config["quantization_config"].update(nsamples=len(replay.hidden), prompts=len(prompts), denoising_steps=calib.steps)
            (writer.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            fmt.extra_files(writer.folder, config["quantization_config"])
            copy_pipeline(folder, roots[fmt.NAME])
        summary.output_bytes = sum(f.stat().st_size for f in out_root.rglob("*.safetensors"))
        summary.seconds = time.time() - started
        summary.peak_vram = peak_vram_bytes()
        summary.peak_rss = rss.peak
        log = summary.to_dict()
        log.update(timings)
        (out_root / LOG).write_text(json.dumps(log, indent=2))
    summary.peak_rss = max(summary.peak_rss, rss.peak)
    return summary
