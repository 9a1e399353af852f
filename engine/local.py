"""Run vLLM as a local process from its own Python environment.

The engine listens on a loopback address or on a Unix socket only, and
requires its own API key (passed in the environment, not on the command
line), so nothing on the machine but the gateway can call it. A socket is
made in a folder only the gateway's user may enter, with the engine's umask
at 077: other users cannot even connect. It runs in its own process group so
that stopping it ends vLLM's worker processes too, and nothing else.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from urllib.parse import urlsplit

from engine.address import socket_path
from engine.spec import EngineSpec


class EngineStartError(Exception):
    """The engine exited or did not become healthy; the message has its log tail."""


@dataclass(frozen=True)
class LocalEngineConfig:
    name: str
    python: str
    model_dir: Path
    url: str
    api_key: str
    spec: EngineSpec
    log_file: Path


def listen_args(url: str) -> list[str]:
    """vLLM's arguments to listen at a local engine URL: a loopback address or a Unix socket."""
    path = socket_path(url)
    if path is not None:
        return ["--uds", path]
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback or parts.port is None:
        raise ValueError(f"a local engine must listen on http://<loopback address>:<port> or unix:/path, not {url!r}")
    return ["--host", host, "--port", str(parts.port)]


def prepare_socket(path: str) -> None:
    """Make the socket's folder (the owner's alone) and clear a socket left by an engine that died.

    vLLM binds the path and fails if it exists. A socket someone still
    listens on is not taken over.
    """
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ValueError(f"{folder} (the engine socket's folder) must be this user's, and theirs alone (chmod 700)")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: left by an engine that died
            return
    raise ValueError(f"something already listens on {path}")


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (for the engine's health check)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to a local engine URL (checked by listen_args), and the path its routes start with."""
    path = socket_path(url)
    if path is not None:
        return _UnixConnection(path, timeout), ""
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout), parts.path.rstrip("/")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class LocalEngine:
    def __init__(self, config: LocalEngineConfig):
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        c = self.config
        if not Path(c.python).exists():
            raise EngineStartError(f"engine Python {c.python} not found (set engine_python in the config)")
        listen = listen_args(c.url)
        path = socket_path(c.url)
        if path is not None:
            prepare_socket(path)
        argv = [
            c.python, "-m", "vllm.entrypoints.openai.api_server",
            *c.spec.vllm_args(model_dir=str(c.model_dir), served_name=c.name, listen=listen),
        ]  # fmt: skip
        env = {**os.environ, **c.spec.environment(), "VLLM_API_KEY": c.api_key}
        c.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(c.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                umask=0o077,  # its socket, logs and caches: the owner's alone
            )

    def healthy(self) -> bool:
        conn, base = _connection(self.config.url, timeout=2)
        try:
            conn.request("GET", base + "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def wait_healthy(self, timeout: float, on_tick: Callable[[float, str], None] | None = None) -> None:
        """Block until /health answers 200; raise EngineStartError if it exits or times out."""
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            if self._proc is not None and self._proc.poll() is not None:
                raise EngineStartError(
                    f"engine {self.config.name} exited with code {self._proc.returncode}:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            if elapsed > timeout:
                raise EngineStartError(
                    f"engine {self.config.name} not healthy after {timeout:.0f}s:\n{self.log_tail()}"
                )
            if on_tick is not None:
                on_tick(elapsed, self.last_log_line())
            time.sleep(1.0)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the engine's process group, SIGKILL what is left after `grace` seconds.

        Returns once every process of the group is gone: vLLM's engine-core and
        worker processes outlive the API server by a moment, and a later engine
        on the same port or GPU must not meet them.
        """
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid
        if not _group_alive(pgid):
            proc.wait()
            return
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader so it does not count as alive
            if not _group_alive(pgid):
                break
            time.sleep(0.2)
        else:
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()
        while _group_alive(pgid):
            time.sleep(0.05)
        path = socket_path(self.config.url)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.config.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def last_log_line(self) -> str:
        tail = self.log_tail(1)
        return tail[-120:]
