"""The next block's weights read onto the GPU while this block computes.

Loading a block is host work and a copy from the checkpoint's memory map (pageable memory: ~2-3 GB/s on an
H200 host): 0.13 s for a Llama-3-8B block, 0.5-0.6 s for a Qwen3-30B-A3B block (128 experts x 3 linears,
bench/results/dist-gpu-2026-11-30-2324.json), on every block and every data-parallel process, and twice as
long on rank 0, whose writer thread reads the previous block at the same time. A thread with its own CUDA
stream loads block i + 1 while block i trains or solves, so the loop waits only for what is left of it.

When (`BlockPrefetch.enabled`): one CUDA device holds the whole block (no placement over several devices:
Placer plans those from the memory left after the previous block, which a loaded next block would change),
and the device has room for one more block's weights beside the current block's estimated need
(placement.block_bytes). Otherwise blocks load on the loop as before.

Memory: at most one block more on the device, none more in RAM: a prefetch is always waited for before the
current block is freed and the checkpoint's maps are closed (runner.py), and the loader closes the maps it read
(runner.load_following), so the maps hold one block's pages at most. A prefetched block's tensors are recorded
on the loop's stream when taken, so the memory of a freed block goes back to the side stream only once the
loop's kernels queued on it are done. A load that runs out of device memory (the room is an estimate) is
dropped and the loop loads that block itself, after the current one is freed.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch


class BlockPrefetch:
    """One loader thread beside the block loop: `start(i, load)` runs `load()` (which returns the block's module,
    or None to give up) on a side CUDA stream; `take(i)` returns that module once its copies are done (the loop's
    stream waits for them), or None when block i was not prefetched. An exception of the load is raised by
    `take` / `join` / `wait`."""

    def __init__(self, device: torch.device, enabled: bool):
        """enabled: the runner's choice (one CUDA device); on the CPU there is no stream to wait for, and a
        prefetched block would be one block more in RAM, so the runner never enables it there (tests do)."""
        self.device = torch.device(device)
        self.enabled = enabled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowbit-load") if enabled else None
        self._stream = torch.cuda.Stream(self.device) if enabled and self.device.type == "cuda" else None
        self._pending: tuple[int, Future] | None = None

    def start(self, index: int, load: Callable[[], torch.nn.Module]) -> None:
        self.wait()

        def run():
            if self._stream is None:
                return load(), None
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):  # the current stream is per thread
                module = load()
                done = torch.cuda.Event()
                done.record(self._stream)
            return module, done

        self._pending = (index, self._pool.submit(run))

    def take(self, index: int) -> torch.nn.Module | None:
        if self._pending is None or self._pending[0] != index:
            self.wait()
            return None
        pending, self._pending = self._pending, None
        module, done = pending[1].result()
        if module is None or done is None:
            return module
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(done)
        for t in list(module.parameters()) + list(module.buffers()):
            if t.device == self.device:
                # allocated on the side stream, read on the loop's: when the block is freed, the allocator must
                # not hand its memory to the side stream again before the loop's queued kernels are done with it
                t.record_stream(stream)
        return module

    def join(self) -> None:
        """Wait until the load in flight is done, keeping its module for `take`: before the current block is
        freed and the checkpoint's maps close (the load reads them)."""
        if self._pending is not None:
            self._pending[1].result()

    def wait(self) -> None:
        """Wait for the load in flight and drop it (on the way out, or when another block is asked for)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].result()

    def close(self) -> None:
        """Stop the thread once its load is done. A load nobody took is dropped, its error too: after a failed
        block the loop's own error is the one to report."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].exception()  # waits; the error, if any, belonged to a block the loop never reached
        if self._pool is not None:
            self._pool.shutdown(wait=True)
