"""Find an implementation by name: a built-in, an installed entry point, or ``module:Attr``."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from runners_orchestrator.exceptions import ConfigurationError

__all__ = ["load_named"]


def load_named(kind: str, name: str, builtins: dict[str, Any], group: str) -> Any:
    """Return the object registered as ``name``.

    Looks in ``builtins``, then the entry-point ``group``, then treats ``name`` as an import
    path ``package.module:Attribute``.

    Raises:
        ConfigurationError: nothing by that name; the message lists what exists.
    """
    if name in builtins:
        return builtins[name]
    for entry in entry_points(group=group):
        if entry.name == name:
            try:
                return entry.load()
            except Exception as exc:
                raise ConfigurationError(
                    f"{kind} {name!r} (entry point {entry.value}) failed to load: {exc}"
                ) from exc
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            return getattr(import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(f"{kind} {name!r} cannot be imported: {exc}") from exc
    known = sorted([*builtins, *(e.name for e in entry_points(group=group))])
    raise ConfigurationError(
        f"unknown {kind} {name!r}; expected one of {', '.join(known)} "
        "or an import path such as 'mypackage.module:Class'"
    )
