"""A minimal ASGI page server for benchmarks: one cookie-banner page, as fast as uvicorn goes.

``?delay=S`` answers after S seconds (a slow page, as a browser check of a real site takes).

Usage: python bench/page_server.py PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any
from urllib.parse import parse_qs

import uvicorn

PAGE = (
    b"<!doctype html><html><head><title>Bench page</title></head><body>"
    b'<div class="cookie-banner">We use cookies</div>' + b"<p>filler</p>" * 200 + b"</body></html>"
)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    delay = parse_qs(scope.get("query_string", b"").decode()).get("delay")
    if delay:
        await asyncio.sleep(float(delay[0]))
    headers = [(b"content-type", b"text/html; charset=utf-8")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": PAGE})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
