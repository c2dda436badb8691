"""`run`'s client side: a start waits out an API that is not ready yet, on a real socket."""

from __future__ import annotations

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
