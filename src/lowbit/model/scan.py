"""NaN/inf scan of every tensor of a checkpoint before any block work, streamed from the shards.

Each safetensors file is read header first (8-byte little-endian length, then a JSON table of
name -> dtype, shape, [begin, end) byte offsets into the data that follows); the floating-point tensors are
then read in chunks of at most CHUNK_BYTES into one reused buffer. Nothing is memory-mapped and no model
is built, so memory stays at one chunk whatever the checkpoint's size; the cost is one sequential read
of the weights (the page cache then serves block 0's reads).
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import torch

from ..errors import LowbitError

CHUNK_BYTES = 64 * 1024**2  # a multiple of every element size
FLOAT_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_header(f) -> tuple[dict, int]:
    """(tensor table without __metadata__, byte offset where the data starts) of an open safetensors file."""
    (length,) = struct.unpack("<Q", f.read(8))
    table = json.loads(f.read(length))
    table.pop("__metadata__", None)
    return table, 8 + length


def _finite(chunk: torch.Tensor) -> bool:
    """Every value finite: its min and max are (a NaN makes both NaN, an inf the max or -inf the min). One
    reduction pass with no temporary: ~35x faster than isfinite(chunk).all() on the CPU (2 cores, bf16: 5 ms
    against 174 ms per 64 MB chunk), so the scan is bound by the disk, not by the check."""
    if chunk.element_size() == 1:  # fp8: no min/max kernel for it on every build
        chunk = chunk.float()
    lo, hi = torch.aminmax(chunk)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def float_tensors(file: Path) -> list[tuple[Path, str, torch.dtype, int, int]]:
    """(file, name, dtype, first byte, end byte) of each floating-point tensor of `file`, in file order."""
    with open(file, "rb", buffering=0) as f:
        table, data_start = read_header(f)
    out = []
    for name, info in sorted(table.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # file order: sequential reads
        dtype = FLOAT_DTYPES.get(info["dtype"])
        if dtype is not None:
            begin, end = info["data_offsets"]
            out.append((file, name, dtype, data_start + begin, data_start + end))
    return out


def first_nonfinite_in(tensors: list[tuple[Path, str, torch.dtype, int, int]]) -> str | None:
    """Name of the first of these tensors holding a NaN or inf, or None; each read in chunks of CHUNK_BYTES."""
    buffer = bytearray(CHUNK_BYTES)
    f, current = None, None
    try:
        for file, name, dtype, begin, end in tensors:
            if file != current:
                if f is not None:
                    f.close()
                f, current = open(file, "rb", buffering=0), file
            f.seek(begin)
            remaining = end - begin
            while remaining:
                view = memoryview(buffer)[: min(remaining, CHUNK_BYTES)]
                got = f.readinto(view)
                if not got:
                    raise LowbitError(f"{file.name} ends inside tensor {name}", "the file is truncated; re-download or re-save the checkpoint")
                with warnings.catch_warnings():  # torch warns that the buffer is writable-shared; it is ours
                    warnings.simplefilter("ignore")
                    chunk = torch.frombuffer(view[:got], dtype=dtype)
                if not _finite(chunk):
                    return name
                remaining -= got
    finally:
        if f is not None:
            f.close()
    return None


def first_nonfinite(file: Path) -> str | None:
    """Name of the first floating-point tensor of `file` holding a NaN or inf, or None."""
    return first_nonfinite_in(float_tensors(file))


def share_by_bytes(tensors: list, rank: int, world: int) -> list:
    """Process `rank`'s contiguous part of the tensors (file order kept), parts of about equal bytes."""
    total = sum(end - begin for *_, begin, end in tensors)
    out, seen = [], 0
    for t in tensors:
        middle = seen + (t[4] - t[3]) / 2  # a tensor goes to the process whose byte range holds its middle
        if min(int(middle * world / max(total, 1)), world - 1) == rank:
            out.append(t)
        seen += t[4] - t[3]
    return out


def check_all_finite(ckpt, rank: int = 0, world: int = 1) -> None:
    """Fail with one line on the first tensor of the checkpoint (a `Checkpoint`) that holds NaN or inf.
    Data-parallel processes each scan their share of the bytes (rank, world)."""
    tensors = [t for file in sorted(set(ckpt.index.values())) for t in float_tensors(file) if ckpt.index.get(t[1]) == file]  # the checkpoint's own
    bad = first_nonfinite_in(share_by_bytes(tensors, rank, world))
    if bad is not None:
        file = next(t[0] for t in tensors if t[1] == bad)
        raise LowbitError(
            f"weight {bad} contains NaN or inf (in {file.name})",
            "fix or re-export the checkpoint; non-finite weights cannot be quantized",
        )
