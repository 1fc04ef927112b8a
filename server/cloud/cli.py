"""`fairedge-server cloud`: run the CEMA cloud service for a run's merged model until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path


def add_cloud_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fairedge-server cloud`."""
    parser.add_argument("--run", required=True, help="run folder whose merged global model the devices run")
    parser.add_argument("--teacher", help="another run folder whose model teaches (default: the served model)")
    parser.add_argument("--state-dir", help="device state folder (default: <run>/cloud-state)")
    parser.add_argument("--host", help="address to listen on (default: cloud.host)")
    parser.add_argument("--port", type=int, help="port (default: cloud.port; 0 = any free port)")
    parser.add_argument(
        "--tokens",
        help="file of accepted bearer tokens, one per line (also read: $FAIREDGE_CLOUD_TOKENS, comma-separated)",
    )
    parser.add_argument("--tls-cert", help="server certificate chain (PEM); needs --tls-key")
    parser.add_argument("--tls-key", help="server private key (PEM); needs --tls-cert")
    parser.add_argument("--config", help="TOML whose [cloud] section to use (default: the run's config.toml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set cloud.lr=0.005 (repeatable)",
    )
    parser.add_argument("--seed", type=int, help="seed of the replay sampling (default: the run's seed)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every update")


def run_cloud(args: argparse.Namespace) -> int:
    """Start the service, print its address, serve until SIGINT/SIGTERM, then stop cleanly."""
    import torch

    from fairedge.common.config import ConfigError, load_config
    from fairedge.server.cloud import CloudService, load_served_model, load_tokens

    run = Path(args.run)

    def fail(message: str) -> int:
        print(f"fairedge-server cloud: {message}", file=sys.stderr)
        return 2

    if bool(args.tls_cert) != bool(args.tls_key):
        return fail("--tls-cert and --tls-key go together")
    try:
        cfg = load_config(args.config or run / "config.toml", args.set)
        tokens = load_tokens(args.tokens)
        tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes()) if args.tls_cert else None
        model = load_served_model(run, args.teacher)
        state_dir = Path(args.state_dir) if args.state_dir else run / "cloud-state"
        service = CloudService(
            model, state_dir, cfg.cloud, tokens=tokens, tls=tls, seed=cfg.seed if args.seed is None else args.seed
        )
    except (ConfigError, ValueError, OSError) as err:
        return fail(str(err))
    if cfg.cloud.threads:  # process-wide, so the entry point's call: oversubscribed cores make steps 10-40x slower
        torch.set_num_threads(cfg.cloud.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("fairedge.cloud").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            address = service.start(host=args.host, port=args.port)
        except OSError as err:
            return fail(str(err))
        print(
            f"fairedge cloud: serving model {model.model_id} ({model.model_version}) on {address} "
            f"({'TLS' if tls else 'plaintext'}), {len(model.student_norm)} norm params, state in {state_dir}; "
            "Ctrl-C to stop",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print("fairedge cloud: stopping", flush=True)
    finally:
        service.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"fairedge cloud: stopped after {service.log.updates} updates", flush=True)
    return 0
