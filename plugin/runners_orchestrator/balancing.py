"""Load balancers: choose one server among the healthy candidates for a job.

Region affinity comes first and is the same for every balancer: a job with a ``region``
may only go to servers of that region; a job without one may go anywhere
(:func:`candidates_for`). The balancer then picks among the candidates:

- ``least-load`` — the lowest estimated load relative to capacity. The estimate starts from
  what the server reported at the last probe (every client's requests, not only ours) and
  adds what this process has started or finished since: ``reported - ours_then + ours_now``.
  Ties are broken at random so that many processes do not all pick the same server.
- ``round-robin`` — each candidate in turn.
- ``random`` — uniformly at random.
- ``weighted`` — in proportion to each server's ``weight``, spread smoothly (nginx's smooth
  weighted round-robin), deterministic for a given candidate set.

Add your own by name through the ``runners_orchestrator.load_balancers`` entry-point group
or an import path (``mypackage.balancers:Fastest``); see ``docs/configuration.md``.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from runners_orchestrator._plugins import load_named
from runners_orchestrator.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from runners_orchestrator.registry import AvailableServer
    from runners_orchestrator.settings import LoadBalancerConfig

__all__ = [
    "LOCAL_LOAD",
    "LeastLoadBalancer",
    "LoadBalancer",
    "LocalLoad",
    "RandomBalancer",
    "RoundRobinBalancer",
    "WeightedBalancer",
    "candidates_for",
    "load_balancer_from_config",
]

BALANCER_ENTRY_POINTS = "runners_orchestrator.load_balancers"


_COUNTS_LOCK = threading.Lock()


@dataclass
class LocalLoad:
    """Requests this process has in flight, per server id.

    One per process (:data:`LOCAL_LOAD`): every flow run and task in the process shares it,
    which is what "the requests this process has in flight" means. Runs and tasks count
    from threads of their own (``serve-flows --start in-process`` keeps one process for
    all its runs), so a count changes under a lock: a lost update would skew the balance
    for the rest of the process's life. The lock is the module's, not an attribute: a run's
    flow is pickled for its process with what it references, and a lock cannot be.
    """

    _counts: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))

    def __getitem__(self, server_id: str) -> int:
        return self._counts.get(server_id, 0)

    def snapshot(self) -> dict[str, int]:
        """A copy of the counts."""
        with _COUNTS_LOCK:
            return dict(self._counts)

    @contextmanager
    def track(self, server_id: str) -> Iterator[None]:
        """Count one request to ``server_id`` while the block runs."""
        with _COUNTS_LOCK:
            self._counts[server_id] += 1
        try:
            yield
        finally:
            with _COUNTS_LOCK:
                self._counts[server_id] -= 1


LOCAL_LOAD = LocalLoad()
"""This process's in-flight requests per server."""


def candidates_for(
    servers: Sequence[AvailableServer],
    region: str | None,
    exclude: Sequence[str] = (),
) -> list[AvailableServer]:
    """Servers a job of ``region`` may use, minus the ``exclude``d ids."""
    return [s for s in servers if (region is None or s.region == region) and s.id not in exclude]


@runtime_checkable
class LoadBalancer(Protocol):
    """Chooses a server among candidates that all satisfy the job's region."""

    def select(self, candidates: Sequence[AvailableServer]) -> AvailableServer | None:
        """Return one of ``candidates``, or ``None`` when there are none."""
        ...


@dataclass
class LeastLoadBalancer:
    """The lowest estimated load relative to capacity; ties at random."""

    local: LocalLoad = field(default_factory=lambda: LOCAL_LOAD)
    rng: random.Random = field(default_factory=random.Random)

    def estimated_load(self, server: AvailableServer) -> float:
        """``(reported - ours at probe + ours now) / capacity``."""
        others = max(0, server.in_flight - server.local_at_probe)
        return (others + self.local[server.id]) / server.capacity

    def select(self, candidates: Sequence[AvailableServer]) -> AvailableServer | None:
        """Pick the least loaded candidate."""
        if not candidates:
            return None
        loads = [(self.estimated_load(s), s) for s in candidates]
        lowest = min(load for load, _ in loads)
        return self.rng.choice([s for load, s in loads if load == lowest])


@dataclass
class RoundRobinBalancer:
    """Each candidate in turn (per candidate set, per process)."""

    _next: defaultdict[tuple[str, ...], int] = field(default_factory=lambda: defaultdict(int))

    def select(self, candidates: Sequence[AvailableServer]) -> AvailableServer | None:
        """Pick the next candidate in id order."""
        if not candidates:
            return None
        ordered = sorted(candidates, key=lambda s: s.id)
        key = tuple(s.id for s in ordered)
        index = self._next[key] % len(ordered)
        self._next[key] = index + 1
        return ordered[index]


@dataclass
class RandomBalancer:
    """Uniformly at random."""

    rng: random.Random = field(default_factory=random.Random)

    def select(self, candidates: Sequence[AvailableServer]) -> AvailableServer | None:
        """Pick any candidate."""
        return self.rng.choice(list(candidates)) if candidates else None


@dataclass
class WeightedBalancer:
    """Smooth weighted round-robin: shares follow ``weight`` with no bursts."""

    _current: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    def select(self, candidates: Sequence[AvailableServer]) -> AvailableServer | None:
        """Pick by weight."""
        if not candidates:
            return None
        total = 0.0
        best: AvailableServer | None = None
        for server in sorted(candidates, key=lambda s: s.id):
            weight = server.server.weight
            self._current[server.id] += weight
            total += weight
            if best is None or self._current[server.id] > self._current[best.id]:
                best = server
        assert best is not None  # noqa: S101 - candidates is not empty
        self._current[best.id] -= total
        return best


BUILTIN_BALANCERS: dict[str, type] = {
    "least-load": LeastLoadBalancer,
    "round-robin": RoundRobinBalancer,
    "random": RandomBalancer,
    "weighted": WeightedBalancer,
}

_instances: dict[str, LoadBalancer] = {}


def load_balancer_from_config(config: LoadBalancerConfig) -> LoadBalancer:
    """Return the process's balancer of ``config.type`` (one instance per type and options).

    Balancers keep state (the round-robin position), so one instance serves every run in
    the process. Extra keys of the config are passed to the balancer's constructor.

    Raises:
        ConfigurationError: unknown type, bad options, or not a :class:`LoadBalancer`.
    """
    key = config.model_dump_json()
    if key in _instances:
        return _instances[key]
    factory = load_named("load balancer", config.type, BUILTIN_BALANCERS, BALANCER_ENTRY_POINTS)
    options = config.model_extra or {}
    try:
        balancer = factory(**options)
    except TypeError as exc:
        raise ConfigurationError(
            f"load balancer {config.type!r} does not take the options {sorted(options)}: {exc}"
        ) from exc
    if not isinstance(balancer, LoadBalancer):
        raise ConfigurationError(
            f"load balancer {config.type!r} built {type(balancer).__name__}, "
            "which has no select(candidates) method"
        )
    _instances[key] = balancer
    return balancer
