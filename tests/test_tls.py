"""TLS contexts built once per process: one per CA file, verifying as httpx's own would."""

from __future__ import annotations

import ssl

import certifi

from runners_orchestrator._tls import certifi_tls_context, shared_tls_context
from runners_orchestrator.execution import runner_client


def test_one_context_per_ca_file_and_it_verifies():
    context = certifi_tls_context()
    assert context is shared_tls_context(cafile=certifi.where())
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert context.get_ca_certs()  # certifi's bundle was read into it
    assert shared_tls_context() is not context  # the system's store: another context


async def test_the_runner_client_uses_the_shared_context():
    client = runner_client()
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert pool._ssl_context is certifi_tls_context()
