"""Shared fixtures: tiny offline models built with from_config, the real default model, GPU skips."""

from __future__ import annotations

import pytest
import torch


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
