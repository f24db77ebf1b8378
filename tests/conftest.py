"""Shared fixtures: tiny offline models built with from_config, the real default model, GPU skips."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:  # `pytest -n N` (scripts/test.sh): the N workers share the cores, so each takes its share of threads
        threads = str(max(1, (os.cpu_count() or 1) // int(workers)))
        torch.set_num_threads(int(threads))
        os.environ.setdefault("OMP_NUM_THREADS", threads)  # and so do the processes a test starts


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if has_gpu else 0
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))


def save_tiny_llama(path, hidden=256, intermediate=512, layers=2, vocab=512, heads=4, kv_heads=2, tie=False, seed=0):
    """A random tiny Llama checkpoint on disk (offline, from_config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512, tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def dying_on(real, call: int):
    """`real`, except that its `call`-th call (from 1) raises RuntimeError("simulated crash"): a run that
    dies part way, e.g. runner.block_tensors dying on block 1 after block 0's shard was flushed."""
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    return dying


@pytest.fixture
def tiny_llama(tmp_path):
    path = tmp_path / "tiny-llama"
    model = save_tiny_llama(path)
    return path, model


def save_tiny_model_with_tokenizer(path, text: str, **sizes):
    """A random tiny Llama plus a byte-level BPE tokenizer trained on `text` (everything offline); `sizes`
    override save_tiny_llama's (vocab must stay above the tokenizer's 400 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(path)
    save_tiny_llama(path, **{"hidden": 128, "intermediate": 256, "vocab": 512, **sizes})


# ---------------------------------------------------------------- the real default model (SmolLM2-135M), `slow` tests

@pytest.fixture(scope="session")
def smollm2_rtn(tmp_path_factory):
    """RTN exports of the real default model, each made once per session (per pytest-xdist process) and read by
    every test that needs that scheme: smollm2_rtn(bits, group_size, sym) -> (folder, summary)."""
    import lowbit

    made = {}

    def export(bits: int, group_size: int, sym: bool):
        if (bits, group_size, sym) not in made:
            out = tmp_path_factory.mktemp("smollm2") / f"rtn-w{bits}g{group_size}{'sym' if sym else 'asym'}"
            summary = lowbit.quantize("default", "rtn", lowbit.Scheme(bits, group_size, sym), run=lowbit.RunConfig(output_dir=str(out), device="cpu"),
                                      progress=False)
            made[bits, group_size, sym] = out, summary
        return made[bits, group_size, sym]

    return export


@pytest.fixture(scope="session")
def smollm2_cli_g64(tmp_path_factory):
    """`lowbit quantize default` W4 g64 asym auto_round, run as a user would (a subprocess): (folder, its
    CompletedProcess). tests/e2e/test_rtn_smollm2.py checks the run; the interop tests read its export."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("smollm2-cli") / "cli-out"
    run = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "default", "--method", "rtn", "--scheme", "W4A16", "--group_size", "64", "--asym",
                          "--format", "auto_round", "--output_dir", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=900)
    return out, run
