"""`fairedge-server`: server-side tools (ONNX export, CEMA cloud service)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fairedge.server.cloud.cli import add_cloud_arguments, add_credentials_arguments, run_cloud, run_credentials


def cmd_certs(args: argparse.Namespace) -> int:
    """Write a local CA, a server certificate and SuperNode key pairs (see `fairedge.common.certificates`)."""
    from fairedge.common.certificates import make_credentials

    hosts = [h for h in args.hosts.split(",") if h.strip()]
    try:
        creds = make_credentials(args.out, hosts=hosts, nodes=args.nodes)
    except (ValueError, FileExistsError) as err:
        print(f"fairedge-server certs: {err}", file=sys.stderr)
        return 2
    print(
        f"CA:          {creds.ca.cert_path} (give this to every SuperNode and flwr CLI)\n"
        f"server cert: {creds.server.cert_path} + {creds.server.key_path} (valid for {', '.join(creds.server.hosts)})"
    )
    for node in creds.nodes:
        print(f"node key:    {node.private_path} (SuperNode) + {node.public_path} (flwr supernode register)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's merged model to ONNX and print where it went and its parity with PyTorch."""
    import torch

    from fairedge.common.config import ConfigError, load_config
    from fairedge.common.edge_model import NormExportError
    from fairedge.server.export import describe, export_run

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # this process's one setting, made here at its entry point
    try:
        config = Path(args.run_dir) / "config.toml"
        if config.is_file() and load_config(config).model.kind == "hf-causal-lm":
            from fairedge.server.export import export_lm_run

            folder = export_lm_run(args.run_dir, args.out, int8=args.int8)
            print(f"fairedge-server export: {folder}/ (model.onnx with past key values, tokenizer"
                  + (", model_quantized.onnx" if args.int8 else "") + ")")  # fmt: skip
            return 0
        report = export_run(args.run_dir, args.out, int8=args.int8)
    except (FileNotFoundError, ConfigError, NormExportError, ValueError) as err:
        print(f"fairedge-server export: {err}", file=sys.stderr)
        return 2
    print(describe(report))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fairedge-server", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    certs = sub.add_parser("certs", help="make a local CA, a TLS server certificate and SuperNode key pairs")
    certs.add_argument("--out", required=True, help="folder to create them in (must not hold credentials yet)")
    certs.add_argument(
        "--hosts",
        default="",
        help="extra server names/IPs for the certificate, comma-separated "
        "(localhost, 127.0.0.1 and ::1 are always included)",
    )
    certs.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make (default: %(default)s)")
    export = sub.add_parser("export", help="merge a run's global LoRA into the base model and export ONNX for the edge")
    export.add_argument("run_dir", help="a finished run folder (config.toml, adapter/)")
    export.add_argument(
        "--out", default=None, help="ONNX file to write (default: <run_dir>/model.onnx, or model-int8.onnx with --int8)"
    )
    export.add_argument("--int8", action="store_true", help="int8 dynamic quantisation of the weights")
    export.add_argument(
        "--threads", type=_positive_int, default=None, help="torch threads for the parity check (default: torch's)"
    )
    add_cloud_arguments(sub.add_parser("cloud", help="run the CEMA cloud gRPC service for a run's merged model"))
    add_credentials_arguments(
        sub.add_parser("credentials", help="issue, rotate, revoke or list the edge devices' credentials for the cloud")
    )
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "certs":
        return cmd_certs(args)
    if args.command == "export":
        return cmd_export(args)
    if args.command == "cloud":
        return run_cloud(args)
    if args.command == "credentials":
        return run_credentials(args)
    print(f"fairedge-server {args.command}: not implemented yet in this version", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
