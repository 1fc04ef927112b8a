"""Many virtual clients: a client's data costs what its own share costs, and a client keeps nothing between rounds."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fairedge.client.client_app as client_app
import fairedge.common.data.partition as partition
from fairedge.common.adapter_record import adapter_to_record
from fairedge.common.config import DataConfig, RunConfig, build_config
from fairedge.common.data import LabeledData, TaskData
from fairedge.common.data.lm_task import load_lm_task
from fairedge.common.data.partition import client_indices, partition_clients
from fairedge.common.task import client_partition, config_json, get_adapter, lora_model, server_test_split


def _data(domains: int = 6, per_domain: int = 1200, classes: int = 10) -> LabeledData:
    n = domains * per_domain
    gen = torch.Generator().manual_seed(0)
    return LabeledData(
        x=torch.zeros(n, 1, 2, 2),
        y=torch.randint(0, classes, (n,), generator=gen),
        domain=torch.arange(n) % domains,
    )


@pytest.mark.parametrize(("mode", "counts"), [("feature", (1, 6, 13, 40)), ("feature-label", (13,))])
def test_one_clients_indices_are_its_share_of_the_full_partition(mode, counts):
    data = _data(per_domain=200)
    for n in counts:
        full = partition_clients(data, n, mode=mode, seed=3)
        for k in range(n):
            assert np.array_equal(client_indices(data, n, k, mode=mode, seed=3), full[k]), (mode, n, k)


def test_client_k_of_1000_is_cut_from_its_own_domain_only(monkeypatch):
    """Client 777 of 1000: one domain is split (not all six), and no other client's share is built."""
    data = _data()
    task = TaskData(data, data, [str(i) for i in range(10)], list("abcdef"), source_domain="a", kind="image")
    cfg = build_config({}, ["federation.num_clients=300"])
    expected = partition_clients(data, 1000, seed=cfg.seed)[777]
    calls: list[int] = []
    real = partition._domain_parts

    def counting(data, present, d_pos, members, *args):
        calls.append(int(present[d_pos]))
        return real(data, present, d_pos, members, *args)

    def refuse(*args, **kwargs):
        raise AssertionError("partition_clients builds every client's share")

    monkeypatch.setattr(partition, "_domain_parts", counting)
    monkeypatch.setattr(partition, "partition_clients", refuse)
    part = client_partition(cfg, 777, 1000, task=task)
    assert calls == [777 % 6]
    assert torch.equal(part.domain, torch.full((len(expected),), 777 % 6))
    assert torch.equal(part.y, data.y[torch.from_numpy(expected)])


@pytest.fixture
def _task_identity(monkeypatch):
    """Messages need a run id outside a running Flower app."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


@pytest.mark.usefixtures("_task_identity")
def test_a_client_holds_no_model_or_optimizer_after_a_message(tmp_path, monkeypatch):
    """The model a train message builds (and the optimizer state on its parameters) is gone when the
    reply is: between rounds a virtual client costs its Flower context only, and that stays empty."""
    cfg = build_config(
        {},
        [
            f"model.cache_dir='{tmp_path}'",
            "model.pretrain_epochs=1",
            "model.hidden_size=16",
            "model.num_layers=1",
            "model.num_heads=2",
            "model.intermediate_size=16",
            "data.samples_per_domain=40",
            "lora.rank=2",
            "federation.num_clients=3",
            "federation.local_steps=3",
            "federation.batch_size=8",
            "federation.device='cpu'",
        ],
    )
    built: list[weakref.ref] = []

    def tracked_model(*args, **kwargs):
        model = lora_model(*args, **kwargs)
        built.append(weakref.ref(model))
        built.extend(weakref.ref(p) for p in model.parameters() if p.requires_grad)
        return model

    monkeypatch.setattr(client_app, "lora_model", tracked_model)
    config = ConfigRecord({client_app.CONFIG_KEY: config_json(cfg), "server-round": 1})
    arrays = adapter_to_record(get_adapter(lora_model(cfg)))
    msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=MessageType.TRAIN)
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 2, "num-partitions": 3}, state=RecordDict(), run_config={}
    )
    reply = client_app.run_train(msg, context)
    assert "arrays" in reply.content and len(built) > 1  # it trained a model of its own
    gc.collect()
    assert [r for r in built if r() is not None] == []
    assert len(context.state) == 0  # FedIT without compression keeps no per-node state


class _CharTokenizer:
    """What `load_lm_task` needs of a tokenizer (an id per character, EOS and padding 0); counts the texts it gets."""

    eos_token_id = pad_token_id = 0

    def __init__(self) -> None:
        self.texts = 0

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        self.texts += len(texts)
        return {"input_ids": [[1 + ord(c) % 255 for c in t] for t in texts]}


def test_an_lm_client_tokenizes_its_own_role_only(tmp_path):
    """Shakespeare client 17 of 30 tokenizes 2 texts (its train and held-out lines), not 60, and gets the
    same rows as from the whole task; its partition is the same either way. The server can score a
    fixed few clients instead of all."""
    d = DataConfig(task="shakespeare", min_lines=200, seq_len=32, max_eval_tokens=64)
    whole_tok, one_tok = _CharTokenizer(), _CharTokenizer()
    whole = load_lm_task(d, whole_tok, num_clients=30, seed=0, cache_dir=tmp_path)  # type: ignore[arg-type]
    one = load_lm_task(d, one_tok, num_clients=30, seed=0, cache_dir=tmp_path, only=17)  # type: ignore[arg-type]
    assert (one_tok.texts, whole_tok.texts) == (2, 60)
    assert one.domains == whole.domains
    for split in ("train", "test"):
        mine, full = getattr(one, split), getattr(whole, split)
        assert torch.equal(mine.domain.unique(), torch.tensor([17]))
        assert torch.equal(mine.input_ids, full.input_ids[full.domain == 17])
    cfg = RunConfig.model_validate(
        {
            "data": d.model_dump(),
            "model": {"kind": "hf-causal-lm", "path": str(tmp_path)},
            "federation": {"num_clients": 30},
        }
    )
    assert torch.equal(client_partition(cfg, 17, task=one).input_ids, client_partition(cfg, 17, task=whole).input_ids)
    with pytest.raises(ValueError, match="outside"):
        load_lm_task(d, one_tok, num_clients=30, seed=0, cache_dir=tmp_path, only=30)  # type: ignore[arg-type]

    # the server scores federation.eval_clients of them, the same ones every round; all of them by default
    assert server_test_split(cfg, whole) is whole.test
    some = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"eval_clients": 5})})
    picked = server_test_split(some, whole).domain.unique()
    assert len(picked) == 5 and torch.equal(server_test_split(some, whole).domain.unique(), picked)
    digits = build_config({}, ["federation.eval_clients=5"])
    with pytest.raises(ValueError, match="eval_clients=5 applies to causal-LM tasks only"):
        server_test_split(digits, TaskData(_data(), _data(), ["0"], list("abcdef"), source_domain="a", kind="image"))
