"""The project's own modules, as workflow files import them: ``sys.path`` and freshness.

Workflow files run with the project root importable, as Prefect's entrypoint loading has it
(``load_script_as_module`` puts the working directory first on ``sys.path``), so that
``flows/checks.py`` may ``from helpers.shared import normalise`` with ``helpers/`` at the
root. The root, not the working directory: a command run from a subfolder, and a generated
deployment module loaded by a Prefect worker, must find the same modules.

A workflow file depends on the *project modules* it imports, directly or through another
project module. Discovery caches an imported workflow file until it changes; this module
tells it when one of those dependencies changed too, and drops the stale module, and every
project module importing it, from ``sys.modules`` so that the new code is executed once and
shared by every workflow file re-imported after it.

A project module is one importable *because* the root is on ``sys.path``: its top-level
package or module lies directly in the root (``helpers/shared.py`` is ``helpers.shared``).
Installed packages, the virtual environment, this plugin and the workflow files themselves
are not. Dependencies are found from the files' import statements (their syntax tree, read
only when a file is imported) and from the project modules an import loaded (which catches
``importlib.import_module``); they are closed over the project modules' own imports.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
import threading
import traceback
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import ModuleType

__all__ = ["Loaded", "Scan", "Stamp", "make_importable"]

Stamp = tuple[int, int]
"""A file's modification time (ns) and size; what tells a changed file."""

NOT_PROJECT = frozenset({"runners_orchestrator", "__main__", "__mp_main__"})
"""Top-level names that are never the project's own modules, wherever their files are."""

_path_lock = threading.Lock()


def stamp(path: Path) -> Stamp | None:
    """``path``'s stamp; ``None`` when it does not exist."""
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size)


def make_importable(root: Path) -> None:
    """Put ``root`` first on ``sys.path``, unless it is on it already, in any spelling.

    First, as Prefect and ``python -m`` do, so a worker, ``serve-flows`` and discovery
    resolve a project module the same way even when an installed distribution has the
    same name. Never twice: every discovery pass calls this.
    """
    entry = str(root)
    if entry in sys.path:
        return
    with _path_lock:
        for existing in sys.path:
            if Path(existing).is_absolute() and Path(existing).resolve() == root:
                return
        sys.path.insert(0, entry)


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _static_imports(source: bytes, filename: str, package: str | None) -> set[str]:
    """Absolute names of the modules ``source`` imports (and of their parent packages)."""
    try:
        tree = ast.parse(source, filename)
    except (SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if not package:
                    continue
                try:
                    base = importlib.util.resolve_name("." * node.level + base, package)
                except (ImportError, ValueError):
                    continue
            names.add(base)
            # `from helpers import shared` imports the submodule helpers.shared, if it is one.
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {parent for name in names if name for parent in _with_parents(name)}


@dataclass(frozen=True)
class _Tracked:
    """A project module as this process executed it."""

    name: str
    stamp: Stamp | None
    """The file's stamp when the module was executed (or first seen)."""
    imports: frozenset[str]
    """What it imports, statically, with its parent packages: the edges for staleness."""


_tracked: dict[Path, _Tracked] = {}
"""Every project module a workflow file depended on, by file."""


@dataclass(frozen=True)
class Loaded:
    """What executing a workflow file gave: the module or the error, and what it depends on."""

    module: ModuleType | None
    error: BaseException | None
    deps: tuple[tuple[Path, Stamp | None], ...]
    """Project files the workflow file imports, with their stamps: re-import when one changes.
    A file that does not exist (yet) has ``None``: the module a failed import looked for."""
    helper: Path | None = None
    """When ``error`` was raised while importing a project module: that module's file."""
    helper_name: str = ""


class Scan:
    """One discovery pass: each file's stamp read once, stale modules dropped once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._stamps: dict[Path, Stamp | None] = {}
        self._purged = False

    def stamp(self, path: Path) -> Stamp | None:
        """``path``'s stamp, read once per pass."""
        try:
            return self._stamps[path]
        except KeyError:
            value = self._stamps[path] = stamp(path)
            return value

    def fresh(self, deps: Iterable[tuple[Path, Stamp | None]]) -> bool:
        """Whether every dependency is as it was when recorded."""
        return all(self.stamp(path) == recorded for path, recorded in deps)

    @cached_property
    def top_names(self) -> frozenset[str]:
        """Names importable from the root: its packages and folders, and its ``.py`` files."""
        names: set[str] = set()
        with os.scandir(self.root) as entries:
            for entry in entries:
                name = entry.name.removesuffix(".py") if entry.name.endswith(".py") else entry.name
                if name.isidentifier() and name not in NOT_PROJECT and name != "__pycache__":
                    names.add(name)
        return frozenset(names)

    @cached_property
    def _mentions_project(self) -> re.Pattern[bytes]:
        words = b"|".join(re.escape(n.encode()) for n in sorted(self.top_names)) or b"(?!)"
        return re.compile(rb"\b(?:" + words + rb")\b|from\s+\.")

    def module_file(self, name: str, module: object) -> Path | None:
        """The file of module ``name`` when it is a project module; ``None`` otherwise."""
        top = name.partition(".")[0]
        if module is None or top not in self.top_names:
            return None
        file = getattr(module, "__file__", None)
        if not isinstance(file, str) or not file.endswith(".py"):
            return None
        path = Path(file)
        if not path.is_relative_to(self.root):
            path = path.resolve()
            if not path.is_relative_to(self.root):
                return None
        first = path.relative_to(self.root).parts[0]
        return path if first in (top, f"{top}.py") else None

    def _imports_of(self, path: Path, package: str | None) -> set[str]:
        try:
            source = path.read_bytes()
        except OSError:
            return set()
        if not self._mentions_project.search(source):
            return set()
        return _static_imports(source, str(path), package)

    def _drop_stale(self) -> None:
        """Drop changed project modules, and those importing them, from ``sys.modules``.

        Once per pass, before the first import: every workflow file re-imported after it
        then shares one fresh copy of each. A module importing a changed one is dropped too,
        because it holds the changed module's old objects (``from .shared import normalise``).
        """
        if self._purged:
            return
        self._purged = True
        stale = {path for path, t in _tracked.items() if self.stamp(path) != t.stamp}
        if not stale:
            return
        files = {t.name: path for path, t in _tracked.items()}
        grown = True
        while grown:
            grown = False
            for path, tracked in _tracked.items():
                if path not in stale and any(files.get(n) in stale for n in tracked.imports):
                    stale.add(path)
                    grown = True
        for path in stale:
            tracked = _tracked.pop(path)
            if self.module_file(tracked.name, sys.modules.get(tracked.name)) == path:
                del sys.modules[tracked.name]

    def _depends_on(self, names: Iterable[str]) -> dict[Path, Stamp | None]:
        """Project files behind ``names``, closed over their own imports."""
        deps: dict[Path, Stamp | None] = {}
        queue = [parent for name in names for parent in _with_parents(name)]
        while queue:
            name = queue.pop()
            module = sys.modules.get(name)
            path = self.module_file(name, module)
            if path is None or path in deps:
                continue
            deps[path] = self.stamp(path)
            tracked = _tracked.get(path)
            if tracked is None or tracked.name != name:
                package = getattr(module, "__package__", None)
                imports = self._imports_of(path, package) | set(_with_parents(name)[:-1])
                tracked = _tracked[path] = _Tracked(name, deps[path], frozenset(imports))
            queue.extend(tracked.imports)
        return deps

    def load(self, path: Path, execute: Callable[[], ModuleType]) -> Loaded:
        """Run ``execute`` (which imports the workflow file ``path``) with the root importable.

        Exceptions from the file are returned, not raised (``KeyboardInterrupt`` and
        ``SystemExit`` are raised).
        """
        make_importable(self.root)
        self._drop_stale()
        last = next(reversed(sys.modules), None)
        module: ModuleType | None = None
        error: Exception | None = None
        try:
            module = execute()
        except Exception as exc:  # noqa: BLE001 - a user's file may raise anything
            error = exc
        names = self._imports_of(path, None)
        for name in reversed(sys.modules):  # what the import loaded, newest first
            if name == last:
                break
            names.add(name)
        deps = self._depends_on(names)
        helper, helper_name = None, ""
        if error is not None:
            helper = self._failed_module(error, path)
            if helper is not None:
                helper_name = ".".join(helper.relative_to(self.root).with_suffix("").parts)
                helper_name = helper_name.removesuffix(".__init__")
                deps[helper] = self.stamp(helper)
            deps.update((p, self.stamp(p)) for p in self._missing(error))
        return Loaded(module, error, tuple(deps.items()), helper, helper_name)

    def _is_project_source(self, filename: str | None) -> Path | None:
        if not filename or not filename.endswith(".py"):
            return None
        path = Path(filename)
        path = path if path.is_absolute() else path.resolve()
        if not path.is_relative_to(self.root):
            return None
        first = path.relative_to(self.root).parts[0]
        return path if first.removesuffix(".py") in self.top_names else None

    def _failed_module(self, error: BaseException, workflow: Path) -> Path | None:
        """The project module whose own import raised ``error``, if it is not the workflow file.

        A syntax error names its file; otherwise the deepest module-level frame of a project
        file in the traceback is the module that failed to import. An error raised by a
        helper *function* called from the workflow file's top level is the workflow file's.
        """
        if isinstance(error, SyntaxError):
            path = self._is_project_source(error.filename)
            if path is not None and path != workflow:
                return path
        failed = None
        for frame, _ in traceback.walk_tb(error.__traceback__):
            if frame.f_code.co_name != "<module>":
                continue
            path = self._is_project_source(frame.f_code.co_filename)
            if path is not None and path != workflow:
                failed = path
        return failed

    def _missing(self, error: BaseException) -> list[Path]:
        """Where the project module a failed import looked for would be: retry once it exists."""
        if not isinstance(error, ModuleNotFoundError) or not error.name:
            return []
        parts = error.name.split(".")
        if not parts[0].isidentifier():
            return []
        folder = self.root.joinpath(*parts)
        return [folder, folder.with_name(f"{parts[-1]}.py")]

    def shadowed(self, error: BaseException) -> str:
        """Why a project package cannot be imported here: a module of its name is already loaded.

        For example the application embedding the API has a ``helpers`` module of its own.
        """
        name = getattr(error, "name", None)
        if not isinstance(error, ImportError) or not name:
            return ""
        top = name.partition(".")[0]
        file = getattr(sys.modules.get(top), "__file__", None)
        mine = self.root / top
        if not file or not (mine.is_dir() or mine.with_suffix(".py").is_file()):
            return ""
        loaded = Path(file).resolve()
        if loaded.is_relative_to(mine) or loaded == mine.with_suffix(".py"):
            return ""
        return (
            f"; {top!r} is already imported from {file} in this process, which hides the "
            f"project's {top}: rename one of them"
        )
