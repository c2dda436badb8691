"""A runner server: executes named checks ("runners") against URLs, over HTTP.

Wire-compatible with the TypeScript ``runners`` HTTP contract (see
``docs/runner-server.md``), so our orchestrator can drive their servers and their clients
can drive ours.
"""

from __future__ import annotations

from runners_orchestrator.runner_server._builtins import COOKIE_BANNER_SELECTORS, PageInput
from runners_orchestrator.runner_server._fetch import Page, create_fetch_client, fetch_page
from runners_orchestrator.runner_server._plugin import (
    RunnerServerConfig,
    RunnerServerPlugin,
    create_runner_app,
    default_registry,
)
from runners_orchestrator.runner_server._registry import (
    ENTRY_POINT_GROUP,
    Runner,
    RunnerContext,
    RunnerFunction,
    RunnerRegistry,
)

__all__ = [
    "COOKIE_BANNER_SELECTORS",
    "ENTRY_POINT_GROUP",
    "Page",
    "PageInput",
    "Runner",
    "RunnerContext",
    "RunnerFunction",
    "RunnerRegistry",
    "RunnerServerConfig",
    "RunnerServerPlugin",
    "create_fetch_client",
    "create_runner_app",
    "default_registry",
    "fetch_page",
]
