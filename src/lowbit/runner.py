"""The one block loop: capture -> algorithm -> pack -> propagate -> free.

Memory stays bounded by one block plus the calibration cache: the model is a meta skeleton, each block's
weights are streamed from the checkpoint when its turn comes and sent back to `meta` after, and packed
tensors go to the output shards as soon as a shard is full. The output is built in
`<output_dir>.lowbit-partial` with a progress file; a run that dies resumes from the last flushed shard.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from contextlib import closing, nullcontext
from functools import partial as partial_args
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .arch import ArchSpec, spec_for
from .arch.experts import experts_modules
from .atomic import announce_resume, atomic_folder, check_target, partial_path
from .blockstep import BlockStep
from .calib.capture import ReplayPlan, capture_block_inputs
from .calib.experts import plan_experts, tokens_to_every_expert
from .calib.corpora import load_text
from .calib.samples import calibration_windows
from .config import CalibConfig, MethodConfig, RunConfig, Scheme, check_quantize_args, method_config
from .dist import on_rank0, share, start
from .engine import BlockEngine
from .placement import Placer, attach, cache_bytes, describe, detach
from .prefetch import BlockPrefetch
from .errors import LowbitError
from .launch import command_started
from .export import FORMAT_WRITERS, ShardWriter
from .export.shards import BackgroundWrites, staged
from .guard import OutputLock, refuse_source_overlap, refuse_unsafe_target, release_output_lock
from .model import Checkpoint, build_skeleton, free_module, load_module, resolve_model
from .model.names import NameMap, check_complete, map_names
from .model.scan import check_all_finite
from .model.skeleton import free_tensors, load_tensors, submodule
from .model.tokenizer import load_tokenizer
from .quant import QuantResult
from .report import BlockPhases, Phases, RssSampler, RunSummary, peak_vram_bytes, release_freed_memory

PROGRESS = "lowbit_progress.json"
LOG = "lowbit_log.json"
# files that describe the tokenizer and generation; copied verbatim into the output
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "chat_template*", "*.model", "vocab*", "merges.txt", "added_tokens.json",
                   "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def load_following(skeleton, prefix: str, ckpt: Checkpoint, names, device, dtype: torch.dtype) -> torch.nn.Module | None:
    """The next block, loaded by prefetch.BlockPrefetch's thread; then the shards' maps are closed, so their pages
    do not stay in RSS while the current block computes (the loop reads no checkpoint tensor meanwhile). None when
    the device ran out of memory (the room was estimated): what was loaded goes back to meta, and the loop loads
    the block itself once the current one is freed."""
    try:
        return load_module(skeleton, prefix, ckpt, names, device, dtype)
    except torch.OutOfMemoryError:
        free_module(submodule(skeleton, prefix))
        return None
    finally:
        ckpt.close()


def source_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The checkpoint's float dtype (config.json `dtype`/`torch_dtype`); full-precision outputs keep it."""
    name = str(getattr(ckpt.config, "dtype", None) or getattr(ckpt.config, "torch_dtype", None) or "float32")
    return getattr(torch, name.removeprefix("torch."), torch.float32)


def compute_dtype(device: torch.device, ckpt: Checkpoint, calibrated: bool) -> torch.dtype:
    """Block weights' dtype while quantizing. RTN reads each weight once (upcast per chunk), so it keeps the
    checkpoint's dtype and half the block memory; calibrated methods run the block: fp32 on the CPU (CPUs gain
    little from 16-bit), the checkpoint's 16-bit dtype on GPUs."""
    source = source_dtype(ckpt)
    if not calibrated:
        return source
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if source == torch.bfloat16 else torch.float16


def plan_linears(block: torch.nn.Module, prefix: str, spec: ArchSpec, scheme: Scheme, formats) -> tuple[dict, dict]:
    """Split a block's linears into (to quantize: name -> module, kept in fp: full name -> reason)."""
    names, fp = spec.block_linears(block, prefix)
    quantize, kept = {}, {f"{prefix}.{n}": "router / gate: kept in full precision by the architecture spec" for n in fp}
    for name in names:
        module = block.get_submodule(name)
        reasons = [w.can_hold(scheme, module.out_features, module.in_features) for w in formats]
        reason = next((r for r in reasons if r), None)
        if reason:
            kept[f"{prefix}.{name}"] = reason
        else:
            quantize[name] = module
    return quantize, kept


def fingerprint(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def load_progress(folder: Path, key_of, world_size: int = 1) -> dict | None:
    """The progress of an interrupted run of these settings (key_of(world size) -> fingerprint), or None.
    The same settings with another number of processes are refused: the samples were split otherwise."""
    path = folder / PROGRESS
    if not path.is_file():
        return None
    try:  # written atomically by save_progress: anything unreadable was changed by someone else
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise LowbitError(f"the resume record {path} of an interrupted run is unreadable ({err})",
                          f"delete {folder} (the interrupted run's partial output) to start over") from None
    if state.get("fingerprint") == key_of(world_size):
        return state
    was = state.get("world_size", 1)
    if was != world_size and state.get("fingerprint") == key_of(was):
        raise LowbitError(f"the interrupted run in {folder} used {was} process(es) and this one uses {world_size}",
                          f"resume it with --nproc {was}, or delete {folder} to start over")
    return None


def save_progress(folder: Path, key: str, blocks_done: int, outputs: list, world_size: int = 1) -> None:
    state = {"fingerprint": key, "world_size": world_size, "blocks_done": blocks_done, "writers": {out.fmt.NAME: out.state() for out in outputs}}
    tmp = folder / (PROGRESS + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / PROGRESS)


def claim_output(target: Path, ckpt: Checkpoint, key_of, world: int) -> dict | None:
    """Lock the output and return the progress of an interrupted run to resume (None: start over, the
    partial folder of other settings removed)."""
    partial = partial_path(target)
    lock = OutputLock.acquire(target)  # a second run on this output refuses here; atomic_folder releases it
    state = lock.release_if_fails(load_progress, partial, key_of, world)  # refuses another world size, in one line
    if partial.exists() and state is None:
        shutil.rmtree(partial)  # a partial run of other settings: start over
    announce_resume(state, ckpt, partial)  # "resuming at block i of n"
    return state


def scan_checkpoint(ckpt: Checkpoint, target: Path, reducer) -> None:
    """NaN/inf in any tensor, streamed from the shards, before block 0; data-parallel processes scan a share
    of the bytes each (none waits for rank 0 to read them all) and every process raises the first error
    found. The output lock (rank 0's) is released on failure: the run ends before atomic_folder."""
    rank, world = (reducer.rank, reducer.world_size) if reducer else (0, 1)
    error = None
    try:
        check_all_finite(ckpt, rank, world)
    except LowbitError as err:
        error = err
    errors = reducer.all_objects(error) if reducer else [error]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        release_output_lock(target)
        raise first


def copy_side_files(source: Path, target: Path) -> None:
    for pattern in TOKENIZER_GLOBS:
        for f in source.glob(pattern):
            if f.is_file():
                shutil.copy2(f, target / f.name)


def quantize(
    model: str,
    method: str | MethodConfig = "rtn",
    scheme: Scheme = Scheme(),
    calib: CalibConfig = CalibConfig(),
    run: RunConfig = RunConfig(),
    progress: bool = True,
) -> RunSummary:
    """Quantize a checkpoint block by block and export it. Returns the run summary.

    Args:
        model: checkpoint folder, .gguf file or "default".
        method: "rtn", "autoround", "awq", "gptq" or a method config (RtnConfig, AutoRoundConfig, ...).
        scheme: bits / group size / symmetry for every quantized linear.
        calib: calibration text and sizes (ignored by RTN).
        run: output folder, formats, device / device_map, lm_head handling.

    Under torchrun (WORLD_SIZE set) every process calls this; each quantizes with its share of the samples,
    rank 0 writes and returns the full summary, the others return after the block loop (dist.py).
    """
    started = time.time()
    startup = started - command_started()  # interpreter, imports (and with --nproc: the launch) before this call
    scheme = check_quantize_args(method, scheme, calib, run)  # wrong kinds of argument, one line each
    target = Path(run.output_dir)
    refuse_unsafe_target(target)  # symlink, file, read-only parent: before any work
    check_target(target, run.overwrite)  # before any work: refuse early
    method_cfg = method_config(method)
    needs_calib = method_cfg.needs_calibration
    formats = [FORMAT_WRITERS[f] for f in run.formats]
    ckpt = Checkpoint(resolve_model(model))
    refuse_source_overlap(target, ckpt.path)  # never write into or over the model folder
    spec = spec_for(ckpt.config)
    if needs_calib and calib.images:  # before any work: images need a model that reads them, and a processor
        from .calib.images import image_prompts, load_processor

        if not spec.media:
            raise LowbitError(f"--images given but {ckpt.config.architectures[0]} reads text only", "drop --images (text calibration)")
        if spec.text_only:
            raise LowbitError(f"image calibration of {ckpt.config.architectures[0]} cannot be replayed exactly: {spec.text_only}", "drop --images")
        image_prompts(calib.images), load_processor(ckpt.path)
    elif needs_calib:
        load_tokenizer(ckpt.path)  # text calibration needs it: refuse before any output
    # data-parallel processes (torchrun): a reducer for the engine, and rank 0 alone writes (the others
    # run the same block loop on their share of the samples and return after it)
    devices, reducer = start(run.device, run.devices)
    device = devices[0]  # the block's code and inputs run here; placement.py may put linears on the others
    world, writes = (reducer.world_size, reducer.rank == 0) if reducer else (1, True)
    dtype = compute_dtype(device, ckpt, needs_calib)
    placer = Placer(devices, run.max_memory_bytes, method_cfg, dtype, calib.batch_size * calib.seqlen if needs_calib else 0)
    summary = RunSummary(method=method_cfg.name, scheme=f"W{scheme.bits}A16 g{scheme.group_size} {'sym' if scheme.sym else 'asym'}", output_dir=str(target), checkpoint_bytes=ckpt.total_bytes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # the resume fingerprint, given the number of processes (another number split the samples otherwise)
    key_of = partial_args(fingerprint, str(ckpt.path), method_cfg, scheme, calib if needs_calib else None, run.formats, run.quant_lm_head, __version__)
    key = key_of(world)
    partial = partial_path(target)
    phases = Phases(device)
    block_phases = BlockPhases(device)  # inside the block loop, per phase (load, stats, solve, collectives, ...)
    # before the claim: the command's startup, then this call's checks, checkpoint index, tokenizer, process group
    phases.seconds.update(startup=startup, setup=time.time() - started)
    with phases("claim"):  # lock, NaN/inf scan, resume state
        state = on_rank0(reducer, claim_output, target, ckpt, key_of, world)  # every rank resumes at the same block
        scan_checkpoint(ckpt, target, reducer)

    # block i's tensors are written by a thread while block i + 1 computes; it exits first (a failed run waits
    # for the write in flight before atomic_folder handles the folder)
    # and block i + 1 is read onto the device by another thread while block i computes (one device, room for it)
    with RssSampler() as rss, (atomic_folder(target, run.overwrite) if writes else nullcontext(partial)) as folder, BackgroundWrites(writes) as background, \
            closing(BlockPrefetch(device, enabled=len(devices) == 1 and device.type == "cuda")) as prefetch:
        skeleton = build_skeleton(ckpt.config, dtype=dtype)
        names = map_names(skeleton, ckpt.index)
        check_complete(skeleton, names, ckpt.path)  # every tensor the model needs is found before block 0
        if names.unmapped and writes:  # listed before any work; copied to the output as they are
            summary.unmapped = list(names.unmapped)
            print(f"lowbit: {len(names.unmapped)} checkpoint tensors match no tensor of {type(skeleton).__name__} and are copied as they are, "
                  f"e.g. {', '.join(names.unmapped[:3])}", file=sys.stderr)
        blocks = submodule(skeleton, spec.blocks)
        refuse_unholdable(skeleton, spec, scheme, formats, run.quant_lm_head)
        outputs = [FormatOutput(fmt, folder / fmt.NAME if len(formats) > 1 else folder, run.max_shard_bytes, writes) for fmt in formats]
        done = 0
        if state:
            for out in outputs:
                out.restore(state["writers"][out.fmt.NAME])
            done = state["blocks_done"]
        engine = None
        if needs_calib:
            # the calibration cache: beside the block on its device if both fit, else another GPU, else the CPU
            chains = 3 if method_cfg.fp_targets else 2  # propagate builds the next chain while the old one lives
            storage = device if device.type == "cpu" or not method_cfg.cache_on_cpu else torch.device("cpu")
            if storage.type != "cpu":
                hidden = ckpt.config.get_text_config().hidden_size
                first_linears, _ = plan_linears(blocks[0], f"{spec.blocks}.0", spec, scheme, formats)
                storage = placer.storage(cache_bytes(calib.nsamples // world + 1, calib.seqlen, hidden, dtype, chains), blocks[0], first_linears)
            with phases("capture"):
                plan = capture(skeleton, ckpt, names, spec, calib, device, dtype, storage, blocks, reducer)
            engine = BlockEngine(plan, device, storage, calib.batch_size, reducer, block_phases)

        bar = tqdm(range(len(blocks)), desc=f"lowbit {method_cfg.name}", unit="block", disable=not (progress and writes))
        # the quantized chain, and the fp model's own beside it when the method wants fp targets (twice the cache)
        step = BlockStep(method_cfg, scheme, spec, device, summary, engine, log=bar.write if writes else None, phases=block_phases)
        if reducer is not None:
            reducer.phases = block_phases
        loop_started = time.perf_counter()
        for i in bar:
            block_started = time.perf_counter()
            prefix = f"{spec.blocks}.{i}"
            linears, kept = plan_linears(blocks[i], prefix, spec, scheme, formats)  # shapes only: the block is still on meta
            placement = placer.place(blocks[i], linears)
            if placement.split:
                summary.placements[i] = {n: str(d) for n, d in placement.linears.items()}
                if writes and summary.placements.get(i - 1) != summary.placements[i]:  # said once for a run of equal placements
                    bar.write(f"block {i}: too big for {device} with {method_cfg.name}'s state; linears on {describe(placement)}")
            with block_phases("load"):
                block = prefetch.take(i) if not placement.split else None
                if block is None:
                    block = load_module(skeleton, prefix, ckpt, names, placement.device_of(prefix), dtype)
                attach(block, placement)
            if prefetch.enabled and i + 1 < len(blocks) and not placement.split and placer.room_for_next(block, linears, blocks[i + 1]):
                prefetch.start(i + 1, partial_args(load_following, skeleton, f"{spec.blocks}.{i + 1}", ckpt, names, device, dtype))
            targets = step.begin(block, i, prefix, linears, kept)
            if i < done:  # resumed: the block is on disk; only its outputs are needed
                if step.stream is not None:
                    outputs[0].replay(block, prefix, linears, scheme)
                    step.replayed(block, i)
                prefetch.join()  # the next block's load reads the checkpoint's maps and takes device memory
                detach(block, placement)
                free_module(block)
                block_phases.block_done()
                continue
            # mixture of experts: routed tokens counted; experts the method cannot calibrate go to RTN
            with block_phases("experts"):
                experts = plan_experts(engine, block, i, step.stream, prefix, calib, method_cfg) if engine is not None else None
            fallback = frozenset(n for n in linears if experts and experts.falls_back(n))
            results = step.quantize(block, i, linears, targets, last=i == len(blocks) - 1, rtn=fallback,
                                    around=lambda: tokens_to_every_expert(block, experts), routed=experts.routed if experts else None)
            if experts is not None:
                summary.add_experts(prefix, experts)
            with phases("write"), block_phases("write"):  # on the loop: packing queued, the last write waited for
                if writes:
                    tensors = [staged(block_tensors(block, prefix, linears, results, out.fmt, source_dtype(ckpt))) for out in outputs]
                    background.submit(partial_args(write_block, folder, key, i + 1, outputs, tensors, world))
            with block_phases("load"):  # what is left of the next block's load: before the maps close
                prefetch.join()
            detach(block, placement)
            free_module(block)
            ckpt.close()  # unmap the shards: pages of finished blocks must not stay resident (and count in RSS)
            release_freed_memory()
            phases.sync()
            summary.block_seconds.append(time.perf_counter() - block_started)
            block_phases.block_done()
        with phases("write"), block_phases("write"):
            background.close()  # the last block's write
        bar.close()
        phases.seconds["blocks"] = time.perf_counter() - loop_started
        if reducer is not None:
            reducer.phases = None
        summary.block_phases, summary.block_phase_seconds = block_phases.totals, block_phases.per_block
        if reducer is not None:  # every process's own figures, for rank 0's summary (each sees only its device)
            summary.ranks = reducer.all_objects({"rank": reducer.rank, "peak_rss_bytes": rss.peak, "peak_vram_bytes": peak_vram_bytes(device),
                                                 "collective_seconds": round(reducer.seconds, 2), "blocks_seconds": round(phases.seconds["blocks"], 2),
                                                 "block_phases": {k: round(v, 2) for k, v in block_phases.totals.items()}})
        engine = step = None  # release the calibration caches before the final writes
        if not writes:
            return summary

        finish_started = time.perf_counter()
        kept_outside = outside_fp_linears(skeleton, spec, run.quant_lm_head)
        for name, why in kept_outside.items():
            summary.kept_fp.setdefault(name, why)
        for out in outputs:
            pending = outside_tensors(ckpt, names, spec, run, scheme, out.fmt, summary)
            while pending:  # popped, so a written tensor (a view of its shard's map) is released right away
                tensor_name, tensor = pending.popitem()
                big = tensor.numel() * tensor.element_size() >= run.max_shard_bytes // 4
                if big:  # embeddings / lm_head: a shard of their own, so at most one of them is in RAM at a time
                    out.writer.flush()
                out.writer.add({tensor_name: tensor})
                if big or out.writer.full:
                    out.writer.flush()
            out.writer.finish()
            ckpt.close()
            write_config(out.folder, ckpt, spec, scheme, summary, method_metadata(method_cfg, calib if needs_calib else None), fmt=out.fmt,
                         untie=run.quant_lm_head and tied_head(skeleton, spec))
            copy_side_files(ckpt.path, out.folder)
        (folder / PROGRESS).unlink(missing_ok=True)
        phases.seconds["finish"] = time.perf_counter() - finish_started
        summary.phases = phases.seconds
        summary.output_bytes = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
        summary.seconds = time.time() - started
        summary.peak_vram = peak_vram_bytes()
        for r in summary.ranks:  # another process's GPU: its own peak (this process allocated nothing there)
            for d, b in r["peak_vram_bytes"].items():
                summary.peak_vram[d] = max(summary.peak_vram.get(d, 0), b)
        summary.peak_rss = rss.peak
        if summary.ranks:
            summary.ranks[0]["peak_rss_bytes"] = max(summary.ranks[0]["peak_rss_bytes"], rss.peak)
        (folder / LOG).write_text(json.dumps(summary.to_dict(), indent=2))
    summary.peak_rss = max(summary.peak_rss, rss.peak)
    return summary


def write_block(folder: Path, key: str, blocks_done: int, outputs: list, tensors: list, world: int) -> None:
    """One block's tensors (staged, one entry per format) into the shard writers (the background thread); when a
    shard is full, every format flushes and the resume record moves past this block: all of it is durable."""
    for out, (block, ready) in zip(outputs, tensors):
        out.writer.add(block, ready)
    if any(out.writer.full for out in outputs):
        for out in outputs:
            out.writer.flush()
        save_progress(folder, key, blocks_done, outputs, world)


def method_metadata(method_cfg: MethodConfig, calib: CalibConfig | None) -> dict:
    out = {"method": method_cfg.name, **method_cfg.metadata()}
    if calib is not None:
        out.update(nsamples=calib.nsamples, seqlen=calib.seqlen, batch_size=calib.batch_size)
    return out


def tied_head(skeleton, spec: ArchSpec) -> bool:
    """lm_head reads the embedding's weight (one Parameter under two names)."""
    return submodule(skeleton, spec.lm_head).weight is submodule(skeleton, spec.embed).weight


def outside_fp_linears(skeleton, spec: ArchSpec, quant_lm_head: bool) -> dict[str, str]:
    """Linears outside the blocks, all kept in full precision (lm_head unless asked): name -> reason."""
    out = {}
    for name, m in skeleton.named_modules():
        if isinstance(m, torch.nn.Linear) and not spec.in_blocks(name):
            if name == spec.lm_head:
                if not quant_lm_head:
                    out[name] = "lm_head stays in full precision (pass --quant_lm_head to quantize it)"
            else:
                out[name] = "outside the language model's blocks (vision / audio tower, projector): kept in full precision"
    return out


class FormatOutput:
    """One export format's folder and shard writer (several formats write side by side)."""

    def __init__(self, fmt, folder: Path, max_shard_bytes: int, writes: bool = True):
        self.fmt, self.folder = fmt, folder
        if writes:  # ranks other than 0 only read (the finished blocks of a resumed run)
            folder.mkdir(parents=True, exist_ok=True)
        self.writer = ShardWriter(folder, max_shard_bytes)

    def state(self) -> dict:
        return {"shards": self.writer.shards, "weight_map": self.writer.weight_map, "total_bytes": self.writer.total_bytes}

    def restore(self, state: dict) -> None:
        self.writer.shards, self.writer.weight_map, self.writer.total_bytes = state["shards"], state["weight_map"], state["total_bytes"]

    def replay(self, block, prefix: str, linears: dict, scheme: Scheme) -> None:
        """On resume: make a finished block compute as written: its linears from their packed tensors
        (dequantized), every other parameter as stored (AWQ folds scales into norms and linears)."""
        from safetensors import safe_open

        files = {}

        def get(tensor: str):
            file = self.folder / self.writer.weight_map[tensor]
            if file not in files:
                files[file] = safe_open(file, framework="pt")
            return files[file].get_tensor(tensor)

        quantized = {f"{n}.weight" for n in linears} | {f"{n}.bias" for n in linears}
        for name, t in block.state_dict().items():
            if name not in quantized and f"{prefix}.{name}" in self.writer.weight_map:
                t.copy_(get(f"{prefix}.{name}"))
        for name, linear in linears.items():
            result = self.fmt.read_layer(get, f"{prefix}.{name}", scheme, linear.out_features, linear.in_features)
            linear.weight.data = result.dequantize().to(linear.weight)


def refuse_unholdable(skeleton, spec: ArchSpec, scheme: Scheme, formats, quant_lm_head: bool) -> None:
    """Before any work: a format that cannot hold the scheme for these layer shapes is refused by name."""
    blocks = submodule(skeleton, spec.blocks)
    in_features = {m.in_features for m in blocks.modules() if isinstance(m, torch.nn.Linear)}
    if quant_lm_head:
        in_features.add(submodule(skeleton, spec.lm_head).in_features)
    for fmt in formats:
        reason = fmt.refuse(scheme, in_features)
        if reason:
            raise LowbitError(reason)
    # experts are most of a MoE model's weights: keeping one in full precision because a format cannot hold
    # its shape would silently defeat the quantization, so that is refused here, before any work
    shapes = {}  # (out, in) -> one expert linear of that shape (experts of a module share their shapes)
    for name, module in experts_modules(blocks).items():
        for linear_name, linear in getattr(module, "0").named_children():
            shapes.setdefault((linear.out_features, linear.in_features), f"{spec.blocks}.{name}.0.{linear_name}")
    for (n, k), example in shapes.items():
        for fmt in formats:
            reason = fmt.can_hold(scheme, n, k)
            if reason:
                raise LowbitError(f"format {fmt.NAME} cannot hold the experts' {n}x{k} projections (e.g. {example}): {reason}",
                                  "pick another --format or --group_size: every expert must be quantized")


def capture(skeleton, ckpt, names: NameMap, spec: ArchSpec, calib: CalibConfig, device, dtype, storage, blocks, reducer=None) -> ReplayPlan:
    """Tokenize the calibration text and record every block's inputs. Loaded for it: every tensor outside
    the blocks that runs before block 0 on text (embeddings, Gemma 4's per-layer tables), i.e. all but
    lm_head, the final norm and the media sub-models (vision / audio towers, which text never reaches; they
    are loaded when the calibration has images). Data-parallel processes capture their contiguous share."""
    samples = calibration_samples(ckpt, spec, calib)
    if reducer is not None:
        samples = share(samples, reducer.rank, reducer.world_size)
    after = (spec.lm_head, *spec.post_block)
    tensors = {**dict(skeleton.named_buffers()), **skeleton.state_dict(keep_vars=True)}  # computed buffers (rotary tables) too
    needed = [(n, t) for n, t in tensors.items()
              if not spec.in_blocks(n) and (calib.images or not spec.is_media(n)) and not any(n == a or n.startswith(a + ".") for a in after)]
    load_tensors(skeleton, needed, ckpt, names, device, dtype)
    try:
        plan = capture_block_inputs(skeleton, blocks, samples, device, storage, spec.state_kwargs)
    finally:
        free_tensors(skeleton, [n for n, t in needed if names.has(n)])
        ckpt.close()
    if plan.refusal:
        raise LowbitError(f"{type(skeleton).__name__}'s blocks cannot be replayed exactly: {plan.refusal}", "quantize it with --method rtn (no calibration), or extend its ArchSpec")
    return plan


def calibration_samples(ckpt: Checkpoint, spec: ArchSpec, calib: CalibConfig) -> list[dict]:
    """Model inputs per sample (batch 1): token windows of the text, or processed image-text pairs."""
    if calib.images:
        from .calib.images import image_samples

        return image_samples(ckpt.path, calib.images, calib.nsamples, calib.seqlen)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt.path)
    windows = calibration_windows(tokenizer, load_text(calib.dataset), calib)
    return [{"input_ids": w.unsqueeze(0)} for w in windows]


def block_tensors(block, prefix: str, linears: dict, results: dict[str, QuantResult], fmt, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Packed tensors of the quantized linears plus every other parameter of the block as it is now, in `dtype`."""
    out = {}
    for name, result in results.items():
        out.update(fmt.layer_tensors(f"{prefix}.{name}", result))
    skip = {f"{n}.weight" for n in linears} | {f"{n}.bias" for n in linears}
    for name, t in block.state_dict().items():
        if name not in skip:
            out[f"{prefix}.{name}"] = t.to(dtype) if t.is_floating_point() else t
    return out


def outside_tensors(ckpt: Checkpoint, names: NameMap, spec: ArchSpec, run: RunConfig, scheme: Scheme, fmt, summary: RunSummary) -> dict:
    """Everything outside the blocks, under the model's names (checked for NaN/inf before the block loop);
    lm_head quantized (RTN) if asked; checkpoint tensors that match no model tensor copied as they are."""
    from .quant import quantize_weight

    out, written = {}, set()
    head = f"{spec.lm_head}.weight"
    for name, key in names.to_checkpoint.items():
        if spec.in_blocks(name) or name == head or key in written:
            continue
        out[name] = ckpt.tensor(key)
        written.add(key)
    for key in names.unmapped:
        out[key] = ckpt.tensor(key)
    head_key = names.get(head)
    tied = head_key is not None and head_key == names.get(f"{spec.embed}.weight")
    if run.quant_lm_head and head_key is not None:
        weight = ckpt.tensor(head_key)
        n, k = weight.shape
        reason = fmt.can_hold(scheme, n, k)
        if reason is None:
            out.update(fmt.layer_tensors(spec.lm_head, quantize_weight(weight.float(), scheme)))
            if spec.lm_head not in summary.quantized:
                summary.quantized.append(spec.lm_head)
            return out
        summary.kept_fp[spec.lm_head] = reason
        out[head] = weight
        return out
    if head_key is not None and not tied:
        out[head] = ckpt.tensor(head_key)
    summary.kept_fp[spec.embed] = "embeddings stay in full precision"
    return out


def write_config(folder: Path, ckpt: Checkpoint, spec: ArchSpec, scheme: Scheme, summary: RunSummary, method: dict, fmt, untie: bool) -> None:
    """config.json with the format's quantization_config: every linear kept in fp is listed by name (block
    linears the format cannot hold, routers, lm_head, vision / audio towers and projectors), and the kept
    sub-models by path, so loaders never expect quantized tensors where there are none."""
    config = ckpt.config.to_dict()
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    kept = sorted(k for k in summary.kept_fp if k != spec.embed)
    config["quantization_config"] = fmt.quantization_config(scheme, spec.blocks, kept, method, __version__, fp_modules=list(spec.keep_fp))
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    fmt.extra_files(folder, config["quantization_config"])
