"""The device's model: an ONNX Runtime session whose normalisation parameters can be swapped live.

The exported model (common/edge_format.py) declares every normalisation affine parameter as a graph
input with its trained value as the default, so feeding a new set changes the model with no
session rebuild. The current set is one immutable `NormParamSet`; a swap validates the new set
completely (names, shapes, finite float32) and then replaces that one reference under a lock.
A batch reads the reference once before it runs, so it sees either the old set or the new one,
never a mix.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from fairedge.common import edge_format
from fairedge.common.edge_format import EdgeModelInfo


@dataclass(frozen=True)
class NormParamSet:
    """A complete set of normalisation parameters and its cloud version (0 = the exported defaults)."""

    version: int
    arrays: Mapping[str, np.ndarray] | None  # None: the model's own defaults


class EdgeSession:
    """Forward passes of an exported model, plus an atomic swap of its normalisation parameters."""

    def __init__(self, model_path: str | Path, *, threads: int = 0) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}")
        self.path = path
        self.session = edge_format.session(path, threads=threads or None)
        self.info: EdgeModelInfo = edge_format.read_edge_metadata(self.session.get_modelmeta().custom_metadata_map)
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        required = {i.name for i in self.session.get_inputs()}
        missing = [n for n in self.info.norm_param_names if n not in overridable]
        missing += [s.name for s in self.info.inputs if s.name not in required]
        if missing:
            raise ValueError(f"{path}: the metadata names graph inputs the model does not have: {missing[:5]}")
        self.norm_shapes: dict[str, tuple[int, ...]] = dict(self.info.norm_param_shapes)
        self.input_dtypes = {s.name: np.dtype(s.dtype) for s in self.info.inputs}
        self._lock = threading.Lock()
        self._params = NormParamSet(version=0, arrays=None)

    @property
    def num_classes(self) -> int:
        return len(self.info.labels)

    @property
    def params(self) -> NormParamSet:
        with self._lock:
            return self._params

    @property
    def params_version(self) -> int:
        return self.params.version

    def predict(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, int]:
        """Logits (N, C) for one batch of model inputs, and the parameter version that produced them."""
        expected = set(self.input_dtypes)
        if set(inputs) != expected:
            raise ValueError(f"model inputs are {sorted(expected)}, got {sorted(inputs)}")
        params = self.params  # read once: the whole batch runs with this set
        feed = {name: np.asarray(a, dtype=self.input_dtypes[name]) for name, a in inputs.items()}
        if params.arrays is not None:
            feed.update(params.arrays)
        return self.session.run([edge_format.OUTPUT_NAME], feed)[0], params.version

    def check_params(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A read-only float32 copy of a complete, well-formed parameter set, or ValueError saying what is wrong."""
        names, expected = set(arrays), set(self.norm_shapes)
        if names != expected:
            raise ValueError(
                f"norm params must be exactly the model's {len(expected)}: "
                f"missing {sorted(expected - names)[:5]}, unknown {sorted(names - expected)[:5]}"
            )
        out = {}
        for name, array in arrays.items():
            a = np.array(array, dtype=np.float32)  # a private copy
            if a.shape != self.norm_shapes[name]:
                raise ValueError(f"norm param {name!r}: shape {a.shape}, the model needs {self.norm_shapes[name]}")
            if not np.isfinite(a).all():
                raise ValueError(f"norm param {name!r}: has non-finite values")
            a.setflags(write=False)
            out[name] = a
        return out

    def swap(self, version: int, arrays: Mapping[str, np.ndarray]) -> bool:
        """Make `arrays` the parameters of every later batch; False if `version` is not newer than the current one."""
        checked = self.check_params(arrays)
        new = NormParamSet(version=int(version), arrays=MappingProxyType(checked))
        with self._lock:
            if new.version <= self._params.version:
                return False
            self._params = new
        return True

    def default_params(self) -> dict[str, np.ndarray]:
        """The exported (trained) values of the normalisation parameters, read from the model file."""
        return {k: np.asarray(v, np.float32) for k, v in edge_format.default_norm_values(self.path).items()}
