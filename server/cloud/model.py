"""What the cloud serves: the device's model (the student), the teacher, and their norm params.

By default the teacher is the merged global model itself; a larger or differently trained
model (another run folder with the same inputs and labels) can teach instead. The device
runs the exported ONNX of the student, so the student's norm params are what travels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from fairedge.common.edge_model import InputSpec, forward_with_norm, load_merged_model, norm_parameters
from fairedge.server.cloud.learner import ForwardFn


@dataclass
class ServedModel:
    """Student and teacher modules, their starting norm params (keys = ONNX input names), and the model's identity."""

    student: nn.Module
    teacher: nn.Module
    inputs: list[InputSpec]
    num_classes: int
    model_id: str
    model_version: str
    student_norm: dict[str, Tensor]
    teacher_norm: dict[str, Tensor]
    forward: ForwardFn = forward_with_norm

    @classmethod
    def from_modules(
        cls,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        inputs: list[InputSpec],
        num_classes: int,
        model_id: str,
        model_version: str,
    ) -> ServedModel:
        """Serve `student`, taught by `teacher` (default: the student itself), with their own norm params."""
        teacher = student if teacher is None else teacher
        return cls(
            student,
            teacher,
            list(inputs),
            num_classes,
            model_id,
            model_version,
            norm_parameters(student),
            norm_parameters(teacher),
        )


def load_served_model(run_dir: str | Path, teacher: str | Path | None = None) -> ServedModel:
    """The merged global model of `run_dir` as student, taught by itself or by the model of the `teacher` run."""
    merged = load_merged_model(run_dir)
    teacher_model = None
    if teacher is not None:
        other = load_merged_model(teacher)
        if other.inputs != merged.inputs:
            raise ValueError(
                f"teacher {str(teacher)!r} takes inputs {other.inputs}, the served model {merged.inputs}: "
                "a teacher must read the same samples"
            )
        if other.labels != merged.labels:
            raise ValueError(
                f"teacher {str(teacher)!r} predicts labels {other.labels[:5]}..., the served model "
                f"{merged.labels[:5]}...: a teacher must predict the same classes"
            )
        teacher_model = other.model
    return ServedModel.from_modules(
        merged.model,
        teacher_model,
        inputs=merged.inputs,
        num_classes=len(merged.labels),
        model_id=merged.model_id,
        model_version=merged.model_version,
    )
