"""The local runner's Unix socket folder (engine/local.py): what it clears and
what it refuses before vLLM binds there. The engine itself runs on a socket in
the `up` test (tests/test_cli.py) and as the session's audio engine."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.address import reach_problem
from engine.container import ENGINE_UID, GATEWAY_UID
from engine.local import listen_args, prepare_socket
from gateway.engine_http import EnginePool, Origin
from gateway.services import preflight
from gateway.settings import load_settings
from tests.support import as_user


def test_listen_args_for_a_socket_or_a_loopback_port_and_nothing_else() -> None:
    assert listen_args("unix:/srv/run/e.sock") == ["--uds", "/srv/run/e.sock"]
    assert listen_args("http://127.0.0.1:8100") == ["--host", "127.0.0.1", "--port", "8100"]
    for url in ("http://0.0.0.0:8100", "http://10.0.0.5:8100", "https://127.0.0.1:8100", "http://127.0.0.1"):
        with pytest.raises(ValueError, match="loopback address"):
            listen_args(url)


def test_a_socket_folder_is_made_private_and_a_dead_socket_cleared(tmp_path: Path) -> None:
    path = tmp_path / "run" / "e.sock"
    prepare_socket(str(path))
    assert (path.parent.stat().st_mode & 0o777) == 0o700

    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))  # bound, never listening: what a killed engine leaves
    dead.close()
    prepare_socket(str(path))
    assert not path.exists()


def test_a_live_socket_an_open_folder_or_another_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run" / "e.sock"
    prepare_socket(str(path))
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(ValueError, match="already listens"):
            prepare_socket(str(path))
    path.unlink()

    path.write_text("not a socket")
    with pytest.raises(ValueError, match="not a socket"):
        prepare_socket(str(path))

    open_folder = tmp_path / "shared"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with pytest.raises(ValueError, match="theirs alone"):
        prepare_socket(str(open_folder / "e.sock"))


def _connect_as(uid: int, gid: int, url: str) -> str:
    """What a connection to `url` through the gateway's engine pool ends in, as `uid`:`gid`."""

    def connect() -> str:
        pool = EnginePool(connect_timeout=2, read_timeout=1, size=1, keepalive=5)
        asyncio.run(pool.request(Origin.of(url, {}), "GET", "/health"))
        return "connected"

    return as_user(uid, gid, connect)


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder others may enter (pytest's own are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="bastion-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="connects as other users")
def test_a_gateway_outside_the_sockets_group_is_told_why_it_cannot_connect(open_folder: Path) -> None:
    """The containers' layout: a socket folder of the engine's user, setgid to
    the gateway's group. A caller in that group connects (and, as nothing
    answers here, times out reading); one outside it is told it needs the group."""
    run = open_folder / "run"
    run.mkdir()
    os.chown(run, ENGINE_UID, GATEWAY_UID)
    run.chmod(0o2750)
    path = run / "engine.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        os.chown(path, ENGINE_UID, GATEWAY_UID)
        path.chmod(0o770)
        assert _connect_as(10003, GATEWAY_UID, f"unix:{path}").startswith("ReadTimeout")
        assert _connect_as(10003, 10003, f"unix:{path}") == (
            f"ConnectFailed cannot connect to the engine: permission denied on {path};"
            " the gateway's user must be in the socket's group"
        )


@pytest.mark.skipif(os.geteuid() != 0, reason="checks as other users")
def test_a_gateway_outside_the_sockets_group_does_not_start(open_folder: Path) -> None:
    """The same layout, checked before the gateway starts: outside the socket's
    group, `preflight` (what `bastion serve` and `up` run first) stops with the
    reason; in it, or before the engine has made its socket, it goes on."""
    run = open_folder / "run"
    run.mkdir()
    os.chown(run, ENGINE_UID, GATEWAY_UID)
    run.chmod(0o2750)
    path = run / "engine.sock"
    url = f"unix:{path}"
    config = open_folder / "bastion.toml"
    config.write_text(f'[[deployments]]\nname = "m"\nengine_url = "{url}"\nverify = false\n')
    settings = load_settings(config)
    check = lambda: str(reach_problem(url))  # noqa: E731
    assert as_user(10003, GATEWAY_UID, check) == "None"  # no socket yet: its engine starts later
    assert as_user(10003, 10003, check).startswith(
        f"the gateway's user (uid 10003, groups 10003) may not enter {run} (owner {ENGINE_UID}, group {GATEWAY_UID},"
        " mode 2750); the gateway's user must be in the socket's group"
    )

    def start() -> str:
        preflight(settings)
        return "started"

    assert as_user(10003, 10003, start).startswith(
        "ConfigError deployment 'm': cannot reach the engine's socket: the gateway's user (uid 10003"
    )
    run.chmod(0o2751)  # others may enter the folder, and may still not use the socket
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        os.chown(path, ENGINE_UID, GATEWAY_UID)
        path.chmod(0o770)
        assert as_user(10003, GATEWAY_UID, check) == "None"
        assert f"may not connect to {path} (owner {ENGINE_UID}, group {GATEWAY_UID}, mode 770)" in as_user(
            10003, 10003, check
        )
