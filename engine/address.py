"""Where an engine listens: `http(s)://host:port`, or a Unix socket, `unix:/path`.

A Unix socket is the tighter choice for an engine on the gateway's own host
(`bastion up`): it has no port, so no process reaches it except through the
file system, whose permissions the runner sets to the gateway's user alone.
It is not a speed-up worth having for its own sake: through the gateway, 0.01-0.02 ms
less at p50 (bench/suite/engine_socket.py).
"""

from __future__ import annotations

from urllib.parse import urlsplit

UNIX = "unix:"
# sun_path holds 108 bytes with the terminating NUL (Linux).
MAX_SOCKET_PATH = 107


def socket_path(url: str) -> str | None:
    """The socket's path of a `unix:/path` URL; None for any other URL."""
    return url[len(UNIX) :] if url.startswith(UNIX) else None


def check(url: str) -> None:
    """Raise ValueError, saying why, unless `url` is an engine address the gateway can use."""
    path = socket_path(url)
    if path is not None:
        if not path.startswith("/"):
            raise ValueError(f"a Unix socket engine URL needs an absolute path (unix:/path), not {url!r}")
        if len(path.encode()) > MAX_SOCKET_PATH:
            raise ValueError(f"the socket path of {url!r} is longer than {MAX_SOCKET_PATH} bytes")
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"an engine URL is http://host:port, https://host:port or unix:/path, not {url!r}")
