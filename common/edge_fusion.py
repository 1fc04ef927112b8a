"""ONNX Runtime's transformer fusions applied to an exported edge graph, the norm parameters kept swappable.

Why this exists: the dynamo exporter writes attention as the decomposed `scaled_dot_product_attention`
(MatMul, Softmax, an `IsNaN`/`Where` guard for fully masked rows, Reshape/Transpose per head). Neither
ONNX Runtime's load-time optimisers nor `onnxruntime.transformers.optimizer` recognise that pattern,
so attention ran unfused — with or without the norm parameters as graph inputs: an export with them
folded as constants optimises to exactly the same node counts (LayerNormalization → SkipLayerNormalization
and BiasGelu fire in both). onnxscript's ORT rewriter (written for dynamo graphs) does match it and
leaves graph inputs alone, so we run it offline, at export (server side): the device gets
`MultiHeadAttention`, `SkipLayerNormalization` and `BiasGelu` nodes (com.microsoft contrib ops, in every
ONNX Runtime CPU build) whose gamma/beta are still the named norm inputs.

We stop at `MultiHeadAttention` on purpose: packing Q, K and V into one `Attention` node would be
marginally faster in fp32 but hides their weights from dynamic int8 quantisation (`QAttention` takes
no attention bias, so the quantiser leaves `Attention` in fp32), and int8 is where the edge gains most.
The caller re-checks the result (`edge_model.check_norm_inputs` and a swap through ONNX Runtime), so a
rewrite that folded a norm parameter could not ship.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import onnx

log = logging.getLogger(__name__)


def _rewriters() -> list[tuple[str, Callable[..., int]]]:
    """onnxscript's fusion functions, named and in the order applied (ImportError on an onnxscript without them)."""
    from onnxscript.rewriter.ort_fusions.bias_gelu import fuse_bias_gelu
    from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
    from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.skip_normalization import (
        fuse_skip_layer_normalization,
        fuse_skip_rms_normalization,
    )

    def both(*fns: Callable[..., int]) -> Callable[..., int]:
        return lambda model, **kw: sum(fn(model, **kw) for fn in fns)

    return [
        ("erf_gelu", fuse_erfgelu),
        ("rms_normalization", fuse_rms_normalization),
        ("skip_layer_normalization", fuse_skip_layer_normalization),
        ("skip_rms_normalization", fuse_skip_rms_normalization),
        ("sdpa", lambda m: fuse_sdpa(m, apply_shape_inference=True)),
        ("mha", both(fuse_mha1, fuse_mha2)),
        ("mha_scale", fuse_mha_scale),
        ("mha_bias", fuse_mha_bias),
        ("gelu", fuse_gelu),
        ("bias_gelu", fuse_bias_gelu),
    ]


def fuse_for_ort(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """`proto` with ORT's transformer fusions applied, and how many of each fired.

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
        log.warning("ONNX Runtime fusions skipped (onnxscript rewriter unavailable: %s)", err)
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
            if name == "skip_rms_normalization":
                passes.CommonSubexpressionEliminationPass()(model)
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
