"""Which kernel runs a W [N, K] layer at M tokens: a per-device table kept as data, not thresholds in code.

A table is a JSON file (`src/lowbit/kernels/tables/*.json` shipped; `$LOWBIT_HOME/kernels/<gpu>.json` written
by `lowbit tune-kernels` on the user's own GPU, which takes precedence), found by the name
`torch.cuda.get_device_name()` gives. Its parts:

    devices                  the GPU names it is for; "default": true marks the table for GPUs without one
    classes                  layer shape classes, name -> predicates all of which must hold:
                               min_k, min_n, min_weights (N * K)        integers
                               min_col_tiles_per_sm [block_n, ratio]    ceil(N / block_n) >= ratio * SMs
                               near [K, N]                              the nearest "near" class of the table
                                                                        (log2 distance in K and N)
                             "any" is every layer
    rows                     [{"m": [lo, hi or null], "class": name, "try": [entry, ...]}, ...]: the first row
                             whose M range and class hold; in it, the first entry whose kernel can read the
                             layer (bits, groups, K) is built into a Config (or a dequantize + cuBLAS plan)
    in_kernel_reduce_max_m   entries that do not say: K splits meet inside the launch up to this M
    moe_split                the grouped MoE kernel's K-split rule (triton/moe.py: `pick`), the split keys of an
                             entry (per_sm or split_k, min_chunks, max_split, ...) and in_kernel_reduce; a table
                             without one takes the default table's

An entry names a kernel of `KERNELS` and overrides its defaults (tile sizes, warps, stages, stream_k,
in_kernel_reduce, and the K-split rule: a fixed `split_k` halved until each split keeps `min_chunks`, or the
smallest power of two giving `per_sm` programs per SM, at most `max_split`, each split keeping `min_chunks`).
Where no entry of a table fits a layer (a tuned W4 table asked for 8 bits), the default table answers.

The choice is made on the host, from Python ints, before the launch (also under torch.compile, where the
custom op's body runs outside the graph, and before CUDA-graph capture); `pick_config` caches it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import triton

from ...errors import LowbitError
from .config import Config
from .dequant_gemm import DequantGemm

SHIPPED = Path(__file__).resolve().parents[1] / "tables"
SCHEMA = 1

_SPLIT = {"split_k", "per_sm", "min_chunks", "max_split", "min_split", "min_split_chunks"}
_LAUNCH = _SPLIT | {"stream_k", "in_kernel_reduce"}
# kernel -> defaults; an entry may set these keys and those of _LAUNCH (dequant: only its own)
KERNELS = {
    # gemv.py, no tensor cores; block_m holds all of M (<= 4), block_k 64 (32 at 4 rows), 4 warps (8 above 1 row)
    "gemv": {"block_n": 512, "num_warps": 0, "block_k": 0, "per_sm": 8, "max_split": 64},
    # unpack4.py's dot per code position, x loaded once per chunk (4 bits, a group per 128-deep chunk)
    "unpack4": {"block_m": 16, "block_n": 256, "num_warps": 4, "num_stages": 3, "per_sm": 1.5, "max_split": 64, "x_once": True,
                "max_registers": 0},
    # unpack4's code positions joined back into k order, one deep dot per chunk
    "unpack4_join": {"block_m": 64, "block_n": 128, "num_warps": 8, "num_stages": 3, "split_k": 4, "min_chunks": 4, "max_registers": 0},
    # split unpack, magic-number conversion, 512 / bits deep chunks (any width and group)
    "magic_split": {"block_m": 16, "block_n": 128, "num_warps": 4, "num_stages": 3, "per_sm": 3, "max_split": 64,
                    "min_split": 4, "min_split_chunks": 16, "max_registers": 0},
    # reshape unpack, magic-number conversion (any width and group; 64-deep chunks for groups of 64)
    "magic": {"block_m": 64, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 3, "split_k": 4, "min_chunks": 4,
              "max_registers": 0},
    # swapab.py, the weight as the wgmma's register operand; block_m 0: M rounded up to a power of two
    # (16..128, 256 above 128); max_registers -1: 128 for token tiles <= 64 (two programs per SM), else none
    "swap_ab": {"block_m": 0, "block_n": 128, "num_warps": 8, "num_stages": 3, "per_sm": 1, "min_chunks": 2,
                "max_registers": -1},
    # dequantize + cuBLAS: the whole weight (slab_n 0) or column slabs, the next dequantized on a side stream
    "dequant": {"slab_n": 0, "overlap": False},
}
_CLASS_KEYS = {"min_k", "min_n", "min_weights", "min_col_tiles_per_sm", "near"}


class NoEntry(Exception):
    """No row of the table has an entry for this layer."""


def _unpack4_ok(k: int, bits: int, group_size: int) -> bool:
    return bits == 4 and (group_size >= k or group_size % 128 == 0)  # a group per 128-deep chunk


def can_run(kernel: str, m: int, k: int, bits: int, group_size: int) -> bool:
    """Whether `kernel` reads this layer at all (what it computes, not how fast)."""
    if kernel == "gemv":
        return m <= 4
    if kernel in ("unpack4", "unpack4_join"):
        return _unpack4_ok(k, bits, group_size)
    if kernel == "swap_ab":
        return _unpack4_ok(k, bits, group_size) and k % 128 == 0
    if kernel == "magic_split" and bits == 2:
        # 2 bits: 256-deep chunks (16 packed rows, tl.dot's smallest depth); a chunk spanning several groups
        # loads per-k scale and zero tiles [256, 128] fp16 per pipeline stage: 279 KB of shared memory, over
        # the H200's 227 KB (OutOfResources on the GPU, 2026-11-30; bench/results/kernels-2026-11-30-h200-r2-table-tests.log)
        return group_size >= k or group_size % 256 == 0
    return True


def k_split(e: dict, tiles: int, chunks: int, sm_count: int) -> int:
    """Programs sharing one output tile's K loop, by the entry's split rule."""
    keep = e.get("min_chunks", 1)
    if "split_k" in e:
        split = e["split_k"]
        while split > 1 and chunks // split < keep:
            split //= 2
    else:
        split = 1
        while tiles * split < e["per_sm"] * sm_count and split * 2 * keep <= chunks and split * 2 <= e.get("max_split", 1 << 16):
            split *= 2
    if "min_split" in e and chunks >= e.get("min_split_chunks", 0):
        split = max(split, e["min_split"])
    return split


def build(entry: dict, m: int, n: int, k: int, bits: int, group_size: int, sm_count: int, ikr_max_m: int = 8) -> Config | DequantGemm | None:
    """The launch an entry means for this layer (None: dequantize + cuBLAS, the whole weight)."""
    kind = entry["kernel"]
    e = dict(KERNELS[kind])
    if "per_sm" in entry:  # the entry's own split rule replaces the kernel's
        e.pop("split_k", None)
    if "split_k" in entry:
        e.pop("per_sm", None)
    e.update(entry)
    if kind == "dequant":
        return DequantGemm(e["slab_n"], e["overlap"]) if e["slab_n"] else None
    fit = 1 << (m - 1).bit_length()  # M rounded up to a power of two
    if kind == "gemv":
        bm = fit
        cfg = Config(bm, e["block_n"], e["block_k"] or (32 if bm == 4 else 64), num_warps=e["num_warps"] or (4 if bm == 1 else 8),
                     num_stages=1, gemv=True)
    elif kind == "swap_ab":
        bm = e["block_m"] or (256 if m > 128 else max(16, fit))
        regs = e["max_registers"] if e["max_registers"] >= 0 else (128 if bm <= 64 else 0)
        cfg = Config(bm, e["block_n"], 128, num_warps=e["num_warps"], num_stages=e["num_stages"], swap_ab=True, x_permuted=True,
                     max_registers=regs)
    else:
        launch = {"num_warps": e["num_warps"], "num_stages": e["num_stages"], "max_registers": e["max_registers"]}
        if kind == "unpack4":
            cfg = Config(e["block_m"], e["block_n"], 128, split_unpack=True, unpack4=True, x_once=e["x_once"], **launch)
        elif kind == "unpack4_join":
            cfg = Config(e["block_m"], e["block_n"], 128, unpack4=True, **launch)
        elif kind == "magic_split":  # block_k * bits / 32 = 16 packed rows: tl.dot's smallest depth
            cfg = Config(e["block_m"], e["block_n"], 512 // bits, split_unpack=True, magic=True, **launch)
        else:  # magic
            bk = e["block_k"]
            if group_size % bk and group_size < k and group_size % 64 == 0:
                bk = 64  # keep one group per chunk for the scale-after-dot path
            cfg = Config(e["block_m"], e["block_n"], bk, magic=True, **launch)
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    return dataclasses.replace(cfg, split_k=k_split(e, tiles, triton.cdiv(k, cfg.block_k), sm_count), stream_k=e.get("stream_k", 0),
                               in_kernel_reduce=e.get("in_kernel_reduce", m <= ikr_max_m))


class Table:
    """A validated kernel table (see the module docstring); `pick` answers for one layer and M."""

    def __init__(self, data, source: str):
        self.source = source
        _validate(data, source)
        self.data = data
        self.devices = data["devices"]
        self.default = data.get("default", False)
        self.classes = data.get("classes", {})
        self.rows = data["rows"]
        self.ikr_max_m = data.get("in_kernel_reduce_max_m", 8)
        self._near = {name: c["near"] for name, c in self.classes.items() if "near" in c}
        self.moe_split = data.get("moe_split")

    def _nearest(self, k: int, n: int) -> str | None:
        dist = lambda kn: (math.log2(k / kn[0])) ** 2 + (math.log2(n / kn[1])) ** 2  # noqa: E731
        return min(self._near, key=lambda name: dist(self._near[name])) if self._near else None

    def _holds(self, name: str, k: int, n: int, sm_count: int, nearest: str | None) -> bool:
        if name == "any":
            return True
        c = self.classes[name]
        tiles = c.get("min_col_tiles_per_sm")
        return (k >= c.get("min_k", 0) and n >= c.get("min_n", 0) and n * k >= c.get("min_weights", 0)
                and (tiles is None or triton.cdiv(n, tiles[0]) >= tiles[1] * sm_count) and ("near" not in c or name == nearest))

    def entry(self, m: int, n: int, k: int, bits: int, group_size: int, sm_count: int) -> dict:
        """The entry that answers for this layer and M (raises NoEntry where none can read the layer)."""
        m = max(m, 1)
        nearest = self._nearest(k, n)
        for row in self.rows:
            lo, hi = row["m"]
            if m < lo or (hi is not None and m > hi) or not self._holds(row["class"], k, n, sm_count, nearest):
                continue
            for entry in row["try"]:
                if can_run(entry["kernel"], m, k, bits, group_size):
                    return entry
        raise NoEntry

    def pick(self, m: int, n: int, k: int, bits: int, group_size: int, sm_count: int) -> Config | DequantGemm | None:
        return build(self.entry(m, n, k, bits, group_size, sm_count), max(m, 1), n, k, bits, group_size, sm_count, self.ikr_max_m)


def _validate(data, source: str) -> None:
    """Raise LowbitError naming the first problem (a user's table must fail in one line, not deep inside a launch)."""

    def bad(problem: str):
        raise LowbitError(f"kernel table {source}: {problem}", "fix or delete the file (`lowbit tune-kernels` writes a valid one)")

    if not isinstance(data, dict):
        bad("the top level must be a JSON object")
    unknown = set(data) - {"schema", "devices", "default", "note", "measured", "in_kernel_reduce_max_m", "classes", "rows", "moe_split"}
    if unknown:
        bad(f"unknown keys {sorted(unknown)}")
    if data.get("schema") != SCHEMA:
        bad(f"schema must be {SCHEMA}, got {data.get('schema')!r}")
    if not isinstance(data.get("devices"), list) or not all(isinstance(d, str) for d in data["devices"]):
        bad('"devices" must be a list of GPU names (torch.cuda.get_device_name())')
    classes = data.get("classes", {})
    if not isinstance(classes, dict):
        bad('"classes" must be an object: name -> predicates')
    for name, c in classes.items():
        if not isinstance(c, dict) or set(c) - _CLASS_KEYS:
            bad(f"class {name!r} must be an object with keys among {sorted(_CLASS_KEYS)}")
        for key in ("min_k", "min_n", "min_weights"):
            if key in c and not (isinstance(c[key], int) and c[key] >= 0):
                bad(f"class {name!r}: {key} must be an integer >= 0")
        for key in ("min_col_tiles_per_sm", "near"):
            if key in c and not (isinstance(c[key], list) and len(c[key]) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in c[key])):
                bad(f"class {name!r}: {key} must be a pair of positive numbers")
    if "moe_split" in data:
        rule, keys = data["moe_split"], _SPLIT | {"in_kernel_reduce"}
        if not isinstance(rule, dict) or set(rule) - keys or not {"per_sm", "split_k"} & set(rule):
            bad(f'"moe_split" must be an object with per_sm or split_k, keys among {sorted(keys)}, got {rule!r}')
        for key, value in rule.items():
            if not _value_ok(key, value, {}):
                bad(f'"moe_split".{key} = {value!r} is not valid (splits are powers of two)')
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows:
        bad('"rows" must be a non-empty list')
    for i, row in enumerate(rows):
        where = f"row {i}"
        if not isinstance(row, dict) or {"m", "class", "try"} - set(row) or set(row) - {"m", "class", "try", "measured"}:
            bad(f'{where} must have the keys "m", "class", "try" (and optionally "measured")')
        m = row["m"]
        if not (isinstance(m, list) and len(m) == 2 and isinstance(m[0], int) and m[0] >= 1 and (m[1] is None or (isinstance(m[1], int) and m[1] >= m[0]))):
            bad(f'{where}: "m" must be [lo, hi] with 1 <= lo <= hi (hi null: no upper end), got {m!r}')
        if row["class"] != "any" and row["class"] not in classes:
            bad(f'{where}: class {row["class"]!r} is not defined under "classes"')
        if not isinstance(row["try"], list) or not row["try"]:
            bad(f'{where}: "try" must be a non-empty list of kernel entries')
        for entry in row["try"]:
            _validate_entry(entry, f"{where}", bad)


def _validate_entry(entry, where: str, bad) -> None:
    if not isinstance(entry, dict) or entry.get("kernel") not in KERNELS:
        bad(f'{where}: each entry must be an object whose "kernel" is one of {sorted(KERNELS)}, got {entry!r}')
    kind = entry["kernel"]
    allowed = set(KERNELS[kind]) | ({"kernel"} if kind == "dequant" else _LAUNCH | {"kernel"})
    if set(entry) - allowed:
        bad(f"{where}: {kind} takes {sorted(allowed - {'kernel'})}, not {sorted(set(entry) - allowed)}")
    for key, value in entry.items():
        if key != "kernel" and not _value_ok(key, value, KERNELS[kind], kind == "swap_ab"):
            bad(f"{where}: {kind}.{key} = {value!r} is not valid (tile sizes, warps and splits are powers of two)")


def _value_ok(key: str, value, defaults: dict, swap_ab: bool = False) -> bool:
    """Whether one key of an entry (or of "moe_split") holds a valid value; defaults: the kernel's (0 allowed where
    the default is 0)."""
    if key in ("x_once", "overlap", "in_kernel_reduce"):
        return isinstance(value, bool)
    if key == "per_sm":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if key in ("block_m", "block_n", "block_k", "num_warps", "split_k", "max_split", "min_split", "slab_n"):
        zero_ok = key in ("slab_n", "block_m", "block_k", "num_warps") and defaults.get(key) == 0
        return isinstance(value, int) and not isinstance(value, bool) and ((value == 0 and zero_ok) or (value > 0 and value & (value - 1) == 0))
    if key == "max_registers":
        return isinstance(value, int) and not isinstance(value, bool) and ((value == -1 and swap_ab) or value == 0 or 32 <= value <= 255)
    # num_stages, stream_k, min_chunks, min_split_chunks
    return isinstance(value, int) and not isinstance(value, bool) and value >= (1 if key == "num_stages" else 0)


def load(path) -> Table:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LowbitError(f"kernel table {path}: cannot read it ({err})", "fix or delete the file (`lowbit tune-kernels` writes a valid one)") from None
    return Table(data, str(path))


def user_path(device_name: str) -> Path:
    """Where `lowbit tune-kernels` writes this GPU's table, and where it is looked for first."""
    from ...paths import lowbit_home

    slug = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in device_name)
    return lowbit_home() / "kernels" / f"{slug}.json"


@functools.lru_cache(maxsize=None)
def shipped() -> tuple[Table, ...]:
    return tuple(load(p) for p in sorted(SHIPPED.glob("*.json")))


@functools.lru_cache(maxsize=None)
def default_table() -> Table:
    (table,) = [t for t in shipped() if t.default]
    return table


@functools.lru_cache(maxsize=None)
def for_device(device_name: str | None) -> Table:
    """The table for a GPU name: the user's ($LOWBIT_HOME/kernels/<name>.json), a shipped one, or the default."""
    if device_name is None:
        return default_table()
    user = user_path(device_name)
    if user.exists():
        return load(user)
    for table in shipped():
        if device_name in table.devices:
            return table
    return default_table()
