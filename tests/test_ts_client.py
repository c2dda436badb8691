"""The upstream TypeScript orchestrator's own oRPC client, in Node, against our runner server.

``tests/ts_client/orpc_execute.mjs`` calls ``/execute`` the way that orchestrator does and
prints what it reads. This runs only where Node is installed and ``npm ci`` has been run in
``tests/ts_client`` (``make test`` does; it needs ``@orpc/client`` from the npm registry);
elsewhere it is skipped (never in CI), and ``test_ts_contract.py`` checks the same wire
forms from Python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from helpers import ScriptedRunnerServer, serve_app

CLIENT_DIR = Path(__file__).parent / "ts_client"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    not os.environ.get("CI")
    and (NODE is None or not (CLIENT_DIR / "node_modules" / "@orpc" / "client").is_dir()),
    reason="needs node and `npm ci --prefix tests/ts_client` (`make test` runs it; CI never skips)",
)


def orpc_execute(runner_api: str, payload: dict[str, Any]) -> dict[str, Any]:
    """What the oRPC client reads from ``runner_api``'s ``/execute`` for ``payload``."""
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(CLIENT_DIR / "orpc_execute.mjs"), runner_api, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_typescript_client_reads_our_results(cli_runner_server, pages):
    url = pages.url("/banner-visible")
    payload = {
        "url": url,
        "runners": [{"name": "cookieBannerVisibleTest", "input": {"url": url}}],
        "runId": "run-node-1",
        "region": "us-east-1",
    }
    read = orpc_execute(f"{cli_runner_server}/api/runner", payload)
    assert read["ok"], read
    output = read["output"]
    assert (output["region"], output["runId"]) == ("us-east-1", "run-node-1")
    (result,) = output["results"]
    assert result["status"] == "pass"
    assert result["details"] == {"visible": True, "selector": ".cookie-banner", "elementCount": 1}


@pytest.mark.parametrize(
    ("runners", "status", "code"),
    [(["noSuchRunner"], 404, "RUNNER_NOT_FOUND"), ([], 400, "BAD_REQUEST")],
)
def test_typescript_client_reads_our_errors(cli_runner_server, runners, status, code):
    read = orpc_execute(
        f"{cli_runner_server}/api/runner", {"url": "http://127.0.0.1:9/", "runners": runners}
    )
    assert not read["ok"]
    assert (read["error"]["code"], read["error"]["status"]) == (code, status)


def test_a_plain_answer_reads_as_nothing_to_the_typescript_client():
    # The control: what every job of that client got before our server answered wrapped.
    plain = ScriptedRunnerServer().always(200, {"region": "us-east-1", "results": []})
    with serve_app(plain) as base:
        read = orpc_execute(f"{base}/api/runner", {"url": "http://127.0.0.1:9/", "runners": ["a"]})
    assert read == {"ok": True, "output": None}
