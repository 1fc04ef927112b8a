"""The edge runtime installs without torch: its import graph, the ONNX fields it reads without `onnx`,
and the NumPy image path it shares with training."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from fairedge.common.onnx_file import SCHEMA, read_onnx

FORBIDDEN = ("torch", "transformers", "peft", "sklearn", "flwr", "ray", "datasets", "onnx", "tomli_w")


def test_edge_runtime_and_cli_import_no_training_stack(tmp_path):
    """Import the runtime and the CLI, parse a command line, and run it to its first error (a missing model)."""
    code = f"""
import json, sys
import fairedge.client.edge
from fairedge.client import edge_cli
args = edge_cli.build_parser().parse_args(["run", "--model", "m.onnx", "--input", "in", "--set", "edge.e_max=0.3"])
assert args.command == "run" and args.set == ["edge.e_max=0.3"]
rc = edge_cli.main(["run", "--model", {str(tmp_path / "missing.onnx")!r}, "--input", {str(tmp_path)!r}])
roots = {{name.split(".")[0] for name in sys.modules}}
print(json.dumps({{"rc": rc, "loaded": sorted(roots & set({list(FORBIDDEN)!r}))}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"rc": 2, "loaded": []}, result.stderr
    assert "no ONNX model at" in result.stderr


def test_onnx_subset_schema_matches_onnx_proto():
    """The fields `onnx_file` declares have the names, numbers, types and cardinality of onnx.proto's."""
    for message, fields in SCHEMA:
        real = getattr(onnx, message).DESCRIPTOR.fields_by_name
        for name, number, kind, repeated, type_name in fields:
            f = real[name]
            assert (f.number, f.type) == (number, kind), f"{message}.{name}"
            assert f.is_repeated == repeated, f"{message}.{name}"
            if type_name:
                target = f.message_type or f.enum_type
                assert "." + target.full_name == type_name, f"{message}.{name}"


def test_read_onnx_gives_metadata_and_initializers_like_onnx(tmp_path):
    weight = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    bias = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gemm", ["x", "w", "b"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        initializer=[
            onnx.numpy_helper.from_array(weight, "w"),  # raw_data
            onnx.helper.make_tensor("b", onnx.TensorProto.FLOAT, [3], bias.tolist()),  # float_data
            onnx.numpy_helper.from_array(np.arange(3, dtype=np.int64), "ids"),
        ],
    )
    model = onnx.helper.make_model(graph)
    onnx.helper.set_model_props(model, {"fairedge.k": '{"a": 1}', "other": "x"})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))

    parsed = read_onnx(path)
    assert parsed.metadata == {"fairedge.k": '{"a": 1}', "other": "x"}
    values = parsed.float_initializers(["b", "w"])
    assert list(values) == ["b", "w"]
    np.testing.assert_array_equal(values["w"], weight)
    np.testing.assert_array_equal(values["b"], bias)
    assert values["w"].dtype == np.float32
    with pytest.raises(ValueError, match="'ids' is not an embedded float32"):
        parsed.float_initializers(["ids"])
    with pytest.raises(ValueError, match="no initializer named 'nope'"):
        parsed.float_initializers(["nope"])
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff not protobuf")
    with pytest.raises(ValueError, match="not an ONNX model"):
        read_onnx(tmp_path / "junk.onnx")


@pytest.mark.parametrize("channels", [1, 3])
def test_the_edge_reads_an_image_file_as_training_does(tmp_path, channels):
    """The edge's NumPy reader and the training loader (torch) give identical pixels for the same file."""
    from fairedge.client.edge.inputs import read_image
    from fairedge.common.data.user_data import load_image_folder

    rng = np.random.default_rng(channels)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    task = load_image_folder(tmp_path, image_size=8, channels=channels, test_fraction=0.5)
    files = sorted(tmp_path.rglob("*.png"))
    edge = np.stack([read_image(f, (channels, 8, 8)) for f in files])
    training = np.concatenate([task.train.x.numpy(), task.test.x.numpy()])
    assert edge.dtype == np.float32 and edge.shape == (4, channels, 8, 8)
    assert edge.min() >= -1.0 and edge.max() <= 1.0
    # same set of images, bit for bit (the split reorders them)
    assert sorted(map(bytes, edge)) == sorted(map(bytes, training))
