"""Find the workflows: public ``async def`` functions in the project's workflow files.

A workflow is a public async function *defined in* a file matched by the ``pattern``
setting (default ``flows/**/*.py`` and ``src/flows/**/*.py``, relative to the project root,
the folder holding ``pyproject.toml``). Functions imported from elsewhere, sync functions,
classes, methods and private names (``_helper``) are not workflows; a function already
decorated with Prefect's ``@flow`` is taken as it is. No decorator is needed.

Why these rules: a workflow file is ordinary Python that a user also imports helpers into;
only what the file itself defines, and means to expose, becomes an endpoint.

Files run with the project root on ``sys.path``, as Prefect runs an entrypoint, so a
workflow file may import the project's own modules (``from helpers.shared import
normalise``); see ``_imports``.

Files are imported once and cached by modification time and size, together with those of
the project modules they import, so discovering an unchanged project again costs one
``stat`` per file (and one per project module they import). A changed project module
re-imports the workflow files that depend on it, with the module executed afresh. The
Prefect flow and the parameter schema of a workflow are built on first use, not at
discovery.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import re
import sys
import threading
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle  # type: ignore[import-untyped]
from prefect import Flow

from runners_orchestrator._imports import Loaded, Scan, Stamp
from runners_orchestrator.exceptions import (
    ConfigurationError,
    DuplicateWorkflowError,
    WorkflowNotFoundError,
)
from runners_orchestrator.results import recording_result
from runners_orchestrator.settings import find_project_root, get_settings

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from types import ModuleType

__all__ = [
    "RESERVED_NAMES",
    "BrokenFile",
    "Discovery",
    "Workflow",
    "discover",
    "load_workflow_flow",
    "to_camel",
    "to_snake",
]

RESERVED_NAMES = frozenset(
    {"runs", "health", "ready", "schema", "docs", "openapi", "suites", "checks"}
)
"""Names the HTTP API uses for its own routes under the prefix."""

MODULE_PREFIX = "runners_orchestrator_workflows"
"""Workflow files are imported under this package name, one module per file."""


def to_camel(name: str) -> str:
    """``orchestrate_runners`` → ``orchestrateRunners``."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def to_snake(name: str) -> str:
    """``orchestrateRunners`` → ``orchestrate_runners`` (snake_case is left as it is)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


@dataclass
class Workflow:
    """A discovered workflow: a function and everything the API and Prefect need of it."""

    name: str
    """The function's name: the HTTP name, the flow name and the deployment name."""
    fn: Callable[..., Any]
    """The user's function (or the ``@flow`` they wrote)."""
    source: Path
    """The file it is defined in."""
    entrypoint: str
    """``flows/file.py:function``, relative to the project root."""

    @cached_property
    def flow(self) -> Flow[Any, Any]:
        """The Prefect flow: the user's own ``@flow``, or the function wrapped in one.

        Either way the return value is recorded in Prefect's database (see ``results``),
        so that a process other than the one that ran the flow, the HTTP API, can read it.
        """
        if isinstance(self.fn, Flow):
            # The user's own flow, with its options, recording its result as ours do.
            wrapped = copy.copy(self.fn)
            wrapped.fn = recording_result(self.fn.fn)
            return wrapped
        return Flow(
            fn=recording_result(self.fn), name=self.name, persist_result=True, log_prints=True
        )

    def deployment_name(self, deployment: str | None = None) -> str:
        """``flow/deployment``: the full name Prefect finds the workflow's deployment by.

        ``deployment`` names another deployment of the same flow (a check suite's). The
        API's start and ``serve --wait-for-deployments`` both look deployments up by it, so
        "deployed" means one thing.
        """
        return f"{self.flow.name}/{deployment or self.name}"

    @cached_property
    def parameters(self) -> dict[str, Any]:
        """The parameters' JSON schema, as Prefect computes it from the type hints."""
        return self.flow.parameters.model_dump_for_openapi()

    @property
    def description(self) -> str:
        """The docstring, cleaned; empty when there is none."""
        return inspect.getdoc(self.fn.fn if isinstance(self.fn, Flow) else self.fn) or ""

    @property
    def camel_name(self) -> str:
        """The TypeScript design's spelling: ``orchestrateRunners``."""
        return to_camel(self.name)


@dataclass(frozen=True)
class BrokenFile:
    """A workflow file that failed to import; the others still load."""

    path: Path
    error: str
    """The exception, one line: ``SyntaxError: invalid syntax (x.py, line 3)``; when a project
    module it imports failed, that module first: ``helpers/shared.py (module helpers.shared)
    failed to import: ZeroDivisionError: division by zero``."""
    details: str = ""
    """The traceback, for logs."""
    helper: Path | None = None
    """The project module that failed to import, when the error is in it, not in this file."""


@dataclass
class Discovery:
    """What a scan found: workflows by name, and the files that failed to import."""

    root: Path
    workflows: dict[str, Workflow] = field(default_factory=dict)
    broken: list[BrokenFile] = field(default_factory=list)
    project_imports: set[Path] = field(default_factory=set)
    """The project's own files that the workflow files import (and, for a failed import, where
    the missing module would be): what ``serve-flows --reload`` watches besides the flows."""

    def names(self) -> list[str]:
        """Workflow names, sorted."""
        return sorted(self.workflows)

    def problems(self) -> list[str]:
        """The broken files, one line each, paths relative to the root.

        A project module that fails to import is one line naming it and every workflow file
        it breaks, rather than one line per workflow file.
        """
        lines: list[str] = []
        by_helper: dict[Path, list[BrokenFile]] = {}
        for broken in self.broken:
            if broken.helper is None:
                lines.append(f"skipped {broken.path.relative_to(self.root)}: {broken.error}")
            else:
                by_helper.setdefault(broken.helper, []).append(broken)
        for files in by_helper.values():
            skipped = ", ".join(str(b.path.relative_to(self.root)) for b in files)
            lines.append(f"{files[0].error}; skipped the workflow files importing it: {skipped}")
        return lines

    def get(self, name: str) -> Workflow:
        """The workflow called ``name`` (snake_case or camelCase).

        Raises:
            WorkflowNotFoundError: no such workflow; the message lists the available ones.
        """
        workflow = self.workflows.get(name) or self.workflows.get(to_snake(name))
        if workflow is None:
            raise WorkflowNotFoundError(name, self.names())
        return workflow

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (
            name in self.workflows or to_snake(name) in self.workflows
        )


@dataclass(frozen=True)
class _CachedFile:
    stamp: Stamp | None
    module: ModuleType | None
    functions: tuple[tuple[str, Any], ...]
    broken: BrokenFile | None
    deps: tuple[tuple[Path, Stamp | None], ...] = ()
    """The project files it imports, with their stamps when it was imported."""
    workflows: dict[tuple[str, Path], Workflow] = field(default_factory=dict)
    """Its workflows by name and project root, made once per version of the file."""

    def workflow(self, name: str, fn: Any, path: Path, root: Path) -> Workflow:
        """The workflow ``name`` of this version of the file, the same object every time.

        What a workflow computes once (its Prefect flow and parameter schema, about 5 ms)
        is then not computed again at every discovery: the HTTP API discovers every second,
        and its first start after each paid for it.
        """
        found = self.workflows.get((name, root))
        if found is None:
            entrypoint = f"{path.relative_to(root)}:{name}"
            found = self.workflows[name, root] = Workflow(name, fn, path, entrypoint)
        return found


_cache: dict[Path, _CachedFile] = {}
_lock = threading.RLock()
"""Imports change ``sys.modules`` and ``sys.path``: one discovery pass at a time."""


def _module_name(root: Path, path: Path) -> str:
    relative = path.relative_to(root).with_suffix("")
    parts = [re.sub(r"\W", "_", part) for part in relative.parts]
    return ".".join([MODULE_PREFIX, *parts])


def _import_file(root: Path, path: Path) -> ModuleType:
    name = _module_name(root, path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - .py files always have one
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    # The module is not importable by name in other processes: ship it by value when
    # Prefect pickles a flow into a subprocess.
    cloudpickle.register_pickle_by_value(module)
    return module


def _workflow_functions(module: ModuleType) -> tuple[tuple[str, Any], ...]:
    """Public async functions and ``@flow`` objects defined in ``module`` itself."""
    found: list[tuple[str, Any]] = []
    for attribute, value in vars(module).items():
        if attribute.startswith("_"):
            continue
        if isinstance(value, Flow):
            fn = value.fn
            if getattr(fn, "__module__", None) == module.__name__:
                found.append((fn.__name__, value))
            continue
        if (
            inspect.iscoroutinefunction(value)
            and value.__module__ == module.__name__
            and value.__qualname__ == attribute
        ):
            found.append((attribute, value))
    return tuple(found)


def _scan(scan: Scan, path: Path) -> _CachedFile:
    stamp = scan.stamp(path)
    cached = _cache.get(path)
    if cached is not None and cached.stamp == stamp and scan.fresh(cached.deps):
        return cached
    loaded = scan.load(path, lambda: _import_file(scan.root, path))
    if loaded.module is None:
        entry = _CachedFile(stamp, None, (), _broken(scan, path, loaded), loaded.deps)
    else:
        functions = _workflow_functions(loaded.module)
        entry = _CachedFile(stamp, loaded.module, functions, None, loaded.deps)
    _cache[path] = entry
    return entry


def _broken(scan: Scan, path: Path, loaded: Loaded) -> BrokenFile:
    """Any error in a user's file, or in a module it imports, is reported, not raised."""
    error = loaded.error or ImportError(f"cannot import {path}")
    if isinstance(error, SyntaxError):  # its last line would drop the file and line number
        line = f"{type(error).__name__}: {error}"
    else:
        line = "".join(traceback.format_exception_only(error)).strip().splitlines()[-1]
    line += scan.shadowed(error)
    if loaded.helper is not None:
        where = loaded.helper.relative_to(scan.root)
        line = f"{where} (module {loaded.helper_name}) failed to import: {line}"
    details = "".join(traceback.format_exception(error))
    return BrokenFile(path, line, details, loaded.helper)


def _files(root: Path, patterns: Iterable[str]) -> list[Path]:
    files: set[Path] = set()
    for pattern in patterns:
        for path in root.glob(pattern):
            if path.is_file() and path.suffix == ".py" and "__pycache__" not in path.parts:
                files.add(path.resolve())
    return sorted(files)


def discover(project_root: Path | None = None, patterns: Sequence[str] | None = None) -> Discovery:
    """Scan the workflow files and return what they define.

    Args:
        project_root: the folder of ``pyproject.toml``; found from the working directory.
        patterns: globs relative to the root; the ``pattern`` setting when omitted.

    Raises:
        DuplicateWorkflowError: two workflows share a name; the message names both files.
        ConfigurationError: a workflow's name is one the HTTP API reserves.
    """
    root = find_project_root(project_root)
    globs = list(patterns) if patterns is not None else get_settings().pattern
    result = Discovery(root=root)
    with _lock:
        scan = Scan(root)
        scanned_files = [(path, _scan(scan, path)) for path in _files(root, globs)]
    for path, scanned in scanned_files:
        result.project_imports.update(dep for dep, _ in scanned.deps)
        if scanned.broken is not None:
            result.broken.append(scanned.broken)
            continue
        for name, fn in scanned.functions:
            _add(result, scanned.workflow(name, fn, path, root))
    return result


def _add(result: Discovery, workflow: Workflow) -> None:
    name = workflow.name
    if name in RESERVED_NAMES or to_snake(name) in RESERVED_NAMES:
        raise ConfigurationError(
            f"workflow {name!r} in {workflow.entrypoint} has a name the HTTP API uses for its own "
            f"routes ({', '.join(sorted(RESERVED_NAMES))}); rename the function"
        )
    existing = result.workflows.get(name) or result.workflows.get(to_snake(name))
    if existing is not None:
        first, second = (w.entrypoint.rpartition(":")[0] for w in (existing, workflow))
        raise DuplicateWorkflowError(name, first, second)
    result.workflows[name] = workflow


def load_workflow_flow(entrypoint: str, root: Path | str | None = None) -> Flow[Any, Any]:
    """Return the Prefect flow of ``flows/file.py:function``: what generated modules call.

    Raises:
        WorkflowNotFoundError: the file does not define that workflow (any more).
        ImportError: the file fails to import.
    """
    base = (Path(root) if root is not None else find_project_root()).resolve()
    relative, _, name = entrypoint.rpartition(":")
    path = (base / relative).resolve()
    with _lock:
        scanned = _scan(Scan(base), path)
    if scanned.broken is not None:
        raise ImportError(f"{relative} failed to import: {scanned.broken.error}")
    for found, fn in scanned.functions:
        if found == name:
            return Workflow(name, fn, path, entrypoint).flow
    raise WorkflowNotFoundError(name, [n for n, _ in scanned.functions])
