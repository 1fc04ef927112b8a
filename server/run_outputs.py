"""What a run leaves behind, for a person to open.

`runs/<timestamp>-<name>/` holds `config.toml` (the resolved config),
`metrics.json` (every round), `report.md` (tables), `accuracy.png`,
`adapter/` (the final global adapter in PEFT's format) and, for rules that
change the base weights (FLoRA, FedEx-LoRA), `base_delta.safetensors`.
`checkpoint/` (see `fairedge.server.checkpoint`) holds the state after the last complete
round, for `--resume`. A run that stops early (a round failed all its retries)
still writes its outputs, with the reason in `metrics.json` (`summary.status`)
and at the top of the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors.torch import save as safetensors_bytes

from fairedge.common.adapter_record import flatten
from fairedge.common.aggregation import Adapter, BaseDelta
from fairedge.common.atomic_files import (
    atomic_folder,
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from fairedge.common.config import RunConfig, config_hash, to_toml
from fairedge.common.lora import save_adapter


def new_run_dir(cfg: RunConfig) -> Path:
    """A fresh `runs/<timestamp>-<name>` folder (never reuses an existing one)."""
    base = Path(cfg.output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = base / (f"{stamp}-{cfg.name}" + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {base}")


@dataclass
class RunRecord:
    """Per-round metrics of a run, plus what is needed to describe it."""

    cfg: RunConfig
    run_dir: Path
    domains: list[str]
    shifted_domains: list[str]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    wall_seconds: float = 0.0
    """all sessions together (a resumed run adds its time to the earlier sessions')."""
    resumed_after: list[int] = field(default_factory=list)
    """the last complete round of each session that was resumed."""
    earlier_stops: list[str] = field(default_factory=list)
    """why earlier sessions stopped, where they stopped on their own (a failed round)."""
    status: str = "complete"

    samples: list[dict[str, str]] = field(default_factory=list)
    """greedy replies of the base and the final model to fixed prompts (causal LMs)."""

    def add_round(
        self,
        server_round: int,
        acc: dict[str, float],
        attempts: Any,
        seconds: float,
        loss: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Record a round's evaluation (round 0 = the base model before any training).

        `acc` is the accuracy per group (domain, or a causal LM's client: next-token accuracy);
        `loss`, given for causal LMs, the held-out loss per token of each client, from which the
        row gets each client's perplexity, their mean and worst (highest), and their geometric mean,
        exp(mean loss): one client with a few odd held-out tokens can outweigh all others in the mean.

        `attempts` are the strategy's `RoundLog`s of the round, one per try, the last
        one the attempt that was aggregated (a single `RoundLog` is taken as a list of
        one; None for round 0 or training without a strategy). Bytes count every attempt.
        """
        shifted = [acc[d] for d in self.shifted_domains if d in acc] or list(acc.values())
        row: dict[str, Any] = {
            "round": server_round,
            "accuracy": acc,
            "mean_accuracy": sum(acc.values()) / len(acc),
            "worst_accuracy": min(acc.values()),
            "shifted_mean_accuracy": sum(shifted) / len(shifted),
            "seconds": seconds,
        }
        if loss is not None:
            ppl = {g: math.exp(min(v, 700.0)) for g, v in loss.items()}
            row.update(
                loss=loss,
                perplexity=ppl,
                mean_perplexity=sum(ppl.values()) / len(ppl),
                worst_perplexity=max(ppl.values()),
                geomean_perplexity=math.exp(min(sum(loss.values()) / len(loss), 700.0)),
            )
        if attempts is not None:
            attempts = attempts if isinstance(attempts, Sequence) else [attempts]
            entry = attempts[-1]
            up, fp32_up = sum(a.bytes_up for a in attempts), sum(a.fp32_bytes_up for a in attempts)
            row.update(
                train_loss=entry.metrics.get("train-loss"),
                bytes_up=up,
                bytes_down=sum(a.bytes_down for a in attempts),
                fp32_bytes_up=fp32_up,
                uplink_ratio_vs_fp32=fp32_up / up if up else None,
                sampled=entry.sampled,
                replied=entry.replied,
                no_reply=entry.no_reply,
                rejected={str(k): v for k, v in entry.rejected.items()},
                clipped={str(k): v for k, v in entry.clipped.items()},
                partitions={str(k): v for k, v in entry.partitions.items()},
                update_norms={str(k): v for k, v in entry.update_norms.items()},
                aggregated=entry.aggregated,
                retries=len(attempts) - 1,
                failed_attempts=[_attempt_json(a) for a in attempts[:-1]],
                aggregator_metrics={k: v for k, v in entry.metrics.items() if k != "train-loss"},
                client_config=entry.client_config,
            )
            if getattr(entry, "privacy", None):
                row["privacy"] = dict(entry.privacy)
            if getattr(entry, "ranks", None):  # heterogeneous LoRA ranks: node id → rank
                row["ranks"] = {str(k): v for k, v in entry.ranks.items()}
            if entry.personal_accuracy:
                accs = entry.personal_accuracy
                row["personal_accuracy"] = {str(k): v for k, v in sorted(accs.items())}
                row["personal_mean_accuracy"] = sum(accs.values()) / len(accs)
        self.rounds.append(row)
        return row

    def summary(self) -> dict[str, Any]:
        """Base vs final accuracy, and totals."""
        base, final = self.rounds[0], self.rounds[-1]
        up = sum(r.get("bytes_up", 0) for r in self.rounds)
        personal = [r["personal_mean_accuracy"] for r in self.rounds if "personal_mean_accuracy" in r]
        return {
            "base_mean_accuracy": base["mean_accuracy"],
            "final_mean_accuracy": final["mean_accuracy"],
            "base_shifted_mean_accuracy": base["shifted_mean_accuracy"],
            "final_shifted_mean_accuracy": final["shifted_mean_accuracy"],
            "final_worst_accuracy": final["worst_accuracy"],
            "bytes_up": up,
            "uplink_ratio_vs_fp32": sum(r.get("fp32_bytes_up", 0) for r in self.rounds) / up if up else None,
            "bytes_down": sum(r.get("bytes_down", 0) for r in self.rounds),
            "wall_seconds": self.wall_seconds,
            "final_personal_mean_accuracy": personal[-1] if personal else None,
            "status": self.status,
            "resumed_after_rounds": self.resumed_after,
            "earlier_stops": self.earlier_stops,
            "retries": sum(r.get("retries", 0) for r in self.rounds),
            **self._perplexity_summary(),
            **privacy_summary(self.rounds),
        }

    def _perplexity_summary(self) -> dict[str, Any]:
        """Base vs final held-out perplexity (causal LMs; empty otherwise)."""
        base, final = self.rounds[0], self.rounds[-1]
        if "mean_perplexity" not in base:
            return {}
        return {
            "base_mean_perplexity": base["mean_perplexity"],
            "final_mean_perplexity": final["mean_perplexity"],
            "base_worst_perplexity": base["worst_perplexity"],
            "final_worst_perplexity": final["worst_perplexity"],
            "perplexity_change": final["mean_perplexity"] / base["mean_perplexity"] - 1.0,
            **(
                {
                    "base_geomean_perplexity": base["geomean_perplexity"],
                    "final_geomean_perplexity": final["geomean_perplexity"],
                }
                if "geomean_perplexity" in base
                and "geomean_perplexity" in final  # (rows of a run resumed from an older version lack it)
                else {}
            ),
        }


def privacy_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Client-level DP of the run: total ε at δ after the last private round (empty without DP)."""
    private = [r["privacy"] for r in rounds if "privacy" in r]
    if not private:
        return {}
    last = private[-1]
    return {"epsilon": last["epsilon"], "delta": last["delta"], "noise_multiplier": last["noise_multiplier"]}


def privacy_markdown(record: RunRecord) -> list[str]:
    """The DP settings, the total (ε, δ) and, per round, its ε, the running total and the clipped clients."""
    p, s = record.cfg.privacy, record.summary()
    if "epsilon" not in s:
        return []
    lines = [
        "## Privacy",
        "",
        f"Client-level DP, {p.mode} ({p.clipping} clipping, initial bound {p.clip_norm:g}), noise multiplier "
        f"{s['noise_multiplier']:.4g}: **ε = {s['epsilon']:.3g} at δ = {s['delta']:g}** after "
        f"{record.rounds[-1]['round']} rounds (dp-accounting RDP, replace-one neighbours). It covers what the "
        "server releases (the global adapters); this report and metrics.json are the server's own log.",
        "",
        "| round | ε this round | ε total | clip norm | clipped clients | sampled / clients |",
        "|---|---|---|---|---|---|",
    ]
    for r in record.rounds[1:]:
        if "privacy" in r:
            q = r["privacy"]
            clip = f"{q['clip_norm']:.4g}" if "clip_norm" in q else f"{p.clip_norm:g}"
            lines.append(
                f"| {r['round']} | {q['epsilon_round']:.3g} | {q['epsilon']:.3g} | {clip} | {int(q['clipped'])} "
                f"| {len(r['sampled'])} (q = {q['sampling_rate']:.3g}) |"
            )
    return lines + [""]


def _attempt_json(attempt: Any) -> dict[str, Any]:
    """A failed attempt at a round, for metrics.json."""
    return {
        "attempt": attempt.attempt,
        "failure": attempt.failure,
        "sampled": attempt.sampled,
        "replied": attempt.replied,
        "no_reply": attempt.no_reply,
        "rejected": {str(k): v for k, v in attempt.rejected.items()},
        "partitions": {str(k): v for k, v in attempt.partitions.items()},
    }


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    """The resolved config, `config.toml`: written when a run starts (resume reads it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", to_toml(cfg))


def _node(node: str | int, partitions: dict[str, int]) -> str:
    part = partitions.get(str(node))
    return f"node {node}" + (f" (partition {part})" if part is not None else "")


def participation_markdown(record: RunRecord) -> list[str]:
    """Per round: who was sampled, who replied, who was left out or clipped and why, and retried attempts."""
    lines = [
        "## Participation and faults",
        "",
        "Node ids are Flower's; the partition is the one the node reported. Left out: error replies, "
        "malformed or non-finite updates, updates beyond the norm limit "
        f"(`update_norm_rule = {record.cfg.federation.update_norm_rule}`, "
        f"factor {record.cfg.federation.update_norm_factor:g}), and sampled nodes with no reply in time.",
        "",
    ]
    for r in record.rounds[1:]:
        parts = r.get("partitions", {})
        lines.append(
            f"- **round {r['round']}**: sampled {len(r['sampled'])}, replied {len(r['replied'])}, "
            f"aggregated {len(r['sampled']) - len(r['no_reply']) - len(r['rejected'])}"
            + (f"; retries {r['retries']}" if r.get("retries") else "")
        )
        lines.append(f"  - sampled: {', '.join(_node(n, parts) for n in sorted(r['sampled'])) or '-'}")
        for n, why in r.get("rejected", {}).items():
            lines.append(f"  - left out {_node(n, parts)}: {why}")
        for n in r.get("no_reply", []):
            lines.append(f"  - left out {_node(n, parts)}: no reply within {record.cfg.federation.round_timeout:g} s")
        for n, why in r.get("clipped", {}).items():
            lines.append(f"  - clipped {_node(n, parts)}: {why}")
        for a in r.get("failed_attempts", []):
            fparts = a.get("partitions", {})
            left = [f"{_node(n, fparts)}: {why}" for n, why in a["rejected"].items()]
            left += [f"{_node(n, fparts)}: no reply" for n in a["no_reply"]]
            lines.append(
                f"  - attempt {a['attempt'] + 1} not aggregated: {a['failure']}"
                + (f" (left out {'; '.join(left)})" if left else "")
            )
    return lines + [""]


def report_markdown(record: RunRecord) -> str:
    """The run report: what ran, base vs final, and the per-round table."""
    cfg, s = record.cfg, record.summary()
    lines = [
        f"# fairedge run `{record.run_dir.name}`",
        "",
        f"Config `{cfg.name}` (hash `{config_hash(cfg)}`): task {cfg.data.task} ({cfg.data.partition} partition), "
        f"model {cfg.model.kind}, LoRA rank {cfg.lora.rank}, {cfg.federation.num_clients} clients, "
        f"{cfg.federation.rounds} rounds, aggregation {cfg.aggregation.method}, seed {cfg.seed}. "
        f"Wall time {s['wall_seconds']:.1f} s.",
        "",
    ]
    if record.status != "complete":
        lines += [f"**Run stopped early**: {record.status}", ""]
    if record.resumed_after:
        lines += [f"Resumed from its checkpoint after round(s) {', '.join(map(str, record.resumed_after))}."]
        lines += [f"An earlier session stopped: {why}" for why in record.earlier_stops] + [""]
    lm = "base_mean_perplexity" in s
    if lm:
        lines += [
            "Held-out text of each client (its last lines or conversations, never trained on); perplexity per "
            "token, mean over clients and the worst client; next-token accuracy likewise.",
            "",
            "| | mean perplexity | worst client perplexity | mean next-token accuracy | worst client accuracy |",
            "|---|---|---|---|---|",
            f"| base (round 0) | {s['base_mean_perplexity']:.2f} | {s['base_worst_perplexity']:.2f} "
            f"| {s['base_mean_accuracy']:.4f} | {record.rounds[0]['worst_accuracy']:.4f} |",
            f"| final (round {record.rounds[-1]['round']}) | {s['final_mean_perplexity']:.2f} "
            f"| {s['final_worst_perplexity']:.2f} | {s['final_mean_accuracy']:.4f} | {s['final_worst_accuracy']:.4f} |",
            "",
            f"Mean perplexity change: **{100 * s['perplexity_change']:+.1f} %**.",
            "",
        ]
        if "final_geomean_perplexity" in s:
            lines += [
                f"Geometric mean over clients, exp(mean held-out loss), which one outlier client cannot dominate: "
                f"{s['base_geomean_perplexity']:.2f} → {s['final_geomean_perplexity']:.2f} "
                f"(**{100 * (s['final_geomean_perplexity'] / s['base_geomean_perplexity'] - 1):+.1f} %**).",
                "",
            ]
    else:
        lines += [
            "| | mean accuracy | shifted-domain mean | worst domain |",
            "|---|---|---|---|",
            f"| base (round 0) | {s['base_mean_accuracy']:.4f} | {s['base_shifted_mean_accuracy']:.4f} "
            f"| {record.rounds[0]['worst_accuracy']:.4f} |",
            f"| final (round {record.rounds[-1]['round']}) | {s['final_mean_accuracy']:.4f} "
            f"| {s['final_shifted_mean_accuracy']:.4f} | {s['final_worst_accuracy']:.4f} |",
            "",
        ]
    if s["final_personal_mean_accuracy"] is not None:
        lines += [
            f"Personalised: each client keeps its own B. The accuracies above are the server's global "
            f"adapter (global A with the initial B); each client's own model (global A, its B, global head) "
            f"on its own domains' test data: final mean **{s['final_personal_mean_accuracy']:.4f}** "
            f"(column 'personal acc' below).",
            "",
        ]
    lines += [
        "## Per round",
        "",
        "| round | train loss | mean acc | worst acc | personal acc | mean ppl | bytes up | fp32 / bytes up "
        "| bytes down | replied | left out | retries |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record.rounds[1:]:
        loss = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "not aggregated"
        ratio = f"{r['uplink_ratio_vs_fp32']:.3g}x" if r.get("uplink_ratio_vs_fp32") else "-"
        left_out = (
            "; ".join(
                [f"{n}: {why}" for n, why in r.get("rejected", {}).items()]
                + [f"{n}: no reply" for n in r.get("no_reply", [])]
            )
            or "-"
        )
        personal = f"{r['personal_mean_accuracy']:.4f}" if "personal_mean_accuracy" in r else "-"
        ppl = f"{r['mean_perplexity']:.2f}" if "mean_perplexity" in r else "-"
        lines.append(
            f"| {r['round']} | {loss} | {r['mean_accuracy']:.4f} | {r['worst_accuracy']:.4f} | {personal} | {ppl} "
            f"| {r['bytes_up']:,} "
            f"| {ratio} | {r['bytes_down']:,} | {len(r['replied'])}/{len(r['sampled'])} | {left_out} "
            f"| {r.get('retries', 0)} |"
        )
    lines += [""] + privacy_markdown(record) + participation_markdown(record)
    first, last = record.rounds[0], record.rounds[-1]
    if lm:
        lines += [
            "## Held-out perplexity per client",
            "",
            "| client | base | final | base next-token acc | final next-token acc |",
            "|---|---|---|---|---|",
        ]
        for d in record.domains:
            lines.append(
                f"| {d} | {first['perplexity'].get(d, float('nan')):.2f} | {last['perplexity'].get(d, float('nan')):.2f} "
                f"| {first['accuracy'].get(d, float('nan')):.4f} | {last['accuracy'].get(d, float('nan')):.4f} |"
            )
    else:
        lines += ["## Final accuracy per domain", "", "| domain | base | final |", "|---|---|---|"]
        for d in record.domains:
            lines.append(
                f"| {d} | {first['accuracy'].get(d, float('nan')):.4f} | {last['accuracy'].get(d, float('nan')):.4f} |"
            )
    if record.samples:
        lines += ["", "## Greedy replies to fixed prompts: base vs final", ""]
        for sample in record.samples:
            lines += [
                f"**Prompt:** {sample['prompt']}",
                "",
                f"- base: {sample['base']!r}",
                f"- final: {sample['final']!r}",
                "",
            ]
    lines += ["", "## Resolved config", "", "```toml", to_toml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


MAX_LEGEND_GROUPS = 16
"""Plots name each group in the legend up to this many groups."""


def plot_accuracy(record: RunRecord, path: Path, metric: str = "accuracy") -> None:
    """A metric per group (domain or client) and its mean, per round, as a PNG titled with the config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["round"] for r in record.rounds]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    scored = [d for d in record.domains if any(d in r[metric] for r in record.rounds)]  # (eval_clients: a few)
    named = len(scored) <= MAX_LEGEND_GROUPS  # past that a legend hides the plot (and takes seconds)
    for d in scored:
        ax.plot(
            xs, [r[metric].get(d, float("nan")) for r in record.rounds],
            alpha=0.6 if named else 0.25, linewidth=1.5 if named else 0.8, label=d if named else None,
        )  # fmt: skip
    mean_label = "mean" if named else f"mean (thin lines: the {len(scored)} groups)"
    ax.plot(xs, [r[f"mean_{metric}"] for r in record.rounds], "k-", linewidth=2.5, label=mean_label)
    ax.set_xlabel("round (0 = pre-trained base)")
    ax.set_ylabel(f"held-out {metric}")
    cfg = record.cfg
    ax.set_title(f"{cfg.name} ({config_hash(cfg)}): {cfg.aggregation.method}, {cfg.federation.num_clients} clients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=110)
    plt.close(fig)


def write_outputs(record: RunRecord, model: PeftModel, base_delta: dict[str, BaseDelta] | None = None) -> None:
    """Write config, metrics, report, plot and the final adapter into the run folder, each file atomically.

    A base delta (the final change of the base weights, `W = W0 + P @ Q` per layer)
    goes to `base_delta.safetensors` as `base/<layer>/Q` and `base/<layer>/P`: the PEFT
    adapter alone does not reproduce such a run's model.
    """
    d = record.run_dir
    write_config(d, record.cfg)
    metrics = {
        "config": record.cfg.model_dump(mode="json"),
        "config_hash": config_hash(record.cfg),
        "domains": record.domains,
        "shifted_domains": record.shifted_domains,
        "summary": record.summary(),
        "samples": record.samples,
        "rounds": record.rounds,
    }
    atomic_write_json(d / "metrics.json", metrics, indent=2, sort_keys=False)
    atomic_write_text(d / "report.md", report_markdown(record))
    plot_accuracy(record, d / "accuracy.png")
    if "perplexity" in record.rounds[0]:
        plot_accuracy(record, d / "perplexity.png", metric="perplexity")
    with atomic_folder(d / "adapter") as tmp:
        save_adapter(model, tmp)
    if base_delta:
        tensors = {k: t.contiguous() for k, t in flatten(Adapter({}, {}, base_delta)).items()}
        atomic_write_bytes(d / "base_delta.safetensors", safetensors_bytes(tensors))
