"""Local training precision: bf16 autocast runs the matmuls in bf16 and keeps the weights and adapter in fp32."""

from __future__ import annotations

import math

import pytest
import torch

from fairedge.common.config import RunConfig
from fairedge.common.task import client_partition, load_task, lora_model
from fairedge.common.training import train_client_round, uses_bf16


def test_auto_precision_is_bf16_only_on_a_gpu_that_supports_it(monkeypatch):
    assert not uses_bf16("auto", torch.device("cpu"))
    assert uses_bf16("bf16", torch.device("cpu")) and not uses_bf16("fp32", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert uses_bf16("auto", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not uses_bf16("auto", torch.device("cuda"))


def test_precision_field_refuses_an_unknown_value():
    with pytest.raises(ValueError, match="precision"):
        RunConfig.model_validate({"name": "x", "data": {"task": "shakespeare"}, "federation": {"precision": "fp16"}})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_causal_lm_client_round_trains_in_the_asked_precision(tiny_llama_dir, tmp_path, precision):
    cfg = RunConfig.model_validate(
        {
            "name": "precision-test",
            "output_dir": str(tmp_path / "runs"),
            "data": {"task": "shakespeare", "clients": ["hamlet/Ham", "othello/IAGO"], "seq_len": 32},
            "model": {"kind": "hf-causal-lm", "path": str(tiny_llama_dir)},
            "lora": {"rank": 4, "alpha": 8, "top_layers": 1},
            "federation": {"num_clients": 2, "local_steps": 3, "batch_size": 4, "lr": 0.02, "precision": precision},
        }
    )
    task = load_task(cfg)
    model = lora_model(cfg, task=task)
    seen: list[torch.dtype] = []
    lora_a = next(m for n, m in model.named_modules() if n.endswith("lora_A.default"))
    hook = lora_a.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = train_client_round(model, client_partition(cfg, 0, task=task), cfg.federation, seed=0)
    hook.remove()
    assert math.isfinite(loss)
    assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trained.values())  # mixed precision: fp32 master weights
    assert any(not torch.equal(p, before[n]) for n, p in trained.items())
