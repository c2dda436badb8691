"""The least an HTTP API in front of Prefect can be: one POST forwarded, nothing else.

On uvicorn (as `runners-orchestrator serve` runs, same server and defaults), every POST's
body goes to one Prefect URL through one kept-alive httpx client, and Prefect's status and
body come back. No validation or policy. ``asgi``: a bare ASGI callable, no framework, the
cost of the second HTTP exchange alone; ``litestar``: the same forward as one Litestar route
handler, the framework's own cost on top. `bench/api_start.py` measures both beside our API
and Prefect itself.

Usage: python bench/bare_proxy.py {asgi,litestar} PORT TARGET_URL
"""

from __future__ import annotations

import sys
from typing import Any

import httpx
import uvicorn
from litestar import Litestar, Request, Response, get, post

KIND, PORT, TARGET = sys.argv[1], int(sys.argv[2]), sys.argv[3]
client = httpx.AsyncClient(timeout=120)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":  # lifespan: nothing to set up
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] != "POST":  # a readiness probe
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    answer = await client.post(TARGET, content=body, headers={"content-type": "application/json"})
    await send(
        {
            "type": "http.response.start",
            "status": answer.status_code,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": answer.content})


def litestar_app() -> Litestar:
    @get("/")
    async def ready() -> str:
        return ""

    @post("/")
    async def forward(request: Request[Any, Any, Any]) -> Response[bytes]:
        body = await request.body()
        answer = await client.post(
            TARGET, content=body, headers={"content-type": "application/json"}
        )
        return Response(
            answer.content, status_code=answer.status_code, media_type="application/json"
        )

    return Litestar([ready, forward])


if __name__ == "__main__":
    served = app if KIND == "asgi" else litestar_app()
    uvicorn.run(served, host="127.0.0.1", port=PORT, log_level="warning")
