"""`bastion compose prepare` and the engine's container arguments, without a Docker engine.

The stack itself is tested on a real Docker engine in tests/test_docker.py.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from engine.container import (
    ENGINE_UID,
    GATEWAY_UID,
    POSTGRES_UID,
    ContainerEngineConfig,
    engine_command,
    run_kwargs,
)
from engine.spec import EngineSpec
from gateway.compose import ENGINE_URL
from gateway.settings import load_settings
from tests.support import bastion

DEPLOYMENT = """
[[deployments]]
name = "big"
engine_url = "{engine_url}"
model_dir = "models/big"
verify = false

[deployments.engine]
tensor_parallel_size = 2
dtype = "bfloat16"
max_model_len = 8192
limit_mm_per_prompt = {{image = 4}}
"""


def compose_dir(tmp_path: Path, engine_url: str = ENGINE_URL) -> Path:
    base = tmp_path / "deploy"
    bastion("init", "--dir", str(base), "--compose")
    model = base / "models" / "big"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    with open(base / "bastion.toml", "a") as f:
        f.write(DEPLOYMENT.format(engine_url=engine_url))
    return base


def prepare(base: Path, *flags: str, check: bool = True):  # noqa: ANN201
    return bastion("compose", "prepare", "--config", str(base / "bastion.toml"), *flags, check=check)


def test_prepare_renders_the_engine_spec_and_its_gpus(tmp_path: Path) -> None:
    base = compose_dir(tmp_path)
    prepare(base)
    doc = yaml.safe_load((base / "compose.deploy.yaml").read_text())
    engine = doc["services"]["engine"]
    model = str((base / "models" / "big").resolve())
    assert engine["command"] == engine_command(EngineSpec(tensor_parallel_size=2, dtype="bfloat16",
                                                          max_model_len=8192, limit_mm_per_prompt={"image": 4}),
                                               "big", Path(model))  # fmt: skip
    command = engine["command"]
    assert command[command.index("--tensor-parallel-size") + 1] == "2"
    assert command[command.index("--uds") + 1] == "/run/bastion-engine/engine.sock"
    assert "--host" not in command and "--port" not in command
    (device,) = engine["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 2, "capabilities": ["gpu"]}
    assert engine["volumes"] == [f"{model}:{model}:ro"]
    assert engine["environment"]["HF_HUB_OFFLINE"] == "1"
    assert engine["environment"]["NCCL_SOCKET_IFNAME"] == "lo"  # the loopback is all it has
    gateway = doc["services"]["gateway"]
    assert f"{base.resolve()}:{base.resolve()}:ro" in gateway["volumes"]
    anchor = str((base / "state" / "anchor").resolve())
    assert f"{anchor}:{anchor}:rw" in gateway["volumes"]


def test_prepare_cpu_asks_for_no_gpu(tmp_path: Path) -> None:
    base = compose_dir(tmp_path)
    prepare(base, "--cpu")
    engine = yaml.safe_load((base / "compose.deploy.yaml").read_text())["services"]["engine"]
    assert "deploy" not in engine


@pytest.mark.skipif(os.geteuid() != 0, reason="prepare hands files to container users (chown)")
def test_prepare_hands_each_secret_to_one_container_user(tmp_path: Path) -> None:
    base = compose_dir(tmp_path)
    prepare(base, "--cpu")
    state = base / "state"
    handed = state / "compose"
    assert stat.S_IMODE(handed.stat().st_mode) == 0o700 and handed.stat().st_uid == 0

    def owner_mode(p: Path) -> tuple[int, int]:
        return p.stat().st_uid, stat.S_IMODE(p.stat().st_mode)

    assert owner_mode(handed / "engine.key") == (ENGINE_UID, 0o400)
    assert owner_mode(handed / "postgres-password") == (POSTGRES_UID, 0o400)
    assert (handed / "engine.key").read_text() == (state / "secrets" / "engine-big.key").read_text()
    assert (handed / "postgres-password").read_text() == (state / "secrets" / "postgres-password").read_text()
    for secret in (state / "secrets").iterdir():
        assert owner_mode(secret)[0] == GATEWAY_UID, secret
    assert (base / "bastion.toml").stat().st_uid == GATEWAY_UID
    # The database URL carries no password; the gateway reads it from its file.
    settings = load_settings(base / "bastion.toml")
    password = (state / "secrets" / "postgres-password").read_text().strip()
    assert password not in settings.database.url
    assert f"bastion:{password}@postgres" in settings.database_url()
    # Preparing again (after a spec change) keeps the secrets.
    before = (handed / "engine.key").read_text()
    prepare(base, "--cpu")
    assert (handed / "engine.key").read_text() == before


OUTSIDE_TLS = '[gateway]\ntls_cert = "/etc/ssl/bastion.pem"\ntls_key = "/etc/ssl/bastion.key"\n'


@pytest.mark.parametrize(
    "engine_url, extra, text",
    [
        # The engine has no network: a TCP address cannot reach it.
        ("http://engine:8000", "", "engine_url must be 'unix:/run/bastion-engine/engine.sock'"),
        # A file the gateway reads from outside the folder it mounts would be missing in its container.
        (ENGINE_URL, OUTSIDE_TLS, "gateway.tls_cert (/etc/ssl/bastion.pem) must be inside"),
    ],
)
def test_prepare_refuses_a_config_not_made_for_compose(tmp_path: Path, engine_url: str, extra: str, text: str) -> None:
    base = compose_dir(tmp_path, engine_url)
    if extra:
        toml = base / "bastion.toml"
        toml.write_text(toml.read_text().replace("[gateway]\n", extra, 1))
    refused = prepare(base, check=False)
    assert refused.returncode == 2
    assert text in refused.stderr
    assert not (base / "compose.deploy.yaml").exists()


def test_prepare_refuses_sqlite_and_an_unreadable_model(tmp_path: Path) -> None:
    base = compose_dir(tmp_path)
    toml = base / "bastion.toml"
    toml.write_text(
        toml.read_text().replace(
            '"postgresql+asyncpg://bastion@postgres:5432/bastion"', '"sqlite+aiosqlite:///state/b.db"'
        )
    )
    refused = prepare(base, check=False)
    assert refused.returncode == 2 and "database.url must be PostgreSQL" in refused.stderr

    base = compose_dir(tmp_path / "second")
    (base / "models" / "big" / "config.json").chmod(0o600)
    refused = prepare(base, check=False)
    assert refused.returncode == 2 and "cannot read" in refused.stderr and "config.json" in refused.stderr


def test_sdk_runner_arguments_carry_the_sandbox(tmp_path: Path) -> None:
    spec = EngineSpec(tensor_parallel_size=4)
    gpu = run_kwargs(ContainerEngineConfig("m", "img", tmp_path, tmp_path / "k", tmp_path / "s", spec, gpus=True))
    assert gpu["read_only"] is True and gpu["cap_drop"] == ["ALL"]
    assert gpu["network_mode"] == "none" and "network" not in gpu
    assert {m["Target"]: m["Source"] for m in gpu["mounts"]}["/run/bastion-engine"] == str(tmp_path / "s")
    assert gpu["security_opt"] == ["no-new-privileges:true"]
    assert gpu["user"] == f"{ENGINE_UID}:{ENGINE_UID}"
    assert "ports" not in gpu
    assert gpu["device_requests"][0]["Count"] == 4
    assert "VLLM_API_KEY" not in gpu["environment"]
    assert gpu["command"][gpu["command"].index("--tensor-parallel-size") + 1] == "4"
    cpu = run_kwargs(ContainerEngineConfig("m", "img", tmp_path, tmp_path / "k", tmp_path / "s", spec, gpus=False))
    assert "device_requests" not in cpu
