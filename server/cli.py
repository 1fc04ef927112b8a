"""`fairedge-server`: server-side tools (ONNX export, CEMA cloud service)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairedge-server", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("export", help="merge the global LoRA into the base model and export ONNX (not yet available)")
    sub.add_parser("cloud", help="run the CEMA cloud gRPC service (not yet available)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"fairedge-server {args.command}: not implemented yet in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
