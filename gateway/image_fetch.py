"""Remote images, fetched by the gateway itself from hosts the operator names.

Off by default: with no `[media.fetch] allow_hosts`, every non-`data:` URL is
refused (gateway.media) and nothing leaves the gateway. With an allow-list,
an `image_url` whose host is on it is fetched here, checked like any inline
image, and forwarded to the engine as a `data:` URL, so the engine still never
touches the network (it has no route out; see docs/media.md).

What a fetch may do, and why:
- https only, unless `allow_http`; never `file:` or anything else.
- The host (and port) must be listed exactly: no wildcards, no suffix
  matching, no user:password@ in the URL.
- Redirects are not followed: a listed host must not be able to bounce the
  gateway to an unlisted one.
- No proxy from the environment (trust_env off): the route is the one the
  operator configured, not one a stray HTTPS_PROXY picks.
- The body is read in chunks and cut off past `max_bytes`, whatever
  Content-Length claims; the whole fetch, connect to last byte, is bounded by
  `timeout_seconds`.
- Only unencoded bodies (`Accept-Encoding: identity`, and a body sent with a
  Content-Encoding anyway is refused): decoding gzip, brotli or zstd here would
  let a few kilobytes on the wire become megabytes in memory per chunk, before
  the byte limit could see them.
- The bytes must sniff as PNG, JPEG, WebP or GIF; the response's
  Content-Type is not trusted.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from urllib.parse import urlsplit

import httpx

from gateway.errors import BadRequest
from gateway.media import sniff
from gateway.settings import FetchSettings

_DEFAULT_PORTS = {"https": 443, "http": 80}


def _refuse(message: str, reason: str, param: str) -> BadRequest:
    return BadRequest(message, param=param, code="invalid_media", audit_reason=reason)


class ImageFetcher:
    def __init__(self, settings: FetchSettings, ca_file: str | None = None):
        self.settings = settings
        self._allowed = settings.hosts()
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            verify=verify,
            timeout=httpx.Timeout(settings.timeout_seconds),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=8),
            headers={"user-agent": "bastion-image-fetch", "accept-encoding": "identity"},
        )

    def allows(self, url: str) -> bool:
        """Whether `url` is one the gateway may fetch (scheme and host:port listed)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return False
        schemes = ("https", "http") if self.settings.allow_http else ("https",)
        if parts.scheme not in schemes or not parts.hostname or parts.username or parts.password:
            return False
        host = parts.hostname.lower()
        if (port is None or port == _DEFAULT_PORTS[parts.scheme]) and (host, None) in self._allowed:
            return True
        return (host, port or _DEFAULT_PORTS[parts.scheme]) in self._allowed

    async def fetch(self, url: str, param: str) -> bytes:
        """The image's bytes; BadRequest (400, audited) on anything but a clean 200 within the limits."""
        if not self.allows(url):
            raise _refuse("This image URL's host is not on the gateway's allow-list.", "media_remote_url", param)
        limit = self.settings.max_bytes
        try:
            async with asyncio.timeout(self.settings.timeout_seconds):
                async with self._client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise _refuse(
                            f"Fetching the image failed: the server answered {response.status_code}"
                            + (" (redirects are not followed)." if response.is_redirect else "."),
                            "media_fetch_failed",
                            param,
                        )
                    encoding = response.headers.get("content-encoding", "identity").strip().lower()
                    if encoding != "identity":
                        raise _refuse(
                            f"Fetching the image failed: the server sent it {encoding}-encoded; "
                            "the gateway accepts only unencoded images.",
                            "media_fetch_failed",
                            param,
                        )
                    data = bytearray()
                    async for chunk in response.aiter_raw():
                        data += chunk
                        if len(data) > limit:
                            raise _refuse(
                                f"The image at this URL is over the fetch limit of {limit} bytes.",
                                "media_too_large",
                                param,
                            )
        except TimeoutError:
            raise _refuse(
                f"Fetching the image took over {self.settings.timeout_seconds:g} s.", "media_fetch_failed", param
            ) from None
        except httpx.HTTPError as exc:
            raise _refuse(f"Fetching the image failed: {type(exc).__name__}.", "media_fetch_failed", param) from None
        return bytes(data)

    async def as_data_url(self, url: str, param: str) -> str:
        """Fetch `url` and return it as a `data:` URL typed by its bytes, for gateway.media to check."""
        data = await self.fetch(url, param)
        mime = sniff(data)
        if mime is None:
            raise _refuse("The URL did not return a PNG, JPEG, WebP or GIF image.", "media_type_mismatch", param)
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"

    async def close(self) -> None:
        await self._client.aclose()
