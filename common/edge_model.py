"""Exporting the merged global model for the edge: ONNX with swappable normalisation parameters.

CEMA adapts a deployed model by replacing the affine parameters (weight/bias) of its
normalisation layers, and nothing else. The export therefore makes each of them a *named
graph input* that also has a same-named initializer: ONNX Runtime uses the initializer as
the default and a value in the feed overrides it, per run, with no session rebuild. The
names are the PyTorch parameter paths (`vit.layers.0.layernorm_before.weight`), so the
cloud (PyTorch, `forward_with_norm`) and the edge (ONNX Runtime feeds) speak of the same
tensors. Everything the edge needs to prepare inputs and read outputs travels in the
model's `metadata_props` (JSON values). Reading and running an exported model is
`fairedge.common.edge_format` (no torch, no onnx): the edge imports only that.

Traps this module guards against: a converter that folds a normalisation into
a neighbour (Conv+BatchNorm) or de-duplicates identical-valued initializers makes a swap
silently ineffective. `export_onnx` checks the graph structure after export and runs a
swap through ONNX Runtime at its default optimisation level; any such problem raises
`NormExportError`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from fairedge.common.config import RunConfig, config_hash
from fairedge.common.data.task_data import TaskData
from fairedge.common.edge_format import (
    FORMAT_VERSION,
    METADATA_PREFIX,
    OUTPUT_NAME,
    TOKENIZER_FILE,
    InputSpec,
    onnx_logits,
    read_edge_metadata,
    session,
    tokenizer_dir,
)
from fairedge.common.edge_fusion import fuse_for_ort
from fairedge.common.quiet_logs import quiet_root_logger

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PARITY_TOLERANCE = 1e-4
"""Max abs logit difference allowed between ONNX Runtime fp32 and PyTorch."""

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
)


class NormExportError(RuntimeError):
    """A normalisation parameter would not be independently swappable in the exported model."""


# ---------------------------------------------------------------- model side (PyTorch)


@dataclass
class MergedModel:
    """The global model with its LoRA merged into the base weights, ready to export or to teach."""

    model: nn.Module  # plain module in eval mode, head included
    cfg: RunConfig
    inputs: list[InputSpec]
    labels: list[str]  # class names, index = class id
    model_id: str
    model_version: str

    @property
    def task(self) -> str:
        """Either "text" (the model takes token ids) or "image"."""
        return "text" if self.cfg.data.task == "text" else "image"

    @functools.cached_property
    def tokenizer(self) -> Tokenizer | None:
        """A text model's tokenizer as the edge gets it (`edge_tokenizer`); None for an image model."""
        if self.task != "text":
            return None
        return edge_tokenizer(self.model.tokenizer, self.inputs[0].shape[0])


def edge_tokenizer(hf_tokenizer: Any, max_length: int) -> Tokenizer:
    """A copy of a transformers fast tokenizer's `tokenizers.Tokenizer`, set to truncate and pad to `max_length`.

    Its `encode_batch` gives the ids and masks of `hf_tokenizer(texts, padding="max_length",
    truncation=True, max_length=max_length)`; the edge loads it from `tokenizer.json` without transformers.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    tok.enable_truncation(max_length=max_length, direction=hf_tokenizer.truncation_side)
    tok.enable_padding(
        length=max_length,
        direction=hf_tokenizer.padding_side,
        pad_id=hf_tokenizer.pad_token_id,
        pad_type_id=hf_tokenizer.pad_token_type_id,
        pad_token=hf_tokenizer.pad_token,
    )
    return tok


def load_merged_model(run_dir: str | Path) -> MergedModel:
    """The final global model of a run folder (config.toml, adapter/, optional base_delta.safetensors).

    The base model is rebuilt from the config exactly as during the run (the pre-trained ViT
    comes from the cache under `model.cache_dir`, or is re-trained deterministically), the
    base delta of FLoRA/FedEx-LoRA is added to the base weights, then the PEFT adapter is
    loaded and merged (`merge_and_unload`), which also puts the trained head in place.
    """
    from fairedge.common.run_model import load_run_model
    from fairedge.common.task import load_task

    cfg, model = load_run_model(run_dir)
    task = load_task(cfg)
    run_dir = Path(run_dir)
    return MergedModel(model, cfg, input_specs(cfg, task), list(task.classes), run_dir.name, weights_version(model))


def input_specs(cfg: RunConfig, task: TaskData) -> list[InputSpec]:
    """The inputs the run's model takes: `pixel_values (C, H, W)`, or `input_ids`/`attention_mask (max_length,)`."""
    if task.kind == "text":
        n = cfg.model.max_length
        return [InputSpec("input_ids", (n,), "int64"), InputSpec("attention_mask", (n,), "int64")]
    return [InputSpec("pixel_values", (task.num_channels, task.image_size, task.image_size), "float32")]


def weights_version(model: nn.Module) -> str:
    """A short hash of every parameter and buffer (names, shapes, values): the model version."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _is_norm(module: nn.Module) -> bool:
    # Custom norms (e.g. transformers' RMSNorm classes) are recognised by their class name.
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm")


def norm_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the affine weight/bias of every normalisation layer, in module order.

    Keys are the parameter paths, which are also the ONNX graph input names. A parameter
    shared by two norm layers cannot be swapped independently and raises `NormExportError`.
    """
    out: dict[str, torch.Tensor] = {}
    owner: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        if not _is_norm(module):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(p) in owner:
                raise NormExportError(
                    f"normalisation parameter {name} is the same tensor as {owner[id(p)]} (tied weights): "
                    "they cannot be swapped independently; untie them before export"
                )
            owner[id(p)] = name
            out[name] = p.detach().clone()
    return out


def forward_with_norm(
    model: nn.Module, norm: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Logits of `model(**inputs)` with the given norm parameters (others keep the model's values).

    Differentiable with respect to `norm` (`torch.func.functional_call`); the model is not changed.
    """
    unknown = [k for k in norm if not _is_norm_param(model, k)]
    if unknown:
        raise KeyError(f"not normalisation parameters of this model: {unknown[:3]}")
    return torch.func.functional_call(model, dict(norm), args=(), kwargs=dict(inputs))


def _is_norm_param(model: nn.Module, name: str) -> bool:
    mod_name, _, p_name = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name)
    except AttributeError:
        return False
    return _is_norm(module) and p_name in dict(module.named_parameters(recurse=False))


class _NormAsInputs(nn.Module):
    """Export wrapper: model inputs and norm parameters both arrive as arguments."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor], norm: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(self.model, norm, args=(), kwargs=inputs)


# ---------------------------------------------------------------- inputs


def example_inputs(specs: Sequence[InputSpec], batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random but valid inputs of the given specs (token ids in [1000, 2000), masks with padding)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = (batch, *spec.shape)
        if spec.name == "attention_mask":
            lengths = rng.integers(2, spec.shape[-1] + 1, size=batch)
            out[spec.name] = (np.arange(spec.shape[-1])[None, :] < lengths[:, None]).astype(np.int64)
        elif spec.dtype == "int64":
            out[spec.name] = rng.integers(1000, 2000, size=shape, dtype=np.int64)
        else:
            out[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    return out


# ---------------------------------------------------------------- export


def export_onnx(merged: MergedModel, path: str | Path, *, quantize: bool = False, fuse: bool = True) -> Path:
    """Write `merged` as ONNX with every norm parameter a named, overridable graph input.

    The batch axis (and for text the sequence axis) is dynamic. With `fuse` (the default) attention is
    fused into ONNX Runtime's `MultiHeadAttention` offline (`fairedge.common.edge_fusion`; the rewrite
    counts go to the metadata key `fairedge.ort_fusions`). With `quantize`, see `quantize_onnx`. For a text model
    the tokenizer is saved next to the file (`<stem>.tokenizer/tokenizer.json`, see `edge_tokenizer`). Raises `NormExportError` if any norm parameter is not an
    independent graph input with its own default, or if swapping them through ONNX Runtime
    (default optimisation level) does not reproduce PyTorch (fp32: within `PARITY_TOLERANCE`);
    then nothing is written.
    """
    import onnxruntime  # noqa: F401  (fail early, before the slow export, if it is missing)

    model = merged.model.eval()
    norm = norm_parameters(model)
    if not norm:
        raise NormExportError("the model has no normalisation parameters: nothing could be adapted on the edge")
    feeds = example_inputs(merged.inputs, batch=2)
    dyn = torch.export.Dim.DYNAMIC
    dynamic = {
        "inputs": {s.name: {0: dyn, **({1: dyn} if s.dtype == "int64" else {})} for s in merged.inputs},
        "norm": {name: None for name in norm},
    }
    program = torch.onnx.export(
        _NormAsInputs(model).eval(),
        (),
        kwargs={"inputs": {k: torch.from_numpy(v) for k, v in feeds.items()}, "norm": norm},
        dynamo=True,
        input_names=[s.name for s in merged.inputs] + list(norm),
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic,
        verbose=False,
    )
    if program is None:  # only without dynamo=True
        raise NormExportError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    _add_defaults(proto, _as_arrays(norm))
    fusions: dict[str, int] = {}
    if fuse:
        proto, fusions = fuse_for_ort(proto)
    return _finish(proto, merged, Path(path), quantize=quantize, fusions=fusions)


def quantize_onnx(merged: MergedModel, src: str | Path, dst: str | Path) -> Path:
    """int8 copy of an fp32 model exported from `merged`: MatMul/Conv weights int8, one scale per
    output channel, activations quantised at run time (ONNX Runtime dynamic quantisation). Quantising
    the fused graph leaves `MultiHeadAttention` in fp32 and turns every projection (Q, K and V included)
    into an int8 MatMul.

    The norm inputs stay fp32, named and swappable (checked as in `export_onnx`; parity with
    PyTorch is not exact, so only a live swap is required). Saves a second torch export.
    """
    proto = onnx.load(str(src))
    info = read_edge_metadata(proto.metadata_props)
    if info.quantized:
        raise ValueError(f"{src} is already quantised")
    if info.model_version != merged.model_version:
        raise ValueError(
            f"{src} holds model version {info.model_version}, not {merged.model_version} "
            f"({merged.model_id}): export that model first"
        )
    fusions = json.loads({p.key: p.value for p in proto.metadata_props}.get(_FUSIONS_KEY, "{}"))
    return _finish(proto, merged, Path(dst), quantize=True, fusions=fusions)


_FUSIONS_KEY = METADATA_PREFIX + "ort_fusions"
"""Informational metadata (the edge does not need it): how many of each offline ORT rewrite the export applied."""


def _as_arrays(norm: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.detach().cpu().numpy().astype(np.float32) for name, t in norm.items()}


def _finish(
    proto: onnx.ModelProto, merged: MergedModel, path: Path, *, quantize: bool, fusions: Mapping[str, int]
) -> Path:
    """Check, (quantise,) label, and write the model; the file appears only once every check passed."""
    norm = norm_parameters(merged.model)
    defaults = _as_arrays(norm)
    check_norm_inputs(proto, defaults)
    if quantize:
        proto = _quantize(proto)
        check_norm_inputs(proto, defaults)
    _set_metadata(proto, merged, defaults, quantized=quantize)
    proto.metadata_props.add(key=_FUSIONS_KEY, value=json.dumps(dict(fusions)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save(proto, str(tmp))
        os.chmod(tmp, 0o644)
        _check_swap(merged, tmp, norm, example_inputs(merged.inputs, batch=2, seed=1), strict=not quantize)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if merged.tokenizer is not None:
        tokenizer_dir(path).mkdir(exist_ok=True)
        merged.tokenizer.save(str(tokenizer_dir(path) / TOKENIZER_FILE))
    return path


def _add_defaults(proto: onnx.ModelProto, defaults: Mapping[str, np.ndarray]) -> None:
    """Give each norm graph input a same-named initializer (its trained value = the default)."""
    present = {init.name for init in proto.graph.initializer}
    for name, value in defaults.items():
        if name in present:
            raise NormExportError(f"the exporter already made {name} an initializer: it would not be swappable")
        proto.graph.initializer.append(numpy_helper.from_array(value, name))


def check_norm_inputs(proto: onnx.ModelProto, defaults: Mapping[str, np.ndarray]) -> None:
    """Raise `NormExportError` unless every norm parameter is a graph input, used by a node,
    with exactly one same-named initializer that holds its own value with the right shape."""
    graph = proto.graph
    inputs = {i.name: i for i in graph.input}
    inits: dict[str, list[onnx.TensorProto]] = {}
    for init in graph.initializer:
        inits.setdefault(init.name, []).append(init)
    used = _names_read(graph)
    problems: list[str] = []
    for name, value in defaults.items():
        if name not in inputs:
            problems.append(f"{name}: not a graph input (folded into the graph)")
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else d.dim_param for d in inputs[name].type.tensor_type.shape.dim
        ]
        if dims != list(value.shape):
            problems.append(f"{name}: graph input of shape {dims}, expected {list(value.shape)}")
        found = inits.get(name, [])
        if len(found) != 1:
            problems.append(f"{name}: {len(found)} initializers of that name, expected exactly 1 (its default)")
        else:
            array = numpy_helper.to_array(found[0])
            if array.shape != value.shape:
                problems.append(f"{name}: default of shape {list(array.shape)}, expected {list(value.shape)}")
            elif not np.array_equal(array, value):
                problems.append(f"{name}: default value differs from the trained parameter")
        if name not in used:
            problems.append(f"{name}: no node reads it (de-duplicated or folded away)")
    if problems:
        raise NormExportError(
            f"{len(problems)} problem(s) with the normalisation inputs of the exported graph; a device could not "
            "swap these parameters:\n  " + "\n  ".join(problems)
        )


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, subgraphs (If/Loop bodies) included."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                names |= _names_read(sub)
    return names


def _quantize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """int8 dynamic quantisation of the weights, per output channel (activations quantised at run time).

    Per-channel scales cut the MiniLM logit error about 3x against one scale per tensor.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, str(src))
        with quiet_root_logger():  # its "consider pre-processing" advice is noise here
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        return onnx.load(str(dst))


def _set_metadata(
    proto: onnx.ModelProto, merged: MergedModel, defaults: Mapping[str, np.ndarray], *, quantized: bool
) -> None:
    cfg = merged.cfg
    values: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "task": merged.task,
        "inputs": [s.to_json() for s in merged.inputs],
        "output": OUTPUT_NAME,
        "labels": merged.labels,
        "norm_params": [{"name": n, "shape": list(v.shape)} for n, v in defaults.items()],
        "model_id": merged.model_id,
        "model_version": merged.model_version,
        "config_name": cfg.name,
        "config_hash": config_hash(cfg),
        "quantized": quantized,
    }
    kept = [p for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, json.dumps(value)


def perturbed_norm(norm: Mapping[str, torch.Tensor], *, scale: float = 0.1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A test swap: every value scaled by `1 + scale·N(0,1)` and shifted by `scale·N(0,1)` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: t * (1 + scale * torch.randn(t.shape, generator=gen)) + scale * torch.randn(t.shape, generator=gen)
        for name, t in norm.items()
    }


def onnx_parity(
    merged: MergedModel, sess: Any, feeds: Mapping[str, np.ndarray], norm: Mapping[str, torch.Tensor] | None = None
) -> float:
    """Max abs difference between ONNX Runtime and PyTorch logits on `feeds` (with `norm` swapped in, if given)."""
    with torch.no_grad():
        ref = forward_with_norm(merged.model, norm or {}, {k: torch.from_numpy(v) for k, v in feeds.items()})
    return float(np.abs(onnx_logits(sess, feeds, norm) - ref.numpy()).max())


def _check_swap(
    merged: MergedModel, path: Path, norm: Mapping[str, torch.Tensor], feeds: Mapping[str, np.ndarray], *, strict: bool
) -> None:
    """Swap every norm parameter through ONNX Runtime (default optimisation level) and compare to PyTorch.

    strict (fp32): both logit sets within `PARITY_TOLERANCE`. Otherwise (int8) the change the swap
    causes must follow PyTorch's (correlation > 0.9), which an ignored or folded parameter breaks.
    """
    sess = session(path)
    missing = set(norm) - {i.name for i in sess.get_overridable_initializers()}
    if missing:
        raise NormExportError(f"ONNX Runtime does not let a feed override these norm parameters: {sorted(missing)[:5]}")
    changed = perturbed_norm(norm, scale=0.2, seed=1)
    torch_feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        want, want_swapped = (forward_with_norm(merged.model, n, torch_feeds).numpy() for n in ({}, changed))
    got, got_swapped = onnx_logits(sess, feeds), onnx_logits(sess, feeds, changed)
    if strict:
        diffs = float(np.abs(got - want).max()), float(np.abs(got_swapped - want_swapped).max())
        if max(diffs) > PARITY_TOLERANCE:
            raise NormExportError(
                f"the exported model in ONNX Runtime differs from PyTorch by {diffs[0]:.2e} (trained norm "
                f"parameters) / {diffs[1]:.2e} (swapped); allowed {PARITY_TOLERANCE:.0e}"
            )
    else:
        corr = float(np.corrcoef((got_swapped - got).ravel(), (want_swapped - want).ravel())[0, 1])
        if not corr > 0.9:
            raise NormExportError(
                f"a norm parameter swap changes the quantised model unlike PyTorch "
                f"(correlation of the logit changes {corr:.3f}, expected > 0.9)"
            )
