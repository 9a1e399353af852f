"""Boot verification in the gateway: only verified models are routed, every
verification is an audit event, and tampering after boot is caught."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from engine import manifest as m
from tests.conftest import GatewayFactory
from tests.support import EngineRef, Gateway, SocketDouble

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def signed_copy(src: Path, dst: Path, name: str, key_file: Path) -> tuple[Path, Path]:
    """Copy a model folder and sign a manifest for it under `name`."""
    shutil.copytree(src, dst)
    path = dst.with_suffix(".manifest.json")
    m.write_signed(m.create_manifest(dst, name=name, version="1"), path, m.load_private_key(key_file))
    return dst, path


def tamper(folder: Path) -> None:
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def wait_status(gw: Gateway, model: str, status: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = gw.model_states()[model]
        if state["status"] == status:
            return state
        time.sleep(0.1)
    raise AssertionError(f"{model} never became {status}: {gw.model_states()}")


def system_events(gw: Gateway, model: str) -> list[dict[str, object]]:
    return [r for r in gw.records() if r["phase"] == "system" and r["model"] == model]


@pytest.mark.engine
def test_good_model_served_tampered_model_refused(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, tiny_model: Path, tripwire: SocketDouble, tmp_path: Path
) -> None:
    assert vllm_engine.publisher is not None
    key_file = Path(vllm_engine.publisher[1][: -len(".pub")])
    bad_dir, bad_manifest = signed_copy(tiny_model, tmp_path / "bad", "bad", key_file)
    tamper(bad_dir)
    bad = EngineRef("bad", tripwire.url, "k", model_dir=str(bad_dir), manifest=str(bad_manifest),
                    publisher=vllm_engine.publisher)  # fmt: skip
    gw = make_gateway(engines=[vllm_engine, bad])
    states = gw.model_states()
    assert states["tiny"]["status"] == "verified" and states["bad"]["status"] == "failed"
    assert any("changed: model.safetensors" in p for p in states["bad"]["problems"])  # type: ignore[union-attr]
    assert httpx.get(gw.url + "/readyz").status_code == 503

    key = gw.create_key()
    ok = gw.post("/v1/chat/completions", key=key, json={"model": "tiny", **CHAT})
    assert ok.status_code == 200
    served = gw.final(ok.headers["x-request-id"])
    assert served["manifest_sha256"] == states["tiny"]["manifest_sha256"]

    refused = gw.post("/v1/chat/completions", key=key, json={"model": "bad", **CHAT})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
    final = gw.final(refused.headers["x-request-id"])
    assert final["error_type"] == "model_failed" and final["model"] == "bad"
    assert tripwire.calls == 0

    # One system event per model, with digest, signer, bytes and duration.
    (good_event,) = system_events(gw, "tiny")
    detail = json.loads(good_event["detail"])  # type: ignore[arg-type]
    assert good_event["outcome"] == "ok" and good_event["manifest_sha256"] == states["tiny"]["manifest_sha256"]
    assert detail["key_id"] == vllm_engine.publisher[0] and detail["bytes"] > 0 and detail["trigger"] == "boot"
    (bad_event,) = system_events(gw, "bad")
    assert bad_event["outcome"] == "failed" and bad_event["error_type"] == "integrity:changed"


@pytest.fixture
def good_copy(tiny_model: Path, tmp_path: Path, tiny_manifest: tuple[Path, tuple[str, str]]) -> EngineRef:
    key_file = Path(tiny_manifest[1][1][: -len(".pub")])
    folder, manifest = signed_copy(tiny_model, tmp_path / "copy", "copy", key_file)
    return EngineRef("copy", "http://127.0.0.1:9", "k", model_dir=str(folder), manifest=str(manifest),
                     publisher=tiny_manifest[1])  # fmt: skip


def test_tampering_after_boot_is_caught_by_admin_reverification(
    make_gateway: GatewayFactory, good_copy: EngineRef
) -> None:
    gw = make_gateway(engines=[good_copy])
    assert gw.model_states()["copy"]["status"] == "verified"
    tamper(Path(good_copy.model_dir))
    user, admin = gw.create_key(role="user"), gw.create_key(role="admin", name="ops")
    assert gw.post("/admin/models/verify", key=user).status_code == 403
    r = gw.post("/admin/models/verify", key=admin)
    assert r.status_code == 200 and r.json()["models"]["copy"]["status"] == "failed"
    refused = gw.post("/v1/chat/completions", key=user, json={"model": "copy", **CHAT})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
    events = system_events(gw, "copy")
    assert [e["outcome"] for e in events] == ["ok", "failed"]
    assert json.loads(events[1]["detail"])["trigger"] == "admin"  # type: ignore[arg-type]
    assert json.loads(events[1]["detail"])["previous_status"] == "verified"  # type: ignore[arg-type]
    assert gw.final(r.headers["x-request-id"])["key_name"] == "ops"


def test_sighup_reverifies(make_gateway: GatewayFactory, good_copy: EngineRef) -> None:
    gw = make_gateway(engines=[good_copy])
    (Path(good_copy.model_dir) / "config.json").unlink()
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGHUP)
    state = wait_status(gw, "copy", "failed")
    assert any("missing: config.json" in p for p in state["problems"])  # type: ignore[union-attr]


def test_interval_reverification(make_gateway: GatewayFactory, good_copy: EngineRef, tmp_path: Path) -> None:
    gw = make_gateway(engines=[good_copy], start=False)
    config = gw.config.read_text().replace("[gateway]", "[integrity]\nreverify_seconds = 0.5\n\n[gateway]")
    gw.config.write_text(config)
    gw.start()
    (Path(good_copy.model_dir) / "extra.bin").write_bytes(b"payload")
    wait_status(gw, "copy", "failed", timeout=10)
    assert json.loads(system_events(gw, "copy")[-1]["detail"])["trigger"] == "interval"  # type: ignore[arg-type]


def test_config_refuses_deployment_without_manifest_unless_verify_is_off(tmp_path: Path) -> None:
    import subprocess

    from tests.support import BASTION

    config = tmp_path / "bastion.toml"
    config.write_text('[[deployments]]\nname = "m"\nengine_url = "http://127.0.0.1:9"\nmodel_dir = "x"\n')
    result = subprocess.run([BASTION, "keys", "list", "--config", str(config)], capture_output=True, text=True)
    assert result.returncode == 2 and "verify = false" in result.stderr


def test_untrusted_publisher_key_id_mismatch_is_a_config_error(tmp_path: Path, good_copy: EngineRef) -> None:
    import subprocess

    from tests.support import BASTION, write_config

    assert good_copy.publisher is not None
    wrong = EngineRef(**{**good_copy.__dict__, "publisher": ("0000000000000000", good_copy.publisher[1])})
    config = write_config(tmp_path / "gw", port=1, database_url="sqlite+aiosqlite:///x.db", engines=[wrong])
    result = subprocess.run([BASTION, "manifest", "verify", good_copy.model_dir, "--manifest", good_copy.manifest,
                             "--config", str(config)], capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and "key id" in result.stderr
