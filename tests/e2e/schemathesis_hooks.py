"""Schemathesis hooks for the API test: no generated request leaves loopback.

Loaded by ``st run`` through ``SCHEMATHESIS_HOOKS``. Every string under a ``url`` key of a
generated body (a job's URL, or one inside a runner's ``input``) is replaced by the local
page named in ``ST_LOCAL_PAGE`` before the request is sent, so the runner servers fetch
127.0.0.1 and nothing else. Non-string values are left alone: they are the negative cases
the API must refuse. Schemathesis re-checks after the hook whether a case is still
positive or negative, so its checks judge what was really sent.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import schemathesis

PAGE = os.environ["ST_LOCAL_PAGE"]
if urlsplit(PAGE).hostname != "127.0.0.1":  # pragma: no cover - a misconfigured test
    raise RuntimeError(f"ST_LOCAL_PAGE must be on 127.0.0.1, not {PAGE}")


def _local(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            key: PAGE if key == "url" and isinstance(value, str) else _local(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_local(item) for item in node]
    return node


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Point every job URL of the body at the local page."""
    del context, kwargs
    if isinstance(case.body, dict | list):
        case.body = _local(case.body)
