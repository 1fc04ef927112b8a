"""Causal LMs: the cached conversion of the built-in GGUF, loading, LoRA adapters PEFT reloads, loss and metrics.

Fast tests use a tiny randomly initialised llama with the real SmolLM2 tokenizer (read from the GGUF);
one slow test loads the real converted SmolLM2.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from platformdirs import user_cache_dir
from transformers import AutoModelForCausalLM, BertConfig, BertModel

from fairedge.common.config import CACHE_ENV
from fairedge.common.data.lm_batches import build_examples, iterate_batches, special_ids, tokenize_plain
from fairedge.common.data.shakespeare import load_shakespeare
from fairedge.common.models import causal_lm
from fairedge.common.models.causal_lm import (
    builtin_model_dir,
    causal_lm_lora_config,
    file_sha256,
    generate_greedy,
    lm_loss,
    lm_metrics,
    load_causal_lm,
    lora_target_modules,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir) -> Path:
    return tiny_llama_dir


def _batch(tokenizer, texts: list[str], seq_len: int = 24) -> dict[str, torch.Tensor]:
    eos, pad = special_ids(tokenizer)
    examples = build_examples(tokenize_plain(tokenizer, texts), seq_len=seq_len, pack=False, eos_id=eos, pad_id=pad)
    return next(iterate_batches(examples, batch_size=len(examples)))


# --- the cached conversion ----------------------------------------------------------------------------------


def test_file_sha256_is_remembered_per_path_size_and_mtime(tmp_path):
    data = tmp_path / "weights.gguf"
    data.write_bytes(os.urandom(3 << 20))
    memo = tmp_path / "memo.json"
    expected = hashlib.sha256(data.read_bytes()).hexdigest()
    assert file_sha256(data, memo=memo) == expected
    # A remembered hash is returned without reading the file again...
    entries = json.loads(memo.read_text())
    entries[str(data.resolve())]["sha256"] = "remembered"
    memo.write_text(json.dumps(entries))
    assert file_sha256(data, memo=memo) == "remembered"
    # ...until the file changes.
    data.write_bytes(os.urandom(3 << 20))
    assert file_sha256(data, memo=memo) == hashlib.sha256(data.read_bytes()).hexdigest()


def test_builtin_model_dir_converts_once_into_a_folder_named_by_the_hash(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a gguf")
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    calls = []

    def fake_convert(src, out, *, sha256, log):
        calls.append((src, out.parent, sha256))
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(causal_lm, "convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    folder = builtin_model_dir(cache, gguf_path=gguf, log=lambda _: None)
    assert folder == cache / f"SmolLM2-135M-Instruct-{sha[:16]}"
    assert (folder / "config.json").is_file()
    assert builtin_model_dir(cache, gguf_path=gguf, log=lambda _: None) == folder
    assert calls == [(gguf, cache, sha)]
    assert not list(cache.glob(".*.tmp"))  # the temporary folder was renamed, not left behind


def test_a_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x")

    def broken_convert(src, out, *, sha256, log):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(causal_lm, "convert_gguf", broken_convert)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk full"):
        builtin_model_dir(cache, gguf_path=gguf, log=lambda _: None)
    assert not [p for p in cache.iterdir() if p.is_dir()]


# --- loading ------------------------------------------------------------------------------------------------


def test_load_causal_lm_gives_fp32_on_cpu_and_honours_dtype(tiny_dir):
    model, tok = load_causal_lm(tiny_dir)
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    assert tok.pad_token_id is not None
    model16, _ = load_causal_lm(tiny_dir, dtype=torch.bfloat16)
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_load_causal_lm_refuses_a_folder_that_is_not_a_causal_lm(tmp_path):
    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert' model .* not a causal language model"):
        load_causal_lm(tmp_path / "bert")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_causal_lm(tmp_path / "missing")


# --- LoRA ---------------------------------------------------------------------------------------------------


def test_lora_targets_presets_and_lists():
    assert lora_target_modules("attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_target_modules("all-linear") == "all-linear"
    assert lora_target_modules(["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="allowed are"):
        lora_target_modules("attn")
    with pytest.raises(ValueError, match="non-empty"):
        lora_target_modules([])


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
        ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_lora_config_adapts_the_targeted_layers(tiny_dir, targets, expected):
    model, _ = load_causal_lm(tiny_dir)
    peft_model = get_peft_model(model, causal_lm_lora_config(rank=4, alpha=8, targets=targets))
    adapted = {name.split(".")[-4] for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    assert adapted == expected  # never lm_head
    assert peft_model.peft_config["default"].task_type == "CAUSAL_LM"


def test_saved_adapter_reloads_with_plain_peft_and_gives_the_same_logits(tiny_dir, tokenizer, tmp_path):
    model, _ = load_causal_lm(tiny_dir)
    peft_model = get_peft_model(model, causal_lm_lora_config(rank=4, alpha=8))
    batch = _batch(tokenizer, ["To be, or not to be, that is the question."])
    with torch.no_grad():
        base = peft_model(input_ids=batch["input_ids"]).logits
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        lm_loss(peft_model, batch).backward()
        optimizer.step()
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(input_ids=batch["input_ids"]).logits
    assert (tuned - base).abs().max() > 1e-4  # the adapter changes the model
    peft_model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        again = reloaded(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(again, tuned, atol=1e-5, rtol=1e-5)


# --- loss, metrics, generation ------------------------------------------------------------------------------


def test_lm_loss_is_hugging_faces_shifted_cross_entropy(tiny_dir, tokenizer):
    model, _ = load_causal_lm(tiny_dir)
    batch = _batch(tokenizer, ["Good night, sweet prince.", "Alas, poor Yorick!"])
    batch["labels"][0, :3] = -100  # some positions take no part
    expected = model(**batch).loss  # transformers shifts the labels itself
    torch.testing.assert_close(lm_loss(model, batch), expected)


def test_lm_metrics_are_token_weighted_over_batches(tiny_dir, tokenizer):
    model, _ = load_causal_lm(tiny_dir)
    short = _batch(tokenizer, ["Adieu."])
    long = _batch(tokenizer, ["Now is the winter of our discontent made glorious summer by this sun of York."])
    metrics = lm_metrics(model, [short, long])
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in (short, long)]
    assert metrics["tokens"] == sum(counts)
    with torch.no_grad():
        sums = [lm_loss(model, b).item() * n for b, n in zip((short, long), counts)]
    assert metrics["loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)
    # accuracy: the share of next tokens the argmax gets right
    with torch.no_grad():
        logits = model(input_ids=long["input_ids"], attention_mask=long["attention_mask"]).logits[:, :-1]
    targets = long["labels"][:, 1:]
    right = ((logits.argmax(-1) == targets) & (targets != -100)).sum().item()
    long_only = lm_metrics(model, [long])
    assert long_only["accuracy"] == pytest.approx(right / counts[1])
    with pytest.raises(ValueError, match="no label tokens"):
        lm_metrics(model, [])


def test_generate_greedy_is_the_argmax_continuation(tiny_dir):
    model, tok = load_causal_lm(tiny_dir)
    prompt = "Friends, Romans, countrymen"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    expected = tok.decode(ids[0, -5:], skip_special_tokens=True)
    assert generate_greedy(model, tok, prompt, max_new_tokens=5) == expected


def test_generate_greedy_renders_messages_with_the_chat_template(tiny_dir):
    model, tok = load_causal_lm(tiny_dir)
    messages = [{"role": "user", "content": "Hello"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert generate_greedy(model, tok, messages, max_new_tokens=4) == generate_greedy(
        model, tok, prompt, max_new_tokens=4
    )


# --- the real model -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_answers_sensibly_and_knows_shakespeare():
    torch.set_num_threads(2)
    folder = builtin_model_dir(Path(os.environ.get(CACHE_ENV) or user_cache_dir("fairedge")))
    assert not (folder / "config.json").read_text().count("quantization_config")
    model, tok = load_causal_lm(folder)
    reply = generate_greedy(model, tok, [{"role": "user", "content": "What is the capital of France?"}], 16)
    assert "Paris" in reply
    roles = load_shakespeare(min_lines=200)
    lines = [line for key in sorted(roles)[:4] for line in roles[key].test[:20]]
    eos, pad = special_ids(tok)
    examples = build_examples(tokenize_plain(tok, ["\n".join(lines)]), seq_len=128, pack=True, eos_id=eos, pad_id=pad)
    metrics = lm_metrics(model, iterate_batches(examples, batch_size=4))
    assert metrics["tokens"] > 500
    assert 1.0 < metrics["perplexity"] < 200.0
