"""The per-device kernel tables (src/lowbit/kernels/tables/*.json, triton/table.py).

Every config a shipped table can name is built for a small layer and run against the float64 reference
(under TRITON_INTERPRET=1 on the CPU, on the GPU in the bench call); a user table overrides the shipped
one; malformed user tables fail in one line that names the problem and the fix.
"""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.kernels.triton import table
from lowbit.kernels.triton.matmul import pick_config, quant_matmul

from test_triton_kernels import TOL, gptq_packed, random_layer, rel_err  # the helpers beside it (rootdir import mode)

N, K = 272, 384  # N off every column tile (64..512) yet whole 2-bit zero words, K = 3 chunks of 128


def _entries():
    """(table, M, entry) for every launch a shipped table can make, run at the smallest M of a row naming it
    (capped at 1024: the rows above run the same dequantize + cuBLAS plans); entries that build the same launch
    for this layer (a tuned table repeats its winners across rows) run once."""
    seen, out = set(), []
    for t in table.shipped():
        for row in t.rows:
            m = min(row["m"][0], 1024)
            for entry in row["try"]:
                cfg = repr(table.build(entry, m, N, K, 4, 128, 132, t.ikr_max_m))
                if cfg not in seen:
                    seen.add(cfg)
                    out.append(pytest.param(t, m, entry, id=f"{t.source.rsplit('/', 1)[-1]}-m{m}-{json.dumps(entry, sort_keys=True)}"))
    return out


@pytest.mark.parametrize("t,m,entry", _entries())
def test_every_table_entry_runs_right(device, t, m, entry):
    """Each entry, built as its table would build it here, computes x @ W^T (+ bias) to fp16 accuracy at
    W4 g128 asym (the scheme the tables are tuned on), output poisoned first."""
    codes, zeros, scales, gs, w_t = random_layer(N, K, 4, 128, False, seed=m)
    p = gptq_packed(codes, zeros, scales, 4, gs, 0, device)
    cfg = table.build(entry, m, N, K, 4, gs, 132, t.ikr_max_m)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).half()
    bias = torch.randn(N).half()
    out = torch.full((m, N), float("nan"), dtype=torch.float16, device=device)
    quant_matmul(x.to(device), p, bias.to(device), config=cfg, out=out)
    assert rel_err(out, x.double() @ w_t + bias.double()) < TOL[torch.float16], cfg


@pytest.mark.parametrize("bits,group_size", [(8, 128), (4, 64), (2, 32), (2, 128)])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_tuned_table_falls_back_for_other_schemes(device, bits, group_size, m):
    """A W4-tuned table asked for a layer its kernels cannot read (8 or 2 bits, groups of 64) answers with a
    config that still computes the right product (on the GPU too: 2 bits with groups smaller than the 256-deep
    chunk once picked a launch that needs more shared memory than an H200 has)."""
    tuned = [t for t in table.shipped() if not t.default]
    codes, zeros, scales, gs, w_t = random_layer(N, K, bits, group_size, False, seed=bits * m)
    p = gptq_packed(codes, zeros, scales, bits, gs, 0, device)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).half()
    for t in tuned + [table.default_table()]:
        cfg = pick_config(m, N, K, bits, gs, 132, t)
        out = torch.full((m, N), float("nan"), dtype=torch.float16, device=device)
        quant_matmul(x.to(device), p, config=cfg, out=out)
        assert rel_err(out, x.double() @ w_t) < TOL[torch.float16], (t.source, cfg)


def test_shipped_tables_one_default_distinct_devices():
    tables = table.shipped()
    assert sum(t.default for t in tables) == 1
    names = [d for t in tables for d in t.devices]
    assert len(names) == len(set(names)), names
    assert table.for_device("A GPU without a table") is table.default_table()


def _write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


VALID = {"schema": 1, "devices": ["Test GPU"], "rows": [{"m": [1, None], "class": "any", "try": [{"kernel": "dequant"}]}]}


def test_user_table_takes_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_HOME", str(tmp_path))
    table.for_device.cache_clear()
    try:
        path = table.user_path("Test GPU")
        path.parent.mkdir(parents=True)
        _write(path, VALID)
        assert table.for_device("Test GPU").source == str(path)
        assert pick_config(1, 4096, 4096, 4, 128, 132, device_name="Test GPU") is None  # its one row: dequantize + cuBLAS
    finally:
        table.for_device.cache_clear()


@pytest.mark.parametrize("text,names", [
    ("{not json", "cannot read it"),
    ({**VALID, "schema": 2}, "schema must be 1"),
    ({**VALID, "rows": []}, '"rows" must be a non-empty list'),
    ({**VALID, "colour": 1}, "unknown keys ['colour']"),
    ({**VALID, "rows": [{"m": [4, 2], "class": "any", "try": [{"kernel": "dequant"}]}]}, '"m" must be [lo, hi]'),
    ({**VALID, "rows": [{"m": [1, None], "class": "huge", "try": [{"kernel": "dequant"}]}]}, "class 'huge' is not defined"),
    ({**VALID, "rows": [{"m": [1, None], "class": "any", "try": [{"kernel": "marlin"}]}]}, '"kernel" is one of'),
    ({**VALID, "rows": [{"m": [1, None], "class": "any", "try": [{"kernel": "unpack4", "split_k": 3}]}]}, "unpack4.split_k = 3 is not valid"),
    ({**VALID, "rows": [{"m": [1, None], "class": "any", "try": [{"kernel": "gemv", "slab_n": 2048}]}]}, "not ['slab_n']"),
    ({**VALID, "classes": {"big": {"min_k": -1}}}, "min_k must be an integer >= 0"),
    ({**VALID, "moe_split": {"max_split": 8}}, '"moe_split" must be an object with per_sm or split_k'),
    ({**VALID, "moe_split": {"per_sm": 8, "max_split": 6}}, '"moe_split".max_split = 6 is not valid'),
])
def test_malformed_user_table_one_line(tmp_path, text, names):
    path = _write(tmp_path / "t.json", text)
    with pytest.raises(LowbitError) as err:
        table.load(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and names in message and "lowbit tune-kernels" in message


def test_tune_writes_a_table_that_keeps_the_default_within_margin(device, tmp_path, monkeypatch):
    """tune.tune on a small layer with two candidates and a scripted clock: a candidate 20% faster than the default
    table's choice goes first, one 2% faster does not (MARGIN); the table written after each shape loads back,
    and its rows cover M from 1 without gaps."""
    from lowbit.kernels import tune

    monkeypatch.setattr(tune, "candidates", lambda m: [{"kernel": "dequant"}])
    # per M: fp16, then the default's choice (the GEMV / split unpack), then dequantize + cuBLAS
    clock = iter([100.0, 50.0, 40.0, 100.0, 50.0, 49.0])
    path = tmp_path / "t.json"
    data = tune.tune([(256, 272)], [1, 2], device=device, timer=lambda fn: next(clock),
                     write=lambda d: path.write_text(json.dumps(d)))
    t = table.load(path)
    assert t.data["rows"] == data["rows"]
    (r1, r2) = data["rows"]
    assert r1["m"] == [1, 1] and r1["try"][0] == {"kernel": "dequant"}  # 20% faster: replaces the default
    assert r2["m"] == [2, None] and r2["try"][0]["kernel"] != "dequant"  # 2% faster: the default stays
    assert pick_config(1, 272, 256, 4, 128, 4, t) is None and pick_config(2, 272, 256, 4, 128, 4, t) is not None
