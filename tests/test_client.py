"""`run`'s client side: a start waits out an API that is not ready yet, on a real socket."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from litestar import Litestar, Request, Response, post
from litestar.params import FromPath  # noqa: TC002 - Litestar reads it at run time

from helpers import serve_app
from runners_orchestrator.client import ApiBackend, RunStartError


class NotReadyApi:
    """An orchestrator API that answers 503 with Retry-After a scripted number of times.

    A real API answers 503 only while Prefect or a deployment is missing, which a unit of the
    client cannot arrange on cue; this app answers on a real socket, and records every key.
    """

    def __init__(self, not_ready: int) -> None:
        self.not_ready = not_ready
        self.keys: list[str | None] = []

        @post("/api/orchestrator/{name:str}", status_code=202)
        async def start(name: FromPath[str], request: Request[Any, Any, Any]) -> Response[Any]:
            self.keys.append(request.headers.get("idempotency-key"))
            if len(self.keys) <= self.not_ready:
                body = {"error": "not_ready", "message": f"no deployment of {name} yet"}
                return Response(body, status_code=503, headers={"Retry-After": "0.2"})
            return Response({"runId": "5d0c7bb8-7ad4-4d1b-a8a5-8b2d0f3ad1c1"}, status_code=202)

        self.app = Litestar([start])


async def test_start_waits_out_503_with_one_key_and_says_so():
    api = NotReadyApi(not_ready=2)
    said: list[str] = []
    with serve_app(api.app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            backend = ApiBackend(http, "/api/orchestrator", on_wait=said.append)
            run_id = await backend.start("orchestrate_runners", {"jobs": []})
    assert run_id == "5d0c7bb8-7ad4-4d1b-a8a5-8b2d0f3ad1c1"
    assert len(api.keys) == 3
    assert api.keys[0] is not None
    assert len(set(api.keys)) == 1  # a retry can never start a second run
    assert len(said) == 2
    assert "HTTP 503: no deployment of orchestrate_runners yet" in said[0]
    assert "retrying in 0.2s" in said[0]


async def test_start_gives_up_after_its_budget_with_the_reason():
    api = NotReadyApi(not_ready=1000)
    with serve_app(api.app) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            backend = ApiBackend(http, "/api/orchestrator", start_wait=1.0)
            with pytest.raises(RunStartError, match="HTTP 503: no deployment"):
                await backend.start("orchestrate_runners", {"jobs": []})
    assert 2 <= len(api.keys) <= 8  # bounded: about 1 s of 0.2 s waits


class DroppingApi:
    """Answers on keep-alive connections, but closes one unanswered after a first answer.

    What HAProxy does when it reused an idle backend connection that was closing: the
    client's connection is closed without a response, for the client to retry. Raw asyncio
    streams, because an ASGI server cannot be told to drop a request.
    """

    LIST = b'{"workflows": []}'
    STARTED = b'{"runId": "5d0c7bb8-7ad4-4d1b-a8a5-8b2d0f3ad1c1"}'

    def __init__(self, drop: int) -> None:
        self.drop = drop
        self.requests: list[tuple[str, str | None]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode().split("\r\n")
                fields = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
                await reader.readexactly(int(fields.get("content-length", "0")))
                method = lines[0].split()[0]
                self.requests.append((method, fields.get("idempotency-key")))
                if len(self.requests) == self.drop:
                    break
                started = method == "POST"
                status, body = ("202 Accepted", self.STARTED) if started else ("200 OK", self.LIST)
                writer.write(
                    f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("drop", [2, 3])
async def test_a_request_closed_unanswered_is_sent_once_more_with_its_key(drop):
    api = DroppingApi(drop)
    server = await asyncio.start_server(api.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        backend = ApiBackend(http, "/api/orchestrator")
        assert await backend.workflows() == {}
        run_id = await backend.start("orchestrate_runners", {"jobs": []})
        if drop == 3:  # the start was answered; the next list is the one dropped
            assert await backend.workflows() == {}
    assert run_id == "5d0c7bb8-7ad4-4d1b-a8a5-8b2d0f3ad1c1"
    assert len(api.requests) == (4 if drop == 3 else 3)
    started = [key for method, key in api.requests if method == "POST"]
    assert started[0] is not None
    assert len(set(started)) == 1  # the same key: a second start can never be a second run
