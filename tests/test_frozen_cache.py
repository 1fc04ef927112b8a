"""hf-vision with `lora.top_layers`: LoRA on the top blocks only, the frozen blocks below computed once per image.

The cached path (`prepare` -> hidden states -> top blocks) must give the full model's logits; the store's key
must change with everything the hidden states depend on and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

from fairedge.common.config import ConfigError, build_config, load_config, to_toml
from fairedge.common.lora import get_base_weights, set_base_weights
from fairedge.common.models import frozen_cache
from fairedge.common.models.frozen_cache import frozen_fingerprint, image_keys
from fairedge.common.models.hf_vision import HFVisionClassifier, load_hf_vision_classifier
from fairedge.common.run_model import load_run_model
from fairedge.common.task import client_partition, load_task, lora_model
from fairedge.common.training import train_local


@pytest.fixture(autouse=True)
def _empty_store():
    frozen_cache.clear()
    yield
    frozen_cache.clear()


def _cfg(tmp_path: Path, model_dir: Path, top: int | None = 2, **model: object):
    return build_config(
        {
            "data": {"task": "digit-shift", "samples_per_domain": 20, "domains": ["mnist", "digits"]},
            "model": {
                "kind": "hf-vision",
                "path": str(model_dir),
                "image_size": 28,
                "cache_dir": str(tmp_path),
                **model,
            },
            "federation": {"num_clients": 2},
            "lora": {"rank": 2, "alpha": 4, "top_layers": top},
        }
    )


def _classifier(model) -> HFVisionClassifier:
    return model.get_base_model()


def test_cached_path_gives_the_full_models_logits_after_training(tmp_path, tiny_dinov2_4_dir):
    cfg = _cfg(tmp_path, tiny_dinov2_4_dir)
    task = load_task(cfg)
    model = lora_model(cfg, task=task)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    assert trainable and all(".layer.2." in n or ".layer.3." in n for n in trainable)  # top 2 of 4 blocks
    assert _classifier(model).frozen_cache is not None
    train_local(model, client_partition(cfg, 0, task=task), steps=3, batch_size=8, lr=2e-2)
    assert any(b.abs().sum() > 0 for n, b in model.named_parameters() if "lora_B" in n)
    # a base-weight change of the adapted blocks (FLoRA, FedEx-LoRA) is outside the frozen part: still exact
    base = get_base_weights(model)
    set_base_weights(model, {k: w + 0.01 * torch.randn_like(w) for k, w in base.items()})
    x = task.test.x[:8]
    with torch.no_grad():
        inputs = model.prepare(x)
        assert set(inputs) == {"hidden_states"} and inputs["hidden_states"].shape == (8, 1 + 16, 32)
        full = model(pixel_values=x)
        cached = model(**inputs)
    assert (full - cached).abs().max() <= 1e-5
    assert frozen_cache.held_bytes() > 0

    # the exported/rebuilt model is the full one and takes pixels
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(cfg))
    set_base_weights(model, base)
    model.save_pretrained(str(run / "adapter"))
    _, merged = load_run_model(run, task=task)
    assert merged.frozen_cache is None and set(merged.prepare(x)) == {"pixel_values"}
    with torch.no_grad():
        assert (merged(pixel_values=x) - model(**model.prepare(x))).abs().max() <= 1e-5


def test_cached_path_matches_a_vit_backbone_too(tmp_path):
    folder = tmp_path / "vit"
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=28,
            patch_size=7,
        )
    ).save_pretrained(folder)
    model = lora_model(_cfg(tmp_path, folder, top=1))
    x = torch.rand(5, 3, 28, 28) * 2 - 1
    with torch.no_grad():
        assert (model(pixel_values=x) - model(**model.prepare(x))).abs().max() <= 1e-5


def test_each_image_is_computed_once_and_the_budget_bounds_the_store(tmp_path, tiny_dinov2_4_dir, monkeypatch):
    model = lora_model(_cfg(tmp_path, tiny_dinov2_4_dir))
    classifier = _classifier(model)
    computed: list[int] = []
    original = HFVisionClassifier.hidden_before_block

    def counting(self, pixels, start):
        computed.append(len(pixels))
        return original(self, pixels, start)

    monkeypatch.setattr(HFVisionClassifier, "hidden_before_block", counting)
    x = torch.rand(6, 3, 28, 28) * 2 - 1
    first = model.prepare(x[:4])["hidden_states"]
    again = model.prepare(x[[3, 5, 0]])["hidden_states"]  # two held, one new
    assert computed == [4, 1]
    assert torch.equal(again[0], first[3]) and torch.equal(again[2], first[0])
    per_image = first[0].numel() * 4
    assert frozen_cache.held_bytes() == 5 * per_image

    frozen_cache.clear()
    classifier.use_frozen_cache(2, max_bytes=2 * per_image)  # room for two images
    computed.clear()
    model.prepare(x[:4])
    out = model.prepare(x[:4])["hidden_states"]
    assert computed == [4, 2] and frozen_cache.held_bytes() == 2 * per_image
    assert torch.allclose(out, first, atol=1e-6)  # not held: recomputed, the same


def test_the_key_changes_with_what_the_hidden_states_depend_on(tmp_path, tiny_dinov2_4_dir):
    model = load_hf_vision_classifier(tiny_dinov2_4_dir, num_classes=10, image_size=28)
    key = frozen_fingerprint(model, 2)
    assert frozen_fingerprint(model, 2) == key
    assert frozen_fingerprint(model, 3) != key  # another block
    other_size = load_hf_vision_classifier(tiny_dinov2_4_dir, num_classes=10, image_size=14)
    assert frozen_fingerprint(other_size, 2) != key
    with torch.no_grad():
        model.backbone.encoder.layer[3].attention.q_proj.weight.add_(1.0)  # an adapted block: not part of the key
        assert frozen_fingerprint(model, 2) == key
        model.backbone.encoder.layer[1].mlp.fc1.weight[0, 0] += 1e-3  # a frozen block
        assert frozen_fingerprint(model, 2) != key
    x = torch.zeros(2, 3, 28, 28)
    x[1, 0, 5, 5] = 1e-3
    a, b = image_keys(x)
    assert a != b and image_keys(x[:1]) == [a]
    assert image_keys(x[:1, :, :14, :14]) != [a]


def test_the_frozen_cache_refuses_what_would_make_it_wrong(tmp_path, tiny_dinov2_4_dir):
    model = lora_model(_cfg(tmp_path, tiny_dinov2_4_dir))
    with pytest.raises(ValueError, match=r"encoder\.layer\.2\..* below it trains or is adapted"):
        _classifier(model).use_frozen_cache(3, max_bytes=1 << 20)  # block 2 has LoRA
    assert lora_model(_cfg(tmp_path, tiny_dinov2_4_dir, frozen_cache_mb=0)).get_base_model().frozen_cache is None
    noisy = tmp_path / "noisy"
    Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=7,
            image_size=28,
            hidden_dropout_prob=0.1,
        )
    ).save_pretrained(noisy)
    assert lora_model(_cfg(tmp_path, noisy, top=1)).get_base_model().frozen_cache is None  # dropout: full path
    with pytest.raises(ValueError, match=r"lora.top_layers=4: the backbone has 4 blocks; use at most 3"):
        lora_model(_cfg(tmp_path, tiny_dinov2_4_dir, top=4))


def test_top_layers_config_for_vision(tmp_path, tiny_dinov2_4_dir):
    assert _cfg(tmp_path, tiny_dinov2_4_dir, top=3).lora.top_layers == 3
    with pytest.raises(ConfigError, match=r"lora.top_layers=2 is for model.kind 'hf-causal-lm' or 'hf-vision'"):
        load_config(None, ["data.task=digit-shift", "lora.top_layers=2"])  # builtin-vit
    with pytest.raises(ConfigError, match=r"lora.top_layers = 0: Input should be greater than or equal to 1"):
        load_config(None, ["model.kind=hf-vision", "lora.top_layers=0"])
    with pytest.raises(ConfigError, match=r"model.frozen_cache_mb = -1"):
        load_config(None, ["model.kind=hf-vision", "lora.top_layers=2", "model.frozen_cache_mb=-1"])
