"""The client's cost on the real causal LM: fairedge's training loop vs a plain PEFT loop, the ClientApp's
overhead, the server's share of a round, and a client's peak memory.

    python -m fairedge.simulations.bench_client [--pairs 5] [--steps 10] [--warmup 2] [--app-repeats 2]
        [--config simulations/configs/shakespeare.toml] [--set key=value ...] [--out simulations/results]
    python -m fairedge.simulations.bench_client --quick      # smoke check, under a minute; writes to a temp folder

Everything runs in this one process on one torch thread (set once, here), on the demo's model and LoRA settings
(SmolLM2-135M-Instruct, the config's `[lora]`), one Shakespeare role's training rows (client 0), the config's
batch size and sequence length:

1. *Loops*: `fairedge.common.training.train_local` (what a client runs) and a plain PEFT loop as a PEFT user
   writes it (`get_peft_model` with the same LoraConfig, AdamW, `model(input_ids, attention_mask,
   labels=labels).loss`, backward, step) on a second copy of the model, in alternating blocks of `--steps`
   steps after a warm-up (pair i runs fairedge first when i is even, the plain loop first when odd). Tokens
   are non-pad input tokens. Reported: tokens/s of each block, their medians, and the median of the paired
   ratios fairedge / plain (goal >= 0.9).
2. *ClientApp*: `fairedge.client.client_app.run_train` on a Flower train Message (the global adapter and the
   run config, as the server sends them), timed whole and by part (load the task, build the LoRA model,
   train, compress the update).
3. *Server share*: a short in-process federation (`simulate(engine="inprocess")`, the config with 2 clients);
   per round, the round's `seconds` (metrics.json: configure, clients, aggregate, server evaluation) split
   into the clients' `run_train` calls and the server's parts, plus the checkpoint written after it.
4. *Peak RSS*: a subprocess that builds the same message and runs one `run_train` reports its peak resident
   memory (`VmHWM`) and its resident memory just before the call.

Writes `client_bench.{json,md}` to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from fairedge.client import client_app
from fairedge.common.adapter_record import adapter_to_record, flatten, unflatten
from fairedge.common.atomic_files import atomic_write_json, atomic_write_text
from fairedge.common.config import RunConfig, load_config
from fairedge.common.data.token_data import TokenData
from fairedge.common.models.causal_lm import LORA_TARGET_PRESETS
from fairedge.common.task import causal_lm_dir, client_partition, config_json, get_adapter, load_task, lora_model
from fairedge.common.training import train_local
from fairedge.simulations.paths import RESULTS, ROOT, display

DEMO_CONFIG = ROOT / "simulations" / "configs" / "shakespeare.toml"
BENCH_SETTINGS = ["federation.num_clients=2", "federation.min_train_nodes=2", "federation.rounds=2"]
"""The demo config made small: two clients (both train every round), two rounds."""
QUICK_SETTINGS = ["federation.rounds=1", "federation.local_steps=1", "data.reply_tokens=2"]
CLIENT_PARTS = ("load_task", "lora_model", "train_client_round", "compress_update")
"""The parts of `run_train` timed apart (names in `fairedge.client.client_app`)."""


# --- timing helpers -------------------------------------------------------------------------------------------


@dataclass
class Calls:
    """Wall-clock intervals of wrapped calls: (name, start, end) in `time.time()` seconds."""

    spans: list[tuple[str, float, float]] = field(default_factory=list)

    def seconds(self, name: str, start: float = float("-inf"), end: float = float("inf")) -> list[float]:
        """Durations of the calls of `name` that began in [start, end]."""
        return [b - a for n, a, b in self.spans if n == name and start <= a <= end]


@contextlib.contextmanager
def timed(calls: Calls, owner: Any, *names: str) -> Iterator[None]:
    """Replace `owner.<name>` (a module's or class's function) by a wrapper that records each call, then restore it."""
    originals = {name: getattr(owner, name) for name in names}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            start = time.time()
            try:
                return fn(*args, **kwargs)
            finally:
                calls.spans.append((name, start, time.time()))

        return timed_call

    try:
        for name, fn in originals.items():
            setattr(owner, name, wrap(name, fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(owner, name, fn)


# --- 1. fairedge's loop vs a plain PEFT loop -------------------------------------------------------------------


@dataclass
class CountingTokens:
    """A client's `TokenData` that counts the non-pad input tokens of the batches drawn from it."""

    data: TokenData
    tokens: int = 0

    @property
    def domain(self) -> torch.Tensor:
        return self.data.domain

    @property
    def eval_batch_size(self) -> int:
        return self.data.eval_batch_size

    def __len__(self) -> int:
        return len(self.data)

    def subset(self, idx: Any) -> TokenData:
        return self.data.subset(idx)

    def batch(self, model: nn.Module, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        batch = self.data.batch(model, idx, device)
        self.tokens += int(batch["attention_mask"].sum())
        return batch

    def loss_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        return self.data.loss_terms(model, batch)


def plain_peft_model(cfg: RunConfig) -> PeftModel:
    """The same base model and LoRA settings, set up the way the PEFT documentation does it."""
    base = AutoModelForCausalLM.from_pretrained(causal_lm_dir(cfg), dtype=torch.float32, local_files_only=True)
    lora = cfg.lora
    n_layers = int(base.config.num_hidden_layers)
    targets = lora.target_modules or LORA_TARGET_PRESETS["attention"]
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        layers_to_transform=list(range(n_layers - lora.top_layers, n_layers)) if lora.top_layers else None,
        layers_pattern="layers" if lora.top_layers else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def plain_batches(data: TokenData, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Shuffled batches of (input_ids, attention_mask, labels) from a DataLoader, epoch after epoch."""
    loader = DataLoader(
        TensorDataset(data.input_ids, data.attention_mask, data.labels),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    while True:
        yield from loader


def plain_block(
    model: PeftModel, opt: torch.optim.Optimizer, batches: Iterator[tuple[torch.Tensor, ...]], steps: int
) -> int:
    """`steps` optimizer steps of the plain loop; returns the non-pad input tokens it trained on."""
    model.train()
    tokens = 0
    for _ in range(steps):
        input_ids, attention_mask, labels = next(batches)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += int(attention_mask.sum())
    return tokens


def loss_agreement(model: nn.Module, data: TokenData, batch_size: int) -> dict[str, float]:
    """fairedge's loss (`TokenData.loss_terms`) and Hugging Face's (`labels=`) on the same batch: the two loops
    optimise the same objective."""
    batch = data.batch(model, torch.arange(batch_size), torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        total, _, count = data.loss_terms(model, batch)
        hf = model(**batch).loss
    return {"fairedge": float(total / count), "hugging_face": float(hf), "abs_diff": abs(float(total / count - hf))}


def compare_loops(
    cfg: RunConfig, data: TokenData, *, pairs: int, steps: int, warmup: int, log: Callable[[str], None]
) -> dict[str, Any]:
    f = cfg.federation
    ours = lora_model(cfg)
    plain = plain_peft_model(cfg)
    trainable = {
        "fairedge": sum(p.numel() for p in ours.parameters() if p.requires_grad),
        "plain": sum(p.numel() for p in plain.parameters() if p.requires_grad),
    }
    if trainable["fairedge"] != trainable["plain"]:
        raise RuntimeError(f"the two models train different parameters: {trainable}")
    agreement = loss_agreement(ours, data, f.batch_size)
    counted = CountingTokens(data)
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=f.lr)
    batches = plain_batches(data, f.batch_size, cfg.seed)

    def run_ours(seed: int, n: int) -> tuple[int, float]:
        before, start = counted.tokens, time.perf_counter()
        train_local(ours, counted, steps=n, batch_size=f.batch_size, lr=f.lr, optimizer="adamw", seed=seed)
        return counted.tokens - before, time.perf_counter() - start

    def run_plain(n: int) -> tuple[int, float]:
        start = time.perf_counter()
        tokens = plain_block(plain, opt, batches, n)
        return tokens, time.perf_counter() - start

    log(f"loops: warm-up ({warmup} steps each)...")
    run_ours(10_000, warmup)
    run_plain(warmup)
    blocks: dict[str, list[dict[str, float]]] = {"fairedge": [], "plain": []}
    for i in range(pairs):
        order = ("fairedge", "plain") if i % 2 == 0 else ("plain", "fairedge")
        for side in order:
            tokens, seconds = run_ours(i, steps) if side == "fairedge" else run_plain(steps)
            blocks[side].append({"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds})
        ratio = blocks["fairedge"][-1]["tokens_per_second"] / blocks["plain"][-1]["tokens_per_second"]
        log(
            f"  pair {i + 1}/{pairs}: fairedge {blocks['fairedge'][-1]['tokens_per_second']:.0f} tok/s, "
            f"plain {blocks['plain'][-1]['tokens_per_second']:.0f} tok/s, ratio {ratio:.3f}"
        )
    ratios = [a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(*blocks.values(), strict=True)]
    median = {side: statistics.median(b["tokens_per_second"] for b in rows) for side, rows in blocks.items()}
    return {
        "trainable_parameters": trainable["fairedge"],
        "loss_agreement": agreement,
        "blocks": blocks,
        "median_tokens_per_second": median,
        "paired_ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "min_ratio": min(ratios),
        "max_ratio": max(ratios),
    }


# --- 2. the ClientApp call ---------------------------------------------------------------------------------------


def flower_identity() -> None:
    """Messages read the run and node ids from Flower's runtime; outside a running app they are set here
    (as `fairedge.simulations.simulate.InProcessGrid` does; not Flower's public API)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


def train_message(cfg: RunConfig, adapter_record: Any) -> tuple[Message, Context]:
    """A round-1 train message carrying the global adapter and the run config, and node 0's context."""
    config = ConfigRecord({client_app.CONFIG_KEY: config_json(cfg), "server-round": 1})
    msg = Message(
        RecordDict({"arrays": adapter_record, "config": config}), dst_node_id=1000, message_type=MessageType.TRAIN
    )
    context = Context(
        run_id=1,
        node_id=1000,
        node_config={"partition-id": 0, "num-partitions": cfg.federation.num_clients},
        state=RecordDict(),
        run_config={},
    )
    return msg, context


def time_client_app(cfg: RunConfig, adapter_record: Any, repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    calls_per_run = []
    for i in range(repeats):
        calls = Calls()
        msg, context = train_message(cfg, adapter_record)
        with timed(calls, client_app, *CLIENT_PARTS, "run_train"):
            client_app.run_train(msg, context)
        row = {name: sum(calls.seconds(name)) for name in (*CLIENT_PARTS, "run_train")}
        row["other"] = row["run_train"] - sum(row[name] for name in CLIENT_PARTS)
        calls_per_run.append(row)
        log(
            f"  run_train {i + 1}/{repeats}: {row['run_train']:.1f} s, of which training {row['train_client_round']:.1f} s"
        )
    median = {k: statistics.median(r[k] for r in calls_per_run) for k in calls_per_run[0]}
    return {
        "runs": calls_per_run,
        "median_seconds": median,
        "training_share": median["train_client_round"] / median["run_train"],
        "local_steps": cfg.federation.local_steps,
    }


# --- 3. the server's share of a round -----------------------------------------------------------------------------


def time_federation(cfg: RunConfig, log: Callable[[str], None]) -> dict[str, Any]:
    from fairedge.server import federation
    from fairedge.server.strategy import LoraStrategy
    from fairedge.simulations.simulate import simulate

    calls = Calls()
    ends: dict[int, tuple[float, float]] = {}

    def on_round(row: dict[str, Any]) -> None:
        ends[int(row["round"])] = (time.time(), float(row["seconds"]))
        log(f"  round {row['round']}: {row['seconds']:.1f} s")

    with (
        tempfile.TemporaryDirectory(prefix="bench-client-") as run_dir,
        timed(calls, client_app, "run_train"),
        timed(calls, federation, "evaluate_groups", "save_run_state"),
        timed(calls, LoraStrategy, "configure_train", "aggregate_train"),
    ):
        started = time.time()
        simulate(cfg, Path(run_dir), on_round=on_round, engine="inprocess")
        wall = time.time() - started
    rounds = []
    for r, (end, seconds) in sorted(ends.items()):
        start = end - seconds
        clients = calls.seconds("run_train", start, end)
        next_start = ends[r + 1][0] - ends[r + 1][1] if r + 1 in ends else float("inf")
        checkpoint = sum(calls.seconds("save_run_state", end, next_start))
        parts = {
            "clients_run_train": sum(clients),
            "configure_train": sum(calls.seconds("configure_train", start, end)),
            "aggregate_train": sum(calls.seconds("aggregate_train", start, end)),
            "server_evaluation": sum(calls.seconds("evaluate_groups", start, end)),
        }
        server = seconds - parts["clients_run_train"]
        slowest = max(clients, default=0.0)
        rounds.append(
            {
                "round": r,
                "seconds": seconds,
                **parts,
                "server_other": server - sum(v for k, v in parts.items() if k != "clients_run_train"),
                "server": server,
                "checkpoint_after": checkpoint,
                "server_share": server / seconds,
                "server_share_with_checkpoint": (server + checkpoint) / (seconds + checkpoint),
                "server_share_parallel_clients": (server + checkpoint) / (server + checkpoint + slowest),
                "clients": len(clients),
            }
        )
    return {"rounds": rounds, "wall_seconds": wall, "settings": settings_of(cfg)}


# --- 4. peak RSS of one client ------------------------------------------------------------------------------------


def memory_kb(field: str) -> int:
    """A field of this process's `/proc/self/status` in KiB (Linux): `VmRSS` now, `VmHWM` its peak.

    Not `getrusage(...).ru_maxrss`: after a fork and exec Linux keeps the pre-exec peak in it, so a
    subprocess of a large parent reports the parent's memory.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this measurement needs Linux)")


def child_train(folder: Path) -> None:
    """The subprocess of part 4: one `run_train` from the message in `folder`; prints its memory as JSON."""
    import json

    torch.set_num_threads(1)
    cfg = RunConfig.model_validate_json((folder / "config.json").read_text())
    adapter = unflatten(load_file(folder / "adapter.safetensors"))
    flower_identity()
    msg, context = train_message(cfg, adapter_to_record(adapter))
    after_training: dict[str, int] = {}
    train = client_app.train_client_round

    def train_and_look(*args: Any, **kwargs: Any) -> float:
        loss = train(*args, **kwargs)
        after_training.update({f: memory_kb(f) for f in ("RssFile", "RssAnon")})  # the model is still loaded
        return loss

    before = memory_kb("VmRSS")
    start = time.perf_counter()
    client_app.train_client_round = train_and_look
    try:
        client_app.run_train(msg, context)
    finally:
        client_app.train_client_round = train
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "rss_before_kb": before,
                "peak_rss_kb": memory_kb("VmHWM"),
                "after_training_file_kb": after_training["RssFile"],
                "after_training_anon_kb": after_training["RssAnon"],
                "run_train_seconds": seconds,
            }
        )
    )


def measure_client_rss(cfg: RunConfig, adapter: Any) -> dict[str, Any]:
    import json

    with tempfile.TemporaryDirectory(prefix="bench-client-rss-") as folder:
        (Path(folder) / "config.json").write_text(cfg.model_dump_json())
        save_file({k: v.contiguous() for k, v in flatten(adapter).items()}, Path(folder) / "adapter.safetensors")
        out = subprocess.run(
            [sys.executable, "-m", "fairedge.simulations.bench_client", "--child-train", folder],
            capture_output=True,
            text=True,
            check=False,
        )
    if out.returncode != 0:
        raise RuntimeError(f"the client subprocess failed ({out.returncode}):\n{out.stderr[-4000:]}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        **child,
        "peak_rss_mb": child["peak_rss_kb"] / 1024,
        "rss_before_mb": child["rss_before_kb"] / 1024,
        "after_training_file_mb": child["after_training_file_kb"] / 1024,
        "after_training_anon_mb": child["after_training_anon_kb"] / 1024,
    }


# --- report ----------------------------------------------------------------------------------------------------


def settings_of(cfg: RunConfig) -> dict[str, Any]:
    return {
        "num_clients": cfg.federation.num_clients,
        "rounds": cfg.federation.rounds,
        "local_steps": cfg.federation.local_steps,
        "batch_size": cfg.federation.batch_size,
        "seq_len": cfg.data.seq_len,
        "lora": cfg.lora.model_dump(mode="json"),
        "aggregation": cfg.aggregation.method,
        "compression": cfg.compression.model_dump(mode="json"),
    }


def markdown(res: dict[str, Any]) -> str:
    loops, app, fed, rss = res["loops"], res["client_app"], res["federation"], res["client_rss"]
    med, s = loops["median_tokens_per_second"], res["settings"]
    agreement = loops["loss_agreement"]
    lines = [
        "# Client benchmark: fairedge's training loop vs plain PEFT, ClientApp overhead, server share, memory",
        "",
        f"Generated by `{res['command']}` in {res['wall_seconds'] / 60:.1f} min, in one process on "
        f"**{res['threads']} torch thread** (set once at the entry point). Machine: {res['machine']}, "
        f"{res['cpus']} cores **shared with other engineers' jobs** (load average {res['load_start']:.1f} at "
        f"start, {res['load_end']:.1f} at end): absolute times are noisy; the loops ran in alternating blocks so "
        "their ratio is fairer than their times. "
        f"torch {res['torch']}, transformers {res['transformers']}, peft {res['peft']}.",
        "",
        f"Model: {res['model']} (`{res['config']}`: LoRA rank {s['lora']['rank']}, alpha {s['lora']['alpha']}, "
        f"targets {s['lora']['target_modules'] or 'attention (q, k, v, o)'}, top {s['lora']['top_layers']} "
        f"blocks; {loops['trainable_parameters']:,} trainable parameters), fp32 on CPU. Data: the training rows of "
        f"client 0, the Shakespeare role {res['client_role']} ({res['client_rows']} rows of {s['seq_len']} tokens). "
        f"Batch {s['batch_size']}, sequence length {s['seq_len']}.",
        "",
        "## 1. Training loop: fairedge `train_local` vs a plain PEFT loop",
        "",
        f"{loops['pairs']} pairs of {loops['steps']} optimizer steps each after {loops['warmup']} warm-up steps; "
        "pair i runs fairedge first when i is even, the plain loop first when odd. Tokens = non-pad input tokens.",
        "",
        "| pair | fairedge tok/s | plain PEFT tok/s | ratio |",
        "|---|---|---|---|",
    ]
    for i, (a, b, r) in enumerate(
        zip(loops["blocks"]["fairedge"], loops["blocks"]["plain"], loops["paired_ratios"], strict=True)
    ):
        lines.append(f"| {i + 1} | {a['tokens_per_second']:.1f} | {b['tokens_per_second']:.1f} | {r:.3f} |")
    goal = "meets" if loops["median_ratio"] >= 0.9 else "misses"
    lines += [
        f"| **median** | **{med['fairedge']:.1f}** | **{med['plain']:.1f}** | **{loops['median_ratio']:.3f}** |",
        "",
        f"Paired ratio fairedge / plain: median **{loops['median_ratio']:.3f}** (range {loops['min_ratio']:.3f} to "
        f"{loops['max_ratio']:.3f}); it {goal} the goal of >= 0.9. Both loops optimise the same objective: on one "
        f"batch fairedge's loss (`TokenData.loss_terms`) is {agreement['fairedge']:.6f}, Hugging Face's "
        f"(`labels=`) {agreement['hugging_face']:.6f} (difference {agreement['abs_diff']:.1e}).",
        "",
        "## 2. The ClientApp call vs its training",
        "",
        f"`run_train` on a round-1 train message (global adapter + run config), {app['local_steps']} local steps, "
        f"median of {len(app['runs'])} call(s):",
        "",
        "| part | seconds | share |",
        "|---|---|---|",
    ]
    total = app["median_seconds"]["run_train"]
    names = {
        "load_task": "load the task (Shakespeare roles, tokenised)",
        "lora_model": "load SmolLM2 + wrap with LoRA",
        "train_client_round": "train (`train_client_round` -> `train_local`)",
        "compress_update": "ComPEFT-compress the update",
        "other": "the rest (set the adapter, partition, records)",
    }
    for key, label in names.items():
        v = app["median_seconds"][key]
        lines.append(f"| {label} | {v:.2f} | {100 * v / total:.0f} % |")
    lines += [
        f"| **whole `run_train`** | **{total:.2f}** | 100 % |",
        "",
        f"Training is {100 * app['training_share']:.0f} % of the call; the rest is paid on every message because "
        "the ClientApp keeps nothing between calls (by design: a node's memory is its Flower context state).",
        "",
        "## 3. The server's share of a round",
        "",
        f"In-process federation (`simulate(engine='inprocess')`): {fed['settings']['num_clients']} clients, "
        f"{fed['settings']['rounds']} rounds of {fed['settings']['local_steps']} local steps, "
        f"{fed['settings']['aggregation']}, compression density {fed['settings']['compression']['density']}; "
        f"whole run {fed['wall_seconds']:.0f} s. A round's `seconds` (metrics.json) runs from the start of the round "
        "to the end of the server's evaluation: configure (sample clients, build messages), the clients' "
        "`run_train` calls (here one after another in this process), aggregation (decompress the ComPEFT payloads, "
        "LoRA-FAIR), the server's held-out evaluation of the new global adapter on every client's test rows; the "
        "checkpoint is written after it and shown apart. Round 0 is the base model's evaluation; its seconds run from "
        "the start of the run, so they include the server's loading of the task and the model.",
        "",
        "| round | seconds | clients' run_train | configure | aggregate | server eval | server other "
        "| checkpoint after | server share | with checkpoint | if clients ran in parallel |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in fed["rounds"]:
        lines.append(
            f"| {r['round']} | {r['seconds']:.1f} | {r['clients_run_train']:.1f} ({r['clients']}) "
            f"| {r['configure_train']:.2f} | {r['aggregate_train']:.2f} | {r['server_evaluation']:.1f} "
            f"| {r['server_other']:.2f} | {r['checkpoint_after']:.2f} | {100 * r['server_share']:.0f} % "
            f"| {100 * r['server_share_with_checkpoint']:.0f} % | {100 * r['server_share_parallel_clients']:.0f} % |"
        )
    lines += [
        "",
        "*If clients ran in parallel* = server time (with checkpoint) / (server time + the slowest client): the "
        "share on a real deployment, where the SuperNodes train at the same time.",
        "",
        "## 4. Peak memory of a client",
        "",
        f"A subprocess that imports fairedge, builds the train message and runs one `run_train` "
        f"({rss['run_train_seconds']:.0f} s): peak RSS **{rss['peak_rss_mb']:.0f} MB** (`VmHWM`); "
        f"{rss['rss_before_mb']:.0f} MB resident before the call (interpreter, torch, transformers, flwr). "
        "SmolLM2's weights are memory-mapped from the cached safetensors file and count in the RSS once the first "
        "forward pass reads them: right after training, with the model still loaded, "
        f"{rss['after_training_file_mb']:.0f} MB of the RSS were file-backed pages (the weights, plus the "
        f"libraries' code; processes on one machine share them) and {rss['after_training_anon_mb']:.0f} MB "
        "anonymous memory (Python objects, data, LoRA factors and optimizer state, freed activations the allocator "
        "keeps). The peak above those is the training step's activations, gradients and full-vocabulary logits. "
        "A Flower SuperNode process adds its own runtime.",
        "",
        "Reproduce: `python -m fairedge.simulations.bench_client` (about "
        f"{res['wall_seconds'] / 60:.0f} min on 2 shared cores); `--quick` is a smoke check.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="a causal-LM run config (default: the demo)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--pairs", type=int, default=5, help="alternating fairedge/plain blocks")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per block")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps of each loop")
    parser.add_argument("--app-repeats", type=int, default=2, help="timed run_train calls (median)")
    parser.add_argument("--out", help="folder for client_bench.{json,md} (default: simulations/results)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 1 pair of 1 step, 1 round of 1 step")
    parser.add_argument("--child-train", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_train:
        child_train(Path(args.child_train))
        return
    if min(args.pairs, args.steps, args.warmup, args.app_repeats) < 1:
        parser.error("--pairs, --steps, --warmup and --app-repeats must be >= 1")
    torch.set_num_threads(1)  # the one place: library code never changes it

    def log(msg: str) -> None:
        print(msg, flush=True)

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    overrides = [*BENCH_SETTINGS, *args.set]
    if args.quick:
        args.pairs = args.steps = args.warmup = args.app_repeats = 1
        overrides += QUICK_SETTINGS
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="bench-client-")) if args.quick else RESULTS)
    cfg = load_config(args.config, overrides)
    if cfg.model.kind != "hf-causal-lm":
        parser.error(f"--config {args.config}: model.kind is {cfg.model.kind!r}; this benchmark needs 'hf-causal-lm'")
    task = load_task(cfg)
    data = client_partition(cfg, 0, task=task)
    roles = [task.domains[int(d)] for d in data.domain.unique()]
    log(f"client 0: {roles}, {len(data)} rows")

    loops = compare_loops(cfg, data, pairs=args.pairs, steps=args.steps, warmup=args.warmup, log=log)
    loops.update(pairs=args.pairs, steps=args.steps, warmup=args.warmup)
    log(f"loops: median ratio fairedge/plain {loops['median_ratio']:.3f}")

    flower_identity()
    initial = get_adapter(lora_model(cfg, task=task))
    log("ClientApp run_train...")
    app = time_client_app(cfg, adapter_to_record(initial), args.app_repeats, log)
    log("in-process federation...")
    fed = time_federation(cfg, log)
    log("peak RSS of a client subprocess...")
    rss = measure_client_rss(cfg, initial)
    log(f"  peak RSS {rss['peak_rss_mb']:.0f} MB")

    import peft

    res = {
        "command": " ".join(["python -m fairedge.simulations.bench_client", *(sys.argv[1:] if argv is None else argv)]),
        "config": display(args.config),
        "overrides": overrides,
        "model": causal_lm_dir(cfg).name,
        "settings": settings_of(cfg),
        "client_role": ", ".join(roles),
        "client_rows": len(data),
        "threads": torch.get_num_threads(),
        "loops": loops,
        "client_app": app,
        "federation": fed,
        "client_rss": rss,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - started,
    }
    atomic_write_json(out / "client_bench.json", res)
    atomic_write_text(out / "client_bench.md", markdown(res) + "\n")
    log(f"wrote {out / 'client_bench.md'} ({res['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
