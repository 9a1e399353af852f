"""Test helpers: a gateway as a real `bastion serve` process, and fault doubles
that are real sockets (an engine that never answers, one that breaks off, a
TCP proxy that can be cut to make PostgreSQL refuse connections)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import ipaddress
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from engine import manifest
from engine.address import socket_path
from gateway.audit.capture import rotate_keyring
from gateway.db import create_engine
from gateway.tables import audit_records

BASTION = str(Path(sys.executable).with_name("bastion"))


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    """A silent mono 16-bit WAV clip of `seconds`."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\0\0" * int(rate * seconds))
    return out.getvalue()


def engine_client(url: str) -> httpx.Client:
    """An HTTP client straight to an engine, at `http://host:port` or `unix:/path`."""
    path = socket_path(url)
    if path is None:
        return httpx.Client(base_url=url, timeout=10)
    return httpx.Client(base_url="http://localhost", transport=httpx.HTTPTransport(uds=path), timeout=10)


def engine_metric(engine: EngineRef, name: str) -> float:
    """A counter from the engine's own Prometheus /metrics, summed over its labels."""
    with engine_client(engine.url) as client:
        text = client.get("/metrics", headers={"authorization": f"Bearer {engine.key}"}).text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M))


_port_picker = random.Random()  # noqa: S311 - not for secrets


def as_user(uid: int, gid: int, work: Callable[[], str]) -> str:
    """What `work` returns (or raises) in a forked child running as `uid`:`gid`
    (the interpreter under /root is not others' to start)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, work, report, exit without running pytest's teardown
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            outcome = work()
        except BaseException as exc:  # noqa: BLE001 (reported to the parent, which checks it)
            outcome = f"{type(exc).__name__} {exc}"
        os.write(write_end, outcome.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        outcome = reader.read().decode()
    os.waitpid(pid, 0)
    return outcome


def free_port() -> int:
    """A loopback port that is free now and outside the kernel's ephemeral range.

    A port the kernel hands out for bind(0) is one it may hand out again to
    anyone else binding 0 (vLLM's workers do) before our server binds it; CI
    saw a gateway lose its port that way. Ports below the ephemeral range are
    only ever taken by name, so a free one stays free for us.
    """
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(200):
        port = _port_picker.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def bastion(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([BASTION, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"bastion {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@dataclass
class EngineRef:
    """Where a deployment's engine is, and its key; with a manifest, its model is verified."""

    name: str
    url: str
    key: str
    model_dir: str = ""
    manifest: str = ""
    # (key id, public key file) of the publisher that signed the manifest.
    publisher: tuple[str, str] | None = None


def toml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else ("true" if value else "false")


# The policy of tests that are not about policy: every team a test uses may
# call every model with everything; `claims` captures payloads encrypted and
# `hr` captures nothing (the capture tests rely on both).
OPEN_POLICY = """\
version: 1
teams:
""" + "".join(
    f"""\
  {team}:
    models: ["*"]
    inputs: [text, image, audio]
    reasoning: true
{extra}"""
    for team, extra in (
        ("default", ""),
        ("team-a", ""),
        ("risk", ""),
        ("ops", ""),
        ("audit", ""),
        ("claims", "    capture: encrypted\n"),
        ("hr", "    capture: none\n"),
    )
)


def write_config(
    directory: Path,
    *,
    port: int,
    database_url: str,
    engines: list[EngineRef],
    gateway: dict[str, Any] | None = None,
    database: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
    policy: str = OPEN_POLICY,
    policy_settings: dict[str, Any] | None = None,
    extra_toml: str = "",
    engine_python: str = "",
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(policy)
    secrets_dir = directory / "state" / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    if not (secrets_dir / "audit-signing.key").exists():
        manifest.create_signing_key(secrets_dir / "audit-signing.key")
    if not (secrets_dir / "audit-keyring.json").exists():
        rotate_keyring(secrets_dir / "audit-keyring.json")
    lines = [f"engine_python = {toml_value(engine_python)}"]
    for key_id, public_key in sorted({e.publisher for e in engines if e.publisher}):
        lines += ["", "[[publishers]]", f"key_id = {toml_value(key_id)}", f"public_key = {toml_value(public_key)}"]
    lines += ["", "[gateway]", f"port = {port}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (gateway or {}).items()]
    lines += ["", "[database]", f"url = {toml_value(database_url)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (database or {}).items()]
    lines += ["", "[audit]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (audit or {}).items() if not isinstance(v, dict)]
    for k, v in (audit or {}).items():
        if isinstance(v, dict):
            lines += ["", f"[audit.{k}]"] + [f"{toml_value(kk)} = {toml_value(vv)}" for kk, vv in v.items()]
    settings = dict(policy_settings or {})
    rate_limits = settings.pop("rate_limits", {})
    lines += ["", "[policy]"] + [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    lines += ["", "[policy.rate_limits]"] + [f"{k} = {toml_value(v)}" for k, v in rate_limits.items()]
    for e in engines:
        key_file = secrets_dir / f"engine-{e.name}.key"
        key_file.write_text(e.key)
        lines += ["", "[[deployments]]", f"name = {toml_value(e.name)}", f"engine_url = {toml_value(e.url)}"]
        lines += [f"manifest = {toml_value(e.manifest)}"] if e.manifest else ["verify = false"]
        if e.model_dir:
            lines += [f"model_dir = {toml_value(e.model_dir)}", "[deployments.engine]", "max_model_len = 512"]
    path = directory / "bastion.toml"
    # Tables that come after every other (e.g. [[auth.oidc]] with its sub-tables).
    path.write_text("\n".join(lines) + "\n" + extra_toml)
    return path


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process started in a session of its own, with its whole group:
    SIGTERM, then SIGKILL if it is still there after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass
class Gateway:
    """A gateway process started with `bastion serve`, and ways to look at it."""

    config: Path
    port: int
    database_url: str
    proc: subprocess.Popen[bytes] | None = None
    # With TLS: the certificate file clients must trust.
    tls_cert: str | None = None
    # With mutual TLS: (certificate, key) files this helper presents.
    client_cert: tuple[str, str] | None = None
    # Environment variables added to the gateway process's own.
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.config.parent / "gateway.log"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://127.0.0.1:{self.port}"

    def log_events(self) -> list[dict[str, Any]]:
        """The gateway's JSON log lines so far, parsed."""
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]

    @property
    def verify(self) -> ssl.SSLContext | bool:
        if not self.tls_cert:
            return True
        context = ssl.create_default_context(cafile=self.tls_cert)
        if self.client_cert:
            context.load_cert_chain(*self.client_cert)
        return context

    def start(self, timeout: float = 30) -> Gateway:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [BASTION, "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1, verify=self.verify).status_code == 200:
                    return self.wait_verified(deadline)
            time.sleep(0.1)
        raise AssertionError(f"gateway not up after {timeout}s:\n{self.log_path.read_text()}")

    def readiness(self, until: Callable[[dict[str, Any]], bool], timeout: float = 10) -> httpx.Response:
        """/readyz once its checks satisfy `until`: its probes of the engines and
        stores may be up to a second old (gateway/readiness.py)."""
        deadline = time.monotonic() + timeout
        while True:
            r = httpx.get(self.url + "/readyz", timeout=10, verify=self.verify)
            if until(r.json()["checks"]) or time.monotonic() > deadline:
                return r
            time.sleep(0.1)

    def model_states(self) -> dict[str, dict[str, Any]]:
        return httpx.get(self.url + "/readyz", timeout=10, verify=self.verify).json()["checks"]["models"]

    def wait_verified(self, deadline: float) -> Gateway:
        """Wait until boot verification has settled (no model pending)."""
        while time.monotonic() < deadline:
            if all(m["status"] != "pending" for m in self.model_states().values()):
                return self
            time.sleep(0.1)
        raise AssertionError(f"models still pending: {self.model_states()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def create_key(self, *extra: str, name: str = "test", role: str = "user", team: str = "team-a") -> str:
        out = bastion(
            "keys",
            "create",
            "--config",
            str(self.config),
            "--name",
            name,
            "--role",
            role,
            "--team",
            team,
            "--json",
            *extra,
        )
        return str(json.loads(out.stdout)["key"])

    def expired_key(self, *extra: str, **kwargs: str) -> str:
        """A key past its expiry. `keys create` refuses an expiry in the past, so
        it is made to expire in a moment and that moment is waited out."""
        key = self.create_key("--expires-in", "2s", *extra, **kwargs)
        time.sleep(2.1)
        return key

    def client(self, key: str, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("base_url", self.url + "/v1")
        return openai.OpenAI(api_key=key, max_retries=0, **kwargs)

    def post(self, path: str, *, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.post(self.url + path, headers=headers, timeout=30, verify=self.verify, **kwargs)

    def get(self, path: str, *, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.get(self.url + path, headers=headers, timeout=60, verify=self.verify, **kwargs)

    def bastion(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a `bastion` command against this gateway's config."""
        return bastion(*args, "--config", str(self.config), check=check)

    def records(self, request_id: str | None = None) -> list[dict[str, Any]]:
        return fetch_records(self.database_url, request_id)

    def final(self, request_id: str) -> dict[str, Any]:
        """The final record of a call (waiting briefly for a stream's to land)."""
        deadline = time.monotonic() + 10
        while True:
            finals = [r for r in self.records(request_id) if r["phase"] == "final"]
            if finals or time.monotonic() > deadline:
                assert len(finals) == 1, f"expected one final record for {request_id}, got {finals}"
                return finals[0]
            time.sleep(0.05)


def fetch_records(database_url: str, request_id: str | None = None) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        engine = create_engine(database_url)
        try:
            query = select(audit_records).order_by(audit_records.c.id)
            if request_id is not None:
                query = query.where(audit_records.c.request_id == request_id)
            async with engine.connect() as conn:
                return [dict(r._mapping) for r in (await conn.execute(query)).all()]
        finally:
            await engine.dispose()

    return asyncio.run(go())


def exchange(
    port: int, *parts: bytes, on_open: Callable[[socket.socket], None] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send `parts` (or let `on_open` send) on a fresh connection; read until the gateway closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        try:
            for part in parts:
                conn.sendall(part)
        except OSError:
            pass  # the gateway answered and closed while we were still sending
        if on_open is not None:
            on_open(conn)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


class SocketDouble:
    """A real TCP listener standing in for a faulty engine.

    mode "hang": accept, read, never answer (an engine too slow to answer).
    mode "break": answer 200 with one SSE event, then drop the connection.
    mode "close": read the request, then close without a word.
    mode "gated": answer 200 with one SSE event, wait until `gate` is set, then
    end the stream with `data: [DONE]` as vLLM does.
    mode "flood": answer 200 and stream 16 KB events without end (a runaway
    engine), until the gateway drops the connection.
    mode "garbled": answer 200 with what vLLM never sends: a stream's usage
    event cut off mid-JSON, or (not streamed) a body with reasoning whose
    `choices` is not a list.
    mode "fails": answer 200 with one SSE event, then what vLLM sends when
    generation fails after that: an `error` event, then `data: [DONE]`.
    mode "usage": answer 200, streamed or not, with a well-formed completion
    whose `usage` is `self.usage` (say, counts no engine could have: negative,
    or past what an SQL integer holds).
    It records request lines, so a test can prove no call reached the engine.
    """

    def __init__(self, mode: str = "hang"):
        self.mode = mode
        self.usage = b'{"prompt_tokens":1,"completion_tokens":1}'
        self.gate = threading.Event()
        self.request_lines: list[bytes] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            head = conn.recv(65536)
            self.request_lines.append(head.split(b"\r\n", 1)[0])
            if self.mode == "close":
                conn.close()
            elif self.mode == "flood":
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                content = b"a" * 16384
                event = _chunk(b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"' + content + b'"}}]}\n\n')
                conn.settimeout(60)
                while not self._stop.is_set():
                    conn.sendall(event)
            elif self.mode == "garbled":
                if b'"stream": true' in head or b'"stream":true' in head:
                    conn.sendall(
                        _whole_stream(
                            b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":\n\n', b"data: [DONE]\n\n"
                        )
                    )
                else:
                    conn.sendall(_whole_json(b'{"id":"x","choices":"none","reasoning_content":"thought"}'))
                conn.close()
            elif self.mode == "usage":
                streamed = b'"stream": true' in head or b'"stream":true' in head
                completion = (
                    b'{"id":"x","object":"chat.completion","choices":'
                    b'[{"index":0,"message":{"role":"assistant","content":"a"},"finish_reason":"stop"}],'
                    b'"usage":' + self.usage + b"}"
                )
                if streamed:
                    events = (
                        b'data: {"id":"x","object":"chat.completion.chunk","choices":'
                        b'[{"index":0,"delta":{"content":"a"}}]}\n\n'
                        b'data: {"id":"x","object":"chat.completion.chunk","choices":[],"usage":'
                        + self.usage
                        + b"}\n\ndata: [DONE]\n\n"
                    )
                    conn.sendall(_whole_stream(events))
                else:
                    conn.sendall(_whole_json(completion))
                conn.close()
            elif self.mode == "fails":
                events = (
                    b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}'
                    b'\n\ndata: {"error": {"message": "Internal server error", "type": "InternalServerError", '
                    b'"param": null, "code": 500}}\n\ndata: [DONE]\n\n'
                )
                conn.sendall(_whole_stream(events))
                conn.close()
            elif self.mode in ("break", "gated"):
                event = (
                    b'data: {"id":"x","object":"chat.completion.chunk",'
                    b'"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
                )
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                    + _chunk(event)
                )
                if self.mode == "gated":
                    self.gate.wait(30)
                    conn.sendall(_chunk(b"data: [DONE]\n\n") + _chunk(b""))
                    conn.recv(1)  # until the gateway lets the connection go
                else:
                    time.sleep(0.2)
                conn.close()
        except OSError:
            pass

    @property
    def calls(self) -> int:
        """Model calls received (health probes from /readyz do not count)."""
        return sum(1 for line in self.request_lines if line.startswith(b"POST /v1/"))

    def close(self) -> None:
        self._stop.set()
        self.gate.set()
        self._sock.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.close()


def at_once(processes: int, work: Callable[[], Any]) -> list[Any]:
    """`work()` in forked processes released together: what each returned, or the repr of what it raised."""
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(processes), ctx.Queue()

    def released() -> None:
        barrier.wait()
        try:
            out.put(work())
        except Exception as exc:  # reported to the test, which names it
            out.put(repr(exc))

    procs = [ctx.Process(target=released) for _ in range(processes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return results


def _chunk(data: bytes) -> bytes:
    """One piece of an HTTP/1.1 chunked body (an empty one ends the body)."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _whole_stream(*pieces: bytes) -> bytes:
    """A 200 event stream, each piece one chunk of it, ended; the connection closes after it."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    return head + b"".join(_chunk(piece) for piece in pieces) + _chunk(b"")


def _whole_json(body: bytes) -> bytes:
    """A 200 JSON answer; the connection closes after it."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return head + b"content-length: %d\r\n\r\n%s" % (len(body), body)


class TcpProxy:
    """Forwards a loopback port to another; `cut()` closes it so connections are refused."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._open: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would
        # leave the kernel accepting connections that nobody serves.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for s in self._open:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files in `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bastion-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path
