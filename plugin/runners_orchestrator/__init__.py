"""runners-orchestrator: plain async workflows that dispatch checks to runner servers.

The public API is what ``__all__`` lists; everything else may change.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from runners_orchestrator.exceptions import (
    ConfigurationError,
    OrchestratorError,
    RunnerError,
    RunnerNotFoundError,
    TargetNotAllowedError,
)
from runners_orchestrator.models import (
    ErrorEnvelope,
    ExecuteRequest,
    ExecuteResponse,
    HealthResponse,
    JobResult,
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
from runners_orchestrator.target_policy import TargetPolicy

try:
    __version__ = version("runners-orchestrator")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ConfigurationError",
    "ErrorEnvelope",
    "ExecuteRequest",
    "ExecuteResponse",
    "HealthResponse",
    "JobResult",
    "OrchestratorError",
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
    "SummaryCounts",
    "TargetNotAllowedError",
    "TargetPolicy",
    "__version__",
    "create_runner_app",
]
