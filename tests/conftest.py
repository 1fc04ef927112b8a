"""Shared fixtures: SmolLM2's real tokenizer and a tiny llama built on it (causal-LM tests); a tiny DINOv2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from tests.tiny_dinov2 import save_tiny_dinov2


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The built-in SmolLM2's tokenizer (with its chat template), read from the GGUF that ships it."""
    from fairedge.common.models.causal_lm import builtin_gguf_path

    gguf = builtin_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny llama (2 layers, hidden 32) with SmolLM2's tokenizer, saved as a Hugging Face folder."""
    tokenizer = smollm2_tokenizer
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the test model's weights; the RNG is restored below
    LlamaForCausalLM(config).save_pretrained(folder)
    torch.random.set_rng_state(generator_state)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dinov2_4_dir(tmp_path_factory) -> Path:
    """A tiny DINOv2 of 4 blocks (the cheap mode needs blocks below and above the cut)."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2-4"), layers=4)
