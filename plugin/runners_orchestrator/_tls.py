"""TLS contexts built once per process and shared by its HTTP clients.

Building an ``ssl`` context means parsing a CA bundle: 27-36 ms of CPU on the reference
machine. httpx and Prefect build one per client, whatever the URL's scheme; a flow run's
process made eight before its first check (``run_process``). A context is safe to share
between clients that trust the same certificates, which httpx recommends.
"""

from __future__ import annotations

import ssl
import threading

import certifi

__all__ = ["certifi_tls_context", "shared_tls_context"]

_tls_contexts: dict[tuple[object, ...], ssl.SSLContext] = {}
_tls_lock = threading.Lock()


def shared_tls_context(
    purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH,
    *,
    cafile: str | None = None,
    capath: str | None = None,
    cadata: str | bytes | None = None,
) -> ssl.SSLContext:
    """``ssl.create_default_context``, built once per set of arguments in this process.

    Reading a CA bundle is the expensive part of a context (27-36 ms of CPU on the
    reference machine); a context is safe to share between clients that trust the same
    certificates. Callers must not load client certificates into the shared context.
    """
    key = (purpose, cafile, capath, cadata)
    context = _tls_contexts.get(key)
    if context is None:
        with _tls_lock:
            context = _tls_contexts.get(key)
            if context is None:
                context = ssl.create_default_context(
                    purpose, cafile=cafile, capath=capath, cadata=cadata
                )
                _tls_contexts[key] = context
    return context


def certifi_tls_context() -> ssl.SSLContext:
    """The shared context that trusts certifi's bundle: httpx's default, built once."""
    return shared_tls_context(cafile=certifi.where())
