"""The CEMA cloud learner: teacher adapts by weighted entropy, the student is distilled from it.

Only normalisation affine parameters learn. The teacher and student modules are shared by
all devices and never change; a device's learnable state is a `DeviceParams` (its student
norm params, its own copy of the teacher's norm params, and their SGD momentum). Forward
passes swap those tensors in with `torch.func.functional_call`, so one module serves every
device.

Why a teacher per device (norm params only): devices drift in different directions (one
camera gets darker, another noisier). A shared teacher adapting to all uploads at once
would average those shifts and distil a compromise to everyone; per-device teacher norm
params cost a few KB each, while the (possibly large) teacher weights stay shared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fairedge.common.config import CloudConfig
from fairedge.server.cloud.losses import distillation_loss, entropy, teacher_entropy_loss

ForwardFn = Callable[[nn.Module, Mapping[str, Tensor], Mapping[str, Tensor]], Tensor]
"""`forward(model, norm_params, inputs) -> logits`: the model run with `norm_params` swapped in."""


class DeviceParams:
    """One device's learnable state: student and teacher norm params, each with an SGD optimizer."""

    def __init__(
        self,
        student: Mapping[str, Tensor],
        teacher: Mapping[str, Tensor],
        cfg: CloudConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        def learnable(v: Tensor) -> Tensor:
            return v.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)

        self.student = {k: learnable(v) for k, v in student.items()}
        self.teacher = {k: learnable(v) for k, v in teacher.items()}
        self.student_opt = torch.optim.SGD(list(self.student.values()), lr=cfg.lr, momentum=cfg.momentum)
        self.teacher_opt = torch.optim.SGD(list(self.teacher.values()), lr=cfg.teacher_lr, momentum=cfg.momentum)

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor needed to resume exactly: `student/<name>`, `teacher/<name>` and their momentum (on the CPU)."""
        out: dict[str, Tensor] = {}
        for role, params, opt in self._roles():
            for name, p in params.items():
                out[f"{role}/{name}"] = p.detach().cpu().clone()
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    out[f"{role}_momentum/{name}"] = buf.detach().cpu().clone()
        return out

    def load_state_dict(self, tensors: Mapping[str, Tensor]) -> None:
        """Restore what `state_dict` returned; a missing or extra parameter is an error."""
        for role, params, opt in self._roles():
            stored = {k.split("/", 1)[1] for k in tensors if k.startswith(f"{role}/")}
            if stored != set(params):
                raise ValueError(
                    f"stored {role} norm params {sorted(stored ^ set(params))[:4]} do not match the model's"
                )
            with torch.no_grad():
                for name, p in params.items():
                    value = tensors[f"{role}/{name}"]
                    if value.shape != p.shape:
                        raise ValueError(
                            f"stored {role} param {name!r} has shape {list(value.shape)}, "
                            f"the model's has {list(p.shape)}"
                        )
                    p.copy_(value)
                    buf = tensors.get(f"{role}_momentum/{name}")
                    if buf is not None:
                        opt.state[p]["momentum_buffer"] = buf.detach().to(device=p.device, dtype=torch.float32).clone()

    def _roles(self) -> tuple[tuple[str, dict[str, Tensor], torch.optim.Optimizer], ...]:
        return (("student", self.student, self.student_opt), ("teacher", self.teacher, self.teacher_opt))

    def student_arrays(self) -> dict[str, np.ndarray]:
        """The student's norm params as float32 arrays (what the device receives)."""
        return {k: v.detach().cpu().numpy().astype(np.float32, copy=True) for k, v in self.student.items()}


@dataclass(frozen=True)
class StepStats:
    """What one learning step saw; losses are measured before the step."""

    new: int
    replayed: int
    teacher_entropy: float
    teacher_kept: int
    student_loss: float
    kl: float


class CemaLearner:
    """Runs CEMA steps for any device's `DeviceParams` against shared, frozen student and teacher modules.

    `student_norm` / `teacher_norm` are the modules' own norm params (the exported
    defaults = version 0), keyed as `forward` expects them (ONNX input names).
    `num_classes` sets `E_max = cfg.e_max · ln C`. The modules, every device's norm params and each
    step's samples live on `device` (the service resolves `cloud.device`: a GPU when one is present);
    what leaves the learner (published arrays, saved state) is on the CPU.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        student_norm: Mapping[str, Tensor],
        teacher_norm: Mapping[str, Tensor],
        num_classes: int,
        cfg: CloudConfig,
        forward: ForwardFn,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}: entropy needs at least 2 classes")
        if not student_norm:
            raise ValueError("student_norm is empty: the student has no normalisation parameters to adapt")
        self.device = torch.device(device)
        self.student, self.teacher = student.eval().to(self.device), teacher.eval().to(self.device)
        for module in (self.student, self.teacher):
            module.requires_grad_(False)  # only the swapped-in norm tensors get gradients
        self.student_norm = {k: v.detach().to(self.device).clone() for k, v in student_norm.items()}
        self.teacher_norm = {k: v.detach().to(self.device).clone() for k, v in teacher_norm.items()}
        self.cfg = cfg
        self.forward = forward
        self.e_max = cfg.e_max * math.log(num_classes)

    def new_params(self) -> DeviceParams:
        """A device's starting state: the modules' own norm params, no momentum."""
        return DeviceParams(self.student_norm, self.teacher_norm, self.cfg, self.device)

    def step(
        self, params: DeviceParams, new: Mapping[str, Tensor], replay: Mapping[str, Tensor] | None = None
    ) -> StepStats:
        """One CEMA step: the teacher learns from `new`, then the student from `new` + `replay`.

        Both dicts map input names to tensors whose first dimension is the sample count. With no new
        samples (a replay-only step, `cloud.replay_every`) the teacher rests and the student learns from `replay`.
        """
        cfg = self.cfg
        new, replay = self._on_device(new), self._on_device(replay) if replay is not None else {}
        n_new, n_replay = _count(new), _count(replay)
        if n_new + n_replay == 0:
            raise ValueError("a CEMA step needs new or replayed samples, got neither")
        # 1. teacher: weighted entropy minimisation on the new uploads only
        teacher_entropy, kept = float("nan"), 0
        if n_new:
            with torch.set_grad_enabled(cfg.teacher_lr > 0):
                t_logits = self.forward(self.teacher, params.teacher, new)
                t_loss, kept = teacher_entropy_loss(t_logits, self.e_max)
            teacher_entropy = float(entropy(t_logits.detach()).mean())
            if kept and cfg.teacher_lr > 0:
                params.teacher_opt.zero_grad(set_to_none=True)
                t_loss.backward()
                params.teacher_opt.step()
        # 2. student: distillation from the updated teacher on new + replayed samples
        batch = (
            {k: torch.cat([new[k], replay[k]]) for k in new} if n_new and n_replay else dict(new if n_new else replay)
        )
        with torch.no_grad():
            t_logits = self.forward(self.teacher, params.teacher, batch)
        s_logits = self.forward(self.student, params.student, batch)
        loss, parts = distillation_loss(
            s_logits,
            t_logits,
            e_max=self.e_max,
            temperature=cfg.temperature,
            entropy_weight=cfg.entropy_weight,
            kl_weight=cfg.kl_weight,
            ce_weight=cfg.ce_weight,
        )
        params.student_opt.zero_grad(set_to_none=True)
        loss.backward()
        params.student_opt.step()
        return StepStats(
            new=n_new,
            replayed=_count(batch) - n_new,
            teacher_entropy=teacher_entropy,
            teacher_kept=kept,
            student_loss=float(loss.detach()),
            kl=parts["kl_unweighted"],
        )

    @torch.no_grad()
    def distillation_gap(self, params: DeviceParams, inputs: Mapping[str, Tensor]) -> float:
        """Mean KL(teacher ‖ student) at T = 1 on `inputs`: how far the student is from its teacher."""
        inputs = self._on_device(inputs)
        t = torch.log_softmax(self.forward(self.teacher, params.teacher, inputs), dim=-1)
        s = torch.log_softmax(self.forward(self.student, params.student, inputs), dim=-1)
        return float((t.exp() * (t - s)).sum(dim=-1).mean())

    def _on_device(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}


def _count(inputs: Mapping[str, Tensor]) -> int:
    return int(next(iter(inputs.values())).shape[0]) if inputs else 0
