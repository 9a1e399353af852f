"""API keys: every bad key is refused with 401 and audited, and the engine never
sees the call (the engine here is a listener that counts connections)."""

from __future__ import annotations

import datetime as dt
import json
import resource
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from gateway.keys import load_or_create_pepper
from tests.conftest import GatewayFactory
from tests.support import BASTION, EngineRef, Gateway, SocketDouble, at_once, bastion

CHAT = {"model": "tripwire", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def gw(make_gateway: GatewayFactory, tripwire: SocketDouble) -> Gateway:
    return make_gateway(engines=[EngineRef("tripwire", tripwire.url, "engine-key")])


def _refused(gw: Gateway, headers: dict[str, str], reason: str, code: str = "invalid_api_key") -> dict[str, object]:
    r = gw.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["www-authenticate"].startswith("Bearer")
    records = gw.records(r.headers["x-request-id"])
    assert [x["phase"] for x in records] == ["final"], "a refused call has no intent record"
    assert records[0]["error_type"] == reason and records[0]["outcome"] == "refused"
    return records[0]


def test_missing_key(gw: Gateway, tripwire: SocketDouble) -> None:
    _refused(gw, {}, "missing_key")
    assert tripwire.calls == 0


def test_malformed_header_and_key(gw: Gateway, tripwire: SocketDouble) -> None:
    _refused(gw, {"authorization": "Basic dXNlcjpwYXNz"}, "malformed_header")
    _refused(gw, {"authorization": "Bearer"}, "malformed_header")
    _refused(gw, {"authorization": "Bearer sk-not-ours"}, "malformed_key")
    assert tripwire.calls == 0


def test_authorization_sent_twice(gw: Gateway, tripwire: SocketDouble) -> None:
    """The first of two was read, whatever a proxy in front had checked."""
    key = gw.create_key()
    for second in (key, "Bearer bst_abcdefabcdef_" + "A" * 43):
        headers = [("authorization", f"Bearer {key}"), ("authorization", second)]
        r = gw.post("/v1/chat/completions", json=CHAT, headers=headers)  # type: ignore[arg-type]
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text
        record = gw.final(r.headers["x-request-id"])
        assert (record["error_type"], record["key_id"]) == ("repeated_credentials", None)
    assert tripwire.calls == 0


def test_unknown_key_and_wrong_secret(gw: Gateway, tripwire: SocketDouble) -> None:
    real = gw.create_key()
    key_id = real.split("_")[1]
    record = _refused(gw, {"authorization": "Bearer bst_abcdefabcdef_" + "A" * 43}, "unknown_key")
    assert record["key_id"] == "abcdefabcdef"
    # The right key id with another secret is the same refusal.
    forged = f"bst_{key_id}_" + "B" * 43
    record = _refused(gw, {"authorization": f"Bearer {forged}"}, "unknown_key")
    assert record["key_id"] == key_id
    assert tripwire.calls == 0


def test_revoked_key_is_refused_on_the_next_request(gw: Gateway, tripwire: SocketDouble) -> None:
    key = gw.create_key()
    key_id = key.split("_")[1]
    assert httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
    bastion("keys", "revoke", "--config", str(gw.config), key_id)
    r = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 401
    _refused(gw, {"authorization": f"Bearer {key}"}, "revoked_key")
    assert tripwire.calls == 0


def _rotate(gw: Gateway, key_id: str, *args: str) -> str:
    return str(json.loads(gw.bastion("keys", "rotate", key_id, *args, "--json").stdout)["key"])


def _works(gw: Gateway, key: str) -> bool:
    return httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200


def test_a_rotated_secret_is_refused_once_its_overlap_ends(gw: Gateway, tripwire: SocketDouble) -> None:
    first = gw.create_key()
    key_id = first.split("_")[1]
    second = _rotate(gw, key_id)  # no overlap: the old secret is refused from the next request on
    assert _works(gw, second) and not _works(gw, first)
    record = _refused(gw, {"authorization": f"Bearer {first}"}, "rotated_key")
    assert record["key_id"] == key_id

    third = _rotate(gw, key_id, "--overlap", "1s")
    assert _works(gw, third) and _works(gw, second)
    time.sleep(1.1)
    assert _works(gw, third)
    _refused(gw, {"authorization": f"Bearer {second}"}, "rotated_key")
    # Only the secret the last rotation replaced is kept, and only for its overlap.
    _rotate(gw, key_id, "--overlap", "1h")
    assert _works(gw, third)
    _refused(gw, {"authorization": f"Bearer {first}"}, "unknown_key")
    _refused(gw, {"authorization": f"Bearer {second}"}, "unknown_key")
    listed = next(k for k in json.loads(gw.bastion("keys", "list", "--json").stdout) if k["key_id"] == key_id)
    assert listed["rotated_at"] and listed["previous_expires_at"]
    assert tripwire.calls == 0


def test_only_an_active_key_is_rotated_and_the_overlap_is_bounded(gw: Gateway) -> None:
    revoked, expired = gw.create_key(), gw.expired_key()
    gw.bastion("keys", "revoke", revoked.split("_")[1])
    for key_id in (revoked.split("_")[1], expired.split("_")[1], "nosuchkey000"):
        done = gw.bastion("keys", "rotate", key_id, check=False)
        assert done.returncode == 1 and f"no active key with id {key_id}" in done.stderr, done.stderr
    live = gw.create_key().split("_")[1]
    for overlap in ("31d", "1w", "-1h", "99999999999d"):
        done = gw.bastion("keys", "rotate", live, "--overlap", overlap, check=False)
        assert done.returncode == 2 and "--overlap" in done.stderr, done.stderr
    rotations = [r for r in gw.records() if r["route"] == "cli.keys.rotate"]
    assert rotations == [], "nothing was rotated, so nothing is on record"

    def full_disk() -> None:  # the trail's files may not grow: the rotation cannot be recorded
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))

    args = [BASTION, "keys", "rotate", live, "--config", str(gw.config)]
    failed = subprocess.run(args, capture_output=True, text=True, preexec_fn=full_disk, check=False)
    assert failed.returncode == 1 and "could not be audited" in failed.stderr, failed.stderr
    assert not failed.stdout, "no new secret"
    listed = next(k for k in json.loads(gw.bastion("keys", "list", "--json").stdout) if k["key_id"] == live)
    assert listed["rotated_at"] is None


def test_expired_key(gw: Gateway, tripwire: SocketDouble) -> None:
    key = gw.expired_key()
    record = _refused(gw, {"authorization": f"Bearer {key}"}, "expired_key", code="expired_api_key")
    assert record["key_id"] == key.split("_")[1]
    assert tripwire.calls == 0


def test_an_expiry_given_in_another_zone_is_kept_in_utc(gw: Gateway, tripwire: SocketDouble) -> None:
    """SQLite keeps a time's fields without its zone: an expiry written for
    UTC+5 was read back as UTC, and the key lived five hours past it."""
    soon = dt.datetime.now(dt.timezone(dt.timedelta(hours=5))) + dt.timedelta(seconds=3)
    key = gw.create_key("--expires-at", soon.isoformat())
    time.sleep(max(0.0, (soon - dt.datetime.now(dt.UTC)).total_seconds()) + 0.1)
    _refused(gw, {"authorization": f"Bearer {key}"}, "expired_key", code="expired_api_key")
    listed = json.loads(gw.bastion("keys", "list", "--json").stdout)
    expires = next(k["expires_at"] for k in listed if k["key_id"] == key.split("_")[1])
    assert expires == soon.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    assert tripwire.calls == 0


def test_auditor_role_may_not_call_models(gw: Gateway, tripwire: SocketDouble) -> None:
    key = gw.create_key(role="auditor")
    r = gw.post("/v1/chat/completions", json=CHAT, key=key)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    final = gw.final(r.headers["x-request-id"])
    assert final["role"] == "auditor" and final["error_type"] == "role_not_allowed"
    assert tripwire.calls == 0


def test_keys_are_stored_only_as_keyed_hashes(gw: Gateway) -> None:
    import sqlite3

    key = gw.create_key()
    secret = key.split("_", 2)[2]
    db_path = gw.database_url.split(":///", 1)[1]
    with sqlite3.connect(db_path) as conn:
        dump = "\n".join(conn.iterdump())
    assert secret not in dump and key not in dump


def test_processes_creating_the_pepper_at_once_all_get_one_whole_pepper(tmp_path: Path) -> None:
    # Workers booting together on a fresh state folder each create the pepper
    # if it is missing. The loser of that race must read the winner's pepper,
    # whole: an error would stop the gateway, a different pepper would make
    # keys work on one worker and fail on another.
    for attempt in range(20):
        path = tmp_path / f"try{attempt}" / "secrets" / "api-key-pepper"
        got = set(at_once(6, lambda: load_or_create_pepper(path).hex()))  # noqa: B023 - run before the loop moves on
        assert got == {path.read_bytes().hex()}, f"attempt {attempt}: {got}"
        assert len(path.read_bytes()) == 32 and path.stat().st_mode & 0o777 == 0o600
        assert [p.name for p in path.parent.iterdir()] == ["api-key-pepper"], "a temporary file was left behind"
