"""What secure aggregation costs per round: bytes and seconds, SecAgg+ vs plaintext, FedIT and LoRA-FAIR.

    python -m fairedge.simulations.bench_secagg [--quick] [--repeats N]

The clients' adapters are synthetic, of SmolLM2-135M's real LoRA shapes (30 decoder layers × q/o
576×576, k/v 576→192, r = 16: 1.84 M values, `smollm2_adapter_cost.make_adapter_updates`), K = 8
clients with 50–500 examples each; `--quick` keeps 2 layers. Each round runs the real protocol
(`fairedge.server.secagg` ↔ `fairedge.client.secagg`) over the in-process Grid: the clients are
called one after another in this process, so "client s" is the sum over the 8 clients' protocol
work (key agreement, Shamir shares, encoding, AES-CTR masks) and "server s" the rest of the round
(sampling, unmasking, decoding, the rule). No training: a client answers with its fixed adapter.
The configurations take turns round by round, so machine load hits them alike; medians are shown.

Bytes: payload bytes of every message of the round (arrays, and the protocol's bytes: keys,
encrypted shares, masked vectors), both directions. Error: the largest difference between the
secure and the plaintext global adapter of the same round. Writes
`simulations/results/secagg_cost.{md,json}` (not with `--quick`).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fairedge.client.secagg import secagg_mod
from fairedge.common.adapter_record import adapter_from_record, adapter_to_record, reply_tensors, tensors_to_record
from fairedge.common.aggregation import Adapter, ClientUpdate, FedIT, LoraFair
from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.privacy_config import SecureAggregationConfig
from fairedge.server.secagg import SecureAggregation
from fairedge.server.strategy import LoraStrategy
from fairedge.simulations import smollm2_adapter_cost as smollm2
from fairedge.simulations.paths import RESULTS
from fairedge.simulations.simulate import InProcessGrid

K = 8
MAX_WEIGHT = 500.0
MODES: dict[str, dict[str, Any] | None] = {
    "plaintext": None,
    "secagg (32-bit ring, 24-bit levels)": {"modulus_bits": 32, "quantization_bits": 24},
    "secagg (64-bit ring, 48-bit levels)": {"modulus_bits": 64, "quantization_bits": 48},
}


class _Clients:
    """A ClientApp whose node `i` answers with client `i`'s fixed adapter, timing all client-side work."""

    def __init__(self, updates: list[ClientUpdate]) -> None:
        self.replies = [tensors_to_record(reply_tensors(u.adapter)) for u in updates]
        self.examples = [u.num_examples for u in updates]
        self.seconds = 0.0
        self.app = ClientApp(mods=[self._timed, secagg_mod])

        @self.app.train()
        def _train(msg: Message, context: Context) -> Message:
            i = int(context.node_config["partition-id"])
            metrics = MetricRecord({"num-examples": self.examples[i], "train-loss": 1.0, "partition-id": i})
            return Message(RecordDict({"arrays": self.replies[i], "metrics": metrics}), reply_to=msg)

    def _timed(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        started = time.perf_counter()
        try:
            return call_next(msg, context)
        finally:
            self.seconds += time.perf_counter() - started


def _round(method: str, mode: str, clients: _Clients, current: Adapter, server_round: int) -> dict[str, Any]:
    rule = FedIT() if method == "fedit" else LoraFair(lam=0.01, objective="frobenius")
    strategy = LoraStrategy(rule, min_train_nodes=K, update_norm_rule="off")
    grid = InProcessGrid(clients.app, K)
    arrays, config = adapter_to_record(current), ConfigRecord({})
    clients.seconds = 0.0
    started = time.perf_counter()
    if (options := MODES[mode]) is None:
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        out, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    else:
        cfg = SecureAggregationConfig(enabled=True, clip_range=1.0, max_weight=MAX_WEIGHT, **options)
        out, _ = SecureAggregation(cfg, lam=0.01).run_round(strategy, server_round, arrays, config, grid)
    seconds = time.perf_counter() - started
    entry = strategy.rounds[-1]
    assert out is not None, entry.failure
    return {
        "seconds": seconds,
        "client_seconds": clients.seconds,
        "server_seconds": seconds - clients.seconds,
        "bytes_up": entry.bytes_up,
        "bytes_down": entry.bytes_down,
        "adapter": adapter_from_record(out),
    }


def _max_error(a: Adapter, b: Adapter) -> float:
    return max(
        float((x - y).abs().max())
        for layer in a.factors
        for x, y in zip(a.factors[layer], b.factors[layer], strict=True)
    )


def run(layers: int, repeats: int) -> dict[str, Any]:
    updates, current = smollm2.make_adapter_updates("attention", K)
    if layers < smollm2.SMOLLM2_LAYERS:
        keep = {n for n in current.factors if int(n.split(".")[2]) < layers}
        updates = [
            ClientUpdate(Adapter({n: f for n, f in u.adapter.factors.items() if n in keep}), u.num_examples, u.node_id)
            for u in updates
        ]
        current = Adapter({n: f for n, f in current.factors.items() if n in keep})
    values = sum(a.numel() + b.numel() for a, b in current.factors.values())
    clients = _Clients(updates)
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {
        (m, mode): [] for m in ("fedit", "lora_fair") for mode in MODES
    }
    for rep in range(repeats):
        for (method, mode), got in rows.items():
            got.append(_round(method, mode, clients, current, server_round=rep + 1))
            print(f"rep {rep}: {method:9s} {mode:38s} {got[-1]['seconds']:.3f} s", flush=True)
    table = []
    for method in ("fedit", "lora_fair"):
        plain = rows[(method, "plaintext")]
        for mode in MODES:
            got = rows[(method, mode)]
            med = {k: statistics.median(r[k] for r in got) for k in ("seconds", "client_seconds", "server_seconds")}
            up, down = got[0]["bytes_up"], got[0]["bytes_down"]
            table.append(
                {
                    "method": method,
                    "mode": mode,
                    **med,
                    "bytes_up": up,
                    "bytes_down": down,
                    "seconds_ratio": med["seconds"] / statistics.median(r["seconds"] for r in plain),
                    "bytes_up_ratio": up / plain[0]["bytes_up"],
                    "bytes_down_ratio": down / plain[0]["bytes_down"],
                    "max_error_vs_plaintext": _max_error(got[0]["adapter"], plain[0]["adapter"]),
                }
            )
    return {
        "adapter_values": values,
        "layers": layers,
        "clients": K,
        "rank": smollm2.SMOLLM2_RANK,
        "repeats": repeats,
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "rows": table,
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Secure aggregation cost per round (SecAgg+ vs plaintext)",
        "",
        f"Synthetic adapters of SmolLM2-135M's attention LoRA shapes ({report['layers']} layers × q,k,v,o, "
        f"r = {report['rank']}, {report['adapter_values']:,} values), K = {report['clients']} clients, no dropouts; "
        f"median of {report['repeats']} rounds per row, configurations taking turns; clients run one after another "
        f"in one process on one torch thread ({report['machine']}). Regenerate: `python -m fairedge.simulations.bench_secagg`.",
        "",
        "| method | mode | s / round | × plain | client s (all 8) | server s | MB up | × plain | MB down | × plain "
        "| max error vs plain |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['seconds']:.3f} | {r['seconds_ratio']:.2f} | "
            f"{r['client_seconds']:.3f} | {r['server_seconds']:.3f} | {r['bytes_up'] / 1e6:.2f} | "
            f"{r['bytes_up_ratio']:.2f} | {r['bytes_down'] / 1e6:.2f} | {r['bytes_down_ratio']:.2f} | "
            f"{r['max_error_vs_plaintext']:.2e} |"
        )
    lines += [
        "",
        "Bytes count every message's payload (arrays, keys, encrypted shares, masked vectors); plaintext FedIT and "
        "LoRA-FAIR send the same. LoRA-FAIR under SecAgg adds a second masked phase: `Ā` down (r·n per layer) and "
        "`B_k A_k Āᵀ` up (m·r per layer) from every client. The 64-bit ring doubles the masked uplink and makes the "
        "quantisation error negligible.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 repeats; prints only")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the other benchmarks: small products on a shared machine
    layers, repeats = (2, 2) if args.quick else (smollm2.SMOLLM2_LAYERS, args.repeats)
    report = run(layers, repeats)
    text = _markdown(report)
    print(text)
    if not args.quick:
        atomic_write_json(RESULTS / "secagg_cost.json", report, indent=2, sort_keys=False)
        atomic_write_text(RESULTS / "secagg_cost.md", text)


if __name__ == "__main__":
    main()
