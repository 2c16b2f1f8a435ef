"""Image URLs fetched for an upstream that takes only inline images (Gemini), when the config's
`translate.fetch_images` allows it: asynchronously, bounded in size and time."""
from __future__ import annotations

import asyncio

from ..translate.base import TranslateError

_CONTENT_TYPES = ("image/", "application/pdf")


async def fetch(urls: list[str], max_bytes: int, timeout_s: float) -> dict[str, tuple[str, bytes]]:
    """{url: (media type, bytes)}; raises TranslateError(400) naming the URL that could not be fetched."""
    import httpx2  # only calls that fetch images pay for the client

    out: dict[str, tuple[str, bytes]] = {}
    async with httpx2.AsyncClient(timeout=timeout_s, follow_redirects=True, max_redirects=3) as client:
        for url in urls:
            try:
                async with asyncio.timeout(timeout_s):
                    async with client.stream("GET", url) as resp:
                        if resp.status_code != 200:
                            raise TranslateError(400, f"image {url}: fetching it answered {resp.status_code}")
                        media = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                        if not media.startswith(_CONTENT_TYPES):
                            raise TranslateError(400, f"image {url}: content type {media or 'none'!r} is not an image")
                        data = bytearray()
                        async for chunk in resp.aiter_bytes():
                            data += chunk
                            if len(data) > max_bytes:
                                raise TranslateError(400, f"image {url} is larger than translate.max_image_bytes "
                                                          f"({max_bytes})")
            except TimeoutError:
                raise TranslateError(400, f"image {url}: not fetched within translate.image_timeout_s "
                                          f"({timeout_s:g} s)") from None
            except httpx2.HTTPError as e:
                raise TranslateError(400, f"image {url}: fetching it failed: {type(e).__name__}: {e}") from None
            out[url] = (media, bytes(data))
    return out
