"""The `bastion` CLI: init, keys, db upgrade, exit codes, and `up` with a real engine."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from engine import manifest
from gateway.cli import demo_engine_url
from gateway.settings import load_settings
from tests.conftest import GatewayFactory
from tests.support import BASTION, EngineRef, bastion, engine_client, fetch_records, free_port, write_config


def test_init_writes_config_state_and_secrets(tmp_path: Path) -> None:
    result = bastion("init", "--dir", str(tmp_path / "site"))
    assert "database migrated" in result.stdout
    config = tmp_path / "site" / "bastion.toml"
    assert config.exists()
    pepper = tmp_path / "site" / "state" / "secrets" / "api-key-pepper"
    assert pepper.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "site" / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "site" / "state" / "bastion.db").exists()
    # A starter policy that passes its own check and allows only team `default`.
    policy_file = tmp_path / "site" / "policy.yaml"
    checked = json.loads(bastion("policy", "check", str(policy_file), "--json").stdout)
    assert checked["valid"] and checked["teams"] == ["default"]
    policy_file.write_text(policy_file.read_text().replace("max_tokens: 1024", "max_tokens: lots"))
    bad = bastion("policy", "check", str(policy_file), check=False)
    assert bad.returncode == 1 and "policy.yaml:13: teams.default.max_tokens: Expected int, got str" in bad.stderr
    # Running it again keeps what is there.
    before = pepper.read_bytes()
    bastion("init", "--dir", str(tmp_path / "site"))
    assert pepper.read_bytes() == before
    # db upgrade is idempotent and uses BASTION_CONFIG when --config is absent.
    env = {**os.environ, "BASTION_CONFIG": str(config)}
    assert subprocess.run([BASTION, "db", "upgrade"], env=env, capture_output=True).returncode == 0


def test_keys_create_list_revoke_with_json(tmp_path: Path) -> None:
    bastion("init", "--dir", str(tmp_path))
    cfg = ["--config", str(tmp_path / "bastion.toml")]
    created = json.loads(bastion("keys", "create", *cfg, "--name", "svc", "--role", "admin", "--team", "ops",
                                 "--expires-in", "30d", "--json").stdout)  # fmt: skip
    assert created["key"].startswith(f"bst_{created['key_id']}_")
    listed = json.loads(bastion("keys", "list", *cfg, "--json").stdout)
    assert [(k["key_id"], k["role"], k["team"]) for k in listed] == [(created["key_id"], "admin", "ops")]
    assert "key" not in listed[0] and "secret_hash" not in listed[0]
    assert listed[0]["expires_at"] is not None
    # An option given twice: click kept the last, so this made an admin key.
    twice = bastion("keys", "create", *cfg, "--name", "x", "--role", "user", "--role", "admin", check=False)
    assert twice.returncode == 2 and "--role is given more than once" in twice.stderr, twice
    assert len(json.loads(bastion("keys", "list", *cfg, "--json").stdout)) == 1
    bastion("keys", "revoke", *cfg, created["key_id"])
    assert json.loads(bastion("keys", "list", *cfg, "--json").stdout)[0]["revoked_at"] is not None
    # Revoking again, or an unknown id: the thing checked failed → 1.
    assert bastion("keys", "revoke", *cfg, created["key_id"], check=False).returncode == 1


@pytest.mark.parametrize(
    ("args", "content"),
    [
        (["keys", "list"], None),  # no config file
        (["keys", "list"], "[gateway]\nport = 'eighty'\n"),  # wrong type
        (["keys", "list"], "[gateway]\nbogus = 1\n"),  # unknown field
        (["keys", "list"], "[gateway]\nbody_timeout_seconds = 0\n"),  # out of range
        (["keys", "list"], "[gateway]\nkeepalive_timeout_seconds = -1\n"),
        (["keys", "list"], "[gateway]\nmax_connections_per_client = 0\n"),
        (["keys", "list"], "[gateway]\nengine_max_answer_bytes = 0\n"),
        (["keys", "list"], '[[deployments]]\nname = "m"\nengine_url = "unix:engine.sock"\n'),  # not absolute
        (["keys", "list"], f'[[deployments]]\nname = "m"\nengine_url = "unix:/{"a" * 120}.sock"\n'),  # too long
        (["keys", "list"], '[[deployments]]\nname = "m"\nengine_url = "ftp://127.0.0.1:21"\n'),
        (["keys", "list"], "not toml at all ="),
        (["keys", "create", "--role", "root", "--name", "x"], ""),  # bad choice
        (["keys", "create", "--name", "x", "--expires-in", "soon"], ""),
        (["keys", "create", "--name", "x", "--expires-in", "99999999999d"], ""),  # was a traceback
        (["keys", "create", "--name", "x", "--expires-at", "9999-12-31T23:59:59-05:00"], ""),  # year 10000 in UTC
        # A key that would be refused from its first call (was created).
        (["keys", "create", "--name", "x", "--expires-at", "2020-01-01T00:00:00Z"], ""),
        (["keys", "create", "--name", "x", "--expires-in", "0s"], ""),
        # Names and teams the trail would cut, or a terminal would obey.
        (["keys", "create", "--name", "x" * 201], ""),
        (["keys", "create", "--name", "x", "--team", "t" * 201], ""),
        (["keys", "create", "--name", "x", "--team", "risk\x1b[8m"], ""),
        (["keys", "create", "--name", "invoice\u202egpj.exe"], ""),
        (["no-such-command"], ""),
        (["keys", "list", "--config", "/nonexistent/bastion.toml"], ""),  # --config twice (the test adds one)
        (["keys", "create", "--name", "x", "--team", "risk", "--team", "ops"], ""),  # a key for one of the two
    ],
)
def test_usage_and_config_errors_exit_2(tmp_path: Path, args: list[str], content: str | None) -> None:
    config = tmp_path / "bastion.toml"
    if content is not None:
        config.write_text(content)
    result = subprocess.run([BASTION, *args, "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr


def test_serve_without_engine_key_file_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text('[[deployments]]\nname = "m"\nengine_url = "http://127.0.0.1:9"\nverify = false\n')
    result = subprocess.run([BASTION, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "engine key file" in result.stderr


def test_serve_refuses_a_database_behind_the_code(tmp_path: Path) -> None:
    from gateway import migrate

    config = tmp_path / "bastion.toml"
    config.write_text('[[deployments]]\nname = "m"\nengine_url = "http://127.0.0.1:9"\nverify = false\n')
    (tmp_path / "state" / "secrets").mkdir(parents=True)
    (tmp_path / "state" / "secrets" / "engine-m.key").write_text("k")
    migrate.upgrade(f"sqlite+aiosqlite:///{tmp_path / 'state' / 'bastion.db'}", "0001")
    serve = [BASTION, "serve", "--config", str(config)]
    result = subprocess.run(serve, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "audit signing key" in result.stderr and "bastion init" in result.stderr
    manifest.create_signing_key(tmp_path / "state" / "secrets" / "audit-signing.key")
    result = subprocess.run(serve, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "policy.yaml: the policy file does not exist" in result.stderr
    (tmp_path / "policy.yaml").write_text("version: 1\nteams: {}\n")
    result = subprocess.run(serve, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "revision 0001" in result.stderr and "bastion db upgrade" in result.stderr


def test_the_readme_configuration_example_loads(tmp_path: Path) -> None:
    """The reference in README.md stays true to the settings code."""
    from gateway.settings import load_settings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Configuration") :]
    start = section.index("```toml") + len("```toml")
    (tmp_path / "bastion.toml").write_text(section[start : section.index("```", start)])
    settings = load_settings(tmp_path / "bastion.toml")
    assert settings.auth.oidc[0].audience == "bastion" and settings.policy.rate_limits.backend == "memory"


def test_config_error_names_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text("[gateway]\nport = 'eighty'\n")
    result = subprocess.run([BASTION, "keys", "list", "--config", str(config)], capture_output=True, text=True)
    assert "$.gateway.port" in result.stderr


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_migrations_match_the_table_definitions(tmp_path: Path, db: str, request: pytest.FixtureRequest) -> None:
    """tables.py describes exactly what the migrations create, on both databases."""
    import asyncio

    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from gateway import migrate
    from gateway.db import create_engine
    from gateway.tables import metadata

    url = (
        request.getfixturevalue("fresh_pg_url") if db == "postgres" else f"sqlite+aiosqlite:///{tmp_path / 'schema.db'}"
    )
    migrate.upgrade(url)

    async def diff() -> list[object]:
        engine = create_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), metadata))
        finally:
            await engine.dispose()

    assert asyncio.run(diff()) == []


@pytest.mark.engine
@pytest.mark.parametrize(
    ("stop_signal", "transport"), [(signal.SIGINT, "tcp"), (signal.SIGTERM, "unix")], ids=["ctrl-c", "sigterm"]
)
def test_up_starts_engine_and_gateway_and_stops_both_on_a_signal(
    tmp_path: Path,
    engine_python: str,
    tiny_model: Path,
    tiny_manifest: tuple[Path, tuple[str, str]],
    stop_signal: signal.Signals,
    transport: str,
) -> None:
    """Also: the engine listens on loopback TCP, or on a Unix socket in a folder
    of the owner's alone (engine/address.py), and refuses a call without its key."""
    port = free_port()
    socket_file = tmp_path / "run" / "engine.sock"
    url = f"http://127.0.0.1:{free_port()}" if transport == "tcp" else f"unix:{socket_file}"
    engine = EngineRef("tiny", url, "engine-secret-key", model_dir=str(tiny_model),
                       manifest=str(tiny_manifest[0]), publisher=tiny_manifest[1])  # fmt: skip
    config = write_config(tmp_path, port=port, database_url="sqlite+aiosqlite:///state/bastion.db",
                          engines=[engine], engine_python=engine_python)  # fmt: skip
    bastion("db", "upgrade", "--config", str(config))
    key = json.loads(bastion("keys", "create", "--config", str(config), "--name", "u", "--json").stdout)["key"]
    proc = subprocess.Popen([BASTION, "up", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("bastion up did not become ready")
        # The engine refuses anyone without its key, and listens on loopback only
        # (or on a socket only its owner may reach).
        with engine_client(engine.url) as direct:
            assert direct.get("/v1/models").status_code == 401
        if transport == "unix":
            assert stat.S_ISSOCK(socket_file.stat().st_mode)
            assert socket_file.stat().st_mode & 0o077 == 0 and socket_file.parent.stat().st_mode & 0o077 == 0
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                             "ignore_eos": True},  # the random model may end early, now and then
                       timeout=60)  # fmt: skip
        assert r.status_code == 200
        assert r.json()["usage"]["completion_tokens"] == 3
        engine_pids = _children(proc.pid)
        assert engine_pids, "no engine process under `bastion up`"
        # SIGINT is what Ctrl-C in a terminal sends; SIGTERM what docker stop, systemd and kill send.
        os.killpg(proc.pid, stop_signal)
        assert proc.wait(60) == 0
        time.sleep(1)
        assert not [p for p in engine_pids if Path(f"/proc/{p}").exists()], "engine outlived `bastion up`"
        # vLLM's own workers ran in the engine's process group; none may be left.
        for pgid in engine_pids:
            assert subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True).stdout == b""
        with pytest.raises(httpx.HTTPError), engine_client(engine.url) as direct:
            direct.get("/health", timeout=2)
        assert not socket_file.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    db = tmp_path / "state" / "bastion.db"
    finals = [r for r in fetch_records(f"sqlite+aiosqlite:///{db}") if r["phase"] == "final"]
    assert finals and finals[0]["manifest_sha256"] == events_digest(tiny_manifest[0])
    assert [r["http_status"] for r in finals] == [200]
    # The progress output names the engine and says it became healthy.
    output = proc.stdout.read() if proc.stdout else b""
    assert b"model tiny: verified" in output and b"engine tiny: healthy" in output
    # The gateway reused up's verification: one boot event, no second hashing pass.
    events = [r for r in fetch_records(f"sqlite+aiosqlite:///{db}") if r["route"] == "model.verify"]
    assert [(e["model"], e["outcome"]) for e in events] == [("tiny", "ok")]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def events_digest(manifest_path: Path) -> str:
    import hashlib

    return hashlib.sha256(manifest_path.read_bytes()).hexdigest()


def test_up_starts_no_engine_for_a_tampered_model(
    tmp_path: Path, engine_python: str, tiny_model: Path, tiny_manifest: tuple[Path, tuple[str, str]]
) -> None:
    import shutil

    folder = tmp_path / "tiny-copy"
    shutil.copytree(tiny_model, folder)
    (folder / "config.json").write_text((folder / "config.json").read_text().replace("128", "129"))
    engine = EngineRef("tiny", f"http://127.0.0.1:{free_port()}", "k", model_dir=str(folder),
                       manifest=str(tiny_manifest[0]), publisher=tiny_manifest[1])  # fmt: skip
    config = write_config(tmp_path, port=free_port(), database_url="sqlite+aiosqlite:///state/bastion.db",
                          engines=[engine], engine_python=engine_python)  # fmt: skip
    bastion("db", "upgrade", "--config", str(config))
    result = subprocess.run([BASTION, "up", "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "model tiny: FAILED verification" in result.stderr and "config.json" in result.stderr
    assert "engine tiny: starting" not in result.stderr


def test_the_demo_engine_gets_a_port_only_when_asked_or_when_a_socket_path_would_be_too_long(tmp_path: Path) -> None:
    short, long = tmp_path / "s", tmp_path / ("x" * 100)
    for folder in (short, long):
        bastion("init", "--dir", str(folder))
    url = lambda folder, port=None: demo_engine_url(load_settings(folder / "bastion.toml"), port)  # noqa: E731
    assert url(short) == f"unix:{short / 'state' / 'run' / 'engine.sock'}"
    assert url(short, 9000) == "http://127.0.0.1:9000"
    assert url(long) == "http://127.0.0.1:8100"


@pytest.mark.engine
def test_demo_model_is_converted_signed_and_verifies(tmp_path: Path, engine_python: str) -> None:
    bastion("init", "--dir", str(tmp_path), "--engine-python", engine_python)
    config = tmp_path / "bastion.toml"
    bastion("demo-model", "--config", str(config), timeout=600)
    model = tmp_path / "state" / "models" / "SmolLM2-135M-Instruct"
    assert json.loads((model / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (model / "model.safetensors").stat().st_size > 200_000_000
    text = config.read_text()
    assert "[[publishers]]" in text and 'name = "smollm2"' in text and "manifest = " in text
    # The demo engine gets no port: a socket in the state folder, this user's alone.
    assert f'engine_url = "unix:{tmp_path / "state" / "run" / "engine.sock"}"' in text
    manifest_file = tmp_path / "state" / "manifests" / "smollm2.manifest.json"
    # Verified with the keys the config trusts, as the gateway and `up` will.
    result = bastion("manifest", "verify", str(model), "--manifest", str(manifest_file), "--model", "smollm2",
                     "--config", str(config), "--json")  # fmt: skip
    assert json.loads(result.stdout)["ok"] is True
    # Running it again changes nothing.
    bastion("demo-model", "--config", str(config))
    assert config.read_text() == text


def test_serve_on_an_address_in_use_exits_1_and_says_why(make_gateway: GatewayFactory) -> None:
    # uvicorn's own binding ended the process with SystemExit before our
    # message (and, under `up`, another exit code than a gateway that fails).
    gw = make_gateway(engines=[EngineRef("m", f"http://127.0.0.1:{free_port()}", "k")], start=False)
    with socket.create_server(("127.0.0.1", gw.port)):
        result = subprocess.run(
            [BASTION, "serve", "--config", str(gw.config)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1, result.stderr
    assert "address already in use" in result.stderr.lower() and "did not start" in result.stderr
