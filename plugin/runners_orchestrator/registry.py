"""Which runner servers exist, and which of them are healthy right now.

A registry lists servers (:class:`Registry`); :class:`HealthChecker` probes their
``/health`` concurrently with a short timeout and keeps what it learns for the whole
process, so every job of every run sees it:

- a server that fails (a probe, or a job's connection error or timeout) is **ejected**: no
  job is sent to it until a probe brings it back. One failure streak is one ejection: more
  jobs failing on a server already out change nothing. It is probed again
  ``ejection_seconds`` after it went out, then after ``ejection_seconds`` times one more than
  the number of failed probes (at most ten times), the way Envoy ejects outliers;
- a server is **confirmed** once it answered over HTTP (a probe or a job, even a 429)
  since it last failed. A
  server that is not confirmed takes one job at a time, a trial: a silent server costs one
  job its ``connect_timeout``, not one per job in flight.

Ejection state is per process, which costs at most one failed probe or trial per server per
process: with ``serve-flows --start in-process`` every run of the serving
process shares what one learned; with a process per run, each run learns on its own.

It also learns **which runners each server has**, from its ``GET /info``, so that a job goes
only to servers that have every runner it names (see ``docs/runner-server.md``, *Routing by
capability*). The list is read with the health probe and kept per server for
``capability_seconds`` (a minute), so a run costs at most one ``/info`` per server and a job
none. A server that goes out is asked again when it is back (a restart may change its
runners), and a ``RUNNER_NOT_FOUND`` answer of a server corrects the list at once
(:meth:`HealthChecker.learn_runners`). A server whose ``/info`` cannot be read (an error, a
body without a ``runners`` list) is **unknown**: it may be sent any job, and its first
``RUNNER_NOT_FOUND`` answer teaches what it has, the job then failing over to a peer that has
its runners. Skipping such servers instead would strand every job on a server that only lacks
an ``/info`` route.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import httpx
from pydantic import BaseModel, Field

from runners_orchestrator._plugins import load_named
from runners_orchestrator.exceptions import ConfigurationError
from runners_orchestrator.settings import RegistryConfig, ServerConfig

if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Iterator, Sequence

__all__ = [
    "AvailableServer",
    "HealthChecker",
    "InMemoryRegistry",
    "Registry",
    "ServerPool",
    "UnavailableServer",
    "registry_from_config",
]

REGISTRY_ENTRY_POINTS = "runners_orchestrator.registries"
MAX_EJECTION_MULTIPLIER = 10
CAPABILITY_SECONDS = 60.0
"""How long the runners a server's ``/info`` listed are trusted before it is asked again."""


@runtime_checkable
class Registry(Protocol):
    """Lists the runner servers. Implement it to read them from DNS, a database, ..."""

    async def servers(self) -> Sequence[ServerConfig]:
        """Return every known server (healthy or not)."""
        ...


@dataclass(frozen=True)
class InMemoryRegistry:
    """The servers listed in settings (``registry.servers``)."""

    configured: tuple[ServerConfig, ...] = ()

    @classmethod
    def from_config(cls, config: RegistryConfig) -> InMemoryRegistry:
        """Build from the ``registry`` setting."""
        return cls(tuple(config.servers))

    async def servers(self) -> Sequence[ServerConfig]:
        """Return the configured servers."""
        return self.configured


def registry_from_config(config: RegistryConfig) -> Registry:
    """Build the registry the ``type`` of ``config`` names.

    Raises:
        ConfigurationError: unknown type, or the type does not build a :class:`Registry`.
    """
    factory = load_named(
        "registry type", config.type, {"in-memory": InMemoryRegistry}, REGISTRY_ENTRY_POINTS
    )
    build = getattr(factory, "from_config", factory)
    registry = build(config)
    if not isinstance(registry, Registry):
        raise ConfigurationError(
            f"registry type {config.type!r} built {type(registry).__name__}, "
            "which has no async servers() method"
        )
    return registry


class AvailableServer(BaseModel):
    """A healthy server as a probe saw it: its configuration and its load at that moment."""

    server: ServerConfig
    in_flight: int = Field(default=0, ge=0, description="Requests in flight it reported.")
    capacity: int = Field(ge=1, description="Capacity it reported (or the configured one).")
    local_at_probe: int = Field(
        default=0, ge=0, description="Requests this process had in flight to it at probe time."
    )
    runners: list[str] | None = Field(
        default=None,
        description="The runners its /info listed; None when unknown (it may have any).",
    )

    def can_run(self, names: Iterable[str]) -> bool:
        """It has every runner in ``names``, or what it has is unknown."""
        return self.runners is None or set(names).issubset(self.runners)

    @property
    def id(self) -> str:
        """The server's id."""
        return self.server.id

    @property
    def region(self) -> str | None:
        """The server's region."""
        return self.server.region


class UnavailableServer(BaseModel):
    """A registered server left out of a lookup, and why."""

    id: str
    region: str | None = None
    reason: str


class ServerPool(BaseModel):
    """The result of a lookup: the healthy servers, and why the others were left out."""

    region: str | None = None
    available: list[AvailableServer] = Field(default_factory=list)
    unavailable: list[UnavailableServer] = Field(default_factory=list)

    def in_region(self, region: str | None) -> list[AvailableServer]:
        """Servers a job of ``region`` may use: all of them when ``region`` is unset."""
        if region is None:
            return list(self.available)
        return [s for s in self.available if s.region == region]

    def why_none(self, region: str | None) -> str:
        """Explain why no server can take a job of ``region``."""
        where = f"in region {region!r}" if region else "in any region"
        left_out = [u for u in self.unavailable if region is None or u.region == region]
        if not left_out:
            return f"no runner server is registered {where}; add one to the registry setting"
        detail = "; ".join(f"{u.id}: {u.reason}" for u in left_out)
        return f"no healthy runner server {where} ({detail})"


@dataclass
class _Ejection:
    until: float
    """When the server is due for its next probe."""
    count: int
    """Failed probes in this streak, plus one: the multiplier of the next wait."""
    reason: str


@dataclass
class _Capability:
    runners: frozenset[str] | None
    """``None``: the server's ``/info`` could not be read."""
    learned: float
    """When (monotonic) it was read or corrected."""


def _runner_names(body: object) -> frozenset[str] | None:
    """The ``runners`` of an ``/info`` body (ours or the TypeScript one), if it lists them."""
    if isinstance(body, dict) and isinstance(body.get("json"), dict):
        body = body["json"]  # a server built on oRPC's RPC handler wraps every answer
    runners = body.get("runners") if isinstance(body, dict) else None
    if not isinstance(runners, list) or not all(isinstance(r, str) for r in runners):
        return None
    return frozenset(runners)


@dataclass
class HealthChecker:
    """Probes servers and remembers, for the whole process, which ones to leave alone.

    And which runners each one has: see the module docstring.
    """

    timeout: float = 1.0
    ejection_seconds: float = 30.0
    capability_seconds: float = CAPABILITY_SECONDS
    _capabilities: dict[str, _Capability] = field(default_factory=dict)
    _ejected: dict[str, _Ejection] = field(default_factory=dict)
    _confirmed: set[str] = field(default_factory=set)
    _trials: dict[str, int] = field(default_factory=dict)
    _probing: set[str] = field(default_factory=set)

    def eject(self, server_id: str, reason: str) -> None:
        """Leave ``server_id`` out until a probe brings it back.

        A server already out stays out as it was: jobs that were in flight to it when it
        failed do not extend its ejection (one ejection per failure streak).
        """
        self._confirmed.discard(server_id)
        self._stale(server_id)
        if server_id not in self._ejected:
            self._ejected[server_id] = _Ejection(
                until=time.monotonic() + self.ejection_seconds, count=1, reason=reason
            )

    def probe_failed(self, server_id: str, reason: str) -> None:
        """A probe found ``server_id`` still down: probe again later, a little later each time."""
        self._confirmed.discard(server_id)
        self._stale(server_id)
        previous = self._ejected.get(server_id)
        count = min((previous.count if previous else 0) + 1, MAX_EJECTION_MULTIPLIER)
        self._ejected[server_id] = _Ejection(
            until=time.monotonic() + self.ejection_seconds * count, count=count, reason=reason
        )

    def restore(self, server_id: str) -> None:
        """Forget a server's failures: it answered."""
        self._ejected.pop(server_id, None)
        self._confirmed.add(server_id)

    def confirm(self, server_id: str) -> None:
        """``server_id`` answered over HTTP (whatever it said): it takes connections again.

        Unlike :meth:`restore`, this does not bring back a server that is out; a 429 or a
        5xx proves the server is reachable, not that it works.
        """
        if server_id not in self._ejected:
            self._confirmed.add(server_id)

    def _stale(self, server_id: str) -> None:
        """Ask ``server_id``'s ``/info`` again at its next good probe.

        Back after a restart, its runners may differ; until then, what it had stays the
        best guess.
        """
        known = self._capabilities.get(server_id)
        if known is not None:
            known.learned = float("-inf")

    def runners_of(self, server_id: str) -> frozenset[str] | None:
        """The runners ``server_id`` has, as last learned; ``None`` when unknown."""
        known = self._capabilities.get(server_id)
        return known.runners if known is not None else None

    def knows_runners(self, server_id: str) -> bool:
        """What ``server_id`` has was learned (from ``/info`` or an answer), even if unknown."""
        return server_id in self._capabilities

    def learn_runners(self, server_id: str, runners: Iterable[str] | None) -> None:
        """Remember what ``server_id`` has; ``None`` when it cannot be told.

        From its ``/info``, or from a ``RUNNER_NOT_FOUND`` answer's ``availableRunners``.
        """
        names = None if runners is None else frozenset(runners)
        self._capabilities[server_id] = _Capability(names, time.monotonic())

    def can_run(self, server: AvailableServer, names: Collection[str]) -> bool:
        """``server`` has every runner in ``names``, or what it has is unknown.

        What this process learned last wins over the lookup's snapshot
        (``server.runners``), so a ``RUNNER_NOT_FOUND`` answer counts at once.
        """
        known = self._capabilities.get(server.id)
        runners = known.runners if known is not None else _frozen(server.runners)
        return runners is None or runners.issuperset(names)

    def is_out(self, server_id: str) -> bool:
        """``server_id`` is ejected: no job may use it until a probe brings it back."""
        return server_id in self._ejected

    def is_due(self, server_id: str) -> bool:
        """``server_id`` is out, its next probe is due, and no probe of it is running."""
        ejection = self._ejected.get(server_id)
        return (
            ejection is not None
            and ejection.until <= time.monotonic()
            and server_id not in self._probing
        )

    def ejected_reason(self, server_id: str) -> str | None:
        """Why ``server_id`` is skipped until its next probe, or ``None`` if it may be probed."""
        ejection = self._ejected.get(server_id)
        if ejection is None or ejection.until <= time.monotonic():
            return None
        left = ejection.until - time.monotonic()
        return f"{ejection.reason} (probed again in {left:.0f}s)"

    def on_trial(self, server_id: str) -> bool:
        """``server_id`` is not confirmed and a job is trying it: others should wait or go on."""
        return server_id not in self._confirmed and self._trials.get(server_id, 0) > 0

    @contextmanager
    def attempt(self, server_id: str) -> Iterator[None]:
        """Count an attempt on a server that is not confirmed as its trial while it runs."""
        trial = server_id not in self._confirmed
        if trial:
            self._trials[server_id] = self._trials.get(server_id, 0) + 1
        try:
            yield
        finally:
            if trial:
                self._trials[server_id] -= 1

    def is_probing(self, server_id: str) -> bool:
        """A probe of the ejected ``server_id`` is running: it may be back in a moment."""
        return server_id in self._probing

    def claim_probe(self, server_id: str) -> bool:
        """Take the due probe of ``server_id`` for the caller (then :meth:`reprobe` it).

        ``False`` when it is not due or someone else probes it: one probe at a time.
        """
        if not self.is_due(server_id):
            return False
        self._probing.add(server_id)
        return True

    def why_out(self, server_id: str) -> str | None:
        """The reason ``server_id`` is ejected, however soon its next probe is."""
        ejection = self._ejected.get(server_id)
        return ejection.reason if ejection else None

    async def reprobe(self, client: httpx.AsyncClient, server: ServerConfig) -> bool:
        """Probe an ejected server claimed with :meth:`claim_probe`; bring it back if it answers.

        Returns:
            ``True`` if the server answered and may take jobs again.
        """
        try:
            outcome = await self.probe(client, server)
        finally:
            self._probing.discard(server.id)
        if isinstance(outcome, AvailableServer):
            self.restore(server.id)
            return True
        self.probe_failed(server.id, outcome)
        return False

    async def probe(
        self, client: httpx.AsyncClient, server: ServerConfig, local_in_flight: int = 0
    ) -> AvailableServer | str:
        """Ask ``server`` for its health; return it as available, or the reason it is not."""
        try:
            response = await client.get(f"{server.url}/health", timeout=self.timeout)
        except httpx.TimeoutException:
            return f"health probe timed out after {self.timeout:g}s"
        except httpx.TransportError as exc:
            return f"unreachable: {type(exc).__name__}: {exc}".rstrip(": ")
        if response.status_code == httpx.codes.NOT_FOUND:
            # A TypeScript runner server has no /health; /info proves it is up.
            return await self._probe_info(client, server, local_in_flight)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != httpx.codes.OK or not isinstance(body, dict):
            return f"health answered HTTP {response.status_code}"
        if body.get("status") != "ok":
            return f"health status is {body.get('status')!r}"
        in_flight = body.get("inFlight")
        capacity = body.get("capacity")
        return AvailableServer(
            server=server,
            in_flight=in_flight if isinstance(in_flight, int) and in_flight >= 0 else 0,
            capacity=capacity if isinstance(capacity, int) and capacity > 0 else server.capacity,
            local_at_probe=local_in_flight,
            runners=await self._capability(client, server),
        )

    def _capability_fresh(self, server_id: str) -> bool:
        known = self._capabilities.get(server_id)
        return known is not None and time.monotonic() - known.learned < self.capability_seconds

    async def _capability(
        self, client: httpx.AsyncClient, server: ServerConfig
    ) -> list[str] | None:
        """The runners ``server`` has: remembered, or read from its ``/info`` when stale.

        An ``/info`` that cannot be read makes them unknown (``None``) for as long as a
        list would be trusted: the server is not asked on every probe.
        """
        if not self._capability_fresh(server.id):
            try:
                response = await client.get(f"{server.url}/info", timeout=self.timeout)
                body = response.json() if response.status_code == httpx.codes.OK else None
            except (httpx.HTTPError, ValueError):
                body = None
            self.learn_runners(server.id, _runner_names(body))
        return _listed(self.runners_of(server.id))

    async def _probe_info(
        self, client: httpx.AsyncClient, server: ServerConfig, local_in_flight: int
    ) -> AvailableServer | str:
        try:
            response = await client.get(f"{server.url}/info", timeout=self.timeout)
        except httpx.HTTPError as exc:
            return f"unreachable: {type(exc).__name__}"
        if response.status_code != httpx.codes.OK:
            return f"health and info answered HTTP {response.status_code}"
        try:
            self.learn_runners(server.id, _runner_names(response.json()))
        except ValueError:
            self.learn_runners(server.id, None)
        return AvailableServer(
            server=server,
            capacity=server.capacity,
            local_at_probe=local_in_flight,
            runners=_listed(self.runners_of(server.id)),
        )

    async def check(
        self,
        client: httpx.AsyncClient,
        servers: Sequence[ServerConfig],
        local_load: dict[str, int] | None = None,
        region: str | None = None,
    ) -> ServerPool:
        """Probe the servers that are not ejected, concurrently; eject those that fail."""
        pool = ServerPool(region=region)
        to_probe: list[ServerConfig] = []
        for server in servers:
            reason = self.ejected_reason(server.id)
            if reason is None:
                to_probe.append(server)
            else:
                pool.unavailable.append(
                    UnavailableServer(id=server.id, region=server.region, reason=reason)
                )
        loads = local_load or {}
        outcomes = await asyncio.gather(
            *(self.probe(client, s, loads.get(s.id, 0)) for s in to_probe)
        )
        for server, outcome in zip(to_probe, outcomes, strict=True):
            if isinstance(outcome, AvailableServer):
                self.restore(server.id)
                pool.available.append(outcome)
            else:
                self.probe_failed(server.id, outcome)
                pool.unavailable.append(
                    UnavailableServer(id=server.id, region=server.region, reason=outcome)
                )
        return pool


def _frozen(runners: list[str] | None) -> frozenset[str] | None:
    return None if runners is None else frozenset(runners)


def _listed(runners: frozenset[str] | None) -> list[str] | None:
    return None if runners is None else sorted(runners)
