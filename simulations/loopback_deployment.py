"""`LoopbackDeployment`: one SuperLink and N SuperNodes on this machine, started and stopped step by step.

Why a module of its own: the deployment's steps (see `deploy_loopback` for the list) without the
command line, for `deploy_loopback` and the tests that drive a deployment themselves.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import tomli_w

from fairedge.common.atomic_files import atomic_write_text
from fairedge.common.certificates import Credentials, make_credentials
from fairedge.simulations.loopback_processes import (
    DeploymentError,
    Log,
    Process,
    free_port,
    spawn,
    stop_processes,
    tail,
)
from fairedge.simulations.paths import CONFIG, ROOT

PROJECT_ROOT = ROOT
DEFAULT_CONFIG = CONFIG
CONNECTION = "fairedge-loopback"


@dataclass
class SuperNode:
    """One SuperNode: its key pair, node config, port and (once started) process."""

    index: int
    key: Path | None
    """OpenSSH private key (`--auth-supernode-private-key`); None: the node starts without one."""
    node_config: str
    port: int
    process: Process | None = None
    node_id: int | None = None


@dataclass
class LoopbackDeployment:
    """One SuperLink and N SuperNodes on 127.0.0.1 with TLS and SuperNode authentication.

    Use as a context manager: leaving it stops every process started (see `stop`).
    """

    folder: Path
    num_nodes: int = 3
    data_paths: Sequence[str] = ()
    log: Log = print
    project: Path = PROJECT_ROOT
    creds: Credentials | None = None
    port: int = 0
    nodes: list[SuperNode] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes={self.num_nodes}: need at least 1 SuperNode")
        if self.data_paths and len(self.data_paths) != self.num_nodes:
            raise ValueError(f"{len(self.data_paths)} data paths for {self.num_nodes} SuperNodes: give one per node")
        self.folder = Path(self.folder).resolve()
        self.bin = Path(sys.executable).parent
        for exe in ("flower-superlink", "flower-supernode", "flwr"):
            if not (self.bin / exe).exists():
                raise DeploymentError(f"{exe} not found next to {sys.executable}: install fairedge (make install)")

    # ----------------------------------------------------------------- set-up
    @property
    def flwr_home(self) -> Path:
        return self.folder / "flwr-home"

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    def env(self, flwr_home: Path | None = None) -> dict[str, str]:
        """The environment of every Flower process: venv first on PATH, Flower kept in the deployment folder."""
        env = dict(os.environ)
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env.get('PATH', '')}",
            FLWR_HOME=str(flwr_home or self.flwr_home),
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("OMP_NUM_THREADS", "1")  # N+1 processes share this machine's cores: no oversubscription
        return env

    def prepare(self) -> None:
        """Certificates, node keys, FLWR_HOME with the connection, node configs and ports."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self.creds = make_credentials(self.folder / "certs", nodes=self.num_nodes)
        self.log(f"certificates and {self.num_nodes} node keys in {self.folder / 'certs'}")
        self.port = free_port()
        self.flwr_home.mkdir(exist_ok=True)
        atomic_write_text(
            self.flwr_home / "config.toml",
            tomli_w.dumps(
                {
                    "superlink": {
                        "default": CONNECTION,
                        CONNECTION: {
                            "address": f"127.0.0.1:{self.port}",
                            "root-certificates": str(self.creds.ca.cert_path),
                        },
                    }
                }
            ),
        )
        for i, key in enumerate(self.creds.nodes):
            config = f"partition-id={i} num-partitions={self.num_nodes}"
            if self.data_paths:
                config += f' data-path="{Path(self.data_paths[i]).resolve()}"'
            self.nodes.append(SuperNode(i, key.private_path, config, free_port()))

    def _spawn(
        self, name: str, cmd: list[str], *, env: dict[str, str] | None = None, on_line: Log | None = None
    ) -> Process:
        """Start `cmd` as one of this deployment's processes, output to `logs/<name>.log` (and to `on_line`)."""
        proc = spawn(name, cmd, self.logs / f"{name}.log", cwd=self.project, env=env or self.env(), on_line=on_line)
        self.processes.append(proc)
        return proc

    def _flwr(self, args: list[str], name: str, timeout: float = 120) -> str:
        """Run a `flwr` CLI command to completion; its output, or DeploymentError naming its log."""
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(
                [str(self.bin / "flwr"), *args],
                cwd=self.project,
                env=self.env(),
                stdout=subprocess.PIPE,
                stderr=log_file,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            proc = Process(name, popen, log_path)
            self.processes.append(proc)
            try:
                out, _ = popen.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise DeploymentError(f"`flwr {' '.join(args)}` took over {timeout:.0f} s; log {log_path}") from None
            finally:  # also on Ctrl-C
                stop_processes([proc])
                self.processes.remove(proc)
            log_file.write(out)
        if popen.returncode:
            raise DeploymentError(
                f"`flwr {' '.join(args)}` failed (exit {popen.returncode}); log {log_path}:\n"
                + out.decode(errors="replace")[-2000:]
                + tail(log_path)
            )
        return out.decode(errors="replace")

    # ------------------------------------------------------------- the steps
    def start_superlink(self, timeout: float = 90) -> None:
        """`flower-superlink` with TLS and SuperNode authentication; wait until it accepts connections."""
        assert self.creds is not None, "call prepare() first"
        proc = self._spawn(
            "superlink",
            [
                str(self.bin / "flower-superlink"),
                "--ssl-ca-certfile",
                str(self.creds.ca.cert_path),
                "--ssl-certfile",
                str(self.creds.server.cert_path),
                "--ssl-keyfile",
                str(self.creds.server.key_path),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
        )
        deadline = time.monotonic() + timeout
        while True:
            if not proc.alive():
                raise DeploymentError(
                    f"flower-superlink exited ({proc.popen.returncode}); log {proc.log_path}:\n" + tail(proc.log_path)
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DeploymentError(
                        f"flower-superlink not listening after {timeout:.0f} s; log {proc.log_path}"
                    ) from None
                time.sleep(0.5)
        self.log(f"SuperLink up on 127.0.0.1:{self.port} (TLS, SuperNode authentication on)")

    def register(self, public_key: Path, name: str) -> int:
        """`flwr supernode register <public key> <connection>`; the node id the SuperLink gives it."""
        out = self._flwr(["supernode", "register", str(public_key), CONNECTION, "--format", "json"], name)
        try:
            return int(json.loads(out[out.index("{") :])["node-id"])
        except (ValueError, KeyError) as err:
            raise DeploymentError(f"unexpected output of flwr supernode register: {out!r}") from err

    def register_nodes(self) -> None:
        """Register every node's public key (in parallel: each `flwr` call takes a few seconds to start)."""
        assert self.creds is not None
        errors: list[BaseException] = []

        def one(node: SuperNode) -> None:
            try:
                assert node.key is not None
                node.node_id = self.register(node.key.with_name(node.key.name + ".pub"), f"register-{node.index}")
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=one, args=(n,)) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        self.log("registered node keys: " + ", ".join(f"node-{n.index} -> {n.node_id}" for n in self.nodes))

    def supernode_command(self, node: SuperNode, *, tls: bool = True) -> list[str]:
        """The `flower-supernode` command line for one node (`tls=False`: plain HTTP, `--insecure`)."""
        assert self.creds is not None
        cmd = [str(self.bin / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}"]
        cmd += ["--root-certificates", str(self.creds.ca.cert_path)] if tls else ["--insecure"]
        if node.key is not None:
            cmd += ["--auth-supernode-private-key", str(node.key)]
        return cmd + ["--node-config", node.node_config, "--host", "127.0.0.1", "--port", str(node.port)]

    def start_supernode(self, node: SuperNode, *, tls: bool = True, extra_args: Sequence[str] = ()) -> Process:
        """Start one SuperNode with its own FLWR_HOME (as on its own machine)."""
        home = self.folder / "nodes" / f"node-{node.index}"
        home.mkdir(parents=True, exist_ok=True)
        node.process = self._spawn(
            f"supernode-{node.index}", [*self.supernode_command(node, tls=tls), *extra_args], env=self.env(home)
        )
        return node.process

    def start_supernodes(self) -> None:
        for node in self.nodes:
            self.start_supernode(node)
        self.log(f"started {len(self.nodes)} SuperNodes (ports {', '.join(str(n.port) for n in self.nodes)})")

    def online_nodes(self) -> set[int]:
        """Node ids the SuperLink lists as online."""
        out = self._flwr(["supernode", "list", CONNECTION, "--format", "json"], "supernode-list")
        nodes = json.loads(out[out.index("{") :]).get("nodes", [])
        return {int(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def wait_online(self, timeout: float = 120) -> None:
        """Wait until every started SuperNode is connected (so round 1 samples all of them)."""
        wanted: set[int] = set()
        for n in self.nodes:
            if n.process is not None:
                if n.node_id is None:
                    raise DeploymentError(f"SuperNode {n.index} has node_id None: call register_nodes() first")
                wanted.add(n.node_id)
        deadline = time.monotonic() + timeout
        while not wanted <= (online := self.online_nodes()):
            for n in self.nodes:
                if n.process is not None and not n.process.alive():
                    raise DeploymentError(
                        f"SuperNode {n.index} exited ({n.process.popen.returncode}); "
                        f"log {n.process.log_path}:\n" + tail(n.process.log_path)
                    )
            if time.monotonic() > deadline:
                raise DeploymentError(f"SuperNodes {sorted(wanted - online)} not online after {timeout:.0f} s")
            time.sleep(1)
        self.log(f"{len(wanted)} SuperNodes online")

    def start(self) -> None:
        """Steps 1-5: credentials, SuperLink, registered keys, SuperNodes, all online."""
        self.prepare()
        self.start_superlink()
        self.register_nodes()
        self.start_supernodes()
        self.wait_online()

    def output_dir(self, overrides: Sequence[str]) -> Path:
        """Where the ServerApp writes the run folder: `output_dir` of the overrides, else the deployment folder."""
        for o in overrides:
            key, _, value = o.partition("=")
            if key.strip() == "output_dir":
                return (self.project / value.strip().strip("'\"")).resolve()
        return self.folder

    def start_run(
        self, config_file: Path, overrides: Sequence[str], name: str = "flwr-run", on_line: Log | None = None
    ) -> Process:
        """Start `flwr run . <connection> --stream` with a run-config file (`config-file`, `overrides`)."""
        output_dir = self.output_dir(overrides)
        output_dir.mkdir(parents=True, exist_ok=True)
        overrides = [o for o in overrides if o.partition("=")[0].strip() != "output_dir"]
        overrides.append(f"output_dir='{output_dir}'")  # absolute: the ServerApp runs in another process
        run_config = self.folder / f"{name}-config.toml"
        atomic_write_text(
            run_config,
            tomli_w.dumps({"config-file": str(Path(config_file).resolve()), "overrides": "; ".join(overrides)}),
        )
        self.log(f"flwr run . {CONNECTION} --stream --run-config {run_config} (log {self.logs / name}.log)")
        return self._spawn(
            name,
            [str(self.bin / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config", str(run_config)],
            on_line=on_line or (lambda _: None),
        )

    def wait_run(self, proc: Process, output_dir: Path, before: set[Path], timeout: float) -> Path:
        """Wait for `flwr run --stream` to end; the run folder the ServerApp wrote (with metrics.json)."""
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"the run did not end within {timeout:.0f} s; log {proc.log_path}") from None
        if proc.pump is not None:
            proc.pump.join(timeout=10)
        new = sorted(
            (p for p in output_dir.iterdir() if p.is_dir() and p not in before and (p / "metrics.json").is_file()),
            key=lambda p: p.stat().st_mtime,
        )
        started = re.search(r"Successfully started run (\d+)", proc.log_path.read_text(errors="replace"))
        status, details = self.run_status(int(started.group(1))) if started else ("not started", "")
        if proc.popen.returncode or status != "finished:completed" or not new:
            raise DeploymentError(
                f"the run failed (Flower status {status!r} {details}, "
                f"flwr run exit {proc.popen.returncode}, "
                f"run folder {new[-1] if new else 'none'}); log {proc.log_path}:\n" + tail(proc.log_path, 30)
            )
        return new[-1]

    def run_status(self, run_id: int) -> tuple[str, str]:
        """Flower's status of a run (`finished:completed`, `finished:failed`, `running`, ...) and its details."""
        out = self._flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], "runs")
        runs = json.loads(out[out.index("{") :]).get("runs", [])
        return (str(runs[0]["status"]), str(runs[0].get("status-details") or "")) if runs else ("unknown", "")

    def run(
        self,
        config_file: Path = DEFAULT_CONFIG,
        overrides: Sequence[str] = (),
        *,
        timeout: float = 3600,
        name: str = "flwr-run",
        on_line: Log | None = None,
    ) -> Path:
        """Step 6: one federated run on this deployment, to its end; its run folder."""
        output_dir = self.output_dir(overrides)
        before = set(output_dir.iterdir()) if output_dir.is_dir() else set()
        proc = self.start_run(config_file, overrides, name, on_line or _progress(self.log))
        done = threading.Event()
        watcher = threading.Thread(target=_watch_rounds, args=(output_dir, before, done, self.log), daemon=True)
        watcher.start()
        try:
            return self.wait_run(proc, output_dir, before, timeout)
        finally:
            done.set()
            watcher.join(timeout=5)
            stop_processes([proc])
            self.processes.remove(proc)

    def kill(self, process: Process) -> None:
        """SIGKILL a process and everything it started at once (a crashed machine)."""
        for p in process.tree():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        process.popen.wait(timeout=10)

    def stop(self) -> None:
        """Step 7: stop every process this deployment started (SuperNodes, SuperLink, runs)."""
        if self.processes:
            stop_processes(self.processes)
            self.log(f"stopped {len(self.processes)} processes")
            self.processes.clear()

    def __enter__(self) -> LoopbackDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _progress(log: Log) -> Log:
    """Show the warnings and errors of the run's log stream (the rest is in its log file)."""

    def on_line(line: str) -> None:
        text = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
        if text.startswith(("WARNING", "ERROR", "Traceback")) or "Successfully started run" in text:
            log("  | " + text[:300])

    return on_line


def round_line(row: dict[str, Any]) -> str:
    """One round of a run's record (metrics.json / checkpoint), in a line."""
    text = f"round {row['round']}: mean acc {row['mean_accuracy']:.4f}, worst {row['worst_accuracy']:.4f}"
    if row["round"] > 0:
        left = {**row.get("rejected", {}), **{str(n): "no reply" for n in row.get("no_reply", [])}}
        text += f", replied {len(row.get('replied', []))}/{len(row.get('sampled', []))}"
        text += "".join(f"; left out {n}: {why[:120]}" for n, why in left.items())
    return text


def _watch_rounds(output_dir: Path, before: set[Path], done: threading.Event, log: Log) -> None:
    """Print each round once the ServerApp has checkpointed it (`<run>/checkpoint/round-*/state.json`)."""
    shown = 0
    while not done.wait(2.0):
        try:
            runs = [p for p in output_dir.iterdir() if p.is_dir() and p not in before]
            states = sorted(p for run in runs for p in run.glob("checkpoint/round-*/state.json"))
            rows = json.loads(states[-1].read_text())["record"]["rounds"] if states else []
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint being written, or another format: progress is best effort
        for row in rows[shown:]:
            log("  " + round_line(row))
        shown = max(shown, len(rows))
