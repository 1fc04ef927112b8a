"""Federated fine-tuning of a causal LM end to end: Shakespeare and chat clients, every aggregation rule,
ComPEFT, resume, the run folder a user opens, and `fairedge-sim generate`.

A tiny llama with SmolLM2's real tokenizer stands in for the model (`model.path`); the data is the real
Shakespeare text and chat JSONL written here. The real SmolLM2 is loaded by the slow test in
test_causal_lm.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fairedge.common.config import AGGREGATION_METHODS, RunConfig, load_config
from fairedge.common.run_model import load_run_model
from fairedge.common.task import load_task
from fairedge.simulations.cli import main as sim_main
from fairedge.simulations.simulate import simulate

ROLES = ["hamlet/Ham", "macbeth/MACBETH", "othello/IAGO"]


def lm_config(model_dir: Path, tmp_path: Path, **sections) -> RunConfig:
    values = {
        "name": "lm-test",
        "output_dir": str(tmp_path / "runs"),
        "data": {"task": "shakespeare", "clients": ROLES, "seq_len": 32, "max_eval_tokens": 64, "reply_tokens": 4},
        "model": {"kind": "hf-causal-lm", "path": str(model_dir)},
        "lora": {"rank": 4, "alpha": 8},
        "federation": {"num_clients": 3, "rounds": 2, "local_steps": 3, "batch_size": 4, "lr": 0.02},
        "aggregation": {"method": "lora_fair"},
        "compression": {"enabled": True, "density": 0.1},
    }
    for section, updates in sections.items():
        values[section] = {**values.get(section, {}), **updates} if isinstance(updates, dict) else updates
    return RunConfig.model_validate(values)


def test_shakespeare_clients_are_roles_with_held_out_text_split_by_position(tiny_llama_dir, tmp_path):
    cfg = lm_config(tiny_llama_dir, tmp_path)
    task = load_task(cfg)
    assert task.kind == "causal-lm" and task.domains == ROLES
    for i in range(len(ROLES)):
        train, test = (task.train.domain == i).sum().item(), (task.test.domain == i).sum().item()
        assert train > 0 and test > 0
    # a held-out budget of 64 tokens per client: 2 rows of 32
    assert task.test.label_tokens <= len(ROLES) * 64
    drawn = load_task(lm_config(tiny_llama_dir, tmp_path, data={"clients": None}))
    assert (
        len(drawn.domains) == 3
        and drawn.domains == load_task(lm_config(tiny_llama_dir, tmp_path, data={"clients": None})).domains
    )  # the same draw from the same seed


def test_federated_shakespeare_run_lowers_perplexity_and_leaves_a_peft_adapter(tiny_llama_dir, tmp_path):
    cfg = lm_config(tiny_llama_dir, tmp_path)
    run_dir = tmp_path / "run"
    record = simulate(cfg, run_dir, engine="inprocess")
    s = record.summary()
    assert s["final_mean_perplexity"] < s["base_mean_perplexity"]  # a random tiny model learns fast
    assert s["uplink_ratio_vs_fp32"] > 10  # ComPEFT at 10 % density
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for row in metrics["rounds"]:
        assert set(row["perplexity"]) == set(ROLES)
        assert all(math.isfinite(v) and v > 1 for v in row["perplexity"].values())
        assert row["worst_perplexity"] == max(row["perplexity"].values())
        geomean = math.exp(sum(row["loss"].values()) / len(row["loss"]))
        assert row["geomean_perplexity"] == pytest.approx(geomean) and geomean <= row["mean_perplexity"]
    assert s["final_geomean_perplexity"] == metrics["rounds"][-1]["geomean_perplexity"]
    report = (run_dir / "report.md").read_text()
    assert "Held-out perplexity per client" in report and "Greedy replies" in report
    assert f"{s['base_geomean_perplexity']:.2f} → {s['final_geomean_perplexity']:.2f}" in report
    assert (run_dir / "perplexity.png").read_bytes().startswith(b"\x89PNG")
    assert [x["prompt"] for x in metrics["samples"]] == ["O gentle night, that", "My lord, I come to tell you"]

    # the adapter is a plain PEFT adapter of the model folder, and equals what the run trained
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), run_dir / "adapter")
    _, merged = load_run_model(run_dir)
    ids = torch.tensor([[1, 50, 200, 3000, 7]])
    assert torch.allclose(peft(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_top_layers_and_all_linear_choose_what_lora_adapts(tiny_llama_dir, tmp_path):
    from fairedge.common.lora import get_lora_factors
    from fairedge.common.task import lora_model

    top = get_lora_factors(lora_model(lm_config(tiny_llama_dir, tmp_path, lora={"top_layers": 1})))
    assert top and all(".layers.1." in name for name in top)
    linear = get_lora_factors(lora_model(lm_config(tiny_llama_dir, tmp_path, lora={"target_modules": ["all-linear"]})))
    kinds = {name.rsplit(".", 1)[-1] for name in linear}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.slow
@pytest.mark.parametrize("method", AGGREGATION_METHODS)
def test_every_aggregation_rule_runs_on_a_causal_lm(tiny_llama_dir, tmp_path, method):
    cfg = lm_config(
        tiny_llama_dir,
        tmp_path,
        aggregation={"method": method},
        federation={"rounds": 1, "local_steps": 2},
        compression={"enabled": method not in ("flora", "fedex_lora")},
    )
    record = simulate(cfg, tmp_path / method, engine="inprocess")
    final = record.rounds[-1]
    assert final["aggregated"] and all(math.isfinite(v) for v in final["perplexity"].values())
    if method in ("flora", "fedex_lora"):  # the base change travels factored and is saved beside the adapter
        assert load_file(str(tmp_path / method / "base_delta.safetensors"))


@pytest.mark.slow
def test_resumed_lm_run_ends_where_an_uninterrupted_one_does(tiny_llama_dir, tmp_path):
    plain = lm_config(tiny_llama_dir, tmp_path, compression={"enabled": False})
    whole = simulate(plain, tmp_path / "whole", engine="inprocess")
    simulate(plain.model_copy(update={"federation": plain.federation.model_copy(update={"rounds": 1})}),
             tmp_path / "split", engine="inprocess")  # fmt: skip
    resumed = simulate(plain, tmp_path / "split", engine="inprocess", resume=True)
    assert resumed.rounds[-1]["perplexity"] == pytest.approx(whole.rounds[-1]["perplexity"], rel=1e-6)


def _write_chat(path: Path) -> None:
    records = []
    for client in ("ann", "bob"):
        for i in range(6):
            records.append(
                {
                    "client": client,
                    "messages": [
                        {"role": "user", "content": f"Hello {client}, how is day {i}?"},
                        {"role": "assistant", "content": f"Day {i} was lovely, thank you for asking!"},
                    ],
                }
            )
    records.append({"client": "bob", "instruction": "Name a colour.", "input": "", "output": "Blue."})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_chat_clients_from_jsonl_train_on_assistant_tokens_and_generate(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    _write_chat(data)
    cfg = lm_config(
        tiny_llama_dir,
        tmp_path,
        data={"task": "chat", "path": str(data), "clients": None, "min_lines": 2, "seq_len": 64},
        federation={"num_clients": 2, "rounds": 1},
    )
    task = load_task(cfg)
    assert task.domains == ["ann", "bob"]
    scored = task.train.labels != -100
    assert 0 < scored.sum() < task.train.attention_mask.sum()  # the user's turns are not trained on
    run_dir = tmp_path / "chat-run"
    simulate(cfg, run_dir, engine="inprocess")
    assert sim_main(["generate", str(run_dir), "--prompt", "Hi there", "--max-new-tokens", "3"]) == 0
    assert "> Hi there" in capsys.readouterr().out


def test_a_supernodes_own_chat_file_is_one_client(tiny_llama_dir, tmp_path):
    from fairedge.client.client_app import node_run_config
    from fairedge.common.task import config_json

    data = tmp_path / "mine.jsonl"
    _write_chat(data)
    cfg = lm_config(tiny_llama_dir, tmp_path, data={"task": "chat", "clients": None, "min_lines": 2})
    node_cfg = node_run_config(config_json(cfg), {"data-path": str(data)})
    assert load_task(node_cfg).domains == ["mine"]


def test_bad_lm_configs_name_the_field(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="hf-causal-lm"):
        RunConfig.model_validate({"data": {"task": "shakespeare"}})
    with pytest.raises(ValueError, match="data.clients"):
        load_task(lm_config(tiny_llama_dir, tmp_path, data={"clients": ["hamlet/NOBODY"]}))
    with pytest.raises(ValueError, match="top_layers"):
        RunConfig.model_validate({"lora": {"top_layers": 2}})


def test_demo_config_is_the_mission_pipeline():
    cfg = load_config(Path(__file__).parents[1] / "simulations" / "configs" / "shakespeare.toml")
    assert cfg.model.kind == "hf-causal-lm" and cfg.model.path is None  # the built-in SmolLM2
    assert cfg.data.task == "shakespeare"
    assert cfg.aggregation.method == "lora_fair"
    assert cfg.compression.enabled and cfg.compression.error_feedback


@pytest.mark.slow
def test_fairedge_server_exports_an_lm_run_that_generates_like_pytorch(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from fairedge.common.lm_generate_ort import OrtCausalLM
    from fairedge.common.models.causal_lm import generate_greedy
    from fairedge.server.cli import main as server_main

    run_dir = tmp_path / "run"
    simulate(lm_config(tiny_llama_dir, tmp_path, federation={"rounds": 1}), run_dir, engine="inprocess")
    assert server_main(["export", str(run_dir)]) == 0
    _, merged = load_run_model(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = [{"role": "user", "content": "Speak, my lord"}]
    assert OrtCausalLM(run_dir / "onnx").generate(prompt, max_new_tokens=6) == generate_greedy(
        merged, tokenizer, prompt, max_new_tokens=6
    )
