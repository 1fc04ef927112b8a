"""`fairedge-edge`: the edge runtime (ONNX Runtime inference with CEMA adaptation)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairedge-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="serve predictions on a stream and adapt with CEMA (not yet available)")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    print(f"fairedge-edge {args.command}: not implemented yet in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
