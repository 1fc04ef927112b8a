"""The exported edge model as a device uses it: metadata, inputs, tokenizer and an ONNX Runtime session.

`fairedge.common.edge_model` writes the model (PyTorch -> ONNX); this module is everything needed
to *run* it and imports only NumPy, ONNX Runtime and, for text models, `tokenizers`, so an edge
device installs no torch, transformers or onnx. The contract between the two:

- every normalisation affine parameter is a graph input with a same-named initializer (its trained
  value, the default), so a feed overrides it per run; ONNX Runtime lists these under
  `session.get_overridable_initializers()`, not `session.get_inputs()`;
- the model's `metadata_props` hold JSON values under `fairedge.*` keys (`read_edge_metadata`);
- a text model has its tokenizer next to it, `<stem>.tokenizer/tokenizer.json`, already set to
  truncate and pad to the model's `max_length` (`load_tokenizer`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fairedge.common.onnx_file import read_onnx

if TYPE_CHECKING:
    from tokenizers import Tokenizer

METADATA_PREFIX = "fairedge."
FORMAT_VERSION = 1
OUTPUT_NAME = "logits"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class InputSpec:
    """One model input: its ONNX graph name, per-sample shape (no batch dim) and dtype.

    Text inputs (`input_ids`, `attention_mask`) have shape `(max_length,)`: `model_inputs`
    pads every text to it, so uploads have a fixed shape (the graph accepts any length).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "int64"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> InputSpec:
        if d.get("dtype") not in ("float32", "int64"):
            raise ValueError(f"input {d.get('name')!r}: dtype {d.get('dtype')!r}, allowed 'float32' or 'int64'")
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


@dataclass(frozen=True)
class EdgeModelInfo:
    """What an edge device knows about an exported model, from its ONNX metadata alone."""

    inputs: list[InputSpec]
    labels: list[str]
    norm_param_names: list[str]
    norm_param_shapes: dict[str, tuple[int, ...]]
    model_id: str
    model_version: str
    config_name: str
    task: str  # "image" | "text"
    quantized: bool

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class HasInputs(Protocol):
    """Anything that declares its model inputs: `EdgeModelInfo`, or the export side's `MergedModel`."""

    @property
    def inputs(self) -> list[InputSpec]: ...


_METADATA_KEYS = (
    "format_version",
    "task",
    "inputs",
    "labels",
    "norm_params",
    "model_id",
    "model_version",
    "config_name",
    "quantized",
)


def read_edge_metadata(metadata: Mapping[str, str] | Sequence[Any]) -> EdgeModelInfo:
    """Parse fairedge metadata: an ORT `custom_metadata_map` dict or `ModelProto.metadata_props`."""
    if not isinstance(metadata, Mapping):
        metadata = {p.key: p.value for p in metadata}
    values: dict[str, Any] = {}
    for key in _METADATA_KEYS:
        raw = metadata.get(METADATA_PREFIX + key)
        if raw is None:
            raise ValueError(
                f"not a fairedge edge model: metadata key {METADATA_PREFIX + key!r} is missing "
                "(export it with `fairedge-server export`)"
            )
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"metadata {METADATA_PREFIX + key!r} is not JSON: {e}") from None
    if values["format_version"] != FORMAT_VERSION:
        raise ValueError(f"edge model format version {values['format_version']}, this code reads {FORMAT_VERSION}")
    norm = values["norm_params"]
    return EdgeModelInfo(
        inputs=[InputSpec.from_json(d) for d in values["inputs"]],
        labels=[str(x) for x in values["labels"]],
        norm_param_names=[d["name"] for d in norm],
        norm_param_shapes={d["name"]: tuple(int(s) for s in d["shape"]) for d in norm},
        model_id=str(values["model_id"]),
        model_version=str(values["model_version"]),
        config_name=str(values["config_name"]),
        task=str(values["task"]),
        quantized=bool(values["quantized"]),
    )


def load_edge_info(path: str | Path) -> EdgeModelInfo:
    """`read_edge_metadata` of an ONNX file."""
    return read_edge_metadata(read_onnx(path).metadata)


def default_norm_values(path: str | Path) -> dict[str, np.ndarray]:
    """The default (trained) value of every norm parameter stored in an ONNX file, float32."""
    model = read_onnx(path)
    return model.float_initializers(read_edge_metadata(model.metadata).norm_param_names)


# ---------------------------------------------------------------- inputs


def _as_array(x: Any, dtype: type) -> np.ndarray:
    """An array of `x`; a torch tensor (recognised by `detach`, torch is not imported) is copied to the CPU."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x, dtype=dtype))


def model_inputs(model: HasInputs, x: Any, *, tokenizer: Tokenizer | None = None) -> dict[str, np.ndarray]:
    """Raw task data -> ONNX feeds (also valid `**kwargs` for the PyTorch model after `torch.from_numpy`).

    Images: a float batch `(N, C, H, W)` already on the task's pixel scale (see
    `fairedge.common.pixels.normalize_pixels`). Texts: a list of strings, tokenized and padded to
    `max_length` by `tokenizer` (`load_tokenizer(onnx_path)`; the export side's `MergedModel`
    brings its own as `.tokenizer`).
    """
    specs = model.inputs
    if [s.dtype for s in specs] == ["float32"]:
        arr = _as_array(x, np.float32)
        if arr.ndim != len(specs[0].shape) + 1 or tuple(arr.shape[1:]) != specs[0].shape:
            raise ValueError(
                f"{specs[0].name}: got an array of shape {tuple(arr.shape)}, "
                f"expected (batch, {', '.join(map(str, specs[0].shape))})"
            )
        return {specs[0].name: arr}
    texts = [x] if isinstance(x, str) else list(x)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("a text model takes a list of strings")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("a text model needs its tokenizer: pass tokenizer=load_tokenizer(onnx_path)")
    encodings = tokenizer.encode_batch(texts)
    length = specs[0].shape[0]
    columns = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings]}
    if any(len(row) != length for row in columns["input_ids"]):
        raise ValueError(
            f"the tokenizer gives {sorted({len(r) for r in columns['input_ids']})} tokens per text, the model takes "
            f"{length}: it is not the tokenizer exported with this model"
        )
    return {s.name: np.asarray(columns[s.name], dtype=np.int64) for s in specs}


def tokenizer_dir(onnx_path: str | Path) -> Path:
    """Where the export puts a text model's tokenizer: `<stem>.tokenizer/` next to the file."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".tokenizer")


def load_tokenizer(onnx_path: str | Path) -> Tokenizer:
    """The tokenizer saved next to an exported text model (a `tokenizers.Tokenizer`, never the hub)."""
    from tokenizers import Tokenizer

    file = tokenizer_dir(onnx_path) / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {file}: export the text model with `fairedge-server export`")
    tokenizer = Tokenizer.from_file(str(file))
    if tokenizer.padding is None or tokenizer.truncation is None:
        raise ValueError(f"{file} does not pad and truncate to the model's length: export the model again")
    return tokenizer


# ---------------------------------------------------------------- running


def session(path: str | Path, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session at the default (full) optimisation level, quiet about overridable inputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # every norm input triggers a "not treated as constant" warning
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_logits(sess: Any, feeds: Mapping[str, np.ndarray], norm: Mapping[str, Any] | None = None) -> np.ndarray:
    """Run a session; `norm` (arrays, or CPU tensors) overrides the default norm parameters for this run."""
    extra = {k: _as_array(v, np.float32) for k, v in (norm or {}).items()}
    return sess.run([OUTPUT_NAME], {**feeds, **extra})[0]
