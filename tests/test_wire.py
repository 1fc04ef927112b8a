"""Generated protobuf code: committed files match `proto/`, and the wire schema stays stable."""

from __future__ import annotations

from pathlib import Path

from common.wire import adapter_update_pb2 as pb
from common.wire.generate import WIRE_DIR, generate


def test_committed_code_matches_proto_sources(tmp_path: Path):
    fresh = generate(out_dir=tmp_path)
    assert fresh, "no .proto files found"
    for path in fresh:
        committed = WIRE_DIR / path.name
        assert committed.exists(), f"{committed.name} is not committed; run `python -m common.wire.generate`"
        assert committed.read_text() == path.read_text(), (
            f"{committed.name} differs from proto/; run `python -m common.wire.generate`")


def test_schema_is_stable():
    """Numbers on the wire must never change meaning."""
    assert pb.DESCRIPTOR.package == "fairedge.v1"
    assert (pb.DENSE_FP32, pb.DENSE_FP16, pb.TERNARY_SPARSE) == (1, 2, 3)
    assert (pb.RICE_GAPS, pb.BITMASK) == (1, 2)
    fields = {f.name: f.number for f in pb.TensorUpdate.DESCRIPTOR.fields}
    assert fields == {"name": 1, "shape": 2, "encoding": 3, "scale": 4, "num_kept": 5,
                      "position_code": 6, "rice_k": 7, "payload": 8, "signs": 9}
    fields = {f.name: f.number for f in pb.AdapterUpdate.DESCRIPTOR.fields}
    assert fields == {"format_version": 1, "round": 2, "num_examples": 3, "tensors": 4, "checksum": 5}


def test_message_round_trip():
    message = pb.AdapterUpdate(format_version=1, round=3, num_examples=10, checksum=0xFFFFFFFF,
                               tensors=[pb.TensorUpdate(name="a", shape=[2, 3], encoding=pb.DENSE_FP32,
                                                        num_kept=6, payload=b"\x00" * 24)])
    again = pb.AdapterUpdate.FromString(message.SerializeToString())
    assert again == message
    assert list(again.tensors[0].shape) == [2, 3]
