"""One LoRA layer's server aggregation measured in a fresh process: parts `layers` (`worker`) and
`switch` (`switch_worker`) of `fairedge.simulations.bench_aggregation_cost`, whose docstring says how.
Apart from the entry point, the driver and the report so that each module reads at once; the workers
still start as `bench_aggregation_cost --worker` / `--switch-worker`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fairedge.common.aggregation.base import weighted_mean
from fairedge.common.aggregation.factored import LowRankSum
from fairedge.common.aggregation.flexlora import flexlora
from fairedge.common.aggregation.lora_fair import delta_form_flops, lora_fair, solve_lora_fair

SEED = 0
LAM = 0.01
DENSE_STEPS = 500
DENSE_BUDGET_S = 60.0
"""Longest dense run timed in full; longer ones are extrapolated per step."""
SWITCH_FORMS = ("factored", "dense", "auto")

Inputs = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]


def make_inputs(m: int, n: int, r: int, K: int, seed: int = SEED) -> Inputs:
    """Factors shaped like trained LoRA: `A` at Kaiming scale, `B` small; weights ∝ dataset sizes."""
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(r, n, generator=g) / n**0.5 for _ in range(K)]
    B = [0.01 * torch.randn(m, r, generator=g) for _ in range(K)]
    examples = torch.randint(50, 500, (K,), generator=g).to(torch.float64)
    return A, B, examples / examples.sum()


def fedit(A: list[torch.Tensor], B: list[torch.Tensor], p: torch.Tensor) -> None:
    """What `FedIT.aggregate` computes for one layer."""
    weighted_mean(A, p), weighted_mean(B, p)


def dense_adam(
    A: list[torch.Tensor], B: list[torch.Tensor], p: torch.Tensor, steps: int, seed: int = SEED
) -> tuple[float, float]:
    """The naive LoRA-FAIR: dense `ΔW`, random start, Adam. Returns (seconds forming ΔW, final cosine)."""
    t0 = time.perf_counter()
    w = p.tolist()
    dW = sum(wk * (b @ a) for wk, a, b in zip(w, A, B, strict=True))
    Ab = sum(wk * a for wk, a in zip(w, A, strict=True))
    Bb = sum(wk * b for wk, b in zip(w, B, strict=True))
    t_form = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    X = (0.01 * torch.randn(Bb.shape, generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([X], lr=1e-3)
    dW_norm = dW.norm()
    cos = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad()
        P = X @ Ab
        cos = (dW * P).sum() / (dW_norm * P.norm())
        loss = 1 - cos + LAM * ((X - Bb) ** 2).sum()
        loss.backward()
        opt.step()
    return t_form, float(cos.detach())


def _factored(name: str) -> Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], object]:
    if name.startswith("lora_fair_cosine"):
        form = name.removeprefix("lora_fair_cosine").lstrip("_") or "auto"
        return lambda A, B, p: lora_fair(A, B, p, lam=LAM, objective="cosine", delta_form=form)  # type: ignore[arg-type]
    if name == "lora_fair_frobenius":
        return lambda A, B, p: lora_fair(A, B, p, lam=LAM, objective="frobenius")
    if name == "flexlora":
        return lambda A, B, p: flexlora(A, B, p, A[0].shape[0])
    if name == "fedit":
        return fedit
    raise ValueError(name)


# --- one (config, method) in a fresh process ----------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _peak_extra_bytes(run: Callable[[], object]) -> int:
    """Peak resident memory `run` adds on top of what is live now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) * 1024


def _timed(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def worker(m: int, r: int, K: int, method: str, quick: bool) -> dict:
    torch.set_num_threads(1)
    # one call on a tiny layer first, so that pages of library code touched for the
    # first time (LAPACK, autograd, ...) do not count as memory the method needs
    warm = make_inputs(32, 32, r, K)
    if method == "lora_fair_dense_adam":
        dense_adam(*warm, steps=2)
    else:
        _factored(method)(*warm)
    A, B, p = make_inputs(m, m, r, K)
    out: dict = {"m": m, "n": m, "r": r, "K": K, "method": method}
    base = lambda: fedit(A, B, p)  # noqa: E731
    fedit_s: list[float] = []
    method_s: list[float] = []
    if method == "lora_fair_dense_adam":
        out["peak_extra_bytes"] = _peak_extra_bytes(lambda: dense_adam(A, B, p, steps=2))
        probe_steps = 3
        t0 = time.perf_counter()
        t_form, _ = dense_adam(A, B, p, steps=probe_steps)
        per_step = (time.perf_counter() - t0 - t_form) / probe_steps
        estimate = t_form + DENSE_STEPS * per_step
        budget = DENSE_BUDGET_S / (4 if quick else 1)
        if estimate > budget:  # time fewer steps, extrapolate linearly per step
            steps = max(5, int(0.25 * budget / per_step))
            runs = 1
        else:
            steps = DENSE_STEPS
            runs = 3 if estimate < 5 else 1
        for _ in range(runs):
            fedit_s.append(min(_timed(base) for _ in range(3)))
            t0 = time.perf_counter()
            t_form, cos = dense_adam(A, B, p, steps=steps)
            total = time.perf_counter() - t0
            method_s.append(t_form + (total - t_form) * DENSE_STEPS / steps)
        out.update(steps_timed=steps, extrapolated=steps < DENSE_STEPS, cos_after_steps=cos)
    else:
        run = _factored(method)
        t0 = time.perf_counter()
        out["peak_extra_bytes"] = _peak_extra_bytes(lambda: run(A, B, p))
        first = time.perf_counter() - t0
        if first > 5.0:  # slow: the measured first call is the one sample
            fedit_s.append(_timed(base))
            method_s.append(first)
            reps = 0
        else:
            reps = 3 if first > 1.0 else (5 if quick else 15)
        for _ in range(reps):
            fedit_s.append(_timed(base))
            method_s.append(_timed(lambda: run(A, B, p)))
        if method.startswith("lora_fair"):
            objective = "frobenius" if method == "lora_fair_frobenius" else "cosine"
            form = method.removeprefix(f"lora_fair_{objective}").lstrip("_") or "auto"
            res = solve_lora_fair(A, B, p, lam=LAM, objective=objective, delta_form=form)  # type: ignore[arg-type]
            # which form `lora_fair` (no metrics) took: frobenius without metrics needs no ‖ΔW‖²
            flops = delta_form_flops(m, m, [r] * K, needs_norm=objective == "cosine", single=True)
            taken = form if form != "auto" else min(flops, key=flops.__getitem__)
            out.update(cos_fair=res.cos_fair, cos_fedit=res.cos_fedit, delta_form=taken, flops=flops)
        if method == "lora_fair_cosine" and out["delta_form"] == "factored":
            delta = LowRankSum.stack(A, B, p, dtype=torch.float32)  # as lora_fair does for float32 clients
            norm_s = [_timed(delta.sq_norm) for _ in range(max(1, min(reps, 5)))]
            out.update(norm_seconds=statistics.median(norm_s))
    out.update(
        seconds_median=statistics.median(method_s),
        seconds_min=min(method_s),
        fedit_seconds_median=statistics.median(fedit_s),
        fedit_seconds_min=min(fedit_s),
        runs=len(method_s),
        ratio_to_fedit=statistics.median(method_s) / statistics.median(fedit_s),
        ratio_to_fedit_of_minima=min(method_s) / min(fedit_s),
    )
    return out


def switch_worker(m: int, r: int, K: int, quick: bool) -> dict:
    """LoRA-FAIR (cosine) with `ΔW` forced factored, forced dense, and auto, taking turns with FedIT in one process."""
    torch.set_num_threads(1)
    runs: dict[str, Callable[[list[torch.Tensor], list[torch.Tensor], torch.Tensor], object]] = {"fedit": fedit}
    for form in SWITCH_FORMS:
        runs[form] = lambda A, B, p, form=form: lora_fair(A, B, p, lam=LAM, delta_form=form)  # type: ignore[misc]
    warm = make_inputs(32, 32, r, K)
    for run in runs.values():
        run(*warm)
    A, B, p = make_inputs(m, m, r, K)
    first = max(_timed(lambda run=run: run(A, B, p)) for run in runs.values())  # type: ignore[misc]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(3 if first > 1.0 else (5 if quick else 11)):
        for name, run in runs.items():
            times[name].append(_timed(lambda run=run: run(A, B, p)))  # type: ignore[misc]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    flops = delta_form_flops(m, m, [r] * K, needs_norm=True, single=True)
    best = min(("factored", "dense"), key=med.__getitem__)
    return {
        "m": m,
        "n": m,
        "r": r,
        "K": K,
        "runs": len(times["fedit"]),
        "kr_over_threshold": K * r / (m * m / (2 * m)),
        "flops": flops,
        "auto_form": min(flops, key=flops.__getitem__),
        "faster_forced_form": best,
        "seconds_median": med,
        "seconds_min": {name: min(ts) for name, ts in times.items()},
        "ratio_to_fedit": {name: med[name] / med["fedit"] for name in SWITCH_FORMS},
        "auto_over_best": med["auto"] / med[best],
    }
