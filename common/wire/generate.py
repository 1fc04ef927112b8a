"""Regenerate the committed protobuf code in `common/wire/` from the sources in `proto/`.

Run `python -m fairedge.common.wire.generate` after editing a `.proto` file. The generated
modules are committed so that nobody needs protoc at run time; `tests/test_wire.py`
regenerates into a temporary folder and fails if the committed files differ.
"""

from __future__ import annotations

import argparse
import importlib.resources
import re
import sys
from pathlib import Path

from fairedge.common.atomic_files import atomic_write_text

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
WIRE_DIR = Path(__file__).resolve().parent
PACKAGE = "fairedge.common.wire"

# protoc emits `import foo_pb2 as foo__pb2` for local imports, which only works with
# the output folder on sys.path; rewrite them to package imports.
_LOCAL_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def generate(out_dir: Path = WIRE_DIR, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every `proto_dir/*.proto` into `out_dir`; return the files written.

    Writes `<name>_pb2.py` and `<name>_pb2.pyi`, plus `<name>_pb2_grpc.py` for files that
    define a gRPC `service`.
    """
    from grpc_tools import protoc  # dev-time dependency only

    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files in {proto_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    written: list[Path] = []
    for proto in protos:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
        ]
        outputs = [f"{proto.stem}_pb2.py", f"{proto.stem}_pb2.pyi"]
        if re.search(r"^\s*service\s+\w+", proto.read_text(), re.MULTILINE):
            args.append(f"--grpc_python_out={out_dir}")
            outputs.append(f"{proto.stem}_pb2_grpc.py")
        if protoc.main([*args, str(proto)]) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        for name in outputs:
            path = out_dir / name
            atomic_write_text(path, _LOCAL_IMPORT.sub(rf"from {PACKAGE} import \1 as \2", path.read_text()))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WIRE_DIR, help="output folder (default: common/wire)")
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR, help="folder of .proto sources")
    args = parser.parse_args(argv)
    for path in generate(args.out, args.proto_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
