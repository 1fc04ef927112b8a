"""The fused edge export: attention fused offline for ONNX Runtime, norm parameters still swappable, parity kept."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import onnx
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fairedge.common import edge_fusion
from fairedge.common.config import build_config
from fairedge.common.edge_format import InputSpec, onnx_logits, session
from fairedge.common.edge_fusion import fuse_for_ort, op_counts
from fairedge.common.edge_model import (
    PARITY_TOLERANCE,
    MergedModel,
    example_inputs,
    export_onnx,
    forward_with_norm,
    norm_parameters,
    onnx_parity,
    perturbed_norm,
    quantize_onnx,
    weights_version,
)

SEQ = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_bert(tmp) -> MergedModel:
    """A 2-layer BERT text classifier (MiniLM's architecture, tiny) with a word-level tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from fairedge.common.models.text import TextClassifier

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(2000)]  # example ids < 2000
    (tmp / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp / "texts.csv").write_text("text,label\nw1 w2,a\n")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = TextClassifier(BertModel(config, add_pooling_layer=False), tokenizer, num_classes=3, max_length=SEQ)
    with torch.no_grad():  # non-trivial norm parameters, so a swap that is ignored would show
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn(p.shape))
    cfg = build_config(
        {
            "name": "tiny-bert",
            "data": {"task": "text", "path": str(tmp / "texts.csv")},
            "model": {"kind": "hf-text", "path": str(tmp), "max_length": SEQ},
        }
    )
    specs = [InputSpec("input_ids", (SEQ,), "int64"), InputSpec("attention_mask", (SEQ,), "int64")]
    return MergedModel(model.eval(), cfg, specs, ["a", "b", "c"], "tiny-bert", weights_version(model))


def _tiny_vit() -> MergedModel:
    from fairedge.common.models.vision import build_vision_classifier

    model = build_vision_classifier(
        image_size=8, num_channels=1, num_classes=3, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32
    )
    spec = InputSpec("pixel_values", (1, 8, 8), "float32")
    return MergedModel(
        model.eval(), build_config({"name": "tiny-vit"}), [spec], ["a", "b", "c"], "tiny-vit", weights_version(model)
    )


@pytest.fixture(scope="module", params=["bert", "vit"])
def fused(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    merged = _tiny_bert(tmp) if request.param == "bert" else _tiny_vit()
    return merged, export_onnx(merged, tmp / "model.onnx")


def _norm_readers(proto: onnx.ModelProto) -> dict[str, str]:
    """norm-like input name -> op type of the node reading it as gamma/beta."""
    slots = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}
    return {node.input[i]: node.op_type for node in proto.graph.node for i in slots.get(node.op_type, ())}


def test_fused_export_ships_fused_attention_and_norms_fed_by_the_graph_inputs(fused):
    merged, path = fused
    proto = onnx.load(str(path))
    ops = op_counts(proto)
    layers = 2
    assert ops.get("MultiHeadAttention") == layers
    assert "Softmax" not in ops and "IsNaN" not in ops  # the decomposed attention is gone
    fusions = json.loads({p.key: p.value for p in proto.metadata_props}["fairedge.ort_fusions"])
    assert fusions["sdpa"] == fusions["mha"] == layers
    inputs = {i.name for i in proto.graph.input}
    readers = _norm_readers(proto)
    for name in norm_parameters(merged.model):
        assert name in inputs and readers.get(name) in ("LayerNormalization", "SkipLayerNormalization"), name


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_export_matches_torch_and_swaps_without_a_rebuild(fused, batch):
    merged, path = fused
    sess = session(path)
    feeds = example_inputs(merged.inputs, batch=batch, seed=batch)  # text: padded masks of random lengths
    norm = norm_parameters(merged.model)
    assert onnx_parity(merged, sess, feeds) <= PARITY_TOLERANCE
    assert onnx_parity(merged, sess, feeds, perturbed_norm(norm, scale=0.2, seed=batch)) <= PARITY_TOLERANCE
    # one parameter at a time, in the same session: each one acts, as in PyTorch
    for name in (next(iter(norm)), list(norm)[len(norm) // 2], list(norm)[-1]):
        change = {name: norm[name] * 0.5 + 0.1}
        assert onnx_parity(merged, sess, feeds, change) <= PARITY_TOLERANCE
        assert np.abs(onnx_logits(sess, feeds, change) - onnx_logits(sess, feeds)).max() > 1e-4, name
    if merged.task == "text":  # the sequence axis stays dynamic through the fusions
        assert onnx_parity(merged, sess, {k: v[:, :5] for k, v in feeds.items()}) <= PARITY_TOLERANCE


def test_int8_of_the_fused_graph_quantises_every_projection_and_still_swaps(fused, tmp_path):
    merged, path = fused
    q = quantize_onnx(merged, path, tmp_path / "int8.onnx")  # also runs the export's own swap check
    ops = op_counts(onnx.load(str(q)))
    projections = sum(isinstance(m, torch.nn.Linear) for m in merged.model.modules()) - 1  # the head may be a Gemm
    assert ops.get("MultiHeadAttention") == 2 and ops.get("MatMulInteger", 0) >= projections
    assert "MatMul" not in ops  # no fp32 projection left: Q, K and V stayed separate, quantisable MatMuls
    sess = session(q)
    feeds = example_inputs(merged.inputs, batch=4, seed=2)
    changed = perturbed_norm(norm_parameters(merged.model), scale=0.2, seed=3)
    tf = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        want, want_sw = (forward_with_norm(merged.model, n, tf).numpy() for n in ({}, changed))
    got, got_sw = onnx_logits(sess, feeds), onnx_logits(sess, feeds, changed)
    assert np.corrcoef((got_sw - got).ravel(), (want_sw - want).ravel())[0, 1] > 0.9


def _without_inputs(proto: onnx.ModelProto, names) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [i for i in out.graph.input if i.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    return out


def _ort_optimised_ops(proto: onnx.ModelProto, tmp_path, name: str) -> dict[str, int]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(str(tmp_path / f"{name}.onnx")))


def test_norm_params_as_graph_inputs_block_no_ort_fusion(fused, tmp_path):
    """The diagnosis behind the offline fusion: folding the norm parameters changes nothing ORT runs."""
    merged, path = fused
    proto = onnx.load(str(path))
    ops = _ort_optimised_ops(proto, tmp_path, "inputs")
    assert ops == _ort_optimised_ops(_without_inputs(proto, set(norm_parameters(merged.model))), tmp_path, "folded")
    if merged.task == "text":  # BERT's post-norm blocks: ORT fuses residual + LayerNorm with gamma/beta as inputs
        assert ops.get("SkipLayerNormalization") == 4 and ops.get("BiasGelu") == 2 and "LayerNormalization" in ops


def test_fused_and_unfused_exports_give_the_same_logits(fused, tmp_path):
    merged, path = fused
    plain = export_onnx(merged, tmp_path / "unfused.onnx", fuse=False)
    assert "MultiHeadAttention" not in op_counts(onnx.load(str(plain)))
    feeds = example_inputs(merged.inputs, batch=3, seed=5)
    changed = perturbed_norm(norm_parameters(merged.model), scale=0.2, seed=5)
    a, b = session(path), session(plain)
    for norm in (None, changed):
        assert np.abs(onnx_logits(a, feeds, norm) - onnx_logits(b, feeds, norm)).max() <= PARITY_TOLERANCE


def test_without_the_rewriter_the_graph_comes_back_unfused(fused, monkeypatch, caplog):
    _, path = fused
    proto = onnx.load(str(path))

    def missing():
        raise ImportError("no onnxscript rewriter")

    monkeypatch.setattr(edge_fusion, "_rewriters", missing)
    with caplog.at_level(logging.WARNING, logger=edge_fusion.__name__):
        out, counts = fuse_for_ort(proto)
    assert out is proto and counts == {} and "attention fusion skipped" in caplog.text
