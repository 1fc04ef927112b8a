"""`fairedge-edge`: the edge runtime (ONNX Runtime inference with CEMA adaptation)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fairedge-edge run`."""
    parser.add_argument("--model", required=True, help="exported ONNX model (fairedge-server export)")
    parser.add_argument(
        "--input", required=True, help="a folder of images/.npy files, a .npz (x[, y]) or a .csv/.jsonl (text[, label])"
    )
    parser.add_argument("--cloud", help="cloud service host:port (without it samples only queue up on disk)")
    parser.add_argument(
        "--token-file",
        help="file holding this device's credential, '<device-id>:<secret>' (fairedge-server credentials issue "
        "--out); needed with --cloud",
    )
    parser.add_argument(
        "--tls-ca",
        help="CA certificate (PEM) to verify the cloud's TLS certificate; without it the connection is plaintext",
    )
    parser.add_argument(
        "--device-id",
        help="stable id of this device (default: the one its credential is bound to; without --cloud: edge-0)",
    )
    parser.add_argument("--queue-dir", help="upload queue folder (default: edge-queue/<device-id>)")
    parser.add_argument("--config", help="TOML whose [edge] section to use (default: built-in defaults)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set edge.e_max=0.3 (repeatable)",
    )
    parser.add_argument("--log", help="JSON log to write (default: runs/edge-<time>-<device-id>.json)")
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to wait at the end for queued uploads and new params (default: %(default)s)",
    )
    parser.add_argument("--progress-every", type=int, default=10, help="batches between progress lines")


def run_edge(args: argparse.Namespace) -> int:
    """Serve predictions on the input stream, adapt through the cloud, write the JSON log."""
    from fairedge.client.edge import CloudEndpoint, EdgeRuntime, open_stream
    from fairedge.common.config import ConfigError, load_config

    def fail(message: str) -> int:
        print(f"fairedge-edge run: {message}", file=sys.stderr)
        return 2

    if args.cloud and not args.token_file:
        return fail("--cloud needs --token-file (the cloud refuses calls without a token)")
    try:
        cfg = load_config(args.config, args.set)
        cloud = CloudEndpoint.from_files(args.cloud, args.token_file, args.tls_ca) if args.cloud else None
        device_id = args.device_id or (cloud.device_id if cloud else "edge-0")
        queue_dir = Path(args.queue_dir) if args.queue_dir else Path("edge-queue") / device_id
        runtime = EdgeRuntime(
            args.model,
            cfg.edge,
            cloud=cloud,
            device_id=device_id,
            queue_dir=queue_dir,
            config_name=cfg.name if args.config else None,
        )
        stream = open_stream(args.input, runtime.info, cfg.edge.batch_size)
    except (ConfigError, ValueError, OSError) as err:
        return fail(str(err))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = Path(args.log) if args.log else Path("runs") / f"edge-{stamp}-{device_id}.json"
    print(
        f"fairedge edge: device {device_id}, model {runtime.info.model_id} ({runtime.info.model_version}, "
        f"{runtime.info.task}, {runtime.session.num_classes} classes), select={cfg.edge.select}, "
        f"cloud={args.cloud or 'none'}{' (TLS)' if args.tls_ca else ''}, queue {queue_dir}",
        flush=True,
    )
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with runtime:
            for i, batch in enumerate(stream):
                if stop.is_set():
                    print("fairedge edge: interrupted; queued samples stay on disk", flush=True)
                    break
                runtime.process(batch)
                if (i + 1) % args.progress_every == 0:
                    print(progress_line(runtime.report()), flush=True)
            if args.cloud and not stop.is_set() and args.drain_timeout > 0:
                if not runtime.drain(args.drain_timeout):
                    print(
                        f"fairedge edge: cloud not caught up after {args.drain_timeout:g} s; "
                        "the queue keeps what is left for the next run",
                        flush=True,
                    )
            runtime.write_log(log_path)
            report = runtime.report()
    except (ValueError, OSError) as err:
        return fail(str(err))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(progress_line(report), flush=True)
    print(f"fairedge edge: log written to {log_path}", flush=True)
    return 0


def progress_line(report: dict) -> str:
    """One line: samples, accuracy, uploads, queue, bytes, params version, last cloud error."""
    acc = f"acc {report['accuracy']:.3f}" if report["accuracy"] is not None else "acc n/a"
    cloud = report["cloud"] or {}
    line = (
        f"{report['predictions']} samples, {acc}, selected {report['selected']} "
        f"({report['selected_fraction']:.1%}), uploaded {report['uploaded']}, "
        f"queued {report['queue'].get('pending_samples', 0)}, dropped {report['queue'].get('dropped_samples', 0)}, "
        f"up {report['bytes_up'] / 1e6:.2f} MB, down {report['bytes_down'] / 1e6:.2f} MB, "
        f"params v{report['params_version']}"
    )
    if report["queue"].get("unsaved_samples"):
        line += f", NOT SAVED {report['queue']['unsaved_samples']} (disk: {report['queue_error']})"
    if cloud.get("last_error"):
        line += f", last cloud error: {cloud['last_error']}"
    return line


def build_parser() -> argparse.ArgumentParser:
    """The `fairedge-edge` command line (sub-command `run`)."""
    parser = argparse.ArgumentParser(prog="fairedge-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    add_run_arguments(sub.add_parser("run", help="serve predictions on a stream and adapt with CEMA"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return run_edge(args)


if __name__ == "__main__":
    sys.exit(main())
