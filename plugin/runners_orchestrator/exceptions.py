"""Every error runners-orchestrator raises on purpose.

::

    OrchestratorError
    ├── ConfigurationError        a setting or flag has a bad value; fix the configuration
    │   └── DuplicateWorkflowError  two workflow files define the same name
    ├── WorkflowNotFoundError     no workflow has that name
    ├── RunNotFoundError          no flow run has that id (for that workflow)
    ├── PrefectUnavailableError   the Prefect API cannot be reached or keeps failing
    ├── TargetNotAllowedError     a URL resolves to an address the target policy refuses
    └── RunnerError               a runner could not do its job
        └── RunnerNotFoundError   a runner name that no registry knows

Third-party errors (httpx, pydantic) are translated once, where they are caught, with
``raise ... from exc`` so the cause stays visible.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DuplicateWorkflowError",
    "OrchestratorError",
    "PrefectUnavailableError",
    "RunNotFoundError",
    "RunnerError",
    "RunnerNotFoundError",
    "TargetNotAllowedError",
    "WorkflowNotFoundError",
]


class OrchestratorError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(OrchestratorError, ValueError):
    """A setting, flag or registration is invalid; the message names it and the fix."""


class TargetNotAllowedError(OrchestratorError):
    """A URL's host resolves to an address that the target policy refuses.

    Attributes:
        host: the host name or address as it appeared in the URL.
        address: the resolved address that was refused.
        network: the denied range that matched.
    """

    def __init__(self, host: str, address: str, network: str) -> None:
        self.host = host
        self.address = address
        self.network = network
        where = address if host == address else f"{host} ({address})"
        super().__init__(
            f"target not allowed: {where} is in the denied range {network}; "
            "the runner server's target policy refuses it (see --deny / --allow)"
        )


class RunnerError(OrchestratorError):
    """A runner could not check its page (the page is unreachable, too large, ...)."""


class RunnerNotFoundError(RunnerError, LookupError):
    """A runner name that no registry knows."""


class DuplicateWorkflowError(ConfigurationError):
    """Two workflows have one name; HTTP routes and deployments need them unique."""

    def __init__(self, name: str, first: object, second: object) -> None:
        self.name = name
        self.files = (first, second)
        super().__init__(
            f"two workflows are named {name!r}: {first} and {second}; rename one of them"
        )


class WorkflowNotFoundError(OrchestratorError, LookupError):
    """No discovered workflow has that name."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        names = ", ".join(available) or "none"
        super().__init__(f"no workflow named {name!r}; available: {names}")


class RunNotFoundError(OrchestratorError, LookupError):
    """No flow run has that id, or it is not a run of the workflow asked about."""


class PrefectUnavailableError(OrchestratorError):
    """The Prefect API is unreachable or keeps failing; the caller may retry later."""
