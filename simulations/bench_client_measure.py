"""The four measurements of `fairedge.simulations.bench_client` (see its docstring): the training loops, the
ClientApp call, the server's share of a round, a client's peak RSS. Apart from the entry point and the report so
that each module reads at once; part 4's subprocess still starts as `bench_client --child-train`.
"""

from __future__ import annotations

import contextlib
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
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM

from fairedge.client import client_app
from fairedge.common.adapter_record import adapter_to_record, flatten, unflatten
from fairedge.common.config import RunConfig
from fairedge.common.data.token_data import TokenData
from fairedge.common.models.causal_lm import LORA_TARGET_PRESETS
from fairedge.common.task import causal_lm_dir, config_json, lora_model
from fairedge.common.training import train_local

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
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int by PEFT; a float scale alpha / r works
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


def settings_of(cfg: RunConfig) -> dict[str, Any]:
    """The settings the report names, for the federation of part 3 and for the whole run."""
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
