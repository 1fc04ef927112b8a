"""Generated protobuf code: committed files match `proto/`, and the wire schema stays stable."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from fairedge.common.wire import adapter_update_pb2 as pb
from fairedge.common.wire.generate import PROTO_DIR, WIRE_DIR, generate


def _generator_version(text: str) -> str | None:
    match = re.search(r"^# Protobuf Python Version: (\S+)$", text, re.MULTILINE)
    return match.group(1) if match else None


def _clear_json_names(messages) -> None:
    """Descriptor sets carry json_name; the descriptors in generated code do not."""
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def test_committed_code_matches_proto_sources(tmp_path: Path):
    """The schema must match exactly; the text too when the same protoc generated both."""
    fresh = generate(out_dir=tmp_path / "gen")
    assert fresh, "no .proto files found"
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        descriptor_set = tmp_path / f"{proto.stem}.pb"
        assert protoc.main(["protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={descriptor_set}", str(proto)]) == 0
        expected = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file[0]
        _clear_json_names(expected.message_type)
        module = importlib.import_module(f"fairedge.common.wire.{proto.stem}_pb2")
        committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        assert committed == expected, f"{proto.name} changed; run `python -m fairedge.common.wire.generate`"
    for path in fresh:
        committed = WIRE_DIR / path.name
        assert committed.exists(), f"{committed.name} is not committed; run `python -m fairedge.common.wire.generate`"
        new, old = path.read_text(), committed.read_text()
        if _generator_version(new) == _generator_version(old):  # a newer protoc words things differently
            assert old == new, f"{committed.name} differs from proto/; run `python -m fairedge.common.wire.generate`"


def test_schema_is_stable():
    """Numbers on the wire must never change meaning."""
    assert pb.DESCRIPTOR.package == "fairedge.v1"
    assert (pb.DENSE_FP32, pb.DENSE_FP16, pb.TERNARY_SPARSE) == (1, 2, 3)
    assert pb.RICE_GAPS == 1
    fields = {f.name: f.number for f in pb.TensorSpec.DESCRIPTOR.fields}
    assert fields == {"name": 1, "shape": 2}
    fields = {f.name: f.number for f in pb.Block.DESCRIPTOR.fields}
    assert fields == {
        "encoding": 1,
        "scale": 2,
        "num_kept": 3,
        "position_code": 4,
        "rice_k": 5,
        "payload": 6,
        "signs": 7,
    }
    fields = {f.name: f.number for f in pb.AdapterUpdate.DESCRIPTOR.fields}
    assert fields == {
        "format_version": 1,
        "round": 2,
        "num_examples": 3,
        "checksum": 5,
        "layout": 6,
        "tensors": 7,
        "blocks": 8,
    }
    reserved = descriptor_pb2.DescriptorProto()
    pb.AdapterUpdate.DESCRIPTOR.CopyToProto(reserved)
    assert [(r.start, r.end) for r in reserved.reserved_range] == [(4, 5)]  # version 1's per-tensor blocks


def test_message_round_trip():
    message = pb.AdapterUpdate(
        format_version=2,
        round=3,
        num_examples=10,
        checksum=0xFFFFFFFF,
        layout=0xFEDCBA9876543210,
        tensors=[pb.TensorSpec(name="a", shape=[2, 3])],
        blocks=[pb.Block(encoding=pb.DENSE_FP32, num_kept=6, payload=b"\x00" * 24)],
    )
    again = pb.AdapterUpdate.FromString(message.SerializeToString())
    assert again == message
    assert list(again.tensors[0].shape) == [2, 3]
    assert again.layout == 0xFEDCBA9876543210
