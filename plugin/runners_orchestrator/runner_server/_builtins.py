"""The two runners of the TypeScript ``runners`` project, under the same names.

They fetch the page with httpx and parse it with selectolax's Lexbor HTML5 parser; they
do not run the page's scripts (a browser-based variant is a separate runner). Their
details match what the TypeScript runners report.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import BaseModel
from selectolax.lexbor import LexborHTMLParser

from runners_orchestrator.models import HttpUrl, RunnerResult
from runners_orchestrator.runner_server._fetch import fetch_page

if TYPE_CHECKING:
    from selectolax.lexbor import LexborNode

    from runners_orchestrator.runner_server._registry import RunnerContext, RunnerRegistry

__all__ = ["COOKIE_BANNER_SELECTORS", "register_builtins"]

COOKIE_BANNER_SELECTORS = ("[data-cookie-banner]", ".cookie-banner", "#cookie-banner")
"""What counts as a cookie banner, in the order the result's ``selector`` reports them."""

_HIDDEN_STYLE = re.compile(
    r"(?:^|;)\s*(?:display\s*:\s*none|visibility\s*:\s*hidden)\s*(?:!important\s*)?(?:;|$)",
    re.IGNORECASE,
)


class PageInput(BaseModel):
    """Input of a runner that checks one page."""

    url: HttpUrl


def _is_hidden(node: LexborNode) -> bool:
    """An element is hidden when it or an ancestor is ``hidden`` or styled out of view."""
    current: LexborNode | None = node
    while current is not None and current.tag not in {"html", "-document"}:
        attributes = current.attributes
        if "hidden" in attributes:
            return True
        style = attributes.get("style") or ""
        if _HIDDEN_STYLE.search(style):
            return True
        current = current.parent
    return False


async def cookie_banner_visible(ctx: RunnerContext) -> RunnerResult:
    """Pass when an element marked as a cookie banner is present and not hidden."""
    page = await fetch_page(ctx)
    tree = LexborHTMLParser(page.text)
    # Lexbor yields an element once for each selector of the list that it matches; the
    # TypeScript runner counts elements, so count each element once.
    element_count = len({node.mem_id for node in tree.css(", ".join(COOKIE_BANNER_SELECTORS))})
    for selector in COOKIE_BANNER_SELECTORS:
        for node in tree.css(selector):
            if not _is_hidden(node):
                details = {"visible": True, "selector": selector, "elementCount": element_count}
                return RunnerResult(name=ctx.name, status="pass", details=details)
    details = {"visible": False, "elementCount": element_count}
    return RunnerResult(name=ctx.name, status="fail", details=details)


async def title_visible(ctx: RunnerContext) -> RunnerResult:
    """Pass when the page has a non-empty ``<title>``; its text goes into ``details``."""
    page = await fetch_page(ctx)
    node = LexborHTMLParser(page.text).css_first("title")
    title = " ".join(node.text().split()) if node is not None else ""
    status = "pass" if title else "fail"
    return RunnerResult(name=ctx.name, status=status, details={"title": title})


def register_builtins(registry: RunnerRegistry) -> None:
    """Add the built-in runners to ``registry``."""
    registry.register("cookieBannerVisibleTest", input_model=PageInput)(cookie_banner_visible)
    registry.register("exampleTitleVisibleTest", input_model=PageInput)(title_visible)
