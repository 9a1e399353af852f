"""Where an engine listens: `http(s)://host:port`, or a Unix socket, `unix:/path`.

A Unix socket is the tighter choice for an engine on the gateway's own host
(`bastion up`): it has no port, so no process reaches it except through the
file system, whose permissions the runner sets to the gateway's user alone.
It is not a speed-up worth having for its own sake: through the gateway, 0.01-0.02 ms
less at p50 (bench/suite/engine_socket.py).
"""

from __future__ import annotations

import os

UNIX = "unix:"
# sun_path holds 108 bytes with the terminating NUL (Linux).
MAX_SOCKET_PATH = 107
# What to do when a socket refuses the gateway: the engine's socket is open to its group only.
NEEDS_GROUP = "the gateway's user must be in the socket's group"


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


def reach_problem(url: str) -> str | None:
    """Why this process may not connect to the socket of a `unix:/path` URL, as
    the file system says now: it must enter the socket's folder and write to the
    socket. None when it may, for any other URL, and while the folder or the
    socket does not exist yet (its engine starts later).
    """
    path = socket_path(url)
    if path is None:
        return None
    groups = sorted({os.getgid(), *os.getgroups()})
    user = f"the gateway's user (uid {os.getuid()}, groups {', '.join(map(str, groups))})"
    for target, mode, verb in ((os.path.dirname(path), os.X_OK, "enter"), (path, os.W_OK, "connect to")):
        try:
            st = os.stat(target)
        except FileNotFoundError:
            return None
        except PermissionError:
            return f"{user} may not reach {target}: a folder above it is closed to it"
        if not os.access(target, mode):
            return (
                f"{user} may not {verb} {target} (owner {st.st_uid}, group {st.st_gid},"
                f" mode {st.st_mode & 0o7777:o}); {NEEDS_GROUP}"
            )
    return None
