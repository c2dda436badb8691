"""The target policy: link-local refused by default, judged on resolved addresses and redirects.

No test sends a packet off loopback: link-local is checked on the policy itself, and the
end-to-end checks deny a loopback address (127.0.0.2) that a real page server listens on.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

import pytest

from helpers import PageServer, serve_app
from runners_orchestrator import ConfigurationError, TargetNotAllowedError, TargetPolicy
from runners_orchestrator.runner_server import RunnerServerConfig, create_runner_app

if TYPE_CHECKING:
    from collections.abc import Iterator

    import httpx


@pytest.mark.parametrize(
    "address", ["169.254.169.254", "169.254.0.1", "fe80::1", "::ffff:169.254.169.254"]
)
def test_default_policy_refuses_link_local(address):
    policy = TargetPolicy()
    assert policy.denied_by(address) is not None
    with pytest.raises(TargetNotAllowedError, match="target not allowed"):
        policy.check_address(address)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.1.2.3", "192.168.1.1", "8.8.8.8"])
def test_default_policy_allows_loopback_and_private(address):
    assert TargetPolicy().denied_by(address) is None


def test_operator_can_deny_private_and_allow_a_range():
    policy = TargetPolicy.from_strings(deny=["private"], allow=["10.1.0.0/16"])
    assert policy.denied_by("192.168.0.7") == ipaddress.ip_network("192.168.0.0/16")
    assert policy.denied_by("10.1.2.3") is None
    assert policy.denied_by("10.2.0.1") is not None
    # Denying more never drops the link-local default.
    assert policy.denied_by("169.254.169.254") is not None


def test_link_local_can_be_allowed_explicitly():
    assert TargetPolicy.from_strings(allow=["169.254.0.0/16"]).denied_by("169.254.1.1") is None


def test_bad_range_names_the_setting_and_value():
    with pytest.raises(ConfigurationError, match=r"deny: 'intranet' is not an address range"):
        TargetPolicy.from_strings(deny=["intranet"])


async def test_resolving_a_link_local_literal_is_refused_without_connecting():
    # getaddrinfo on a numeric host makes no network request.
    with pytest.raises(TargetNotAllowedError, match=r"169\.254\.169\.254"):
        await TargetPolicy().check_url("http://169.254.169.254/latest/meta-data/")


async def test_a_name_resolving_to_a_denied_address_is_refused():
    policy = TargetPolicy.from_strings(deny=["loopback"])
    with pytest.raises(TargetNotAllowedError, match=r"localhost \("):
        await policy.check_url("http://localhost:8080/")


@pytest.fixture(scope="module")
def second_loopback_pages() -> Iterator[PageServer]:
    """Pages on 127.0.0.2, reachable on Linux: the address the tests deny."""
    with PageServer(host="127.0.0.2") as server:
        yield server


@pytest.fixture(scope="module")
def guarded_runner_url() -> Iterator[str]:
    config = RunnerServerConfig(deny=["127.0.0.2/32"])
    with serve_app(create_runner_app(config)) as url:
        yield url


async def _title(client: httpx.AsyncClient, base: str, url: str) -> dict[str, str]:
    body = {"url": url, "runners": ["exampleTitleVisibleTest"]}
    response = await client.post(f"{base}/api/runner/execute", json=body)
    assert response.status_code == 200
    result: dict[str, str] = response.json()["results"][0]
    return result


async def test_denied_page_is_reachable_without_the_policy(
    client, runner_url, second_loopback_pages
):
    # The control: the same page passes on a server that does not deny 127.0.0.2.
    result = await _title(client, runner_url, second_loopback_pages.url("/title"))
    assert result["status"] == "pass"


async def test_denied_address_is_an_error_result(client, guarded_runner_url, second_loopback_pages):
    result = await _title(client, guarded_runner_url, second_loopback_pages.url("/title"))
    assert result["status"] == "error"
    assert result["errorMessage"].startswith(
        "target not allowed: 127.0.0.2 is in the denied range 127.0.0.2/32"
    )


async def test_redirect_to_denied_address_is_refused(
    client, guarded_runner_url, pages, second_loopback_pages
):
    target = second_loopback_pages.url("/title")
    result = await _title(client, guarded_runner_url, pages.url(f"/redirect?to={target}"))
    assert result["status"] == "error"
    assert "target not allowed: 127.0.0.2" in result["errorMessage"]


async def test_redirect_between_allowed_pages_is_followed(client, guarded_runner_url, pages):
    target = pages.url("/title")
    result = await _title(client, guarded_runner_url, pages.url(f"/redirect?to={target}"))
    assert result["status"] == "pass"


async def test_allowed_pages_still_pass_on_a_guarded_server(client, guarded_runner_url, pages):
    assert (await _title(client, guarded_runner_url, pages.url("/title")))["status"] == "pass"
