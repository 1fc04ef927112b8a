"""The `privacy` config section: client-level DP and secure aggregation, and the combinations they refuse.

Split from `fairedge.common.config` (which holds `RunConfig` and imports these) to keep each module readable;
like it, this imports only pydantic. The checks run from `RunConfig`'s validator, so a refused combination
fails at load time with an error naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from fairedge.common.config_section import Section

if TYPE_CHECKING:
    from fairedge.common.config import RunConfig


PRIVACY_CENTRAL_METHODS = ("fedit", "ffa_lora", "fedsa_lora", "rolora", "lora_fair")
"""Aggregation methods central DP supports: the next global adapter is post-processing of noised sums
(LoRA-FAIR with the frobenius objective also releases a noised `Σ B_k A_k Āᵀ`; see ALGORITHMS.md, Privacy)."""


SECAGG_METHODS = ("fedit", "ffa_lora", "fedsa_lora", "rolora", "lora_fair")
"""Aggregation methods secure aggregation supports: their next global adapter needs only weighted sums
(LoRA-FAIR: frobenius objective, two phases; see ALGORITHMS.md, Secure aggregation)."""


class SecureAggregationConfig(Section):
    """SecAgg+ (Bell et al. 2020): the server learns only the sum of the clients' masked, quantised updates.

    Each client sends `w_k·(x_k − ref)` (its change, weighted by `w_k = n_k / max_weight`), clamped to
    `[-clip_range, clip_range]` and rounded to `quantization_bits` levels over that range, plus `n_k`,
    masked modulo `2^modulus_bits`; pairwise masks cancel in the sum and a dropped client's are rebuilt
    from `reconstruction_threshold` of its neighbours' Shamir shares.
    """

    enabled: bool = False
    clip_range: float = Field(1.0, gt=0, description="each weighted change entry is clamped to ±clip_range")
    quantization_bits: int = Field(24, ge=8, le=60, description="fixed-point levels over [-clip_range, clip_range]")
    modulus_bits: Literal[32, 64] = Field(32, description="masking ring 2^modulus_bits; 64 doubles the uplink")
    max_weight: float = Field(1000.0, gt=0, description="examples that give weight 1 (w_k = n_k / max_weight)")
    num_shares: int | None = Field(
        None,
        ge=3,
        description="SecAgg+ neighbours per client, itself included (odd; even gets one more); unset = all sampled clients",
    )
    reconstruction_threshold: float = Field(
        0.6, gt=0.5, le=1, description="fraction of a client's shares needed to rebuild its mask (≥ 2 shares)"
    )


class PrivacyConfig(Section):
    """Client-level differential privacy (DP-FedAvg): clip each client's update, add Gaussian noise, account.

    A client's update is its change from the global adapter it was sent. `central`: the server clips
    each update to `clip_norm`, sums them and adds `N(0, (noise_multiplier·clip_norm)²)` to the sum
    (the server is trusted; what it releases, the global adapters, is private). `local`: each client
    clips and noises its own update before it leaves (nothing trusted). (ε, δ) is accounted per round
    with dp-accounting's RDP accountant.
    """

    enabled: bool = False
    mode: Literal["central", "local"] = "central"
    clip_norm: float = Field(1.0, gt=0, description="L2 bound on a client's update (adaptive: the initial bound)")
    clipping: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="adaptive: the bound tracks a quantile of the update norms (Andrew et al. 2021), central only",
    )
    target_quantile: float = Field(0.5, gt=0, lt=1, description="adaptive: fraction of updates left unclipped")
    clip_lr: float = Field(0.2, gt=0, description="adaptive: geometric step size of the bound")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="adaptive: noise std of the unclipped count; unset = sampled clients / 20"
    )
    noise_multiplier: float | None = Field(None, ge=0, description="noise std / clip_norm; set this or target_epsilon")
    target_epsilon: float | None = Field(
        None, gt=0, description="derive noise_multiplier so that ε ≤ this after federation.rounds rounds"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the reported (ε, δ)")
    noise_seed: int | None = Field(
        None,
        ge=0,
        description="seed of the DP noise, for reproducible studies only: anyone who knows it can remove the "
        "noise; unset = fresh OS randomness (what a real deployment needs)",
    )
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)

    @model_validator(mode="after")
    def _check(self) -> PrivacyConfig:
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "privacy: set exactly one of privacy.noise_multiplier and privacy.target_epsilon "
                f"(got noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon})"
            )
        if self.enabled and self.mode == "local" and self.clipping == "adaptive":
            raise ValueError("privacy.clipping='adaptive' needs privacy.mode='central' (the server adapts the bound)")
        return self


def check_privacy(cfg: RunConfig) -> None:
    """Refuse combinations whose DP guarantee we cannot state (why: ALGORITHMS.md, Privacy)."""
    p, method = cfg.privacy, cfg.aggregation.method
    if p.mode == "local":
        return  # every rule and ComPEFT only post-process updates that were noised on the client
    if method not in PRIVACY_CENTRAL_METHODS:
        raise ValueError(
            f"aggregation.method={method!r} is not supported with privacy.mode='central': it needs each client's "
            f"product B_k A_k or sends the clients' factors to everyone; allowed: {', '.join(PRIVACY_CENTRAL_METHODS)}, "
            "or privacy.mode='local'"
        )
    if method == "lora_fair" and cfg.aggregation.objective != "frobenius":
        raise ValueError(
            f"aggregation.objective={cfg.aggregation.objective!r} with lora_fair under privacy.mode='central': the "
            "cosine objective needs ‖Σ p_k B_k A_k‖², which is not released; allowed: 'frobenius'"
        )
    if method == "lora_fair" and p.clipping == "adaptive":
        raise ValueError("privacy.clipping='adaptive' is not supported with lora_fair; allowed: 'fixed'")
    sampled = max(int(cfg.federation.num_clients * cfg.federation.fraction_train), cfg.federation.min_train_nodes)
    count_std = p.clipped_count_stddev or sampled / 20
    if p.clipping == "adaptive" and p.noise_multiplier is not None and p.noise_multiplier >= 2 * count_std:
        raise ValueError(
            f"privacy.noise_multiplier={p.noise_multiplier} with adaptive clipping needs "
            f"privacy.clipped_count_stddev > {p.noise_multiplier / 2:g} (got {count_std:g}; unset = sampled "
            "clients / 20): the count's noise takes part of the budget (Andrew et al. 2021)"
        )
    stateful = [
        why
        for why, on in (
            ("compression.error_feedback=true", cfg.compression.enabled and cfg.compression.error_feedback),
            ("aggregation.method='fedsa_lora' (personal B)", method == "fedsa_lora"),
        )
        if on
    ]
    if stateful and cfg.federation.fraction_train < 1:
        raise ValueError(
            f"federation.fraction_train={cfg.federation.fraction_train} with privacy.mode='central' and "
            f"{stateful[0]}: clients keep state that depends on the rounds they were sampled in, which the "
            "sampling-amplified accountant does not cover; allowed: federation.fraction_train=1, or "
            "privacy.mode='local'" + (", or compression.error_feedback=false" if "compression" in stateful[0] else "")
        )


def check_secure_aggregation(cfg: RunConfig) -> None:
    """Refuse what secure aggregation cannot deliver from sums (why: README and ALGORITHMS.md, Secure aggregation)."""
    sa, method, f = cfg.privacy.secure_aggregation, cfg.aggregation.method, cfg.federation
    if method not in SECAGG_METHODS:
        raise ValueError(
            f"aggregation.method={method!r} is not supported with privacy.secure_aggregation: it needs each "
            f"client's product B_k A_k or stacks the clients' factors; allowed: {', '.join(SECAGG_METHODS)}"
        )
    if method == "lora_fair" and cfg.aggregation.objective != "frobenius":
        raise ValueError(
            f"aggregation.objective={cfg.aggregation.objective!r} with lora_fair under secure aggregation: the "
            "cosine objective needs ‖Σ p_k B_k A_k‖², whose cross terms pair clients (not a sum); allowed: 'frobenius'"
        )
    if cfg.compression.enabled:
        raise ValueError(
            "compression.enabled=true with privacy.secure_aggregation: masks make sparse ternary payloads dense "
            "and the server must decode each one; allowed: compression.enabled=false"
        )
    if cfg.privacy.enabled and cfg.privacy.mode == "central":
        raise ValueError(
            "privacy.mode='central' with privacy.secure_aggregation: the server cannot clip updates it never "
            "sees; allowed: privacy.mode='local'"
        )
    if f.min_train_nodes < 2:
        raise ValueError(f"federation.min_train_nodes={f.min_train_nodes} with secure aggregation: allowed >= 2")
    sampled = max(int(f.num_clients * f.fraction_train), f.min_train_nodes)
    room = sa.modulus_bits - 1 - math.ceil(math.log2(sampled))
    if sa.quantization_bits > room:
        raise ValueError(
            f"privacy.secure_aggregation.quantization_bits={sa.quantization_bits}: the sum of {sampled} clients "
            f"overflows 2^{sa.modulus_bits}; allowed: <= {room} (or modulus_bits=64)"
        )
