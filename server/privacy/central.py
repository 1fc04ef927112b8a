"""Client-level DP inside `LoraStrategy`: central release (clip, noise, post-process) and local accounting.

Why not Flower's wrappers (`DifferentialPrivacyServerSideFixedClipping` and the adaptive ones in
`flwr.serverapp.strategy`): they clip every ArrayRecord of a reply against the `arrays` sent, by
position, and noise the wrapped strategy's output. Our replies may be ComPEFT payloads (a
ConfigRecord, decoded only inside `aggregate_train`) or hold only some factors (FFA-LoRA, RoLoRA,
FedSA-LoRA); our weights are `p_k ∝ num_examples`; and noise on LoRA-FAIR's output is not noise on
a sum (its B' needs `Σ B_k A_k Āᵀ`). So the strategy decodes and validates as usual and hands the
updates here; we follow the wrappers' recipe and use Flower's helpers where they fit
(`compute_stdv` for the noise on the mean, `compute_adaptive_noise_params` for Andrew et al.'s split
of the multiplier between the update and the clipped count).

Central release of one round, with `K` the number of sampled clients (a fixed denominator: a client
that drops out counts as a zero update, so one client moves the mean by at most `C/K`):

1. `U_k = clip(reply_k − sent, C)` over the tensors the client sends; weights are uniform.
2. `P = sent + (Σ U_k + N(0, σ²))/K`. For FedIT, FFA-LoRA, FedSA-LoRA and RoLoRA the rule's output
   on the single "client" `P` is exactly its output on the noised sum: post-processing.
3. LoRA-FAIR (frobenius) also needs `M = Σ p_k B_k A_k Āᵀ`. With `Ā` now public (noised), each
   client's `m_k = B_k A_k Āᵀ − B_s A_s Āᵀ` is clipped to `C·max‖Ā‖₂²` (what a clipped ΔB moves it
   by) and summed with its own noise. Both releases get `√2` times the noise, so the round is one
   Gaussian of multiplier `z` (adaptive Gaussian composition adds `1/σ²`). Then
   `B' = (M̃ + λB̄)(ĀĀᵀ + λI)⁻¹`, LoRA-FAIR's closed form on released quantities only.
4. Adaptive clipping (Andrew et al. 2021): the unclipped count gets noise `σ_b` and the bound moves
   `C ← C·exp(−η(b̃ − γ))`; the update's multiplier is raised so that both together spend `z`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from flwr.supercore.differential_privacy import compute_adaptive_noise_params, compute_stdv

from fairedge.common.adapter_record import reply_tensors, unflatten
from fairedge.common.aggregation import Adapter, Aggregator, ClientUpdate, frobenius_from_sums, reply_factors
from fairedge.common.config import ConfigError, RunConfig
from fairedge.common.privacy import LOCAL_CLIP_KEY, LOCAL_NOISE_KEY, add_noise, clip_update, noise_generator
from fairedge.common.privacy_config import PrivacyConfig
from fairedge.server.privacy.accountant import PrivacyLedger, planned_sampling, resolve_noise_multiplier

if TYPE_CHECKING:
    from fairedge.server.round_log import SentRound


class ClientLevelDP:
    """The run's DP: its resolved noise multiplier, the current clip bound and the ledger of releases."""

    def __init__(self, cfg: PrivacyConfig, noise_multiplier: float, sample_size: int, *, lam: float = 0.0) -> None:
        self.cfg = cfg
        self.noise_multiplier = noise_multiplier
        """z: what the accountant composes each round (update and count noise together)."""
        self.clip_norm = cfg.clip_norm
        self.lam = lam
        self.ledger = PrivacyLedger(cfg.delta, cfg.mode)
        self.count_std, self.update_multiplier = 0.0, noise_multiplier
        if cfg.clipping == "adaptive":
            self.count_std, self.update_multiplier = compute_adaptive_noise_params(
                noise_multiplier, sample_size, cfg.clipped_count_stddev
            )

    @property
    def central(self) -> bool:
        return self.cfg.mode == "central"

    def client_config(self) -> dict[str, float]:
        """Round-config entries that make clients noise their own updates (local DP only)."""
        return {LOCAL_NOISE_KEY: self.noise_multiplier, LOCAL_CLIP_KEY: self.clip_norm} if not self.central else {}

    def account_local(self, sampled: int, population: int, clipped: int) -> dict[str, float]:
        """Local DP: the round's (ε, δ) per client and how many clients reported clipping."""
        return {**self._row(sampled, population), "clipped": float(clipped)}

    def release(
        self, updates: list[ClientUpdate], round_: SentRound, aggregator: Aggregator, population: int
    ) -> tuple[Adapter, dict[str, float], dict[str, float]]:
        """Central DP: the next global adapter from clipped, noised sums; the rule's metrics; the privacy row."""
        sampled = len(round_.entry.sampled)
        start = reply_tensors(round_.sent, reply_factors(round_.client_config))
        gen = noise_generator(self.cfg.noise_seed, round_.entry.round, round_.entry.attempt)
        two = aggregator.name == "lora_fair"
        multiplier = self.update_multiplier * (math.sqrt(2) if two else 1.0)
        clip_norm, total, clipped = (
            self.clip_norm,
            {k: torch.zeros_like(t, dtype=torch.float64) for k, t in start.items()},
            0,
        )
        for u in updates:
            got = reply_tensors(u.adapter)
            delta, _, was_clipped = clip_update({k: got[k].double() - s.double() for k, s in start.items()}, clip_norm)
            clipped += was_clipped
            for k in total:
                total[k] += delta[k]
        noised = add_noise(total, multiplier * clip_norm, gen)
        mean = {k: (start[k].double() + v / sampled).to(start[k].dtype) for k, v in noised.items()}
        private = unflatten({**reply_tensors(round_.sent), **mean})
        if two:
            new, metrics = self._lora_fair(updates, round_, private, sampled, multiplier * clip_norm, gen)
        else:
            new, metrics = aggregator.aggregate([ClientUpdate(private, 1, 0)], round_.current)
        row = {
            **self._row(sampled, population),
            "clip_norm": clip_norm,
            "clipped": float(clipped),
            "noise_std_mean": compute_stdv(multiplier, clip_norm, sampled),
        }
        if self.cfg.clipping == "adaptive":
            unclipped = (
                len(updates) - clipped + float(torch.randn((), generator=gen, dtype=torch.float64)) * self.count_std
            )
            self.clip_norm *= math.exp(-self.cfg.clip_lr * (unclipped / sampled - self.cfg.target_quantile))
        return new, metrics, row

    def _lora_fair(
        self,
        updates: list[ClientUpdate],
        round_: SentRound,
        private: Adapter,
        sampled: int,
        std: float,
        gen: torch.Generator,
    ) -> tuple[Adapter, dict[str, float]]:
        """LoRA-FAIR's frobenius B' from the noised `Ā`, `B̄` and a noised `M` (step 3 of the module docstring)."""
        sent = round_.sent.factors
        abar = {layer: a.double() for layer, (a, _) in private.factors.items()}
        bound = self.clip_norm * max(float(torch.linalg.matrix_norm(a, ord=2)) ** 2 for a in abar.values())
        base = {layer: b.double() @ (a.double() @ abar[layer].T) for layer, (a, b) in sent.items()}
        total = {layer: torch.zeros_like(m) for layer, m in base.items()}
        for u in updates:
            m_k = {
                layer: b.double() @ (a.double() @ abar[layer].T) - base[layer]
                for layer, (a, b) in u.adapter.factors.items()
            }
            clipped, _, _ = clip_update(m_k, bound)
            for layer in total:
                total[layer] += clipped[layer]
        noised = add_noise(total, std / self.clip_norm * bound, gen)
        factors = {}
        for layer, (a, b) in private.factors.items():
            m = base[layer] + noised[layer] / sampled
            factors[layer] = (a, frobenius_from_sums(abar[layer], b, m, self.lam).to(b.dtype))
        return Adapter(factors, private.head), {"dp/product_clip_norm": bound}

    def _row(self, sampled: int, population: int) -> dict[str, float]:
        return {
            **self.ledger.record(self.noise_multiplier, sampled, population),
            "noise_multiplier": self.noise_multiplier,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, **self.ledger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip_norm = float(state["clip_norm"])
        self.ledger.load_state_dict(state)


def make_client_level_dp(cfg: RunConfig) -> ClientLevelDP | None:
    """The run's DP from its config (None when `privacy.enabled` is off); calibrates the noise if asked."""
    if not cfg.privacy.enabled:
        return None
    sample_size, _ = planned_sampling(cfg)
    z = resolve_noise_multiplier(cfg)
    try:
        return ClientLevelDP(cfg.privacy, z, sample_size, lam=cfg.aggregation.lam)
    except ValueError as err:  # adaptive clipping: the count's noise cannot fit in the calibrated budget
        raise ConfigError(f"privacy: noise multiplier {z:.4g} (from privacy.target_epsilon): {err}") from None
