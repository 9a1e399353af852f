"""Where an engine listens: `http(s)://host:port`, or a Unix socket, `unix:/path`.

A Unix socket is the tighter choice for an engine on the gateway's own host
(`bastion up`): it has no port, so no process reaches it except through the
file system, whose permissions the runner sets to the gateway's user alone.
It is not a speed-up worth having for its own sake: through the gateway, 0.01-0.02 ms
less at p50 (bench/suite/engine_socket.py).
"""

from __future__ import annotations

UNIX = "unix:"
# sun_path holds 108 bytes with the terminating NUL (Linux).
MAX_SOCKET_PATH = 107


def socket_path(url: str) -> str | None:
    """The socket's path of a `unix:/path` URL; None for any other URL.

    Raises ValueError for a path the kernel cannot bind or that depends on the
    working directory: not absolute, or longer than MAX_SOCKET_PATH bytes.
    """
    if not url.startswith(UNIX):
        return None
    path = url[len(UNIX) :]
    if not path.startswith("/"):
        raise ValueError(f"a Unix socket engine URL needs an absolute path (unix:/path), not {url!r}")
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"the socket path of {url!r} is longer than {MAX_SOCKET_PATH} bytes")
    return path
