"""Split one dataset across federated clients, the way the LoRA-FAIR paper does.

"feature" non-IID (the paper's DomainNet setting): each client sees one domain only.
"feature-label" non-IID: the same, plus Dirichlet label skew inside each domain, drawn
with flwr-datasets' `DirichletPartitioner` so the skew matches Flower's own baselines.
"""

from __future__ import annotations

import warnings
from typing import Literal, cast

import numpy as np

from fairedge.common.data.task_data import Examples, LabeledData

PartitionMode = Literal["feature", "feature-label"]
MIN_PARTITION_SIZE = 10  # what the Dirichlet partitioner asks of every partition, when feasible


def partition_clients(
    data: Examples,
    num_clients: int,
    *,
    mode: PartitionMode = "feature",
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Per-client index arrays into `data`; client `i` holds domain `i % D`.

    D is the number of domains present in `data.domain` (taken in sorted id order).
    - "feature": the clients of one domain split its samples evenly at random (disjoint).
    - "feature-label": a domain with `c` clients is cut into `P = max(2, c)` Dirichlet label
      partitions (`alpha=dirichlet_alpha`, no self-balancing) and client `j` of the domain
      gets partition `j`. With one client per domain that client thus holds a label-skewed
      part of its domain (the rest of the domain is unused), so label skew exists even when
      `num_clients == D`. The partitioner is seeded with `seed * 1000 + domain id`.
    """
    _check(data, num_clients, mode, dirichlet_alpha)
    present = np.unique(data.domain.numpy())
    clients: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for d_pos in range(min(len(present), num_clients)):
        members = range(d_pos, num_clients, len(present))
        for j, part in enumerate(_domain_parts(data, present, d_pos, len(members), mode, dirichlet_alpha, seed)):
            clients[members[j]] = part
    return clients


def client_indices(
    data: Examples,
    num_clients: int,
    client: int,
    *,
    mode: PartitionMode = "feature",
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
) -> np.ndarray:
    """`partition_clients(...)[client]`, computed from the client's own domain only.

    A simulated client needs its share alone; this costs a pass over one domain's
    samples, independent of how many other clients the run has (1000 virtual clients
    cost what 10 do), where `partition_clients` builds every client's index array.
    """
    _check(data, num_clients, mode, dirichlet_alpha)
    if not 0 <= client < num_clients:
        raise ValueError(f"client {client} outside [0, {num_clients})")
    present = np.unique(data.domain.numpy())
    d_pos = client % len(present)
    members = len(range(d_pos, num_clients, len(present)))
    return _domain_parts(data, present, d_pos, members, mode, dirichlet_alpha, seed)[client // len(present)]


def _check(data: Examples, num_clients: int, mode: str, dirichlet_alpha: float) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if mode not in ("feature", "feature-label"):
        raise ValueError(f"unknown partition mode {mode!r}; expected 'feature' or 'feature-label'")
    if not dirichlet_alpha > 0:
        raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
    if len(data) == 0:
        raise ValueError("cannot partition an empty split")


def _domain_parts(
    data: Examples, present: np.ndarray, d_pos: int, members: int, mode: str, dirichlet_alpha: float, seed: int
) -> list[np.ndarray]:
    """The sorted index arrays of the `members` clients of domain `present[d_pos]`, in client order."""
    d = int(present[d_pos])
    idx = np.flatnonzero(data.domain.numpy() == d)
    if mode == "feature":
        parts = np.array_split(np.random.default_rng([seed, d]).permutation(idx), members)
    else:
        # label skew needs labels; causal-LM data (TokenData) has none and is split by client only.
        # A per-domain seed, so clients of different domains do not share one label skew.
        labels = cast(LabeledData, data).y.numpy()[idx]
        parts = _dirichlet_parts(idx, labels, max(2, members), dirichlet_alpha, seed * 1000 + d)
    if any(len(parts[j]) == 0 for j in range(members)):
        raise ValueError(f"domain {d} has {len(idx)} samples, too few for its {members} clients")
    return [np.sort(parts[j]).astype(np.int64) for j in range(members)]


def _dirichlet_parts(idx: np.ndarray, labels: np.ndarray, num_parts: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Cut `idx` into `num_parts` label-skewed pieces with flwr-datasets' DirichletPartitioner.

    The partitioner resamples until every piece reaches `min_partition_size` and gives up
    after 10 tries, so the minimum is lowered to what a small domain can actually meet.
    """
    # Imported here: flwr-datasets takes seconds to import and only this mode needs it.
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    if len(idx) < num_parts:
        raise ValueError(f"a domain with {len(idx)} samples cannot be split into {num_parts} partitions")
    min_size = max(1, min(MIN_PARTITION_SIZE, len(idx) // (4 * num_parts)))
    partitioner = DirichletPartitioner(
        num_partitions=num_parts,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_size,
        self_balancing=False,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict({"label": labels.tolist(), "idx": idx.tolist()})
    with warnings.catch_warnings():  # it warns on every resample; only a final failure matters
        warnings.simplefilter("ignore")
        try:
            return [np.asarray(partitioner.load_partition(j)["idx"], dtype=np.int64) for j in range(num_parts)]
        except ValueError as err:
            raise ValueError(
                f"Dirichlet split (alpha={alpha}) of a domain with {len(idx)} samples into {num_parts} "
                f"partitions of >= {min_size} samples failed after 10 tries; raise dirichlet_alpha "
                f"or use fewer clients per domain ({err})"
            ) from err
