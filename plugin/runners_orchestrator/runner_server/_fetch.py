"""The runner server's HTTP client: pooled, policy-checked, bounded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpcore
import httpx

from runners_orchestrator.exceptions import RunnerError
from runners_orchestrator.target_policy import PolicyNetworkBackend, TargetPolicy

if TYPE_CHECKING:
    from runners_orchestrator.runner_server._registry import RunnerContext

__all__ = ["Page", "create_fetch_client", "fetch_page"]

USER_AGENT = "runners-orchestrator-runner/0.1 (+https://github.com/consentdotio/runners)"


def create_fetch_client(
    policy: TargetPolicy | None = None,
    *,
    timeout: float = 30.0,
    max_connections: int = 200,
) -> httpx.AsyncClient:
    """Return the client runners fetch pages with.

    Every TCP connect, the first and every redirect hop's, goes through
    :class:`PolicyNetworkBackend`, so following redirects is safe. Environment proxies are
    ignored (``trust_env=False``): a proxy would hide the real target from the policy.
    """
    transport = httpx.AsyncHTTPTransport(retries=0)
    # httpx has no public hook for the network backend; swap in a pool that uses ours.
    # tests/test_target_policy.py proves the check still runs if httpx changes underneath.
    transport._pool = httpcore.AsyncConnectionPool(  # noqa: SLF001
        ssl_context=httpx.create_ssl_context(),
        max_connections=max_connections,
        max_keepalive_connections=max_connections // 4,
        keepalive_expiry=5.0,
        network_backend=PolicyNetworkBackend(policy or TargetPolicy()),
    )
    return httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        follow_redirects=True,
        max_redirects=10,
        trust_env=False,
        headers={"User-Agent": USER_AGENT, "Accept": "text/html,*/*;q=0.8"},
    )


@dataclass(frozen=True)
class Page:
    """A fetched page: where the redirects ended, its status and its decoded text."""

    url: str
    status_code: int
    text: str


async def fetch_page(ctx: RunnerContext, url: str | None = None) -> Page:
    """GET ``url`` (the context's URL by default) within the runner's deadline.

    Raises:
        RunnerError: no URL, the page is unreachable, too large, or answers 4xx/5xx.
        TargetNotAllowedError: the URL or a redirect points at a refused address.
    """
    target = url or ctx.url
    if not target:
        raise RunnerError("url is required in input")
    timeout = max(ctx.remaining(), 0.001)
    try:
        async with ctx.client.stream("GET", target, timeout=timeout) as response:
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > ctx.max_page_bytes:
                    raise RunnerError(
                        f"{target} is larger than {ctx.max_page_bytes} bytes; "
                        "raise the runner server's max page size to check it"
                    )
                chunks.append(chunk)
            body = b"".join(chunks)
    except httpx.TimeoutException as exc:
        raise RunnerError(f"{target} did not answer within {timeout:.1f}s") from exc
    except httpx.TooManyRedirects as exc:
        raise RunnerError(f"{target} redirects too many times") from exc
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise RunnerError(f"could not fetch {target}: {reason}") from exc
    if response.status_code >= 400:  # noqa: PLR2004 - HTTP's own boundary
        raise RunnerError(f"{target} answered HTTP {response.status_code}")
    encoding = response.charset_encoding or "utf-8"
    try:
        text = body.decode(encoding, errors="replace")
    except LookupError:
        text = body.decode("utf-8", errors="replace")
    return Page(url=str(response.url), status_code=response.status_code, text=text)
