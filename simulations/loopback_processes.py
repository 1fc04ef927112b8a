"""The processes of a loopback deployment: start one with its log, stop a whole tree of them.

Why a module of its own: this is POSIX process plumbing with no Flower in it (process groups,
log files, ports), kept apart so that `loopback_deployment` reads as the deployment's steps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

Log = Callable[[str], None]


class DeploymentError(RuntimeError):
    """A step of the deployment failed; the message names the step and its log file."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Process:
    """A process this deployment started, with its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    log_file: IO[Any] | None = None
    pump: threading.Thread | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        """The process and all its descendants (Flower starts SuperExec in a new session)."""
        try:
            root = psutil.Process(self.popen.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def stop_processes(procs: Sequence[Process], grace: float = 10.0) -> None:
    """SIGTERM each process group and every descendant, wait `grace` s, SIGKILL what is left, reap all."""
    tree = {q.pid: q for p in procs for q in p.tree()}  # before signalling: orphans get re-parented out of view
    for p in reversed(procs):  # last started first: runs, SuperNodes, then the SuperLink
        if p.alive():
            try:
                os.killpg(p.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for pid, q in tree.items():
        if pid not in {p.popen.pid for p in procs}:
            try:
                q.terminate()
            except psutil.NoSuchProcess:
                pass
    _, alive = psutil.wait_procs(list(tree.values()), timeout=grace)
    for q in alive:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    for p in procs:
        if p.alive():
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            p.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if p.pump is not None:
            p.pump.join(timeout=5)
        if p.log_file is not None:
            p.log_file.close()


def spawn(
    name: str, cmd: list[str], log_path: Path, *, cwd: Path, env: dict[str, str], on_line: Log | None = None
) -> Process:
    """Start `cmd` in its own process group, output to `log_path` (and to `on_line`)."""
    if on_line is None:
        log_file = open(log_path, "ab")  # noqa: SIM115  (the Popen outlives this function; Process closes it)
        popen: subprocess.Popen[bytes] | subprocess.Popen[str] = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc = Process(name, popen, log_path, log_file)
    else:
        popen = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
            errors="replace",
            bufsize=1,
        )
        proc = Process(name, popen, log_path)
        proc.pump = threading.Thread(target=_pump, args=(popen, log_path, on_line), daemon=True)
        proc.pump.start()
    return proc


def _pump(popen: subprocess.Popen, log_path: Path, on_line: Log) -> None:
    """Copy a process's output to its log file line by line, handing each line to `on_line`."""
    assert popen.stdout is not None
    with open(log_path, "a") as log_file:
        for line in popen.stdout:
            log_file.write(line)
            log_file.flush()
            try:
                on_line(line.rstrip("\n"))
            except Exception:
                pass
