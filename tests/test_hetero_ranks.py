"""Heterogeneous LoRA ranks: rank assignment, slices and padding, mixed-rank aggregation against dense references,
and short mixed-rank federations in which every client is sent the global adapter cut to its own rank."""

import json

import pytest
import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from fairedge.client.client_app import run_train
from fairedge.common.adapter_record import record_bytes
from fairedge.common.aggregation import AGGREGATORS, Adapter, ClientUpdate, make_aggregator
from fairedge.common.aggregation.ranks import pad, pad_updates, truncate, truncate_adapter
from fairedge.common.config import MIXED_RANK_METHODS, ConfigError, build_config
from fairedge.common.lora_ranks import assigned_rank, at_rank, node_rank
from fairedge.server.federation import run_federation
from fairedge.simulations.simulate import InProcessGrid, flower_environment

M, N, R_MAX = 7, 5, 4
RANKS = (1, 2, 4)


def _clients(seed: int = 0, ranks=RANKS, dtype=torch.float64) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, r in enumerate(ranks):
        factors = {
            "l0": (torch.randn(r, N, generator=g, dtype=dtype), torch.randn(M, r, generator=g, dtype=dtype)),
            "l1": (torch.randn(r, 3, generator=g, dtype=dtype), torch.randn(6, r, generator=g, dtype=dtype)),
        }
        out.append(ClientUpdate(Adapter(factors, {"h": torch.full((2,), float(k), dtype=dtype)}), 10 * (k + 1), k))
    return out


def _current(dtype=torch.float64) -> Adapter:
    g = torch.Generator().manual_seed(99)
    factors = {
        "l0": (torch.randn(R_MAX, N, generator=g, dtype=dtype), torch.zeros(M, R_MAX, dtype=dtype)),
        "l1": (torch.randn(R_MAX, 3, generator=g, dtype=dtype), torch.zeros(6, R_MAX, dtype=dtype)),
    }
    return Adapter(factors, {"h": torch.zeros(2, dtype=dtype)})


def _weights(updates) -> torch.Tensor:
    n = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    return n / n.sum()


def _dense_delta(updates, layer: str) -> torch.Tensor:
    """`ΔW = Σ p_k B_k A_k` from each client's own-rank factors, by hand."""
    p = _weights(updates)
    return sum(w * (u.adapter.factors[layer][1] @ u.adapter.factors[layer][0]) for w, u in zip(p, updates))


# --- assignment --------------------------------------------------------------------------------------------


def _cfg(*overrides):
    return build_config({}, ["lora.rank=4", "lora.client_ranks=[1, 2, 4]", *overrides])


def test_cyclic_and_seeded_random_assignment():
    cfg = _cfg()
    assert [assigned_rank(cfg.lora, 0, i) for i in range(5)] == [1, 2, 4, 1, 2]
    rnd = _cfg("lora.rank_assignment='random'")
    draw = [assigned_rank(rnd.lora, 7, i) for i in range(30)]
    assert draw == [assigned_rank(rnd.lora, 7, i) for i in range(30)]  # seeded: the same every time
    assert set(draw) == {1, 2, 4} and draw != [assigned_rank(rnd.lora, 8, i) for i in range(30)]
    assert assigned_rank(build_config({}, ["lora.rank=8"]).lora, 0, 3) == 8  # no client_ranks: everyone r_max


def test_node_config_rank_wins_and_bad_ones_are_named():
    cfg = _cfg()
    assert node_rank(cfg, {"lora-rank": 2}, partition_id=0) == 2
    assert node_rank(cfg, {}, partition_id=2) == 4
    with pytest.raises(ValueError, match=r"lora-rank=8 is outside 1..lora.rank=4"):
        node_rank(cfg, {"lora-rank": 8}, 0)
    with pytest.raises(ValueError, match=r"lora-rank='four' is not an integer"):
        node_rank(cfg, {"lora-rank": "four"}, 0)
    with pytest.raises(ValueError, match=r"but the run has no lora.client_ranks"):
        node_rank(build_config({}, ["lora.rank=4"]), {"lora-rank": 2}, 0)


def test_a_client_keeps_the_global_scale():
    cfg = _cfg("lora.alpha=16")
    low = at_rank(cfg, 1)
    assert low.lora.rank == 1 and low.lora.alpha / low.lora.rank == cfg.lora.alpha / cfg.lora.rank == 4.0
    assert at_rank(cfg, 4) is cfg


def test_config_refuses_ranks_above_r_max_and_rules_without_mixed_ranks():
    with pytest.raises(ConfigError, match=r"lora.client_ranks=\[4, 16\]: \[16\] outside 1..lora.rank=8"):
        build_config({}, ["lora.rank=8", "lora.client_ranks=[4, 16]"])
    for method in ("fedex_lora", "fedsa_lora", "rolora", "ffa_lora"):
        with pytest.raises(ConfigError, match=rf"needs an aggregation.method that aggregates mixed ranks.*'{method}'"):
            _cfg(f"aggregation.method='{method}'")
    assert {n for n, cls in AGGREGATORS.items() if cls.mixed_ranks} == set(MIXED_RANK_METHODS)


# --- slices and padding -------------------------------------------------------------------------------------


def test_pad_then_truncate_round_trips_and_padding_keeps_the_product():
    a, b = torch.randn(2, N, dtype=torch.float64), torch.randn(M, 2, dtype=torch.float64)
    pa, pb = pad((a, b), 6)
    assert pa.shape == (6, N) and pb.shape == (M, 6) and not pa[2:].any() and not pb[:, 2:].any()
    assert torch.equal(pb @ pa, b @ a)
    ta, tb = truncate((pa, pb), 2)
    assert torch.equal(ta, a) and torch.equal(tb, b)
    cut = truncate_adapter(_current(), 2)
    assert cut.factors["l0"][0].shape == (2, N) and cut.factors["l1"][1].shape == (6, 2) and cut.head is not None
    assert (
        truncate_adapter(_current(), None) is not None
        and truncate_adapter(_current(), 4).factors["l0"][0].shape[0] == 4
    )
    with pytest.raises(ValueError, match="cannot cut rank-2 factors to rank 3"):
        truncate((a, b), 3)
    with pytest.raises(ValueError, match="cannot pad rank-2 factors to the smaller rank 1"):
        pad((a, b), 1)


# --- mixed-rank aggregation against plain references --------------------------------------------------------


def test_fedit_averages_zero_padded_factors():
    updates, current = _clients(), _current()
    new, _ = make_aggregator("fedit").aggregate(updates, current)
    p = _weights(updates)
    for layer in current.factors:
        padded = [pad(u.adapter.factors[layer], R_MAX) for u in updates]
        assert torch.allclose(new.factors[layer][0], sum(w * a for w, (a, _) in zip(p, padded)), atol=1e-12)
        assert torch.allclose(new.factors[layer][1], sum(w * b for w, (_, b) in zip(p, padded)), atol=1e-12)
    assert torch.allclose(new.head["h"], sum(w * k for w, k in zip(p, range(3))) * torch.ones(2, dtype=torch.float64))


def test_global_padding_fills_with_the_sent_factors_so_unchanged_rows_do_not_shrink():
    current = _current()
    current = Adapter({k: (a, a.new_ones(b.shape)) for k, (a, b) in current.factors.items()}, current.head)
    updates = _clients()
    new, _ = make_aggregator("fedit", rank_padding="global").aggregate(updates, current)
    p = _weights(updates)
    for layer, (ga, gb) in current.factors.items():
        for row in range(R_MAX):  # by hand: a client lacking a row contributes the row it was sent
            holds = [
                (w, u.adapter.factors[layer]) for w, u in zip(p, updates) if u.adapter.factors[layer][0].shape[0] > row
            ]
            lacks = sum(w for w, u in zip(p, updates) if u.adapter.factors[layer][0].shape[0] <= row)
            want_a = sum(w * a[row] for w, (a, _) in holds) + lacks * ga[row]
            want_b = sum(w * b[:, row] for w, (_, b) in holds) + lacks * gb[:, row]
            assert torch.allclose(new.factors[layer][0][row], want_a, atol=1e-12)
            assert torch.allclose(new.factors[layer][1][:, row], want_b, atol=1e-12)
    # clients that sent back exactly what they were given leave the global adapter as it was; zero-padding shrinks it
    same = [ClientUpdate(truncate_adapter(current, r), 10, k) for k, r in enumerate(RANKS)]
    kept, _ = make_aggregator("fedit", rank_padding="global").aggregate(same, current)
    shrunk, _ = make_aggregator("fedit").aggregate(same, current)
    for layer, (ga, gb) in current.factors.items():
        assert torch.allclose(kept.factors[layer][0], ga) and torch.allclose(kept.factors[layer][1], gb)
        assert shrunk.factors[layer][0][R_MAX - 1].norm() < ga[R_MAX - 1].norm() / 2
    lf, _ = make_aggregator("lora_fair", objective="frobenius", rank_padding="global").aggregate(same, current)
    for layer, (ga, gb) in current.factors.items():
        assert torch.allclose(lf.factors[layer][0], ga) and torch.allclose(lf.factors[layer][1], gb, atol=1e-9)
    with pytest.raises(ValueError, match="rank padding 'ones'; allowed: zeros, global"):
        pad_updates(updates, current, "ones")  # type: ignore[arg-type]
    assert build_config({}, ["aggregation.rank_padding=global"]).aggregation.rank_padding == "global"
    with pytest.raises(ConfigError, match="rank_padding"):
        build_config({}, ["aggregation.rank_padding=ones"])


def test_flora_merges_the_exact_mixed_rank_update():
    updates, current = _clients(), _current()
    new, _ = make_aggregator("flora", lora_scale=2.0).aggregate(updates, current)
    for layer in current.factors:
        q, pf = new.base_delta[layer]
        assert q.shape[0] == min(sum(RANKS), pf.shape[0], q.shape[1])  # own ranks stacked (capped at min(m, n))
        assert torch.allclose(pf @ q, 2.0 * _dense_delta(updates, layer), atol=1e-10)
        assert not new.factors[layer][1].any() and new.factors[layer][0].shape[0] == R_MAX


def test_flexlora_gives_every_rank_its_best_approximation():
    updates, current = _clients(), _current()
    new, _ = make_aggregator("flexlora").aggregate(updates, current)
    for layer in current.factors:
        U, S, Vh = torch.linalg.svd(_dense_delta(updates, layer), full_matrices=False)
        for r in (1, 2, R_MAX):  # the slice a rank-r client gets is ΔW's best rank-r approximation
            a, b = truncate(new.factors[layer], r)
            assert torch.allclose(b @ a, (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-10)


@pytest.mark.parametrize("delta_form", ["factored", "dense"])
def test_lora_fair_frobenius_matches_the_closed_form_on_dense_delta(delta_form):
    updates, current = _clients(), _current()
    lam = 0.1
    new, _ = make_aggregator("lora_fair", lam=lam, objective="frobenius", delta_form=delta_form).aggregate(
        updates, current
    )
    p = _weights(updates)
    for layer in current.factors:
        padded = [pad(u.adapter.factors[layer], R_MAX) for u in updates]
        a_bar = sum(w * a for w, (a, _) in zip(p, padded))
        b_bar = sum(w * b for w, (_, b) in zip(p, padded))
        dw = _dense_delta(updates, layer)
        want = (dw @ a_bar.T + lam * b_bar) @ torch.linalg.inv(a_bar @ a_bar.T + lam * torch.eye(R_MAX, dtype=dw.dtype))
        assert torch.allclose(new.factors[layer][0], a_bar, atol=1e-12)
        assert torch.allclose(new.factors[layer][1], want, atol=1e-9)


def test_lora_fair_cosine_with_mixed_ranks_is_the_padded_problem_and_beats_fedit():
    updates, current = _clients(seed=3), _current()
    rule = make_aggregator("lora_fair")
    new, metrics = rule.aggregate(updates, current)
    padded, _ = rule.aggregate(pad_updates(updates, current), current)
    for layer in current.factors:
        assert torch.equal(new.factors[layer][1], padded.factors[layer][1])
    assert metrics["lora_fair/cos_fair"] >= metrics["lora_fair/cos_fedit"]
    dense, _ = make_aggregator("lora_fair", delta_form="dense").aggregate(updates, current)
    for layer in current.factors:
        assert torch.allclose(dense.factors[layer][1], new.factors[layer][1], atol=1e-8)


# --- federations ----------------------------------------------------------------------------------------------

TINY = [
    "model.pretrain_epochs=1",
    "model.hidden_size=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=16",
    "data.samples_per_domain=40",
    "lora.rank=4",
    "lora.alpha=8",
    "lora.client_ranks=[1, 2, 4]",
    "lora.target_modules=['q_proj','fc1']",
    "federation.num_clients=3",
    "federation.rounds=2",
    "federation.min_train_nodes=3",
    "federation.local_steps=2",
    "federation.batch_size=8",
    "federation.device='cpu'",
]


class RecordingGrid(InProcessGrid):
    """Keeps, per node, the rank of every adapter sent to it, and counts query messages."""

    def __init__(self, client_app, num_nodes):
        super().__init__(client_app, num_nodes)
        self.sent_ranks: dict[int, list[int]] = {}
        self.sent_bytes: dict[int, list[int]] = {}
        self.queries: list[int] = []

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            node = m.metadata.dst_node_id
            if m.metadata.message_type == MessageType.QUERY:
                self.queries.append(node)
            elif m.metadata.message_type == MessageType.TRAIN:
                a = next(v for k, v in m.content.array_records["arrays"].items() if k.endswith("/A"))
                self.sent_ranks.setdefault(node, []).append(a.shape[0])
                self.sent_bytes.setdefault(node, []).append(record_bytes(m.content.array_records["arrays"]))
        return super().push_messages(messages)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hetero-cache")  # the tiny ViT is pre-trained once for the module


def _run(tmp_path, cache, method, client_app=None, node_ranks=None):
    from fairedge.client.client_app import app

    cfg = build_config(
        {}, [f"output_dir='{tmp_path / 'runs'}'", f"model.cache_dir='{cache}'", *TINY, f"aggregation.method='{method}'"]
    )
    flower_environment()
    grid = RecordingGrid(client_app or app, 3)
    for node, rank in (node_ranks or {}).items():  # as `--node-config "lora-rank=..."` on a SuperNode
        grid.contexts[node].node_config["lora-rank"] = rank
    record = run_federation(grid, cfg, tmp_path / "run")
    return grid, record


def test_each_client_is_sent_its_rank_and_a_mixed_rank_run_trains(tmp_path, cache, caplog):
    with caplog.at_level("WARNING", logger="fairedge.server"):
        grid, record = _run(tmp_path, cache, "lora_fair")
    assert "cosine objective with mixed ranks (lora.client_ranks) and zero-padding" in caplog.text  # said at the start
    # node 1000 + i holds partition i: cyclic ranks 1, 2, 4; asked once for its rank, sent its slice every round
    assert grid.sent_ranks == {1000: [1, 1], 1001: [2, 2], 1002: [4, 4]}
    assert sorted(grid.queries) == [1000, 1001, 1002]
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert all(r["ranks"] == {"1000": 1, "1001": 2, "1002": 4} and r["aggregated"] for r in rows[1:])
    assert all(not r["rejected"] for r in rows[1:])
    assert record.rounds[-1]["mean_accuracy"] > 0  # evaluated at r_max on the server
    # downlink: the slices (smaller for smaller ranks), and the bytes counted are those sent
    first = [grid.sent_bytes[n][0] for n in (1000, 1001, 1002)]  # ranks 1, 2, 4
    assert first[0] < first[1] < first[2] and rows[1]["bytes_down"] == sum(first)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedit", "flexlora", "flora"])
def test_mixed_rank_runs_of_the_other_rules(tmp_path, cache, method):
    grid, record = _run(tmp_path, cache, method)
    assert grid.sent_ranks == {1000: [1, 1], 1001: [2, 2], 1002: [4, 4]}
    assert all(r["aggregated"] and not r["rejected"] for r in record.rounds[1:])


def test_a_node_that_does_not_answer_the_query_cuts_the_adapter_itself(tmp_path, cache):
    train_only = ClientApp()  # no query handler: the query gets an error reply

    @train_only.train()
    def _train(msg: Message, context: Context) -> Message:
        return run_train(msg, context)

    grid, record = _run(tmp_path, cache, "fedit", client_app=train_only)
    assert grid.sent_ranks[1000][0] == 4  # unknown rank: the whole adapter ...
    assert grid.sent_ranks[1000][1] == 1  # ... then its own rank, learned from its first reply
    assert all(r["aggregated"] and not r["rejected"] for r in record.rounds[1:])


def test_a_node_config_rank_overrides_the_assignment(tmp_path, cache):
    grid, record = _run(tmp_path, cache, "fedit", node_ranks={1000: 4, 1002: 2})
    assert grid.sent_ranks == {1000: [4, 4], 1001: [2, 2], 1002: [2, 2]}
    assert record.rounds[-1]["ranks"] == {"1000": 4, "1001": 2, "1002": 2}


def test_mixed_ranks_with_central_dp_are_refused_by_name():
    from fairedge.common.config import ConfigError, load_config
    from fairedge.simulations.paths import CONFIG

    with pytest.raises(ConfigError, match="lora.client_ranks=.*privacy.mode='central'"):
        load_config(
            CONFIG,
            ["lora.client_ranks=[2, 4]", "lora.rank=4", "privacy.enabled=true", "privacy.noise_multiplier=1.0"],
        )


def test_mixed_ranks_under_secure_aggregation_are_refused_by_name():
    from fairedge.common.config import ConfigError, load_config
    from fairedge.simulations.paths import CONFIG

    with pytest.raises(ConfigError, match="lora.client_ranks=.*secure_aggregation"):
        load_config(CONFIG, ["lora.client_ranks=[2, 4]", "lora.rank=4", "privacy.secure_aggregation.enabled=true"])
