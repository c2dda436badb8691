"""Settings: environment variables (``ORCHESTRATOR_*``) over ``[tool.runners-orchestrator]``.

The pyproject table is the counterpart of the TypeScript design's ``nitro.config.ts``;
environment variables win over it, so an operator can override a project's defaults per
deployment. Read settings through :func:`get_settings` (cached; tests call
``get_settings.cache_clear()``), never through a module-level instance.

Structured settings (``registry``, ``load_balancer``) are JSON in the environment and tables
in ``pyproject.toml``; ``load_balancer`` also takes a bare type name. A bad value fails at
start-up with one message per problem naming the environment variable, the value and what
is expected.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    PyprojectTomlConfigSettingsSource,
    SettingsConfigDict,
)

from runners_orchestrator.exceptions import ConfigurationError
from runners_orchestrator.models import HttpUrl

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

__all__ = [
    "LoadBalancerConfig",
    "OrchestratorSettings",
    "RegistryConfig",
    "ServerConfig",
    "find_project_root",
    "get_settings",
]

ENV_PREFIX = "ORCHESTRATOR_"
PYPROJECT_TABLE = ("tool", "runners-orchestrator")

_pyproject_file: ContextVar[Path | None] = ContextVar("_pyproject_file", default=None)


class ServerConfig(BaseModel):
    """One runner server in a registry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Unique name of the server, shown in results.")
    url: HttpUrl = Field(
        description="Runner API base, e.g. http://127.0.0.1:3001/api/runner (no trailing /execute)."
    )
    region: str | None = Field(default=None, description="Region the server runs in.")
    capacity: int = Field(default=10, ge=1, description="Requests it serves at once.")
    weight: float = Field(default=1.0, gt=0, description="Share of traffic for `weighted`.")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")

    @field_validator("url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")


class RegistryConfig(BaseModel):
    """Where the runner servers are listed. ``type`` selects the registry implementation."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(default="in-memory", description="Registry type: a name or module:Class.")
    servers: list[ServerConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> RegistryConfig:
        seen: set[str] = set()
        for server in self.servers:
            if server.id in seen:
                raise ValueError(f"two servers have the id {server.id!r}; ids must be unique")
            seen.add(server.id)
        return self


class LoadBalancerConfig(BaseModel):
    """How a server is chosen for a job. ``type`` selects the balancer."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        default="least-load",
        description="least-load, round-robin, random, weighted, or a module:Class path.",
    )


def _decode_json(value: Any, expected: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON (at char {exc.pos}): expected {expected}") from None


class OrchestratorSettings(BaseSettings):
    """Every setting of the orchestrator; see ``docs/configuration.md``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        pyproject_toml_table_header=PYPROJECT_TABLE,
        pyproject_toml_depth=8,
        extra="ignore",
        validate_default=True,
    )

    pattern: Annotated[list[str], NoDecode] = Field(
        default=["flows/**/*.py", "src/flows/**/*.py"],
        description="Glob(s) of workflow files, relative to the project root.",
    )
    suites: Annotated[list[str], NoDecode] = Field(
        default=["checks/**/*.toml"],
        description="Glob(s) of check-suite files (one suite per file), relative to the "
        "project root.",
    )
    registry: Annotated[RegistryConfig, NoDecode] = Field(
        default_factory=RegistryConfig,
        description='The runner servers: {"type": "in-memory", "servers": [...]}.',
    )
    load_balancer: Annotated[LoadBalancerConfig, NoDecode] = Field(
        default_factory=LoadBalancerConfig,
        description='How servers are chosen: a type name or {"type": ...}.',
    )
    route_prefix: str = Field(
        default="/api/orchestrator", description="Where the HTTP API is mounted."
    )
    api_token: SecretStr | None = Field(
        default=None, description="Bearer token required to start and cancel runs; unset: none."
    )
    api_url: str | None = Field(
        default=None, description="The orchestrator API the CLI's `run` talks to."
    )
    allow_client_registry: bool = Field(
        default=False,
        description="Let API clients pass their own registry (server URLs) in options.",
    )
    max_body_size: int = Field(
        default=1_000_000, ge=1_000, description="Largest API request body in bytes."
    )
    prefect_write_concurrency: int = Field(
        default=4, ge=1, description="Run creations sent to Prefect at once, per API process."
    )
    prefect_write_attempts: int = Field(
        default=100,
        ge=1,
        description="Attempts of a Prefect call that meets a transient error (503, ...).",
    )
    prefect_retry_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long the API keeps retrying one Prefect call before answering 503.",
    )
    max_concurrency: int = Field(
        default=10, ge=1, le=10_000, description="Default jobs in flight per orchestration."
    )
    job_timeout: float = Field(
        default=120.0, gt=0, description="Seconds a job may take, retries and failover included."
    )
    request_timeout: float = Field(
        default=45.0,
        gt=0,
        description="Seconds one execute request may take before the server counts as failed.",
    )
    connect_timeout: float = Field(
        default=3.0,
        gt=0,
        description="Seconds to connect to a runner server before it counts as down (a silent "
        "host costs this, once: it is then ejected and its jobs fail over).",
    )
    health_timeout: float = Field(default=1.0, gt=0, description="Seconds a health probe may take.")
    ejection_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long a failing server is skipped before it is probed again.",
    )
    max_attempts: int = Field(
        default=3, ge=1, le=20, description="Attempts per server before failing over."
    )
    retry_backoff: float = Field(
        default=0.2, ge=0, description="First retry delay in seconds (doubles, full jitter)."
    )
    retry_backoff_max: float = Field(
        default=5.0, ge=0, description="Longest retry delay in seconds."
    )
    chromium: str | None = Field(
        default=None,
        description="Chromium the browser-engine runner server launches (a path or a command); "
        "unset: chromium on the PATH, else one installed by `playwright install chromium`.",
    )
    work_pool: str = Field(
        default="default",
        min_length=1,
        description="Work pool of the generated deployments (`prefect deploy`).",
    )
    deployment_tags: list[str] = Field(
        default_factory=list, description="Extra tags on every generated deployment."
    )
    task_per_job_limit: int = Field(
        default=50,
        ge=0,
        description="Up to this many jobs, each job is its own Prefect task; above, batches.",
    )
    batch_size: int = Field(
        default=100, ge=1, description="Jobs per Prefect task above task_per_job_limit."
    )
    # -- monitoring: history and alerts (runners_orchestrator.monitoring) ---------------
    monitoring_database_url: SecretStr | None = Field(
        default=None,
        description="SQLAlchemy async URL of the database that keeps history and alerts; "
        "unset: Prefect's own database (PREFECT_SERVER_DATABASE_CONNECTION_URL).",
    )
    monitoring: bool = Field(
        default=True,
        description="Record history and send alerts from the API process (`serve`, `dev`).",
    )
    monitoring_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often finished runs are looked for in Prefect."
    )
    alert_after: int = Field(
        default=2,
        ge=1,
        description="Consecutive failures before a check of a suite alerts, when the suite "
        "does not say.",
    )
    alert_max_attempts: int = Field(
        default=12,
        ge=1,
        description="Deliveries tried per alert and destination before it is given up.",
    )
    alert_backoff: float = Field(
        default=1.0,
        gt=0,
        description="Wait in seconds before an alert's second delivery (doubles per attempt).",
    )
    alert_backoff_max: float = Field(
        default=300.0, gt=0, description="Longest wait in seconds between two deliveries."
    )
    history_retention_days: float = Field(
        default=30.0, gt=0, description="Days of check results kept; older ones are pruned."
    )

    @field_validator("pattern", "suites", mode="before")
    @classmethod
    def _split_pattern(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return _decode_json(text, 'a glob or a JSON list of globs: ["flows/**/*.py"]')
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("registry", mode="before")
    @classmethod
    def _decode_registry(cls, value: Any) -> Any:
        return _decode_json(value, '{"type": "in-memory", "servers": [{"id", "url", ...}]}')

    @field_validator("load_balancer", mode="before")
    @classmethod
    def _decode_load_balancer(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip().startswith("{"):
            return {"type": value.strip()}
        return _decode_json(value, '{"type": "least-load"} or a type name such as round-robin')

    @field_validator("api_token", mode="before")
    @classmethod
    def _blank_token_is_an_error(cls, value: Any) -> Any:
        # An empty token would accept an empty "Bearer": refuse it rather than leave the
        # routes open while the operator believes they are guarded.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; unset it to turn authentication off, or set a token")
        return value

    @field_validator("route_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/', for example /api/orchestrator")
        return value.rstrip("/") or "/"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init arguments, then the environment, then ``pyproject.toml``."""
        del dotenv_settings, file_secret_settings
        pyproject = PyprojectTomlConfigSettingsSource(settings_cls, _pyproject_file.get())
        return init_settings, env_settings, pyproject


def find_project_root(start: Path | None = None) -> Path:
    """Return the nearest folder, from ``start`` (the working directory) up, with a pyproject.toml.

    Falls back to ``start`` itself when there is none.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return here


def _describe(error: ErrorDetails, raw: dict[str, Any]) -> str:
    field = str(error["loc"][0]) if error["loc"] else "settings"
    where = ".".join(str(part) for part in error["loc"][1:])
    env = f"{ENV_PREFIX}{field.upper()}"
    value = raw.get(field, error.get("input"))
    shown = json.dumps(value) if not isinstance(value, str) else value
    if len(shown) > 200:  # noqa: PLR2004 - keep messages readable
        shown = shown[:200] + "..."
    detail = error["msg"].removeprefix("Value error, ")
    inner = f" at {where}" if where else ""
    return f"{env} (or `{field}` in [tool.runners-orchestrator]){inner}: {detail}; got {shown}"


def load_settings(project_root: Path | None = None, **overrides: Any) -> OrchestratorSettings:
    """Read the settings now, from the environment and ``project_root``'s pyproject.toml.

    Raises:
        ConfigurationError: a setting has a bad value; one line per problem.
    """
    root = find_project_root(project_root)
    token = _pyproject_file.set(root / "pyproject.toml")
    try:
        return OrchestratorSettings(**overrides)
    except ValidationError as exc:
        raw = {str(e["loc"][0]): e.get("input") for e in exc.errors() if e["loc"]}
        lines = [_describe(error, raw) for error in exc.errors(include_url=False)]
        raise ConfigurationError("invalid settings:\n  " + "\n  ".join(lines)) from None
    finally:
        _pyproject_file.reset(token)


@lru_cache(maxsize=1)
def get_settings() -> OrchestratorSettings:
    """The process's settings, read once. Call ``get_settings.cache_clear()`` to re-read."""
    return load_settings()
