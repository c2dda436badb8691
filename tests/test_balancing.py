from __future__ import annotations

import random
from collections import Counter

import pytest

from runners_orchestrator import ConfigurationError
from runners_orchestrator.balancing import (
    LeastLoadBalancer,
    LocalLoad,
    RandomBalancer,
    RoundRobinBalancer,
    WeightedBalancer,
    candidates_for,
    load_balancer_from_config,
)
from runners_orchestrator.registry import AvailableServer
from runners_orchestrator.settings import LoadBalancerConfig, ServerConfig


def server(
    sid: str, region: str = "us", in_flight: int = 0, capacity: int = 10, weight: float = 1
) -> AvailableServer:
    config = ServerConfig(
        id=sid, url=f"http://127.0.0.1:1/{sid}", region=region, capacity=capacity, weight=weight
    )
    return AvailableServer(server=config, in_flight=in_flight, capacity=capacity)


SERVERS = [server("us-1"), server("us-2"), server("eu-1", "eu"), server("us-3")]


def test_region_affinity_limits_candidates_and_no_region_means_any():
    assert [s.id for s in candidates_for(SERVERS, "eu")] == ["eu-1"]
    assert [s.id for s in candidates_for(SERVERS, None)] == ["us-1", "us-2", "eu-1", "us-3"]
    assert [s.id for s in candidates_for(SERVERS, "us", exclude=["us-2"])] == ["us-1", "us-3"]
    assert candidates_for(SERVERS, "ap") == []


def test_round_robin_takes_each_in_turn():
    balancer = RoundRobinBalancer()
    us = candidates_for(SERVERS, "us")
    picks = [balancer.select(us).id for _ in range(6)]  # type: ignore[union-attr]
    assert picks == ["us-1", "us-2", "us-3", "us-1", "us-2", "us-3"]


def test_weighted_follows_weights_smoothly():
    balancer = WeightedBalancer()
    candidates = [server("a", weight=5), server("b", weight=1), server("c", weight=1)]
    picks = [balancer.select(candidates).id for _ in range(70)]  # type: ignore[union-attr]
    assert Counter(picks) == {"a": 50, "b": 10, "c": 10}
    # Smooth: the heavy server never takes more than its share in a row.
    assert "aaaaaa" not in "".join(picks)


def test_random_spreads_over_all_candidates():
    balancer = RandomBalancer(rng=random.Random(7))
    counts = Counter(balancer.select(SERVERS).id for _ in range(4000))  # type: ignore[union-attr]
    assert set(counts) == {"us-1", "us-2", "eu-1", "us-3"}
    assert all(800 < n < 1200 for n in counts.values())


def test_least_load_uses_reported_load_relative_to_capacity():
    balancer = LeastLoadBalancer(local=LocalLoad())
    busy_big = server("big", in_flight=8, capacity=20)  # 0.4
    idle_small = server("small", in_flight=1, capacity=2)  # 0.5
    quiet = server("quiet", in_flight=3, capacity=10)  # 0.3
    assert balancer.select([busy_big, idle_small, quiet]).id == "quiet"  # type: ignore[union-attr]


def test_least_load_adds_this_process_in_flight_requests():
    local = LocalLoad()
    balancer = LeastLoadBalancer(local=local)
    a, b = server("a", capacity=2), server("b", capacity=2)
    picks = []
    with local.track("a"), local.track("a"):
        picks.append(balancer.select([a, b]).id)  # type: ignore[union-attr]
        with local.track("b"):
            picks.append(balancer.select([a, b]).id)  # type: ignore[union-attr]
    assert picks == ["b", "b"]
    assert local.snapshot() == {"a": 0, "b": 0}


def test_least_load_does_not_count_its_own_requests_twice():
    # The probe saw 2 in flight on "a", both ours, and they have finished since.
    local = LocalLoad()
    balancer = LeastLoadBalancer(local=local)
    a = server("a", in_flight=2, capacity=4).model_copy(update={"local_at_probe": 2})
    b = server("b", in_flight=1, capacity=4)
    assert balancer.select([a, b]).id == "a"  # type: ignore[union-attr]


def test_least_load_spreads_ties():
    balancer = LeastLoadBalancer(local=LocalLoad(), rng=random.Random(1))
    picks = Counter(balancer.select(SERVERS).id for _ in range(400))  # type: ignore[union-attr]
    assert len(picks) == 4


@pytest.mark.parametrize("name", ["least-load", "round-robin", "random", "weighted"])
def test_balancers_by_name_return_none_without_candidates(name):
    assert load_balancer_from_config(LoadBalancerConfig(type=name)).select([]) is None


def test_balancer_by_import_path_and_unknown_name():
    config = LoadBalancerConfig(type="runners_orchestrator.balancing:RoundRobinBalancer")
    assert isinstance(load_balancer_from_config(config), RoundRobinBalancer)
    with pytest.raises(
        ConfigurationError, match="unknown load balancer 'fastest'; expected one of"
    ):
        load_balancer_from_config(LoadBalancerConfig(type="fastest"))
    with pytest.raises(ConfigurationError, match="does not take the options"):
        load_balancer_from_config(LoadBalancerConfig(type="round-robin", speed=3))  # type: ignore[call-arg]
