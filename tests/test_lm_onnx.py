"""ONNX export of a causal LM with past key values, and the torch-free greedy loop that runs it.

A tiny randomly initialised llama (2 layers, hidden 64, 4 heads / 2 KV heads) with SmolLM2's real tokenizer
(read from the GGUF) is exported once per module; the real SmolLM2 is exported by
`python -m fairedge.simulations.bench_lm_latency` only (it takes many minutes).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fairedge.common.lm_generate_ort import (
    CHAT_TEMPLATE_FILE,
    INT8_FILE,
    TOKENIZER_FILE,
    LmInfo,
    OrtCausalLM,
    input_names,
    output_names,
)
from fairedge.common.lm_onnx import (
    PARITY_TOLERANCE,
    export_causal_lm,
    lm_info,
    load_merged_causal_lm,
    logits_parity,
)
from fairedge.common.models.causal_lm import builtin_gguf_path, causal_lm_lora_config

pytestmark = pytest.mark.slow  # every test exports an ONNX graph first (tens of seconds)


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ],
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer():
    gguf = builtin_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _tiny_llama(tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.3,  # wide enough that greedy decoding does not repeat one token
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_llama(tokenizer)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("lm-onnx") / "tiny"
    export_causal_lm(model, tokenizer, folder, quantize=True, log=lambda _: None)
    return folder


@pytest.fixture(scope="module")
def ort_lm(exported) -> OrtCausalLM:
    return OrtCausalLM(exported, threads=1)


def _chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def _torch_greedy(model, tokenizer, ids: list[int], n: int = NEW_TOKENS) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


def _dims(value) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def test_graph_has_optimum_inputs_outputs_dynamic_axes_and_metadata(exported, model, tokenizer):
    proto = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    graph = proto.graph
    assert [i.name for i in graph.input] == input_names(2)
    assert [o.name for o in graph.output] == output_names(2)
    assert input_names(2)[3:] == [
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    dims = {v.name: _dims(v) for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["position_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert dims["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["logits"] == ["batch_size", "sequence_length", len(tokenizer)]
    assert dims["present.0.key"][:2] == ["batch_size", 2] and dims["present.0.key"][3] == 16
    assert proto.opset_import[0].version == 18

    meta = {p.key: p.value for p in proto.metadata_props}
    info = LmInfo.from_metadata(meta)
    assert info == lm_info(model, tokenizer)
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (2, 2, 16)
    assert info.eos_token_ids == (tokenizer.eos_token_id,) and info.has_chat_template and not info.quantized
    assert json.loads(meta["fairedge.format"]) == "causal-lm-with-past"
    assert (exported / TOKENIZER_FILE).is_file()
    assert (exported / CHAT_TEMPLATE_FILE).read_text() == tokenizer.chat_template


@pytest.mark.parametrize("chat", [0, 2])
def test_logits_match_pytorch_for_the_prompt_and_five_steps_with_past(model, tokenizer, ort_lm, chat):
    diffs = logits_parity(model, ort_lm, _chat_ids(tokenizer, CHATS[chat]), steps=5)
    assert len(diffs) == 6
    assert max(diffs) <= PARITY_TOLERANCE, diffs


def test_one_decoding_step_reads_the_past(model, tokenizer, ort_lm):
    """The same new token after two different pasts gives different logits: the cache is really used."""
    a, b = _chat_ids(tokenizer, CHATS[0]), _chat_ids(tokenizer, CHATS[1])
    outs = []
    for ids in (a, b):
        mask = np.ones((1, len(ids)), np.int64)
        _, past = ort_lm.forward(np.array([ids]), mask, ort_lm.empty_past(1))
        assert past["past_key_values.0.key"].shape == (1, 2, len(ids), 16)
        step = np.array([[42]])
        logits, grown = ort_lm.forward(step, np.concatenate([mask, [[1]]], axis=1), past)
        assert grown["past_key_values.1.value"].shape == (1, 2, len(ids) + 1, 16)
        outs.append(logits)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2


def test_greedy_ids_are_those_of_model_generate(model, tokenizer, ort_lm):
    for chat in CHATS:
        ids = _chat_ids(tokenizer, chat)
        want = _torch_greedy(model, tokenizer, ids)
        got = ort_lm.generate_ids([ids], NEW_TOKENS)[0]
        assert got == want
        assert len(set(want)) > 3  # a varied reply, not one token repeated


def test_a_left_padded_batch_generates_what_each_prompt_does_alone(tokenizer, ort_lm):
    prompts = [_chat_ids(tokenizer, chat) for chat in CHATS]
    prompts.append(prompts[0][-5:])  # a short one: every other row is left-padded
    alone = [ort_lm.generate_ids([p], NEW_TOKENS)[0] for p in prompts]
    assert ort_lm.generate_ids(prompts, NEW_TOKENS) == alone


def test_generation_stops_at_eos_unless_told_not_to(tokenizer, ort_lm):
    ids = _chat_ids(tokenizer, CHATS[0])
    first, second = ort_lm.generate_ids([ids], 2)[0]
    stopping = dataclasses.replace(ort_lm.info, eos_token_ids=(second,))
    lm = OrtCausalLM(ort_lm.path)
    lm.info = stopping
    assert lm.generate_ids([ids], NEW_TOKENS)[0] == [first, second]
    assert len(lm.generate_ids([ids], NEW_TOKENS, stop_at_eos=False)[0]) == NEW_TOKENS


def test_chat_prompts_render_as_transformers_renders_them(model, tokenizer, ort_lm):
    for chat in CHATS:
        assert ort_lm.render_chat(chat) == tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False
        )
        assert ort_lm.prompt_ids(chat) == _chat_ids(tokenizer, chat)
    assert ort_lm.prompt_ids("plain text") == tokenizer("plain text")["input_ids"]
    want = _torch_greedy(model, tokenizer, _chat_ids(tokenizer, CHATS[0]))
    assert ort_lm.generate(CHATS[0], max_new_tokens=NEW_TOKENS) == tokenizer.decode(want, skip_special_tokens=True)


def test_int8_copy_is_blockwise_quantised_smaller_and_still_generates_like_pytorch(model, tokenizer, exported):
    proto = onnx.load(str(exported / INT8_FILE))
    ops = [n.op_type for n in proto.graph.node]
    fp32_ops = [n.op_type for n in onnx.load(str(exported / "model.onnx")).graph.node]
    assert "MatMulNBits" in ops and "DynamicQuantizeLinear" not in ops
    blockwise = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in blockwise[0].attribute}["bits"] == 8
    assert len(blockwise) == fp32_ops.count("MatMul") - ops.count("MatMul")  # every weight MatMul, no other
    assert (exported / INT8_FILE).stat().st_size < 0.7 * (exported / "model.onnx").stat().st_size
    lm = OrtCausalLM(exported, quantized=True)
    assert lm.info.quantized and lm.info.num_layers == 2
    agree = []
    for chat in CHATS:
        ids = _chat_ids(tokenizer, chat)
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0].numpy()
        got = lm.forward(np.array([ids]), np.ones((1, len(ids)), np.int64), lm.empty_past(1))[0][0]
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98
        agree.append(float((got.argmax(-1) == want.argmax(-1)).mean()))
        first = lm.generate_ids([ids], NEW_TOKENS)[0]
        assert first[0] == _torch_greedy(model, tokenizer, ids, 1)[0]
    assert np.mean(agree) > 0.8, agree


def test_generation_module_runs_without_torch_or_transformers(exported):
    code = (
        "import sys\n"
        "from fairedge.common.lm_generate_ort import OrtCausalLM\n"
        f"lm = OrtCausalLM({str(exported)!r}, quantized=True)\n"
        "print(repr(lm.generate([{'role': 'user', 'content': 'Hello'}], max_new_tokens=4)))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'onnx', 'sklearn', 'flwr') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("'")


def test_a_merged_lora_adapter_gives_the_peft_model_logits(tmp_path, model, tokenizer):
    folder, adapter = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(1)
    cfg = causal_lm_lora_config(rank=4, alpha=8, targets="attention")
    cfg.init_lora_weights = False  # non-zero B, so the merge changes the weights
    get_peft_model(_tiny_llama(tokenizer), cfg).save_pretrained(adapter)
    merged, _ = load_merged_causal_lm(folder, adapter)
    assert not hasattr(merged, "peft_config")
    ids = torch.tensor([_chat_ids(tokenizer, CHATS[0])])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(_tiny_llama(tokenizer), adapter).eval()(ids).logits
        base_logits = model(ids).logits
        merged_logits = merged(ids).logits
    assert torch.allclose(merged_logits, peft_logits, atol=1e-4)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-2)


def test_export_refuses_unmerged_or_half_precision_models_and_leaves_nothing(tmp_path, model, tokenizer):
    peft_model = get_peft_model(_tiny_llama(tokenizer), causal_lm_lora_config(rank=2, alpha=4))
    with pytest.raises(TypeError, match="merge_and_unload"):
        export_causal_lm(peft_model, tokenizer, tmp_path / "a", log=lambda _: None)
    with pytest.raises(ValueError, match="float32"):
        export_causal_lm(_tiny_llama(tokenizer).to(torch.bfloat16), tokenizer, tmp_path / "b", log=lambda _: None)
    assert not any(tmp_path.iterdir())


def test_a_failed_parity_check_leaves_no_export(tmp_path, model, tokenizer, monkeypatch):
    from fairedge.common import lm_onnx

    monkeypatch.setattr(lm_onnx, "PARITY_TOLERANCE", 0.0)
    with pytest.raises(RuntimeError, match="differ from PyTorch"):
        export_causal_lm(model, tokenizer, tmp_path / "out", quantize=False, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_metadata_of_another_model_is_refused_by_name():
    with pytest.raises(ValueError, match="fairedge.format"):
        LmInfo.from_metadata({"fairedge.task": '"text"'}, "classifier.onnx")
    good = dict(LmInfo(2, 2, 16, 100, (2,), 2, True, False).to_metadata())
    del good["fairedge.head_dim"]
    with pytest.raises(ValueError, match="fairedge.head_dim"):
        LmInfo.from_metadata(good)


def test_a_template_that_rejects_a_chat_raises_its_message(exported, tmp_path):
    import shutil

    from jinja2.exceptions import TemplateError

    folder = tmp_path / "strict"
    shutil.copytree(exported, folder)
    (folder / CHAT_TEMPLATE_FILE).write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('chats must start with a user turn') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    lm = OrtCausalLM(folder)
    assert lm.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(TemplateError, match="start with a user turn"):
        lm.render_chat([{"role": "assistant", "content": "hi"}])
