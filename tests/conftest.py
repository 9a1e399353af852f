"""Session-wide real parts: a vLLM CPU engine serving a tiny model built on
the spot (and, for the audio tests only, a second one serving a tiny audio
model), and a fresh PostgreSQL database on 127.0.0.1:5432."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from engine import manifest
from engine.local import LocalEngine, LocalEngineConfig
from engine.spec import EngineSpec
from gateway import migrate
from gateway.db import create_engine
from tests.support import EngineRef, Gateway, SocketDouble, free_port, write_config

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("BASTION_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def engine_python() -> str:
    python = os.environ.get("BASTION_ENGINE_PYTHON") or str(ROOT / ".venv-engine" / "bin" / "python")
    if not Path(python).exists():
        pytest.fail(f"engine Python {python} not found: run `make setup` (or set BASTION_ENGINE_PYTHON)")
    return python


@pytest.fixture(scope="session")
def tiny_model(engine_python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run([engine_python, str(ROOT / "engine" / "build_tiny.py"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_manifest(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[str, str]]:
    """The tiny model's manifest, signed by a publisher key made for the session."""
    folder = tmp_path_factory.mktemp("publisher")
    key_id = manifest.create_signing_key(folder / "publisher.key")
    path = folder / "tiny.manifest.json"
    made = manifest.create_manifest(tiny_model, name="tiny", version="1")
    manifest.write_signed(made, path, manifest.load_private_key(folder / "publisher.key"))
    return path, (key_id, str(folder / "publisher.key.pub"))


def _serve(
    ref: EngineRef, python: str, model: Path, spec: EngineSpec, logs: pytest.TempPathFactory
) -> Iterator[EngineRef]:
    """Run one real vLLM engine through Bastion's own local runner for the session."""
    engine = LocalEngine(
        LocalEngineConfig(
            name=ref.name,
            python=python,
            model_dir=model,
            url=ref.url,
            api_key=ref.key,
            spec=spec,
            log_file=logs.mktemp("engine-logs") / f"engine-{ref.name}.log",
        )
    )
    engine.start()
    try:
        engine.wait_healthy(timeout=600)
        yield ref
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def vllm_engine(
    engine_python: str,
    tiny_model: Path,
    tiny_manifest: tuple[Path, tuple[str, str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EngineRef]:
    """The session's text engine: the tiny chat model with vLLM's reasoning parser."""
    ref = EngineRef(
        name="tiny",
        url=f"http://127.0.0.1:{free_port()}",
        key=secrets.token_urlsafe(24),
        model_dir=str(tiny_model),
        manifest=str(tiny_manifest[0]),
        publisher=tiny_manifest[1],
    )
    # The reasoning parser splits <think>...</think> into `reasoning`; the random
    # model seldom closes its thinking, and tests/test_reasoning.py forbids it to.
    spec = EngineSpec(max_model_len=512, dtype="bfloat16", reasoning_parser="deepseek_r1")
    yield from _serve(ref, engine_python, tiny_model, spec, tmp_path_factory)


@pytest.fixture(scope="session")
def audio_engine(engine_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineRef]:
    """The session's audio engine: a tiny random Qwen2-Audio (engine/build_tiny_audio.py), on a Unix socket."""
    model = tmp_path_factory.mktemp("models") / "tiny-audio"
    build = [engine_python, str(ROOT / "engine" / "build_tiny_audio.py"), str(model)]
    subprocess.run(build, check=True, capture_output=True)
    # This engine listens on a Unix socket (engine/address.py), so the session
    # serves real calls over both of the gateway's transports.
    socket_file = tmp_path_factory.mktemp("sockets") / "run" / "audio.sock"
    ref = EngineRef(name="tiny-audio", url=f"unix:{socket_file}", key=secrets.token_urlsafe(24), model_dir=str(model))
    spec = EngineSpec(max_model_len=2048, dtype="bfloat16", limit_mm_per_prompt={"audio": 1})
    yield from _serve(ref, engine_python, model, spec, tmp_path_factory)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped afterwards."""
    name = f"bastion_test_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        engine = create_engine(PG_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                await conn.execute(text(sql))
        finally:
            await engine.dispose()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def tripwire() -> Iterator[SocketDouble]:
    """An "engine" that accepts calls and never answers, and records each one."""
    double = SocketDouble("hang")
    yield double
    double.close()


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways for one test: `make_gateway(engines=[...], database_url=..., gateway={...})`."""
    started: list[Gateway] = []
    count = 0

    def factory(
        *,
        engines: list[EngineRef],
        database_url: str | None = None,
        gateway: dict[str, object] | None = None,
        database: dict[str, object] | None = None,
        audit: dict[str, object] | None = None,
        policy: str | None = None,
        policy_settings: dict[str, object] | None = None,
        extra_toml: str = "",
        start: bool = True,
    ) -> Gateway:
        nonlocal count
        count += 1
        directory = tmp_path / f"gw{count}"
        db_url = database_url or f"sqlite+aiosqlite:///{directory / 'state' / 'bastion.db'}"
        port = free_port()
        config = write_config(
            directory,
            port=port,
            database_url=db_url,
            engines=engines,
            gateway=gateway,
            database=database,
            audit=audit,
            policy_settings=policy_settings,
            extra_toml=extra_toml,
            **({"policy": policy} if policy is not None else {}),
        )
        migrate.upgrade(db_url)
        tls_cert = (gateway or {}).get("tls_cert")
        gw = Gateway(config=config, port=port, database_url=db_url, tls_cert=str(tls_cert) if tls_cert else None)
        started.append(gw)
        return gw.start() if start else gw

    yield factory
    for gw in started:
        gw.stop()


@pytest.fixture
def fresh_pg_url(pg_url: str) -> Iterator[str]:
    """The session's PostgreSQL database with its tables emptied for this test."""
    migrate.upgrade(pg_url)

    async def truncate() -> None:
        engine = create_engine(pg_url)
        try:
            async with engine.begin() as conn:
                tables = "audit_records, audit_checkpoints, audit_payloads, api_keys, gateway_heartbeat"
                await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY"))
        finally:
            await engine.dispose()

    asyncio.run(truncate())
    yield pg_url
