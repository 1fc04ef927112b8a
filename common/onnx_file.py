"""Read an ONNX file's metadata and initializer values without the `onnx` package.

An edge device has ONNX Runtime but not `onnx`, and ONNX Runtime exposes a model's metadata but
not the values of its initializers (the trained defaults of the swappable norm parameters). An
ONNX file is a protobuf `ModelProto`, so this module declares the few fields of `onnx.proto` it
reads (same names, numbers and types) and lets protobuf parse the file; every other field is
skipped as unknown. `tests/test_edge_imports.py` checks these declarations against the `onnx`
package's own descriptors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_FIELD = descriptor_pb2.FieldDescriptorProto

# (message, [(field, number, type, repeated, message type)]): a subset of onnx.proto (package "onnx").
SCHEMA: tuple[tuple[str, tuple[tuple[str, int, int, bool, str], ...]], ...] = (
    (
        "StringStringEntryProto",
        (("key", 1, _FIELD.TYPE_STRING, False, ""), ("value", 2, _FIELD.TYPE_STRING, False, "")),
    ),
    (
        "TensorProto",
        (
            ("dims", 1, _FIELD.TYPE_INT64, True, ""),
            ("data_type", 2, _FIELD.TYPE_INT32, False, ""),
            ("float_data", 4, _FIELD.TYPE_FLOAT, True, ""),
            ("name", 8, _FIELD.TYPE_STRING, False, ""),
            ("raw_data", 9, _FIELD.TYPE_BYTES, False, ""),
            ("data_location", 14, _FIELD.TYPE_ENUM, False, ".onnx.TensorProto.DataLocation"),
        ),
    ),
    ("GraphProto", (("initializer", 5, _FIELD.TYPE_MESSAGE, True, ".onnx.TensorProto"),)),
    (
        "ModelProto",
        (
            ("graph", 7, _FIELD.TYPE_MESSAGE, False, ".onnx.GraphProto"),
            ("metadata_props", 14, _FIELD.TYPE_MESSAGE, True, ".onnx.StringStringEntryProto"),
        ),
    ),
)
FLOAT = 1
"""`TensorProto.DataType.FLOAT`."""
EXTERNAL = 1
"""`TensorProto.DataLocation.EXTERNAL`: the values live in a separate file."""


@functools.cache
def _model_class() -> Any:
    """The `ModelProto` message class of SCHEMA, in a private descriptor pool (built once)."""
    file = descriptor_pb2.FileDescriptorProto(name="fairedge_onnx_subset.proto", package="onnx", syntax="proto2")
    for name, fields in SCHEMA:
        message = file.message_type.add(name=name)
        for field, number, kind, repeated, type_name in fields:
            label = _FIELD.LABEL_REPEATED if repeated else _FIELD.LABEL_OPTIONAL
            message.field.add(name=field, number=number, type=kind, label=label, type_name=type_name or None)
        if name == "TensorProto":
            enum = message.enum_type.add(name="DataLocation")
            enum.value.add(name="DEFAULT", number=0)
            enum.value.add(name="EXTERNAL", number=EXTERNAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("onnx.ModelProto"))


@dataclass(frozen=True)
class OnnxFile:
    """The metadata and the parsed protobuf of one ONNX file."""

    path: Path
    metadata: dict[str, str]
    proto: Any

    def float_initializers(self, names: list[str]) -> dict[str, np.ndarray]:
        """The values of the named float32 initializers, in the order of `names`."""
        found = {t.name: t for t in self.proto.graph.initializer if t.name in set(names)}
        out = {}
        for name in names:
            tensor = found.get(name)
            if tensor is None:
                raise ValueError(f"{self.path}: no initializer named {name!r}")
            if tensor.data_type != FLOAT or tensor.data_location == EXTERNAL:
                raise ValueError(f"{self.path}: initializer {name!r} is not an embedded float32 tensor")
            shape = tuple(int(d) for d in tensor.dims)
            if tensor.raw_data:
                array = np.frombuffer(tensor.raw_data, dtype="<f4").astype(np.float32)
            else:
                array = np.asarray(tensor.float_data, dtype=np.float32)
            out[name] = array.reshape(shape)
        return out


def read_onnx(path: str | Path) -> OnnxFile:
    """Parse an ONNX file (metadata and initializers; nodes are skipped)."""
    path = Path(path)
    data = path.read_bytes()
    proto = _model_class()()
    try:
        proto.ParseFromString(data)
    except Exception as err:  # protobuf raises DecodeError (a plain Exception subclass) for non-ONNX bytes
        raise ValueError(f"{path} is not an ONNX model: {err}") from None
    return OnnxFile(path, {p.key: p.value for p in proto.metadata_props}, proto)
