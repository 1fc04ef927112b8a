"""Run one federated job on Flower's simulation engine (Ray), or in this process.

`simulate(cfg)` builds a ServerApp around `fairedge.server.federation.run_federation`
and hands it, with fairedge's ClientApp, to `flwr.simulation.run_simulation`:
one virtual SuperNode per client, each with the configured CPU/GPU share.
`engine="inprocess"` skips Ray: an `InProcessGrid` answers every message by
calling the ClientApp in this process, one node after another: the same client
code and seeds, so the same results, without Ray's start-up cost (quick runs,
debugging, tests). On Ray, a start-up timeout (Ray's processes too slow to come up on a
busy machine) starts the simulation once more, resuming if round 0 was checkpointed; the server thread
the failed start left behind stops at its next poll (`AttemptGrid`) instead of waiting out its round timeouts.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

# `Run`, `TaskIdentity`, `ErrorCode` and `SUPERLINK_NODE_ID` are not Flower's public API; InProcessGrid
# stands in for Flower's runtime and needs them: `Run` is the type of the abstract `Grid.run`,
# `TaskIdentity` holds the run and node ids `Message(...)` reads (Flower's runtime sets them in a running
# app), and the constants are the numbers Flower uses for a ClientApp's exception (the public `Error`
# takes a bare code) and for the server's node id.
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fairedge.common.config import RunConfig

if TYPE_CHECKING:
    from fairedge.server.federation import RoundCallback
    from fairedge.server.run_outputs import RunRecord

log = logging.getLogger("fairedge.simulate")
RAY_START_RETRIES = 1
"""Times a simulation whose Ray runtime failed to start (a start-up timeout on a busy machine) is started again."""
RAY_START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")
"""What Ray's start-up errors say when its processes came up too slowly (Ray's waits are fixed, not settings)."""


def ray_start_failure(err: BaseException) -> str | None:
    """The message of a Ray start-up timeout in `err`'s chain of causes, or None if it holds none."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if any(t in str(cause) for t in RAY_START_TIMEOUTS):
            return str(cause).splitlines()[0][:200]
        cause = cause.__cause__ or cause.__context__
    return None


def _shutdown_ray() -> None:
    import ray

    ray.shutdown()


def flower_environment() -> None:
    """Keep Flower out of the user's home, quiet, and from installing packages."""
    os.environ.setdefault("FLWR_HOME", str(Path(tempfile.gettempdir()) / "fairedge-flwr-home"))
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


class SimulationAbandoned(Exception):
    """Raised in a server thread whose start of the simulation was given up (`AttemptGrid`)."""


class AttemptGrid:
    """Flower's grid for one start of the simulation, whose waits for replies end once `stop` is set.

    When Ray fails to start, Flower's `run_simulation` raises while its ServerApp thread (not a daemon, not
    ours to stop) still waits for replies that never come: the process could not exit, and after the round
    timeouts that thread would fail the round and write its outputs into the run folder, over those of the
    start that ran. `simulate` sets `stop` when `run_simulation` returns or raises; the thread's next poll
    then raises `SimulationAbandoned`, which leaves `run_federation` before it writes anything.
    """

    POLL_S = 0.1

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self._grid, self._stop = grid, stop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Flower's `send_and_receive` (push, then pull until every reply is in or `timeout` passed)."""
        self._check()
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            got = list(self._grid.pull_messages(list(waiting)))
            replies += got
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if waiting:
                self._stop.wait(self.POLL_S)
                self._check()
        return replies

    def _check(self) -> None:
        if self._stop.is_set():
            raise SimulationAbandoned("this start of the simulation was given up")


class InProcessGrid(Grid):
    """Flower's Grid served by ClientApp calls in this process.

    Node `i` (id `1000 + i`) has node config `partition-id = i` of `num-partitions`
    and a state RecordDict that lasts the whole run, as a SuperNode's does. A
    ClientApp exception becomes an error reply, as in Flower. Messages are
    handled when their replies are pulled, one after another, so the round
    timeout never cuts a client off here.

    It plays the part of Flower's runtime, so it does three things only the runtime
    does, through non-public parts of Flower: it sets the process's `TaskIdentity`
    (the server's run and node ids, which `Message(...)` reads), gives pushed
    messages their ids (`Metadata.message_id` has no public setter; Flower's own
    grids set it the same way), and answers a crashing ClientApp with Flower's error code.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            1000 + i: Context(
                run_id=run_id,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self._pending: dict[str, Message] = {}
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        """Deprecated in Flower (build a `Message` instead) but still abstract in `Grid`."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"no node with id {msg.metadata.dst_node_id}")
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's grids do (no public setter)
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for message_id in message_ids:
            msg = self._pending.pop(message_id)
            try:
                reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception:  # a crashing client is an error reply, not a crashed server
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, traceback.format_exc()), reply_to=msg)
            replies.append(reply)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


def simulate(
    cfg: RunConfig,
    run_dir: Path,
    *,
    on_round: RoundCallback | None = None,
    client_app: ClientApp | None = None,
    verbose: bool = False,
    resume: bool = False,
    engine: Literal["ray", "inprocess"] = "ray",
) -> RunRecord:
    """Run the federation described by `cfg`; return its `RunRecord` (outputs in `run_dir`).

    `resume=True` continues the run in `run_dir` from its checkpoint. Errors of the
    server side (e.g. `fairedge.server.federation.RoundFailed`) are raised here.
    """
    flower_environment()
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fairedge.client.client_app import app as default_client_app
    from fairedge.server.checkpoint import has_checkpoint
    from fairedge.server.federation import run_federation

    client_app = client_app or default_client_app
    if engine == "inprocess":
        grid = InProcessGrid(client_app, cfg.federation.num_clients)
        return run_federation(grid, cfg, run_dir, on_round=on_round, resume=resume)
    if engine != "ray":
        raise ValueError(f"engine must be 'ray' or 'inprocess', got {engine!r}")

    records: list[RunRecord] = []
    errors: list[Exception] = []
    stops: list[threading.Event] = []  # one per start of the simulation
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        attempt_grid = cast(Grid, AttemptGrid(grid, stops[-1]))
        try:
            records.append(run_federation(attempt_grid, cfg, run_dir, on_round=on_round, resume=resume))
        except SimulationAbandoned:
            log.info("a server thread of a simulation start that failed has stopped")
        except Exception as err:  # raised again below, after Flower has shut the simulation down
            errors.append(err)

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    for attempt in range(1 + RAY_START_RETRIES):
        stops.append(threading.Event())
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.federation.num_clients,
                backend_config={
                    "client_resources": {
                        "num_cpus": cfg.federation.client_cpus,
                        "num_gpus": cfg.federation.client_gpus,
                    },
                    "init_args": {"log_to_driver": verbose, "logging_level": "WARNING" if not verbose else "INFO"},
                },
                verbose_logging=verbose,
            )
            break
        except RuntimeError as err:
            why = ray_start_failure(err)
            if why is None or attempt == RAY_START_RETRIES or records or errors:
                raise
            _shutdown_ray()
            resume = resume or has_checkpoint(run_dir)  # the server may have checkpointed round 0 already
            log.warning("Ray did not start (%s); starting the simulation again%s", why, " (resumed)" * resume)
        finally:
            stops[-1].set()  # a server thread this start left behind stops at its next poll, writing nothing
    if errors:
        raise errors[0]
    if not records:
        raise RuntimeError(f"the simulation ended without a result; see the log above (run folder {run_dir})")
    return records[0]
