"""runners-orchestrator: plain async workflows that dispatch checks to runner servers.

The public API is what ``__all__`` lists; everything else may change. Names that need
Prefect (discovery, steps, serving) are imported on first use, so that a runner server,
which needs no Prefect, starts without paying for its import.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from runners_orchestrator.exceptions import (
    ConfigurationError,
    DuplicateWorkflowError,
    OrchestratorError,
    RunnerError,
    RunnerNotFoundError,
    TargetNotAllowedError,
    WorkflowNotFoundError,
)
from runners_orchestrator.models import (
    Attempt,
    ErrorEnvelope,
    ExecuteRequest,
    ExecuteResponse,
    HealthResponse,
    JobResult,
    OrchestrateOptions,
    RunnerInfo,
    RunnerJob,
    RunnerResult,
    RunnerSpec,
    RunSummary,
    SummaryCounts,
)
from runners_orchestrator.runner_server import (
    Runner,
    RunnerContext,
    RunnerRegistry,
    RunnerServerConfig,
    RunnerServerPlugin,
    create_runner_app,
)
from runners_orchestrator.settings import (
    LoadBalancerConfig,
    OrchestratorSettings,
    RegistryConfig,
    ServerConfig,
    get_settings,
)
from runners_orchestrator.target_policy import TargetPolicy

if TYPE_CHECKING:
    from runners_orchestrator.discovery import Discovery, Workflow, discover
    from runners_orchestrator.monitoring import (
        HistoryStore,
        Suite,
        SuiteError,
        check_key,
        load_suites,
    )
    from runners_orchestrator.steps import (
        aggregate_results,
        dispatch_jobs,
        execute_runner,
        find_available_servers,
        select_best_server,
    )

try:
    __version__ = version("runners-orchestrator")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_LAZY = {
    "Discovery": "runners_orchestrator.discovery",
    "Workflow": "runners_orchestrator.discovery",
    "discover": "runners_orchestrator.discovery",
    "aggregate_results": "runners_orchestrator.steps",
    "dispatch_jobs": "runners_orchestrator.steps",
    "execute_runner": "runners_orchestrator.steps",
    "find_available_servers": "runners_orchestrator.steps",
    "select_best_server": "runners_orchestrator.steps",
    "HistoryStore": "runners_orchestrator.monitoring",
    "Suite": "runners_orchestrator.monitoring",
    "SuiteError": "runners_orchestrator.monitoring",
    "check_key": "runners_orchestrator.monitoring",
    "load_suites": "runners_orchestrator.monitoring",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runners_orchestrator' has no attribute {name!r}")


__all__ = [
    "Attempt",
    "ConfigurationError",
    "Discovery",
    "DuplicateWorkflowError",
    "ErrorEnvelope",
    "ExecuteRequest",
    "ExecuteResponse",
    "HealthResponse",
    "HistoryStore",
    "JobResult",
    "LoadBalancerConfig",
    "OrchestrateOptions",
    "OrchestratorError",
    "OrchestratorSettings",
    "RegistryConfig",
    "RunSummary",
    "Runner",
    "RunnerContext",
    "RunnerError",
    "RunnerInfo",
    "RunnerJob",
    "RunnerNotFoundError",
    "RunnerRegistry",
    "RunnerResult",
    "RunnerServerConfig",
    "RunnerServerPlugin",
    "RunnerSpec",
    "ServerConfig",
    "Suite",
    "SuiteError",
    "SummaryCounts",
    "TargetNotAllowedError",
    "TargetPolicy",
    "Workflow",
    "WorkflowNotFoundError",
    "__version__",
    "aggregate_results",
    "check_key",
    "create_runner_app",
    "discover",
    "dispatch_jobs",
    "execute_runner",
    "find_available_servers",
    "get_settings",
    "load_suites",
    "select_best_server",
]
