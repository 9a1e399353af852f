"""Media parts are decoded and checked before anything reaches the engine:
every bad image and bad audio case gets a clear 400 and an audit row, remote
URLs cause no traffic at all, and accepted parts are hashed into the audit."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import wave
from typing import Any

import openai
import pytest
from PIL import Image

from gateway.errors import BadRequest
from gateway.media import MediaLimits, check_audio, check_image
from tests.conftest import GatewayFactory
from tests.support import EngineRef, Gateway, SocketDouble, engine_client, engine_metric, wav_bytes

LIMITS = MediaLimits(max_image_pixels=40_000_000, max_audio_seconds=600)


def image_bytes(fmt: str, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, fmt)
    return out.getvalue()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# One MPEG-1 Layer III frame header (128 kb/s, 44.1 kHz) and a silent 417-byte frame, 40 times: 1.04 s.
MP3 = (b"\xff\xfb\x90\x64" + b"\x00" * 413) * 40
# The same at 16 kHz (MPEG-2 Layer III, 64 kb/s, mono; 288-byte frames of 36 ms), 28 times: 1.008 s.
# The audio engine wants 16 kHz: vLLM resamples anything else with torchaudio, which has no CPU build.
MP3_16K = (b"\xff\xf3\x88\xc0" + b"\x00" * 284) * 28


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")]
)
def test_each_accepted_image_type_is_decoded_and_hashed(fmt: str, mime: str) -> None:
    data = image_bytes(fmt)
    part = check_image(data_url(mime, data), LIMITS, "p")
    assert (part.kind, part.mime, part.size, part.pixels) == ("image", mime, len(data), 64)
    assert part.sha256 == hashlib.sha256(data).hexdigest()


def test_audio_length_is_read_from_wav_and_mp3() -> None:
    assert check_audio(base64.b64encode(wav_bytes(1.5)).decode(), "wav", LIMITS, "p").seconds == pytest.approx(1.5)
    assert check_audio(base64.b64encode(MP3).decode(), "mp3", LIMITS, "p").seconds == pytest.approx(1.04, abs=0.01)


BAD_IMAGES = {
    "media_bad_base64": "data:image/png;base64,not*base64!",
    "media_corrupt": data_url("image/png", image_bytes("PNG")[:40]),
    "media_type_mismatch": data_url("image/png", image_bytes("JPEG")),
    "media_bad_type": data_url("image/bmp", image_bytes("BMP")),
    "media_bad_data_url": "data:image/png,rawbytes",
    "media_too_many_pixels": data_url("image/png", image_bytes("PNG", (10000, 10000), "1")),
}


@pytest.mark.parametrize("reason", sorted(BAD_IMAGES))
def test_bad_images(reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        check_image(BAD_IMAGES[reason], LIMITS, "messages[0].content[1]")
    assert caught.value.audit_reason == reason and caught.value.param == "messages[0].content[1]"


def two_frame_gif() -> bytes:
    out = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), (1, 2, 3)), Image.new("RGB", (8, 8), (9, 9, 9))]
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


@pytest.mark.parametrize(("offset", "was", "value"), [(70, 129, 142), (101, 59, 44)])
def test_a_malformed_gif_is_corrupt_whatever_pillow_raises(offset: int, was: int, value: int) -> None:
    # Found by mutating images: with one byte changed, Pillow raised IndexError
    # (the first) and struct.error (the second), which the gateway answered 500.
    data = bytearray(two_frame_gif())
    assert data[offset] == was, "Pillow now writes this GIF differently: find the byte again"
    data[offset] = value
    with pytest.raises(BadRequest) as caught:
        check_image(data_url("image/gif", bytes(data)), LIMITS, "p")
    assert caught.value.audit_reason == "media_corrupt"


def test_a_pixel_ceiling_below_pillows_own() -> None:
    small = MediaLimits(max_image_pixels=1000, max_audio_seconds=600)
    with pytest.raises(BadRequest, match="64x64 pixels, over the limit of 1000"):
        check_image(data_url("image/png", image_bytes("PNG", (64, 64))), small, "p")


BAD_AUDIO = {
    "media_bad_base64": ("%%%%", "wav"),
    "media_corrupt": (base64.b64encode(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk").decode(), "wav"),
    "media_type_mismatch": (base64.b64encode(wav_bytes(0.5)).decode(), "mp3"),
    "media_bad_type": (base64.b64encode(wav_bytes(0.5)).decode(), "flac"),
    "media_too_long": (base64.b64encode(wav_bytes(3)).decode(), "wav"),
}


@pytest.mark.parametrize("reason", sorted(BAD_AUDIO))
def test_bad_audio(reason: str) -> None:
    data, fmt = BAD_AUDIO[reason]
    with pytest.raises(BadRequest) as caught:
        check_audio(data, fmt, MediaLimits(max_image_pixels=1000, max_audio_seconds=2), "p")
    assert caught.value.audit_reason == reason


CARD = "4111 1111 1111 1111"


@pytest.mark.parametrize(
    "check",
    [
        lambda: check_image(f"{CARD}:x", LIMITS, "p"),
        lambda: check_image(f"data:{CARD};base64,AAAA", LIMITS, "p"),
        lambda: check_audio("AAAA", CARD, LIMITS, "p"),
    ],
)
def test_a_refusal_does_not_quote_what_the_caller_sent(check: Any) -> None:
    # The message is answered and kept in the audit record's error_message,
    # which holds no request text: a card number as a URL scheme, an image's
    # declared type or an audio format was written into the trail.
    with pytest.raises(BadRequest) as caught:
        check()
    assert "4111" not in caught.value.message


# ---------------------------------------------------------------- gateway


def chat(gw: Gateway, key: str, parts: list[dict[str, Any]]) -> Any:
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, *parts]}],
        "max_tokens": 1,
    }
    return gw.post("/v1/chat/completions", key=key, json=body)


@pytest.mark.engine
def test_bad_media_never_reaches_the_engine_and_remote_urls_are_not_fetched(
    make_gateway: GatewayFactory, tripwire: SocketDouble
) -> None:
    gw = make_gateway(engines=[EngineRef("tiny", tripwire.url, "k")], audit={"mode": "strict"})
    key = gw.create_key()
    listener = SocketDouble("hang")  # where the remote URLs point: a loopback socket of our own
    try:
        cases: list[tuple[str, dict[str, Any]]] = [
            (reason, {"type": "image_url", "image_url": {"url": url}}) for reason, url in BAD_IMAGES.items()
        ]
        for scheme in ("http", "https"):
            cases.append(
                (
                    "media_remote_url",
                    {"type": "image_url", "image_url": {"url": f"{scheme}://127.0.0.1:{listener.port}/x.png"}},
                )
            )
        cases.append(("media_remote_url", {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}))
        cases.append(
            ("media_remote_url", {"type": "audio_url", "audio_url": {"url": f"http://127.0.0.1:{listener.port}/a.wav"}})
        )
        for reason, (data, fmt) in BAD_AUDIO.items():
            if reason != "media_too_long":
                cases.append((reason, {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}))
        for reason, part in cases:
            r = chat(gw, key, [part])
            assert r.status_code == 400, (reason, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_media" and error["param"] == "messages[0].content[1]", error
            records = gw.records(r.headers["x-request-id"])
            assert [x["phase"] for x in records] == ["final"] and records[0]["error_type"] == reason, (reason, records)
        assert tripwire.calls == 0, "a bad part reached the engine"
        assert listener.request_lines == [], "the gateway fetched a remote URL"
    finally:
        listener.close()


@pytest.mark.engine
def test_accepted_media_is_hashed_into_the_audit_record(make_gateway: GatewayFactory, vllm_engine: EngineRef) -> None:
    gw = make_gateway(engines=[vllm_engine])
    png, wav = image_bytes("PNG", (16, 16)), wav_bytes(0.5)
    parts = [
        {"type": "image_url", "image_url": {"url": data_url("image/png", png)}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}},
    ]
    r = chat(gw, gw.create_key(), parts)
    # The text-only test engine then refuses the media itself; the gateway let it through.
    assert r.status_code == 400 and r.json()["error"]["code"] != "invalid_media", r.text
    media = json.loads(gw.final(r.headers["x-request-id"])["detail"])["media"]
    assert media == [
        {
            "kind": "image",
            "mime": "image/png",
            "size": len(png),
            "pixels": 256,
            "sha256": hashlib.sha256(png).hexdigest(),
        },
        {
            "kind": "audio",
            "mime": "audio/wav",
            "size": len(wav),
            "seconds": 0.5,
            "sha256": hashlib.sha256(wav).hexdigest(),
        },
    ]


# ------------------------------------------------------- audio on a real engine


def audio_part(data: bytes, fmt: str = "wav") -> dict[str, Any]:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def ask(client: openai.OpenAI, parts: list[dict[str, Any]], **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="tiny-audio",
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is said?"}, *parts]}],
        max_tokens=4,
        **extra,
    )


@pytest.mark.engine
def test_audio_end_to_end_on_a_real_audio_engine(make_gateway: GatewayFactory, audio_engine: EngineRef) -> None:
    """input_audio (WAV and MP3) through the gateway to a tiny Qwen2-Audio on vLLM CPU, with the openai SDK."""
    gw = make_gateway(engines=[audio_engine])
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.create_key())
    text_only = ask(client, []).parse().usage.prompt_tokens
    tokens = {}
    for seconds in (1, 3):
        wav = wav_bytes(seconds)
        raw = ask(client, [audio_part(wav)])
        usage = raw.parse().usage
        record = gw.final(raw.headers["x-request-id"])
        assert (record["prompt_tokens"], record["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)
        media = json.loads(record["detail"])["media"]
        assert media == [{"kind": "audio", "mime": "audio/wav", "size": len(wav), "seconds": float(seconds),
                          "sha256": hashlib.sha256(wav).hexdigest()}]  # fmt: skip
        tokens[seconds] = usage.prompt_tokens
    # The clip reached the audio encoder: one prompt token per 40 ms frame (25 a second).
    assert tokens[3] - tokens[1] == 50 and tokens[1] > text_only, (text_only, tokens)

    raw = ask(client, [audio_part(MP3_16K, "mp3")])
    assert raw.parse().usage.prompt_tokens > text_only
    assert json.loads(gw.final(raw.headers["x-request-id"])["detail"])["media"][0]["mime"] == "audio/mpeg"

    raw = ask(client, [audio_part(wav_bytes(1))], stream=True, stream_options={"include_usage": True})
    chunks = list(raw.parse())
    record = gw.final(raw.headers["x-request-id"])
    assert chunks[-1].usage is not None and record["prompt_tokens"] == chunks[-1].usage.prompt_tokens == tokens[1]


def noise_wav(seed: int, seconds: float = 1, rate: int = 16000) -> bytes:
    """A mono 16-bit WAV clip of random samples: two seeds, two different clips of one length."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(random.Random(seed).randbytes(2 * int(rate * seconds)))
    return out.getvalue()


@pytest.mark.engine
def test_a_part_s_uuid_is_refused_as_the_engine_would_read_the_part_by_it(
    make_gateway: GatewayFactory, audio_engine: EngineRef
) -> None:
    """vLLM takes a part's `uuid` as the media's identity in its caches, in place
    of a hash of its bytes: a call with its own clip and a uuid another caller
    used is answered from that caller's clip. And a part with a uuid is read by
    its other keys, whatever its `type`: a `text` part carrying `input_audio` is
    audio to the engine, unseen by the media checks and policy. Shown on the
    engine itself, then refused by the gateway before anything reaches the engine."""
    question = {"type": "text", "text": "What is said?"}

    def ask_engine(client: Any, *parts: dict[str, Any]) -> dict[str, Any]:
        body = {"model": "tiny-audio", "messages": [{"role": "user", "content": list(parts)}],
                "max_tokens": 1, "temperature": 0, "logprobs": True, "top_logprobs": 5}  # fmt: skip
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def first_token(client: Any, clip: bytes, **uuid: str) -> dict[str, float]:
        top = ask_engine(client, question, {**audio_part(clip), **uuid})["choices"][0]["logprobs"]["content"][0]
        return {t["token"]: t["logprob"] for t in top["top_logprobs"]}

    mine, theirs = noise_wav(1), noise_wav(2)
    disguised = {**question, "uuid": "as-text", "input_audio": audio_part(mine)["input_audio"]}
    with engine_client(audio_engine.url) as direct:
        direct.headers["authorization"] = f"Bearer {audio_engine.key}"
        own = first_token(direct, mine)
        theirs_heard = first_token(direct, theirs, uuid="shared-id")
        assert own != theirs_heard, "the two clips must tell apart"
        assert first_token(direct, mine, uuid="shared-id") == theirs_heard, "vLLM answered from the other clip"
        # The clip's 25 frames a second reach the prompt from a part typed `text`.
        text_only = ask_engine(direct, question)["usage"]["prompt_tokens"]
        assert ask_engine(direct, disguised)["usage"]["prompt_tokens"] > text_only + 20

    gw = make_gateway(engines=[audio_engine])
    key = gw.create_key()
    before = engine_metric(audio_engine, "vllm:prompt_tokens_total")
    parts = [{**audio_part(mine), "uuid": value} for value in ("shared-id", "", 0)] + [disguised]
    for part in parts:
        body = {"model": "tiny-audio", "max_tokens": 1, "messages": [{"role": "user", "content": [part]}]}
        r = gw.post("/v1/chat/completions", key=key, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].uuid", r.text
        assert gw.final(r.headers["x-request-id"])["error_type"] == "invalid_body"
    assert engine_metric(audio_engine, "vllm:prompt_tokens_total") == before, "a call with a uuid reached the engine"
    part = {**audio_part(mine), "uuid": None}  # null is no uuid, to vLLM too
    body = {"model": "tiny-audio", "max_tokens": 1, "messages": [{"role": "user", "content": [part]}]}
    assert gw.post("/v1/chat/completions", key=key, json=body).status_code == 200


@pytest.mark.engine
def test_every_bad_audio_case_is_refused_before_the_audio_engine(
    make_gateway: GatewayFactory, audio_engine: EngineRef
) -> None:
    gw = make_gateway(engines=[audio_engine], extra_toml="[media]\nmax_audio_seconds = 2\n")
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=gw.create_key(), max_retries=0)
    before = engine_metric(audio_engine, "vllm:prompt_tokens_total")
    for reason, (data, fmt) in sorted(BAD_AUDIO.items()):
        part = {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, [part])
        assert caught.value.code == "invalid_media" and caught.value.param == "messages[0].content[1]", reason
        record = gw.final(caught.value.response.headers["x-request-id"])
        assert (record["http_status"], record["error_type"]) == (400, reason)
    assert engine_metric(audio_engine, "vllm:prompt_tokens_total") == before, "a bad clip reached the engine"
