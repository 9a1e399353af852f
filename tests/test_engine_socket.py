"""The local runner's Unix socket folder (engine/local.py): what it clears and
what it refuses before vLLM binds there. The engine itself runs on a socket in
the `up` test (tests/test_cli.py) and as the session's audio engine."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from engine.local import listen_args, prepare_socket


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
