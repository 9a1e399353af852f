"""What policy needs to know of a media part, read without decoding it whole.

Sizes come from the base64 length (no decode of megabytes on the hot path);
an audio clip's length from its WAV header, decoded from the first few
hundred bytes only. Anything that cannot be measured is reported as unknown
(None), and a policy that limits it refuses the part (fail closed).
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import TYPE_CHECKING

from policy import MediaPart

if TYPE_CHECKING:
    from gateway.summary import AudioPart, AudioURLPart, ImagePart

# Enough of a WAV file to reach its `fmt ` and `data` chunk headers in practice.
_WAV_HEAD_B64 = 4096


def media_part(part: ImagePart | AudioPart | AudioURLPart) -> MediaPart:
    from gateway.summary import AudioPart, ImagePart

    if isinstance(part, ImagePart):
        return MediaPart("image", size=data_url_size(part.image_url.url))
    if isinstance(part, AudioPart):
        data = part.input_audio.data
        seconds = wav_seconds(data) if part.input_audio.format.lower() == "wav" else None
        return MediaPart("audio", size=base64_size(data), seconds=seconds)
    return MediaPart("audio", size=data_url_size(part.audio_url.url))


def base64_size(data: str) -> int:
    """Decoded size of base64 text (without decoding it)."""
    data = data.rstrip()
    return len(data) * 3 // 4 - (len(data) - len(data.rstrip("=")))


def data_url_size(url: str) -> int | None:
    """Decoded size of a `data:...;base64,` URL; None for any other URL."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url.partition(",")
    if not sep:
        return None
    return base64_size(payload) if head.endswith(";base64") else len(payload)


def wav_seconds(data: str) -> float | None:
    """Length of a base64 WAV clip: bytes after its `data` header / its byte rate."""
    try:
        head = base64.b64decode(data[:_WAV_HEAD_B64], validate=False)
    except (binascii.Error, ValueError):
        return None
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    byte_rate = None
    at = 12
    while at + 8 <= len(head):
        chunk, size = head[at : at + 4], struct.unpack_from("<I", head, at + 4)[0]
        if chunk == b"fmt " and at + 16 <= len(head):
            byte_rate = struct.unpack_from("<I", head, at + 16)[0]
        elif chunk == b"data":
            if not byte_rate:
                return None
            # Count the bytes that are there, not the size the header claims:
            # a header can lie, and a streamed WAV leaves it unset.
            return (base64_size(data) - (at + 8)) / byte_rate
        at += 8 + size + (size & 1)
    return None
