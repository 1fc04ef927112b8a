"""LoRA through PEFT: factor and head access, trainability, merge algebra, save/reload."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from fairedge.common.lora import (
    add_lora,
    get_head_state,
    get_lora_factors,
    lora_scale,
    save_adapter,
    set_head_state,
    set_lora_factors,
)
from fairedge.common.models import build_vision_classifier

RANK, ALPHA = 4, 8.0
LAYERS = [f"vit.layers.{i}.attention.{p}" for i in range(4) for p in ("q_proj", "v_proj")]


def _base():
    return build_vision_classifier(image_size=16, num_channels=1, num_classes=10, seed=0)


@pytest.fixture
def model() -> PeftModel:
    return add_lora(_base(), rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _random_factors(model: PeftModel, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g))
        for name, (a, b) in get_lora_factors(model).items()
    }


def test_layer_names_shapes_and_scale(model) -> None:
    factors = get_lora_factors(model)
    assert list(factors) == LAYERS
    for a, b in factors.values():
        assert a.shape == (RANK, 64) and b.shape == (64, RANK)
        assert a.dtype == b.dtype == torch.float32 and not a.requires_grad
        assert torch.count_nonzero(b) == 0  # PEFT's default init: B = 0, so the adapter starts as a no-op
    assert lora_scale(model) == ALPHA / RANK
    layer = model.get_base_model().vit.layers[0].attention.q_proj
    assert layer.scaling["default"] == lora_scale(model)
    assert model.lora_targets == ("q_proj", "v_proj")  # attribute access reaches the wrapped model


def test_only_lora_and_head_are_trainable(model) -> None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(LAYERS) + 2
    assert all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in trainable)
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 100_000


def test_factors_round_trip_and_are_copies(model) -> None:
    x = torch.randn(3, 1, 16, 16)
    before = model(**model.prepare(x))
    factors = _random_factors(model)
    set_lora_factors(model, factors)
    got = get_lora_factors(model)
    assert got.keys() == factors.keys()
    for name in factors:
        assert torch.equal(got[name][0], factors[name][0]) and torch.equal(got[name][1], factors[name][1])
    assert not torch.allclose(model(**model.prepare(x)), before)
    got[LAYERS[0]][0].zero_()  # returned tensors are copies, not views of the model
    assert torch.equal(get_lora_factors(model)[LAYERS[0]][0], factors[LAYERS[0]][0])


def test_set_factors_rejects_unknown_names_and_wrong_shapes(model) -> None:
    good = get_lora_factors(model)
    with pytest.raises(KeyError, match="nope"):
        set_lora_factors(model, {"nope": good[LAYERS[0]]})
    bad = dict(_random_factors(model))
    a, b = bad[LAYERS[3]]
    bad[LAYERS[3]] = (a, b.T.contiguous())
    with pytest.raises(ValueError, match=LAYERS[3].replace(".", r"\.")):
        set_lora_factors(model, bad)
    for name, (a0, b0) in get_lora_factors(model).items():  # nothing was copied
        assert torch.equal(a0, good[name][0]) and torch.equal(b0, good[name][1])


def test_merged_weight_is_w0_plus_s_b_a(model) -> None:
    set_lora_factors(model, _random_factors(model))
    name = "vit.layers.2.attention.v_proj"
    w0 = model.get_base_model().vit.layers[2].attention.v_proj.base_layer.weight.detach().clone()
    a, b = get_lora_factors(model)[name]
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        logits = model(**model.prepare(x))
        merged = copy.deepcopy(model).merge_and_unload()
        assert torch.allclose(merged.vit.layers[2].attention.v_proj.weight, w0 + lora_scale(model) * b @ a, atol=1e-5)
        assert torch.allclose(merged(**merged.prepare(x)), logits, atol=1e-4)


def test_head_state_round_trip_and_errors(model) -> None:
    state = get_head_state(model)
    assert set(state) == {"classifier.weight", "classifier.bias"}
    assert state["classifier.weight"].shape == (10, 64)
    new = {k: torch.randn_like(v) for k, v in state.items()}
    set_head_state(model, new)
    got = get_head_state(model)
    assert all(torch.equal(got[k], new[k]) for k in new)
    # The trained copy is what the forward pass uses.
    head = model.get_base_model().classifier.modules_to_save["default"]
    assert torch.equal(head.weight, new["classifier.weight"])
    with pytest.raises(KeyError, match="classifier.nope"):
        set_head_state(model, {"classifier.nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="classifier.bias"):
        set_head_state(model, {"classifier.bias": torch.zeros(3)})


def test_saved_adapter_reloads_with_identical_logits(model, tmp_path) -> None:
    set_lora_factors(model, _random_factors(model))
    set_head_state(model, {k: torch.randn_like(v) for k, v in get_head_state(model).items()})
    save_adapter(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_base(), tmp_path / "adapter")
    x = torch.randn(5, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**loaded.prepare(x)), model(**model.prepare(x)))


def test_lora_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = get_lora_factors(add_lora(_base(), rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=["q_proj"], seed=5))
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(123)  # the caller's own RNG use does not leak into the adapter
    b = get_lora_factors(add_lora(_base(), rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=["q_proj"], seed=5))
    c = get_lora_factors(add_lora(_base(), rank=RANK, alpha=ALPHA, dropout=0.0, target_modules=["q_proj"], seed=6))
    assert all(torch.equal(a[k][0], b[k][0]) for k in a)
    assert not any(torch.equal(a[k][0], c[k][0]) for k in a)
    assert all(a[k][0].abs().sum() > 0 for k in a)  # A is drawn, not zero


SAVE_SCRIPT = """
import sys
from fairedge.common.lora import add_lora, save_adapter
from fairedge.common.models import build_vision_classifier

base = build_vision_classifier(image_size=16, num_channels=1, num_classes=10, seed=0)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]
save_adapter(add_lora(base, rank=2, alpha=4.0, dropout=0.0, target_modules=targets, seed=1), sys.argv[1])
"""


@pytest.mark.slow
def test_saved_adapter_files_are_byte_identical_across_processes(tmp_path) -> None:
    """PEFT keeps target_modules as a set, whose order follows the string hash seed of the process."""
    outs = [tmp_path / f"hashseed-{seed}" for seed in (1, 2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAVE_SCRIPT, str(out)],
            env={**os.environ, "PYTHONHASHSEED": str(seed), "OMP_NUM_THREADS": "1"},
        )
        for seed, out in zip((1, 2), outs)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    files = sorted(f.name for f in outs[0].iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert sorted(f.name for f in outs[1].iterdir()) == files
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    config = json.loads((outs[0] / "adapter_config.json").read_text())
    assert config["target_modules"] == ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]
