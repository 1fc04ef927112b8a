"""`fairedge-server cloud`: run the CEMA cloud service for a run's merged model until Ctrl-C / SIGTERM;
`fairedge-server cloud status`: the running service's per-device counters (from its status file);
`fairedge-server credentials`: issue, rotate, revoke and list the devices' credentials (while it runs)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def add_cloud_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fairedge-server cloud` and its `status` sub-command."""
    sub = parser.add_subparsers(dest="cloud_action", metavar="{status}")
    status = sub.add_parser("status", help="per-device counters of a running (or stopped) cloud service")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--state-dir", help="the service's state folder (it rewrites status.json there)")
    where.add_argument("--run", help="the run folder it serves (state folder <run>/cloud-state)")
    status.add_argument("--json", action="store_true", help="print the whole status document as JSON")
    parser.add_argument("--run", help="run folder whose merged global model the devices run (required)")
    parser.add_argument("--teacher", help="another run folder whose model teaches (default: the served model)")
    parser.add_argument("--state-dir", help="device state folder (default: <run>/cloud-state)")
    parser.add_argument("--host", help="address to listen on (default: cloud.host)")
    parser.add_argument("--port", type=int, help="port (default: cloud.port; 0 = any free port)")
    parser.add_argument(
        "--credentials",
        help="devices' credentials file (fairedge-server credentials; default: <state-dir>/credentials.json); "
        "re-read when it changes, so issuing and revoking need no restart",
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
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port at cloud.metrics_host (default: cloud.metrics_port; 0 = any)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every update")


def run_cloud(args: argparse.Namespace) -> int:
    """Start the service, print its address, serve until SIGINT/SIGTERM, then stop cleanly."""
    if args.cloud_action == "status":
        return show_status(args)
    import torch

    from fairedge.common.config import ConfigError, load_config
    from fairedge.server.cloud import CloudService, load_served_model

    def fail(message: str) -> int:
        print(f"fairedge-server cloud: {message}", file=sys.stderr)
        return 2

    if not args.run:
        return fail("--run is required (the run folder whose merged model the devices run)")
    run = Path(args.run)
    if bool(args.tls_cert) != bool(args.tls_key):
        return fail("--tls-cert and --tls-key go together")
    try:
        overrides = args.set + ([f"cloud.metrics_port={args.metrics_port}"] if args.metrics_port is not None else [])
        cfg = load_config(args.config or run / "config.toml", overrides)
        state_dir = Path(args.state_dir) if args.state_dir else run / "cloud-state"
        credentials = Path(args.credentials) if args.credentials else state_dir / "credentials.json"
        if not credentials.is_file():
            raise ValueError(
                f"no credentials file {str(credentials)!r}: the cloud service refuses to run without authentication; "
                f"issue a device's credential first: fairedge-server credentials issue --credentials {credentials} "
                "<device-id>"
            )
        tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes()) if args.tls_cert else None
        model = load_served_model(run, args.teacher)
        service = CloudService(
            model,
            state_dir,
            cfg.cloud,
            credentials=credentials,
            tls=tls,
            seed=cfg.seed if args.seed is None else args.seed,
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
            f"({'TLS' if tls else 'plaintext'}), {len(model.student_norm)} norm params, state in {state_dir}, "
            f"{len(service.credentials.entries())} device credentials in {service.credentials.path}"
            + (
                f", Prometheus metrics on {cfg.cloud.metrics_host}:{service.metrics_port}"
                if service.metrics_port
                else ""
            )
            + "; Ctrl-C to stop",
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


def add_credentials_arguments(parser: argparse.ArgumentParser) -> None:
    """The sub-commands of `fairedge-server credentials`."""
    sub = parser.add_subparsers(dest="action", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--credentials",
        required=True,
        help="the credentials file the cloud reads (fairedge-server cloud --credentials; "
        "by default <state-dir>/credentials.json)",
    )
    issue = sub.add_parser(
        "issue", parents=[where], help="make a device's credential (printed once; the file keeps only a hash)"
    )
    issue.add_argument("device_id", help="the device it is bound to (fairedge-edge run --device-id)")
    issue.add_argument(
        "--out", help="write the credential to this file (mode 0600; the device's --token-file) instead of printing it"
    )
    issue.add_argument(
        "--replace", action="store_true", help="rotate: replace the device's credential (the old one stops working)"
    )
    revoke = sub.add_parser("revoke", parents=[where], help="revoke a device's credential (effective at its next call)")
    revoke.add_argument("device_id")
    sub.add_parser("list", parents=[where], help="list the devices that have a credential, and when it was issued")


def run_credentials(args: argparse.Namespace) -> int:
    """Issue / revoke / list; a running cloud picks the change up at its next call."""
    from fairedge.common.atomic_files import atomic_write_text
    from fairedge.server.cloud.credentials import CredentialStore
    from fairedge.server.cloud.errors import CloudError

    store = CredentialStore(args.credentials)
    try:
        if args.action == "issue":
            token = store.issue(args.device_id, replace=args.replace)
            if args.out:
                atomic_write_text(Path(args.out), token + "\n")  # a new file from mkstemp: mode 0600
                print(f"credential of device {args.device_id!r} written to {args.out} (give it to the device only)")
            else:
                print(token)
        elif args.action == "revoke":
            store.revoke(args.device_id)
            print(f"credential of device {args.device_id!r} revoked; its next call is refused")
        else:
            for device_id, entry in sorted(store.entries().items()):
                print(f"{device_id}\tissued {entry.issued_at}")
    except (CloudError, ValueError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) else str(err)
        print(f"fairedge-server credentials {args.action}: {message}", file=sys.stderr)
        return 2
    return 0


def show_status(args: argparse.Namespace) -> int:
    """Print the per-device table of `<state-dir>/status.json`; warn when the service stopped rewriting it."""
    state_dir = Path(args.state_dir) if args.state_dir else Path(args.run) / "cloud-state"
    path = state_dir / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        print(
            f"fairedge-server cloud status: cannot read {path} ({err}); the service writes it while it runs",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(json.dumps(status, indent=1, sort_keys=True))
        return 0
    print(format_status(status))
    age, every = time.time() - status["written_at"], status["service"]["status_every_s"]
    if not status["service"]["running"]:
        print(f"warning: the service stopped {age:.0f} s ago; these are its final counters", file=sys.stderr)
    elif age > 3 * every + 1:
        print(
            f"warning: {path} was written {age:.0f} s ago (every {every:g} s while the service runs): "
            "the service is not running (it ended without stopping cleanly) or is stuck",
            file=sys.stderr,
        )
    return 0


def format_status(status: dict[str, Any]) -> str:
    """The status document as a header and one line per device."""
    svc, now = status["service"], time.time()
    lines = [
        f"model {svc['model_id']} ({svc['model_version']}) at {svc['address']}, up {status['uptime_s']:.0f} s, "
        f"{svc['devices']} devices, {svc['updates']} updates ({svc['failures']} failed); "
        f"written {now - status['written_at']:.0f} s ago",
        f"{'device':<20} {'version':>7} {'uploads':>7} {'accepted':>9} {'resent':>7} {'pending':>7} "
        f"{'replay':>7} {'last seen':>10}  rejections",
    ]
    for device_id, row in status["devices"].items():
        seen = f"{now - row['last_seen']:.0f} s ago" if row.get("last_seen") else "-"
        refused = ", ".join(f"{reason} {n}" for reason, n in sorted(row["rejections"].items())) or "-"
        if row.get("error"):
            refused += f"; updates paused: {row['error']}"
        lines.append(
            f"{device_id or '(no known device)':<20} {row.get('params_version', '-'):>7} {row['uploads']:>7} "
            f"{row.get('total_accepted', row['samples_accepted']):>9} {row['samples_resent']:>7} "
            f"{row.get('pending_samples', '-'):>7} {row.get('replay_buffer', '-'):>7} {seen:>10}  {refused}"
        )
    return "\n".join(lines)
