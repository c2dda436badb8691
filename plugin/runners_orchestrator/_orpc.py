"""The oRPC client's wire form: a JSON value wrapped as ``{"json": value}``.

The TypeScript orchestrator calls runner servers through oRPC's RPC link. It sends its input
as ``{"json": input}`` (with a ``"meta"`` list beside it only when the input holds values JSON
cannot carry: a ``Date``, a ``BigInt``, a ``Set``, ...) and reads its output, and its errors,
from the ``json`` member of the reply. So a runner server answers a wrapped request with a
wrapped reply and a plain request with a plain one, and an orchestrator reads either form.

``meta`` is accepted and not interpreted: the values it tags are read in their JSON form
(a date as its ISO string), which is what a plain JSON client would have sent.
"""

from __future__ import annotations

from typing import Any

__all__ = ["unwrap", "wrap"]

_WRAPPER_KEYS = frozenset({"json", "meta"})


def unwrap(payload: object) -> tuple[object, bool]:
    """Return the value inside an oRPC wrapper and ``True``, or ``payload`` and ``False``.

    A payload is wrapped when it is an object with a ``json`` member and nothing else
    besides ``meta``. No body of the runners contract has that shape of its own: a request
    needs ``runners`` and a reply ``results`` or ``code``.
    """
    if isinstance(payload, dict) and "json" in payload and payload.keys() <= _WRAPPER_KEYS:
        return payload["json"], True
    return payload, False


def wrap(value: object) -> dict[str, Any]:
    """Return ``value`` in the form an oRPC client reads (no ``meta``: ours is plain JSON)."""
    return {"json": value}
