"""Which addresses a runner server may fetch: the guard against server-side request forgery.

A runner server fetches whatever URL a job names, so a job could aim it at the cloud
metadata service (``169.254.169.254``) or, on an internet-facing server, at private
networks. The policy is judged on the *resolved* address of every connection, including
every redirect hop, so neither a DNS name nor a redirect can smuggle a refused address in:
:class:`PolicyNetworkBackend` plugs the check into httpcore's connect step and then
connects to the very address it checked (no second lookup that DNS rebinding could
change).

Rules: an address in an ``allow`` range is allowed; otherwise an address in a ``deny``
range is refused; everything else is allowed. The default denies link-local ranges only,
so loopback and private networks work for local development.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import httpcore

from runners_orchestrator.exceptions import ConfigurationError, TargetNotAllowedError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

__all__ = [
    "NAMED_RANGES",
    "IPNetwork",
    "PolicyNetworkBackend",
    "TargetPolicy",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAMED_RANGES: dict[str, tuple[str, ...]] = {
    "link-local": ("169.254.0.0/16", "fe80::/10"),
    "loopback": ("127.0.0.0/8", "::1/128"),
    "private": (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
    ),
    "unspecified": ("0.0.0.0/32", "::/128"),
    "multicast": ("224.0.0.0/4", "ff00::/8"),
}
"""Names an operator may use instead of CIDR ranges in ``deny`` and ``allow``."""


def _parse_ranges(values: Iterable[str], setting: str) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for raw in values:
        value = raw.strip()
        if not value:
            continue
        if value in NAMED_RANGES:
            networks.extend(ipaddress.ip_network(cidr) for cidr in NAMED_RANGES[value])
            continue
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            names = ", ".join(sorted(NAMED_RANGES))
            raise ConfigurationError(
                f"{setting}: {value!r} is not an address range; expected CIDR such as "
                f"'10.0.0.0/8' or '::1/128', or one of: {names}"
            ) from None
    return tuple(networks)


def _normalise(address: IPAddress) -> IPAddress:
    """Judge ``::ffff:169.254.169.254`` as the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class TargetPolicy:
    """Allowed and denied address ranges for the pages runners fetch."""

    deny: tuple[IPNetwork, ...] = field(
        default_factory=lambda: _parse_ranges(["link-local"], "deny")
    )
    """Ranges refused unless also allowed. Default: link-local (cloud metadata lives there)."""
    allow: tuple[IPNetwork, ...] = ()
    """Ranges allowed even when a ``deny`` range contains them."""

    @classmethod
    def from_strings(
        cls, deny: Sequence[str] | None = None, allow: Sequence[str] | None = None
    ) -> TargetPolicy:
        """Build a policy from CIDR strings or names of :data:`NAMED_RANGES`.

        ``deny=None`` keeps the default (link-local). The default is *added to*, never
        replaced, when ``deny`` is given: refusing the metadata service stays on unless an
        operator allows it explicitly.

        Raises:
            ConfigurationError: a value is neither a range nor a known name.
        """
        denied = _parse_ranges(["link-local", *(deny or ())], "deny")
        return cls(deny=denied, allow=_parse_ranges(allow or (), "allow"))

    def denied_by(self, address: str | IPAddress) -> IPNetwork | None:
        """Return the deny range that refuses ``address``, or ``None`` when it is allowed."""
        ip = _normalise(ipaddress.ip_address(address))
        if any(ip in network for network in self.allow if network.version == ip.version):
            return None
        for network in self.deny:
            if network.version == ip.version and ip in network:
                return network
        return None

    def check_address(self, address: str | IPAddress, host: str | None = None) -> None:
        """Raise :class:`TargetNotAllowedError` when ``address`` is refused."""
        network = self.denied_by(address)
        if network is not None:
            raise TargetNotAllowedError(host or str(address), str(address), str(network))

    async def resolve(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and return its addresses, refusing if any one is denied.

        A name with one denied address among allowed ones is refused as a whole: which
        address a connection would use is not ours to predict.

        Raises:
            TargetNotAllowedError: an address is in a denied range.
            OSError: the name does not resolve.
        """
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            pass
        else:  # nothing to resolve: no resolver thread for an address written out
            self.check_address(literal, host)
            return [str(literal)]
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses: list[str] = []
        for info in infos:
            address = str(info[4][0]).split("%", 1)[0]
            self.check_address(address, host)
            if address not in addresses:
                addresses.append(address)
        return addresses

    async def check_url(self, url: str) -> None:
        """Resolve the host of ``url`` and refuse it as a connection to it would be.

        Raises:
            TargetNotAllowedError: the host resolves to a denied address.
            OSError: the host does not resolve.
        """
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"URL {url!r} has no host")
        default_port = 443 if parts.scheme == "https" else 80
        await self.resolve(parts.hostname, parts.port or default_port)


class PolicyNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that checks the policy at every TCP connect.

    It resolves the host itself, refuses denied addresses, then connects to an address it
    checked. TLS still uses the URL's host name for SNI and certificate checks, because
    httpcore passes that name to ``start_tls`` separately.
    """

    def __init__(
        self, policy: TargetPolicy, backend: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._policy = policy
        self._backend = backend or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Resolve, check and connect; try each allowed address in turn."""
        try:
            addresses = await self._policy.resolve(host.strip("[]"), port)
        except OSError as exc:  # the name does not resolve: a connect error to httpx
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._backend.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
        if last_error is None:  # pragma: no cover - getaddrinfo never returns nothing
            raise httpcore.ConnectError(f"{host} resolved to no address")
        raise last_error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ARG002, ASYNC109
        socket_options: Iterable[Any] | None = None,  # noqa: ARG002
    ) -> httpcore.AsyncNetworkStream:
        """Refuse: runner targets are URLs, never local sockets."""
        raise httpcore.ConnectError(f"unix socket {path!r} is not a runner target")

    async def sleep(self, seconds: float) -> None:
        """Delegate to the wrapped backend."""
        await self._backend.sleep(seconds)
