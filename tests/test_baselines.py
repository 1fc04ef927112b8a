"""The federated-LoRA baselines: each one's defining property, the base-delta and
client-config plumbing, and one trip per method through the strategy and the client."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fairedge.client.client_app import PERSONAL_B_KEY, _load_message, run_evaluate, run_train
from fairedge.client.update_compression import compress_update
from fairedge.common.adapter_record import (
    adapter_from_record,
    adapter_to_record,
    record_tensors,
    reply_tensors,
    shapes,
    tensors_to_record,
)
from fairedge.common.aggregation import (
    PERSONAL_B,
    TRAIN_FACTORS,
    Adapter,
    ClientUpdate,
    FedExLoRA,
    FedSALoRA,
    FFALoRA,
    FLoRA,
    RoLoRA,
    client_weights,
    extend_base_delta,
    make_aggregator,
    reply_factors,
)
from fairedge.common.compression import decompress
from fairedge.common.config import CompressionConfig, build_config
from fairedge.common.lora import get_base_weights, get_lora_factors, set_trainable_factors
from fairedge.common.task import client_partition, config_json, get_adapter, load_task, lora_model, set_adapter
from fairedge.common.training import evaluate, train_local
from fairedge.server.federation import configured_aggregator
from fairedge.server.strategy import LoraStrategy
from tests.tiny_vit import TINY_VIT

S = 2.0  # LoRA scale alpha / r
M, N, R, K = 6, 5, 2, 3  # K·r = 6 > min(m, n) = 5: FLoRA's first stack is already re-factored


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages need a run id outside a running Flower app."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def _initial(seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(
        {
            "l0": (torch.randn(R, N, generator=g), torch.zeros(M, R)),
            "l1": (torch.randn(R, N, generator=g), torch.zeros(M, R)),
        },
        {"head.w": torch.randn(3, M, generator=g)},
    )


def _trained(start: Adapter, trains: str, seed: int) -> list[ClientUpdate]:
    """K clients that changed the factors in `trains` (the others stay exactly as started) and the head."""
    g = torch.Generator().manual_seed(seed)
    ups = []
    for k in range(K):
        factors = {
            layer: (
                a + torch.randn(a.shape, generator=g) if "A" in trains else a.clone(),
                b + torch.randn(b.shape, generator=g) if "B" in trains else b.clone(),
            )
            for layer, (a, b) in start.factors.items()
        }
        head = {n: t + torch.randn(t.shape, generator=g) for n, t in start.head.items()}
        ups.append(ClientUpdate(Adapter(factors, head), num_examples=10 * (k + 1), node_id=k + 1))
    return ups


def _ideal(updates: list[ClientUpdate], layer: str) -> torch.Tensor:
    """`ΔW = Σ p_k B_k A_k` (dense: fine at these sizes)."""
    p = client_weights(updates)
    return sum(
        float(pk) * (u.adapter.factors[layer][1] @ u.adapter.factors[layer][0]).double() for pk, u in zip(p, updates)
    )


def _base(adapter: Adapter, layer: str) -> torch.Tensor:
    if layer not in adapter.base_delta:
        return torch.zeros(M, N, dtype=torch.float64)
    q, p = adapter.base_delta[layer]
    return (p @ q).double()


def _effective(adapter: Adapter, layer: str) -> torch.Tensor:
    """`base_delta + s·B A`: the adapter's change of the layer's weight."""
    a, b = adapter.factors[layer]
    return _base(adapter, layer) + S * (b @ a).double()


def _close(x: torch.Tensor, y: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(x.double(), y.double(), atol=atol, rtol=0)


# --- base delta -------------------------------------------------------------------------------


def test_extend_base_delta_stacks_then_refactors_exactly_past_min_mn():
    g = torch.Generator().manual_seed(3)
    m, n = 12, 7
    first = extend_base_delta(None, torch.randn(4, n, generator=g), torch.randn(m, 4, generator=g), torch.float64)
    assert first[0].shape == (4, n) and first[1].shape == (m, 4)  # narrow enough: kept as stacked
    Q2, P2 = torch.randn(5, n, generator=g, dtype=torch.float64), torch.randn(m, 5, generator=g, dtype=torch.float64)
    Q, P = extend_base_delta(first, Q2, P2, torch.float64)
    assert Q.shape == (min(m, n), n) and P.shape == (m, min(m, n))  # 9 > 7: re-factored to rank 7
    _close(P @ Q, first[1] @ first[0] + P2 @ Q2, atol=1e-10)


# --- each method's defining property ------------------------------------------------------------


def test_flora_stacks_the_exact_product_into_the_base_and_restarts_lora():
    start = _initial()
    agg = FLoRA(lora_scale=S)
    ups1 = _trained(start, "AB", seed=1)
    new, metrics = agg.aggregate(ups1, start)
    for layer, (a0, _) in start.factors.items():
        _close(_base(new, layer), S * _ideal(ups1, layer))  # merged base = W0 + s·ΔW
        assert torch.equal(new.factors[layer][0], a0) and not new.factors[layer][1].any()  # LoRA is a no-op again
        assert new.base_delta[layer][0].shape[0] <= min(M, N)
    assert metrics["base_delta_rank"] == min(M, N)
    ups2 = _trained(new, "AB", seed=2)
    newer, _ = agg.aggregate(ups2, new)
    for layer in start.factors:
        _close(_base(newer, layer), S * (_ideal(ups1, layer) + _ideal(ups2, layer)))
    torch.testing.assert_close(
        new.head["head.w"], sum(float(p) * u.adapter.head["head.w"] for p, u in zip(client_weights(ups1), ups1))
    )


def test_flora_stack_product_is_the_sum_of_client_products():
    """Without re-factoring (K·r ≤ min(m, n)) the stack itself is `[s·B_1 … s·B_K] [p_1A_1; …]`."""
    start = Adapter({"l": (torch.randn(1, 8), torch.zeros(9, 1))})
    ups = _trained(start, "AB", seed=4)
    new, _ = FLoRA(lora_scale=S).aggregate(ups, start)
    q, p = new.base_delta["l"]
    assert q.shape == (K, 8) and p.shape == (9, K)
    _close(p @ q, S * _ideal(ups, "l"))


def test_fedex_folds_the_exact_residual_into_the_base():
    start = _initial()
    agg = FedExLoRA(lora_scale=S)
    ups1 = _trained(start, "AB", seed=1)
    new, _ = agg.aggregate(ups1, start)
    p = client_weights(ups1)
    for layer in start.factors:
        a_bar = sum(float(pk) * u.adapter.factors[layer][0] for pk, u in zip(p, ups1))
        b_bar = sum(float(pk) * u.adapter.factors[layer][1] for pk, u in zip(p, ups1))
        _close(new.factors[layer][0], a_bar)  # the factors are FedIT's
        _close(new.factors[layer][1], b_bar)
        _close(_effective(new, layer), S * _ideal(ups1, layer))  # W0 + base + s·B̄Ā = W0 + s·ΔW
    ups2 = _trained(new, "AB", seed=2)  # round 2 starts from (Ā, B̄) on the changed base
    newer, _ = agg.aggregate(ups2, new)
    for layer in start.factors:
        _close(_effective(newer, layer), _base(new, layer) + S * _ideal(ups2, layer))


def test_ffa_keeps_the_seeded_a_and_averages_b_exactly():
    start = _initial()
    agg = FFALoRA()
    assert agg.client_config(1) == {TRAIN_FACTORS: "B"} and reply_factors(agg.client_config(7)) == "B"
    ups = _trained(start, "B", seed=1)
    new, _ = agg.aggregate(ups, start)
    for layer, (a0, _) in start.factors.items():
        assert torch.equal(new.factors[layer][0], a0)
        _close(S * (new.factors[layer][1] @ new.factors[layer][0]), S * _ideal(ups, layer))


def test_rolora_alternates_and_each_average_is_exact():
    start = _initial()
    agg = RoLoRA()
    assert agg.client_config(1) == {TRAIN_FACTORS: "B"}  # B first: at B = 0 A's gradient vanishes
    ups1 = _trained(start, "B", seed=1)
    new, _ = agg.aggregate(ups1, start)
    for layer, (a0, _) in start.factors.items():
        assert torch.equal(new.factors[layer][0], a0)
        _close(new.factors[layer][1] @ new.factors[layer][0], _ideal(ups1, layer))
    assert agg.client_config(2) == {TRAIN_FACTORS: "A"}
    ups2 = _trained(new, "A", seed=2)
    newer, _ = agg.aggregate(ups2, new)
    for layer, (_, b1) in new.factors.items():
        assert torch.equal(newer.factors[layer][1], b1)
        _close(newer.factors[layer][1] @ newer.factors[layer][0], _ideal(ups2, layer))


def test_fedsa_averages_a_and_leaves_b_to_the_clients():
    start = _initial()
    agg = FedSALoRA()
    assert agg.personalized and agg.client_config(1) == {TRAIN_FACTORS: "AB", PERSONAL_B: True}
    assert reply_factors(agg.client_config(1)) == "A"
    ups = _trained(start, "AB", seed=1)
    new, _ = agg.aggregate(ups, start)
    p = client_weights(ups)
    for layer, (_, b0) in start.factors.items():
        _close(new.factors[layer][0], sum(float(pk) * u.adapter.factors[layer][0] for pk, u in zip(p, ups)))
        assert torch.equal(new.factors[layer][1], b0)


def test_registry_and_config_pass_the_lora_scale():
    cfg = build_config({}, ["aggregation.method='flora'", "lora.rank=4", "lora.alpha=12"])
    agg = configured_aggregator(cfg)
    assert isinstance(agg, FLoRA) and agg.lora_scale == 3.0
    assert isinstance(make_aggregator("fedex_lora", lora_scale=1.0), FedExLoRA)
    for name in ("ffa_lora", "fedsa_lora", "rolora"):
        assert make_aggregator(name).name == name
    # one factory: a run config's options for other rules are passed over, a typo is not
    fair = configured_aggregator(build_config({}, ["aggregation.method='lora_fair'", "aggregation.lam=0.3"]))
    assert fair.name == "lora_fair" and fair.lam == 0.3
    assert make_aggregator("ffa_lora", lam=0.3, lora_scale=2.0).name == "ffa_lora"
    with pytest.raises(ValueError, match=r"no aggregation method takes the option\(s\) \['lamda'\]"):
        make_aggregator("lora_fair", lamda=0.3)
    with pytest.raises(TypeError, match="lora_scale"):
        make_aggregator("flora")  # a value the rule needs


# --- through the strategy ------------------------------------------------------------------------


class _Grid:
    """The one Grid call FedAvg's sampling makes."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _reply(request: Message, tensors: dict[str, torch.Tensor], n: int) -> Message:
    return Message(
        RecordDict(
            {"arrays": tensors_to_record(tensors), "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5})}
        ),
        reply_to=request,
    )


def _run_round(s: LoraStrategy, arrays: ArrayRecord, server_round: int, seed: int, compressed: bool = False):
    """Configure a round on the global adapter `arrays`, let the sampled nodes train what they were told
    and reply; aggregate."""
    messages = list(s.configure_train(server_round, arrays, ConfigRecord({"fairedge-config": "{}"}), _Grid()))
    config = messages[0].content["config"]
    start = adapter_from_record(messages[0].content["arrays"])  # what every client received
    assert start.base_delta.keys() == adapter_from_record(arrays).base_delta.keys()
    trains = str(config.get(TRAIN_FACTORS, "AB"))
    ups = _trained(start, trains, seed)
    send = reply_factors(config)
    replies = []
    for msg, u in zip(messages, ups):
        tensors = reply_tensors(u.adapter, send)
        if compressed:  # lossless ComPEFT (density 1): the change since what the client started from
            payload = compress_update(
                tensors,
                reply_tensors(start, send),
                CompressionConfig(enabled=True, density=1.0),
                RecordDict(),
                server_round=server_round,
                num_examples=u.num_examples,
            )
            replies.append(
                Message(
                    RecordDict(
                        {
                            "compressed": ConfigRecord({"payload": payload}),
                            "metrics": MetricRecord({"num-examples": u.num_examples, "train-loss": 0.5}),
                        }
                    ),
                    reply_to=msg,
                )
            )
        else:
            replies.append(_reply(msg, tensors, u.num_examples))
    arrays, _ = s.aggregate_train(server_round, replies)
    assert arrays is not None and not s.rounds[-1].rejected
    return start, ups, arrays, config


@pytest.mark.parametrize("method", ["ffa_lora", "rolora", "flora", "fedex_lora"])
@pytest.mark.parametrize("compressed", [False, True])
def test_exact_methods_through_the_strategy_reach_the_average_of_client_weights(method, compressed):
    s = LoraStrategy(
        make_aggregator(method, **({"lora_scale": S} if method in ("flora", "fedex_lora") else {})),
        min_train_nodes=2,
    )
    arrays = adapter_to_record(_initial())
    for rnd in (1, 2):
        start, ups, arrays, config = _run_round(s, arrays, rnd, seed=10 * rnd, compressed=compressed)
        p = client_weights(ups)
        for layer in start.factors:
            want = _base(start, layer) + S * sum(
                float(pk) * (u.adapter.factors[layer][1] @ u.adapter.factors[layer][0]).double()
                for pk, u in zip(p, ups)
            )
            _close(_effective(adapter_from_record(arrays), layer), want, atol=1e-4)
        names = set(record_tensors(arrays))
        assert any(k.startswith("base/") for k in names) == (method in ("flora", "fedex_lora"))
        entry = s.rounds[-1]
        sent_values = sum(t.numel() for t in reply_tensors(start, reply_factors(config)).values())
        assert entry.fp32_bytes_up == 3 * 4 * sent_values  # only what was sent counts
        if not compressed:
            assert 3 * 4 * sent_values <= entry.bytes_up <= 3 * (4 * sent_values + 200 * 10)
    if method == "rolora":
        assert [r.client_config[TRAIN_FACTORS] for r in s.rounds] == ["B", "A"]


def test_fedsa_through_the_strategy_takes_a_only_and_gathers_personal_accuracy():
    s = LoraStrategy(FedSALoRA(), min_train_nodes=2)
    start, ups, arrays, config = _run_round(s, adapter_to_record(_initial()), 1, seed=5)
    assert config[PERSONAL_B] is True
    p = client_weights(ups)
    new = adapter_from_record(arrays)
    for layer, (_, b0) in start.factors.items():
        _close(new.factors[layer][0], sum(float(pk) * u.adapter.factors[layer][0] for pk, u in zip(p, ups)))
        assert torch.equal(new.factors[layer][1], b0)
    assert s.rounds[-1].fp32_bytes_up == 3 * 4 * (2 * R * N + 3 * M)  # A and the head; B stays home
    # a reply that sends its B along is malformed for this method
    messages = list(s.configure_train(2, arrays, ConfigRecord(), _Grid()))
    full = [_reply(m, reply_tensors(u.adapter), 10) for m, u in zip(messages, ups)]
    s.aggregate_train(2, full)
    assert all("unexpected ['lora/l0/B'" in why for why in s.rounds[-1].rejected.values())
    # personalised evaluation: every node, with the round's instructions
    evals = list(s.configure_evaluate(2, arrays, ConfigRecord(), _Grid()))
    assert len(evals) == 3 and all(m.content["config"][PERSONAL_B] for m in evals)
    handed, got = record_tensors(arrays), record_tensors(evals[0].content["arrays"])
    assert handed.keys() == got.keys() and all(torch.equal(handed[k], got[k]) for k in handed)
    replies = [
        Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 5, "accuracy": acc, "partition-id": pid})}), reply_to=m
        )
        for m, acc, pid in zip(evals, (0.5, 0.7, 0.9), (0, 1, 2))
    ]
    metrics = s.aggregate_evaluate(2, replies)
    assert s.rounds[-1].personal_accuracy == {0: 0.5, 1: 0.7, 2: 0.9}
    assert metrics["personal-mean-accuracy"] == pytest.approx(0.7)


def test_non_personalised_methods_skip_federated_evaluation():
    s = LoraStrategy(FFALoRA(), min_train_nodes=2)
    assert list(s.configure_evaluate(1, adapter_to_record(_initial()), ConfigRecord(), _Grid())) == []


# --- on a real PEFT model and the real client -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return build_config(
        {},
        [
            f"model.cache_dir='{root}'",
            *TINY_VIT,
            "federation.num_clients=2",
            "federation.local_steps=3",
            "federation.batch_size=8",
            "federation.device='cpu'",
        ],
    )


@pytest.mark.parametrize("trains", ["A", "B"])
def test_set_trainable_factors_freezes_the_other_factor(tiny_cfg, trains):
    model = lora_model(tiny_cfg)
    g = torch.Generator().manual_seed(0)
    set_adapter(
        model,
        Adapter(
            {
                k: (a, 0.1 * torch.randn(b.shape, generator=g))  # B ≠ 0, so A has a gradient
                for k, (a, b) in get_lora_factors(model).items()
            },
            {},
        ),
    )
    before = get_lora_factors(model)
    set_trainable_factors(model, trains)
    train_local(model, client_partition(tiny_cfg, 0), steps=3, batch_size=8)
    after = get_lora_factors(model)
    for layer, (a, b) in before.items():
        assert torch.equal(after[layer][0], a) == (trains == "B")
        assert torch.equal(after[layer][1], b) == (trains == "A")


def _train_msg(adapter: Adapter, cfg, config: dict, server_round: int = 1) -> Message:
    record = ConfigRecord({"fairedge-config": config_json(cfg), "server-round": server_round, **config})
    return Message(
        RecordDict({"arrays": adapter_to_record(adapter), "config": record}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )


def _context() -> Context:
    return Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={}
    )


def test_client_applies_the_base_delta_and_sends_only_what_it_trains(tiny_cfg):
    model = lora_model(tiny_cfg)
    w0 = get_base_weights(model)
    g = torch.Generator().manual_seed(1)
    layer = next(iter(w0))
    m, n = w0[layer].shape
    delta = (torch.randn(3, n, generator=g), torch.randn(m, 3, generator=g))
    glob = Adapter(get_adapter(model).factors, get_adapter(model).head, {layer: delta})
    msg = _train_msg(glob, tiny_cfg, {TRAIN_FACTORS: "B"})
    reply = run_train(msg, _context())
    names = set(reply.content["arrays"].keys())
    assert names == {f"lora/{k}/B" for k in w0} | {f"head/{h}" for h in glob.head}
    base_now = get_base_weights(_load_message(msg, _context()).model)  # the model the client trains
    _close(base_now[layer], w0[layer] + delta[1] @ delta[0])
    assert all(torch.equal(base_now[k], w0[k]) for k in w0 if k != layer)


def test_client_keeps_its_own_b_and_evaluates_with_it(tiny_cfg):
    model = lora_model(tiny_cfg)
    glob = get_adapter(model)
    ctx = _context()
    personal = {TRAIN_FACTORS: "AB", PERSONAL_B: True}
    reply = run_train(_train_msg(glob, tiny_cfg, personal), ctx)
    assert all(not k.endswith("/B") for k in reply.content["arrays"])  # B never leaves
    own1 = {k: torch.from_numpy(v.numpy().copy()) for k, v in ctx.state[PERSONAL_B_KEY].items()}
    assert all(b.abs().max() > 1e-3 for b in own1.values())
    # round 2: the global B (here all ones) is ignored; training continues from the client's own B
    ones = Adapter({k: (a, torch.ones_like(b)) for k, (a, b) in glob.factors.items()}, glob.head)
    run_train(_train_msg(ones, tiny_cfg, personal, server_round=2), ctx)
    own2 = {k: torch.from_numpy(v.numpy().copy()) for k, v in ctx.state[PERSONAL_B_KEY].items()}
    assert all((own2[k] - own1[k]).abs().max() < 0.05 for k in own1)
    # evaluation: global A and head, own B, on the client's own domains
    ev = Message(
        RecordDict(
            {"arrays": adapter_to_record(ones), "config": _train_msg(ones, tiny_cfg, personal).content["config"]}
        ),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    metrics = run_evaluate(ev, ctx).content["metrics"]
    set_adapter(model, Adapter({k: (a, own2[k]) for k, (a, _) in glob.factors.items()}, glob.head))
    task = load_task(tiny_cfg)
    own_domains = client_partition(tiny_cfg, 0, 2).domain.unique()
    test = task.test.subset(torch.nonzero(torch.isin(task.test.domain, own_domains)).flatten())
    assert metrics["own-b"] == 1 and metrics["num-examples"] == len(test) < len(task.test)
    assert metrics["accuracy"] == pytest.approx(evaluate(model, test)[0])


def test_client_compresses_only_what_it_sends(tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"compression": CompressionConfig(enabled=True, density=0.5)})
    glob = get_adapter(lora_model(cfg))
    reply = run_train(_train_msg(glob, cfg, {TRAIN_FACTORS: "AB", PERSONAL_B: True}), _context())
    payload = reply.content["compressed"]["payload"]
    delta = decompress(payload, expected=shapes(glob, "A"))  # the layout is A and the head, in order
    assert any(t.abs().sum() > 0 for t in delta.values())
