"""Attention fusion for an exported edge graph, applied offline with the norm parameters kept swappable.

Why this exists, and why it does no more: the norm parameters as graph inputs block none of ONNX
Runtime's fusions. Its load-time optimisers turn LayerNormalization (+ residual Add) into
SkipLayerNormalization and Gelu (+ bias) into BiasGelu with gamma/beta as inputs exactly as with them
folded: the graphs it runs have the same op counts either way (`bench_edge_latency` shows them). What
ran unfused was attention: the dynamo exporter writes `scaled_dot_product_attention` decomposed
(MatMul, Softmax, an `IsNaN`/`Where` guard for fully masked rows, per-head Reshape/Transpose), which
neither those optimisers nor `onnxruntime.transformers.optimizer` match. onnxscript's ORT rewriter,
written for dynamo graphs, does, and leaves graph inputs alone; we run it at export (server side) and
the device gets `MultiHeadAttention` nodes (a com.microsoft contrib op in every ONNX Runtime CPU build).

Only the attention rules: the rewriter's own SkipLayerNormalization rule also matches the ViT's
pre-norm blocks, where ORT's kernel ran about 35 % slower than LayerNormalization + Add at batch 32
(ORT's load-time rule, which leaves them alone, already fuses MiniLM's post-norm ones). We stop at
`MultiHeadAttention` rather than packing Q, K and V into one `Attention` node: the packed node is
only marginally faster in fp32 and hides the projections from dynamic int8 quantisation (`QAttention`
takes no attention bias). The caller re-checks the result (`edge_model.check_norm_inputs` and a swap
through ONNX Runtime), so a rewrite that folded a norm parameter could not ship.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import onnx

log = logging.getLogger(__name__)


def _rewriters() -> list[tuple[str, Callable[..., int]]]:
    """onnxscript's attention fusions, named and in the order applied (ImportError on an onnxscript without them)."""
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    return [
        ("sdpa", lambda m: fuse_sdpa(m, apply_shape_inference=True)),
        ("mha", lambda m: fuse_mha1(m) + fuse_mha2(m)),
        ("mha_scale", fuse_mha_scale),
        ("mha_bias", fuse_mha_bias),
    ]


def fuse_for_ort(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """`proto` with attention fused into `MultiHeadAttention`, and how many of each rewrite fired.

    Graph inputs (the norm parameters among them) stay inputs with their initializers. Without a
    usable onnxscript rewriter the graph comes back unchanged with empty counts (logged), since an
    unfused graph is still correct, only slower.
    """
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as passes
        from onnxscript.optimizer import optimize
        from onnxscript.rewriter.ort_fusions import shape_optimization

        rewriters = _rewriters()
    except ImportError as err:
        log.warning("ONNX Runtime attention fusion skipped (onnxscript rewriter unavailable: %s)", err)
        return proto, {}
    inputs = [i.name for i in proto.graph.input]
    model: Any = ir.from_proto(proto)
    # It warns once per norm parameter that an initializer which is also a graph input stays as it is: intended.
    dedup_log = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    level = dedup_log.level
    dedup_log.setLevel(logging.ERROR)
    try:
        passes.ShapeInferencePass()(model)
        optimize(model)
        shape_optimization.rules.apply_to_model(model)
        optimize(model)
        counts: dict[str, int] = {}
        for name, rewrite in rewriters:
            counts[name] = int(rewrite(model))
        optimize(model)
    finally:
        dedup_log.setLevel(level)
    out = ir.to_proto(model)
    lost = [n for n in inputs if n not in {i.name for i in out.graph.input}]
    if lost:  # never seen; a later onnxscript that prunes inputs would make norm swaps impossible
        raise RuntimeError(f"the ORT fusions removed graph inputs {lost[:3]}")
    return out, {k: v for k, v in counts.items() if v}


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the main graph has (to compare optimised graphs)."""
    out: dict[str, int] = {}
    for node in proto.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return dict(sorted(out.items()))
