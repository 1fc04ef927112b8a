"""Tests for common/data: digits-domains, client partitioning, user data loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fairedge.common.data import (
    DIGITS_DOMAINS,
    LabeledData,
    TaskData,
    digits_domains_source_ids,
    load_hf_image_dataset,
    load_image_folder,
    load_text_table,
    make_digits_domains,
    partition_clients,
    stratified_split,
)

SMALL = dict(samples_per_domain=200, image_size=12)


@pytest.fixture(scope="module")
def digits() -> TaskData:
    return make_digits_domains()


# ---------------------------------------------------------------- containers


def test_subset_works_for_tensors_and_texts() -> None:
    images = LabeledData(
        x=torch.arange(5.0).view(5, 1, 1, 1), y=torch.arange(5), domain=torch.zeros(5, dtype=torch.long)
    )
    sub = images.subset(np.array([4, 1]))
    assert sub.x.flatten().tolist() == [4.0, 1.0] and sub.y.tolist() == [4, 1] and len(sub) == 2
    texts = LabeledData(x=list("abcde"), y=torch.arange(5), domain=torch.zeros(5, dtype=torch.long))
    assert texts.subset(torch.tensor([3, 0])).x == ["d", "a"]
    assert texts.subset([2]).y.tolist() == [2]


def test_labeled_data_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        LabeledData(x=["a", "b"], y=torch.arange(3), domain=torch.zeros(3, dtype=torch.long))


def test_stratified_split_keeps_every_class_in_both_splits() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 2)
    train, test = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(15))
    assert set(labels[train]) == set(labels[test]) == {0, 1, 2}


# ---------------------------------------------------------------- digits-domains


def test_digits_shapes_dtypes_and_normalisation(digits: TaskData) -> None:
    assert digits.kind == "image" and digits.source_domain == "clean"
    assert digits.domains == list(DIGITS_DOMAINS) and digits.num_classes == 10
    assert digits.num_channels == 1 and digits.image_size == 16
    assert digits.train.x.dtype == torch.float32 and digits.train.x.shape == (6 * 900, 1, 16, 16)
    assert digits.test.x.shape == (6 * 300, 1, 16, 16)
    assert digits.train.y.dtype == torch.int64 and digits.train.domain.dtype == torch.int64
    x = digits.train.x
    assert abs(x.mean().item()) < 0.5 and 0.5 < x.std().item() < 1.5
    clean = x[digits.train.domain == 0]
    assert clean.min() >= -1.0 and clean.max() <= 1.0


def test_every_domain_in_both_splits_with_requested_sizes(digits: TaskData) -> None:
    for split, n in ((digits.train, 900), (digits.test, 300)):
        counts = torch.bincount(split.domain, minlength=len(digits.domains))
        assert counts.tolist() == [n] * len(digits.domains)
        for d in range(len(digits.domains)):  # every class appears in every domain
            assert len(torch.unique(split.y[split.domain == d])) == 10


def test_domains_differ(digits: TaskData) -> None:
    x, dom = digits.test.x, digits.test.domain
    stat = {name: x[dom == d] for d, name in enumerate(digits.domains)}
    assert stat["inverted"].mean() > stat["clean"].mean() + 0.5
    assert stat["noisy"].std() > stat["clean"].std() * 1.3
    assert stat["blurred"].std() < stat["clean"].std() * 0.9
    assert stat["thick"].mean() > stat["clean"].mean() + 0.2
    # Rotation moves ink: the mean rotated image is far from the mean clean image of the same class.
    y = digits.test.y
    rot_gap = (x[(dom == 1) & (y == 1)].mean(0) - x[(dom == 0) & (y == 1)].mean(0)).abs().mean()
    assert rot_gap > 0.1


def test_digits_deterministic() -> None:
    tiny = dict(samples_per_domain=40, image_size=10)
    a, b = make_digits_domains(**tiny, seed=3), make_digits_domains(**tiny, seed=3)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    assert torch.equal(a.train.y, b.train.y) and torch.equal(a.test.domain, b.test.domain)
    c = make_digits_domains(**tiny, seed=4)
    assert not torch.equal(a.train.x, c.train.x)


def test_no_test_source_image_in_any_train_domain() -> None:
    kwargs = dict(samples_per_domain=SMALL["samples_per_domain"], seed=1)
    train_ids, test_ids = digits_domains_source_ids(**kwargs)
    train_src = set(torch.cat(train_ids).tolist())
    test_src = set(torch.cat(test_ids).tolist())
    assert train_src and test_src and not (train_src & test_src)
    # The ids are the ones behind the task's samples: their labels match.
    from sklearn.datasets import load_digits

    target = torch.from_numpy(load_digits().target)
    task = make_digits_domains(**SMALL, seed=1)
    assert torch.equal(task.train.y, target[torch.cat(train_ids)])
    assert torch.equal(task.test.y, target[torch.cat(test_ids)])


def test_domain_subset_and_order() -> None:
    task = make_digits_domains(**SMALL, domains=("inverted", "clean"))
    assert task.domains == ["inverted", "clean"]
    assert task.train.x[task.train.domain == 0].mean() > task.train.x[task.train.domain == 1].mean()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(domains=("clean", "sepia")), "sepia"),
        (dict(image_size=7), "image_size"),
        (dict(test_fraction=1.0), "test_fraction"),
        (dict(test_fraction=0.0), "test_fraction"),
        (dict(samples_per_domain=19), "samples_per_domain"),
    ],
)
def test_digits_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_digits_domains(**kwargs)


# ---------------------------------------------------------------- partitioning


@pytest.fixture(scope="module")
def small_digits() -> TaskData:
    return make_digits_domains(samples_per_domain=400, image_size=8)


@pytest.mark.parametrize("num_clients", [3, 6, 13])
def test_feature_partition(small_digits: TaskData, num_clients: int) -> None:
    data = small_digits.train
    parts = partition_clients(data, num_clients, mode="feature", seed=0)
    assert len(parts) == num_clients
    all_idx = np.concatenate(parts)
    assert len(all_idx) == len(set(all_idx.tolist()))  # disjoint
    for i, p in enumerate(parts):
        assert len(p) >= 1
        assert set(data.domain[p].tolist()) == {i % 6}
    if num_clients >= 6:  # every domain has a client: the clients cover all samples
        assert sorted(all_idx.tolist()) == list(range(len(data)))
        sizes = [len(p) for p in parts if data.domain[p[0]] == 0]
        assert max(sizes) - min(sizes) <= 1  # a shared domain is split evenly


def _label_tv(part: np.ndarray, domain_idx: np.ndarray, y: torch.Tensor) -> float:
    """Total variation distance between a client's label distribution and its domain's."""
    p = torch.bincount(y[part], minlength=10).double()
    q = torch.bincount(y[domain_idx], minlength=10).double()
    return 0.5 * (p / p.sum() - q / q.sum()).abs().sum().item()


@pytest.mark.parametrize("num_clients", [6, 12])
def test_feature_label_partition_is_skewed_disjoint_and_deterministic(small_digits: TaskData, num_clients: int) -> None:
    data = small_digits.train
    parts = partition_clients(data, num_clients, mode="feature-label", dirichlet_alpha=0.3, seed=0)
    again = partition_clients(data, num_clients, mode="feature-label", dirichlet_alpha=0.3, seed=0)
    other = partition_clients(data, num_clients, mode="feature-label", dirichlet_alpha=0.3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))
    all_idx = np.concatenate(parts)
    assert len(all_idx) == len(set(all_idx.tolist()))
    iid = partition_clients(data, num_clients, mode="feature", seed=0)
    skew, iid_skew = [], []
    for i, (p, q) in enumerate(zip(parts, iid)):
        assert len(p) >= 1 and set(data.domain[p].tolist()) == {i % 6}
        domain_idx = np.flatnonzero(data.domain.numpy() == i % 6)
        skew.append(_label_tv(p, domain_idx, data.y))
        iid_skew.append(_label_tv(q, domain_idx, data.y))
    assert np.mean(skew) > 0.25 and np.mean(skew) > 3 * np.mean(iid_skew)


def test_partition_bad_arguments(small_digits: TaskData) -> None:
    with pytest.raises(ValueError, match="num_clients"):
        partition_clients(small_digits.train, 0)
    with pytest.raises(ValueError, match="mode"):
        partition_clients(small_digits.train, 2, mode="label")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dirichlet_alpha"):
        partition_clients(small_digits.train, 2, mode="feature-label", dirichlet_alpha=0.0)


# ---------------------------------------------------------------- user data


def _write_image_folder(root: Path, per_class: int = 5) -> None:
    rng = np.random.default_rng(0)
    for name, level in (("cat", 40), ("dog", 200)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(level + rng.integers(-20, 20, size=(10, 14, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_image_folder_round_trip(tmp_path: Path) -> None:
    _write_image_folder(tmp_path)
    task = load_image_folder(tmp_path, image_size=8, channels=3, test_fraction=0.2, seed=0)
    assert task.classes == ["cat", "dog"] and task.domains == ["all"] and task.source_domain == "all"
    assert task.train.x.shape == (8, 3, 8, 8) and task.test.x.shape == (2, 3, 8, 8)
    assert task.train.x.dtype == torch.float32 and task.test.y.tolist() == [0, 1]
    # Dark "cat" images stay darker than bright "dog" ones after normalisation.
    assert task.train.x[task.train.y == 0].mean() < -0.5 < 0.5 < task.train.x[task.train.y == 1].mean()
    gray = load_image_folder(tmp_path, image_size=6, channels=1)
    assert gray.num_channels == 1 and gray.image_size == 6


def test_hf_dataset_round_trip(tmp_path: Path) -> None:
    from datasets import ClassLabel, Dataset, DatasetDict, Features
    from datasets import Image as HFImage

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)) for _ in range(12)]
    features = Features(
        {"image": HFImage(), "label": ClassLabel(names=["b", "a", "c"]), "domain": ClassLabel(names=["x", "y"])}
    )
    ds = Dataset.from_dict(
        {"image": images, "label": [i % 3 for i in range(12)], "domain": [i % 2 for i in range(12)]}, features=features
    )
    ds.save_to_disk(str(tmp_path / "single"))
    task = load_hf_image_dataset(tmp_path / "single", image_size=8, channels=3, test_fraction=0.25)
    assert task.classes == ["b", "a", "c"] and task.domains == ["x", "y"]
    assert len(task.train) == 9 and len(task.test) == 3 and task.train.x.shape[1:] == (3, 8, 8)

    plain = Dataset.from_dict({"img": [np.full((5, 5), 200, dtype=np.uint8)] * 4, "y": ["dog", "cat", "dog", "cat"]})
    DatasetDict({"train": plain, "test": plain.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    task = load_hf_image_dataset(tmp_path / "dict", image_size=4, channels=1, image_column="img", label_column="y")
    assert task.classes == ["cat", "dog"] and len(task.train) == 4 and task.test.y.tolist() == [1, 0]
    assert task.domains == ["all"] and torch.allclose(task.train.x, torch.tensor(200 / 255 * 2 - 1))
    with pytest.raises(ValueError, match="'image'"):
        load_hf_image_dataset(tmp_path / "dict")


def test_text_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('text,label\n"good, really",pos\nbad,neg\nfine,pos\nawful,neg\n"great\nfilm",pos\nmeh,neg\n')
    task = load_text_table(csv_path, test_fraction=0.34)
    assert task.kind == "text" and task.classes == ["neg", "pos"]
    assert isinstance(task.train.x, list) and len(task.train) + len(task.test) == 6
    texts = task.train.x + task.test.x
    assert "good, really" in texts and "great\nfilm" in texts

    jsonl_path = tmp_path / "data.jsonl"
    rows = [{"text": f"t{i}", "label": i % 3 * 5, "domain": "ab"[i % 2]} for i in range(9)]
    jsonl_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_text_table(jsonl_path)
    assert task.classes == ["0", "5", "10"] and task.domains == ["a", "b"]  # numeric labels sort numerically
    everything = task.train.x + task.test.x
    labels = torch.cat([task.train.y, task.test.y]).tolist()
    assert all(int(task.classes[c]) == int(t[1:]) % 3 * 5 for t, c in zip(everything, labels))


def test_user_data_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for loader in (load_image_folder, load_hf_image_dataset, load_text_table):
        with pytest.raises(FileNotFoundError, match="nope"):
            loader(missing)
    with pytest.raises(ValueError, match="test_fraction"):
        load_text_table(missing, test_fraction=1.5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(empty)
    (empty / "cat").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(empty)
    Image.new("RGB", (4, 4)).save(empty / "cat" / "0.png")
    with pytest.raises(ValueError, match="at least 2"):
        load_image_folder(empty)

    no_label = tmp_path / "t.csv"
    no_label.write_text("text,category\nhello,a\n")
    with pytest.raises(ValueError, match="'label'"):
        load_text_table(no_label)
    no_rows = tmp_path / "empty.jsonl"
    no_rows.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_text_table(no_rows)
    one_class = tmp_path / "one.jsonl"
    one_class.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(ValueError, match="at least 2"):
        load_text_table(one_class)
    with pytest.raises(ValueError, match=".txt"):
        (tmp_path / "t.txt").write_text("x")
        load_text_table(tmp_path / "t.txt")
