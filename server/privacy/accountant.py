"""(ε, δ) of client-level DP, round by round, from dp-accounting's RDP accountant (no hand-written bounds).

What one round releases, as a dp-accounting event:

- central: the server samples `K` of `N` clients without replacement (our sampler draws a fixed-size
  sample), so the event is `SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z/2))` under the
  REPLACE_ONE relation (the only one dp-accounting supports for that sampling; Wang, Balle &
  Kasiviswanathan 2019). Replacing one client's data moves its clipped update by up to `2C`, so
  noise of std `z·C` on the sum is a Gaussian mechanism of multiplier `z/2` for that relation.
  With `K = N` there is no amplification and the event is the Gaussian alone.
- local: each client noises its own update; the server sees it, so sampling hides nothing. A round
  is `GaussianDpEvent(z/2)` per client (any two data sets of a client: updates up to `2C` apart),
  composed over every round (a client that is sampled every round; fewer rounds only lower its ε).

`calibrate_noise_multiplier` is dp-accounting's `calibrate_dp_mechanism` on the planned rounds: the
multiplier it returns gives ε ≤ target (its bisection keeps the side that meets the budget).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

from dp_accounting import dp_event
from dp_accounting.mechanism_calibration import LowerEndpointAndGuess, calibrate_dp_mechanism
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from fairedge.common.config import RunConfig

Mode = Literal["central", "local"]


def round_event(noise_multiplier: float, sample_size: int, population: int, mode: Mode) -> dp_event.DpEvent:
    """The dp-accounting event of one round (see the module docstring)."""
    if not 0 < sample_size <= population:
        raise ValueError(f"need 0 < sample_size <= population, got {sample_size} of {population}")
    gaussian = dp_event.GaussianDpEvent(noise_multiplier / 2)  # replace-one: sensitivity 2C for noise z·C
    if mode == "local" or sample_size == population:
        return gaussian
    return dp_event.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)


def new_accountant() -> RdpAccountant:
    return RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)


def epsilon_of(events: list[tuple[float, int, int]], delta: float, mode: Mode) -> float:
    """ε at `delta` after composing `(noise_multiplier, sample_size, population)` rounds (inf without noise)."""
    if any(z <= 0 for z, _, _ in events):
        return math.inf
    acc = new_accountant()
    for (z, k, n), count in Counter(events).items():
        acc.compose(round_event(z, k, n, mode), count)
    return float(acc.get_epsilon(delta)) if events else 0.0


class PrivacyLedger:
    """The rounds released so far and their (ε, δ); its state is the list of events (for checkpoints)."""

    def __init__(self, delta: float, mode: Mode) -> None:
        self.delta = delta
        self.mode: Mode = mode
        self.events: list[tuple[float, int, int]] = []

    def record(self, noise_multiplier: float, sample_size: int, population: int) -> dict[str, float]:
        """Compose one round; return its own ε, the total ε so far, δ and the sampling rate."""
        event = (float(noise_multiplier), int(sample_size), int(population))
        self.events.append(event)
        return {
            "epsilon": epsilon_of(self.events, self.delta, self.mode),
            "epsilon_round": epsilon_of([event], self.delta, self.mode),
            "delta": self.delta,
            "sampling_rate": sample_size / population if self.mode == "central" else 1.0,
        }

    def epsilon(self) -> float:
        return epsilon_of(self.events, self.delta, self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {"events": [list(e) for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = [(float(z), int(k), int(n)) for z, k, n in state["events"]]


def planned_sampling(cfg: RunConfig) -> tuple[int, int]:
    """`(K, N)`: clients sampled per round and clients in all, as the strategy will draw them."""
    f = cfg.federation
    return max(int(f.num_clients * f.fraction_train), f.min_train_nodes), f.num_clients


def calibrate_noise_multiplier(
    target_epsilon: float, delta: float, rounds: int, sample_size: int, population: int, mode: Mode
) -> float:
    """The smallest noise multiplier (to 1e-4) whose ε after `rounds` rounds is at most `target_epsilon`."""

    def event(z: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(round_event(z, sample_size, population, mode), rounds)

    return float(
        calibrate_dp_mechanism(new_accountant, event, target_epsilon, delta, LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4)
    )


def resolve_noise_multiplier(cfg: RunConfig) -> float:
    """`privacy.noise_multiplier`, or the one `privacy.target_epsilon` calls for over `federation.rounds`."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    assert p.target_epsilon is not None  # the config allows exactly one of the two
    k, n = planned_sampling(cfg)
    return calibrate_noise_multiplier(p.target_epsilon, p.delta, cfg.federation.rounds, k, n, p.mode)
