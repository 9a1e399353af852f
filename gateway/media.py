"""Media parts checked before anything reaches the engine (issue 10, part 1).

Images arrive as `data:` URLs (PNG, JPEG, WebP, GIF) and audio as base64 WAV
or MP3. Each is decoded here: strict base64, magic bytes that must agree with
the declared type, then a real decode (Pillow for images, mutagen for audio)
so that a corrupt file, a type that lies about itself or a decompression bomb
is refused with a clear 400 instead of reaching the engine. Remote URLs
(`http://`, `https://`, `file://`, anything but `data:`) are refused without
any network traffic: the engine must never fetch on a caller's behalf.

Why Pillow and mutagen: both are long-kept, widely packaged libraries that
read these formats defensively; a hand-written parser is what a crafted file
is made to break. Pillow reads the header before the pixels, so the pixel
count is checked before any pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mutagen.mp3
import mutagen.wave
from PIL import Image

from gateway.errors import BadRequest
from policy import MediaPart

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF"}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


@dataclass(frozen=True, slots=True)
class MediaLimits:
    """Ceilings that hold whatever the policy says (policy can only be tighter)."""

    max_image_pixels: int
    max_audio_seconds: float


def _refuse(message: str, reason: str, param: str) -> BadRequest:
    return BadRequest(message, param=param, code="invalid_media", audit_reason=reason)


def sniff(data: bytes) -> str | None:
    """The image type the bytes say they are."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _b64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse("The media data is not valid base64.", "media_bad_base64", param) from None


def check_image(url: str, limits: MediaLimits, param: str) -> MediaPart:
    # No refusal here quotes the caller's text (a scheme, a declared type): the
    # message goes into the audit record, which keeps no request text.
    if not url.startswith("data:"):
        raise _refuse(
            "Images must be sent inline as data: URLs; other URLs are not fetched.", "media_remote_url", param
        )
    head, sep, payload = url.partition(",")
    declared = head[len("data:") :].removesuffix(";base64").lower()
    if not sep or not head.endswith(";base64"):
        raise _refuse("An image data: URL must be base64 (data:image/png;base64,...).", "media_bad_data_url", param)
    if declared not in IMAGE_TYPES:
        raise _refuse(
            "The image's declared type is not accepted; send PNG, JPEG, WebP or GIF.", "media_bad_type", param
        )
    data = _b64(payload, param)
    actual = sniff(data)
    if actual != declared:
        raise _refuse(
            f"The image is declared as {declared} but its bytes are {actual or 'not a known image type'}.",
            "media_type_mismatch",
            param,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[IMAGE_TYPES[declared]])
            width, height = image.size
            frames = getattr(image, "n_frames", 1)
            if width * height * frames > limits.max_image_pixels:
                raise _refuse(
                    f"The image has {width}x{height} pixels{f' in {frames} frames' if frames > 1 else ''}, "
                    f"over the limit of {limits.max_image_pixels}.",
                    "media_too_many_pixels",
                    param,
                )
            image.load()
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard, which fires at open() for the largest headers.
        raise _refuse(
            f"The image has too many pixels (over the limit of {limits.max_image_pixels}).",
            "media_too_many_pixels",
            param,
        ) from None
    except Exception:  # noqa: BLE001 - Pillow's decoders raise many types for a bad file (fuzzing found
        # IndexError and struct.error besides OSError and ValueError); all mean "unreadable", not a 500
        raise _refuse("The image could not be decoded (corrupt or truncated).", "media_corrupt", param) from None
    return MediaPart(
        "image", size=len(data), mime=declared, sha256=hashlib.sha256(data).hexdigest(), pixels=width * height * frames
    )


# The registered media types (RFC 2361 and RFC 3003), as the audit records them.
_AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg"}


def check_audio(data_b64: str, fmt: str, limits: MediaLimits, param: str) -> MediaPart:
    fmt = fmt.lower()
    if fmt not in _AUDIO_MIME:
        raise _refuse("The audio's format is not accepted; send wav or mp3.", "media_bad_type", param)
    data = _b64(data_b64, param)
    looks_wav = data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    looks_mp3 = data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)
    if (fmt == "wav" and not looks_wav) or (fmt == "mp3" and not looks_mp3):
        raise _refuse(f"The audio is declared as {fmt} but its bytes are not.", "media_type_mismatch", param)
    reader: Any = mutagen.wave.WAVE if fmt == "wav" else mutagen.mp3.MP3
    try:
        seconds = float(reader(io.BytesIO(data)).info.length)
    except Exception:  # noqa: BLE001 - mutagen raises many types for a bad file; all mean "unreadable"
        raise _refuse(f"The audio could not be read as {fmt} (corrupt or truncated).", "media_corrupt", param) from None
    if seconds <= 0:
        raise _refuse("The audio holds no sound.", "media_corrupt", param)
    if seconds > limits.max_audio_seconds:
        raise _refuse(
            f"The audio is {seconds:.1f} s long, over the limit of {limits.max_audio_seconds:g} s.",
            "media_too_long",
            param,
        )
    return MediaPart(
        "audio", size=len(data), mime=_AUDIO_MIME[fmt], sha256=hashlib.sha256(data).hexdigest(), seconds=seconds
    )


def check_count(params: Sequence[str], limit: int) -> None:
    """Refuse a request with more than `limit` media parts (`params`: their JSON
    paths), before any is fetched or decoded."""
    if len(params) > limit:
        raise _refuse(
            f"The request has {len(params)} images and audio clips; the gateway takes at most {limit}.",
            "media_too_many",
            params[limit],
        )


def check_parts(parts: list[tuple[str, Any]], limits: MediaLimits) -> tuple[MediaPart, ...]:
    """Check every media part of a request; `parts` holds (JSON path, part) pairs."""
    from gateway.summary import AudioPart, AudioURLPart, ImagePart

    out = []
    for param, part in parts:
        if isinstance(part, ImagePart):
            out.append(check_image(part.image_url.url, limits, param))
        elif isinstance(part, AudioPart):
            out.append(check_audio(part.input_audio.data, part.input_audio.format, limits, param))
        elif isinstance(part, AudioURLPart):
            raise _refuse("Audio must be sent inline as input_audio; URLs are not fetched.", "media_remote_url", param)
    return tuple(out)
