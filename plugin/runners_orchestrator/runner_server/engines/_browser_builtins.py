"""The built-in runners as the browser engine evaluates them: in the rendered page.

Same names, inputs and details as the HTTP engine's (``_builtins.py``), judged on what a
person sees once the page's scripts ran, and waiting for what appears late.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from pydantic import BaseModel, ConfigDict, Field

from runners_orchestrator.models import HttpUrl, RunnerResult
from runners_orchestrator.runner_server._builtins import COOKIE_BANNER_SELECTORS

if TYPE_CHECKING:
    from playwright.async_api import Page

    from runners_orchestrator.runner_server._registry import RunnerContext, RunnerRegistry

__all__ = ["DEFAULT_WAIT_MS", "BrowserPageInput", "register_browser_builtins"]

DEFAULT_WAIT_MS = 5000
"""How long, after the page's ``load`` event, a runner waits for what it checks to appear.

Consent-management scripts usually add their banner within a second or two of ``load``;
five seconds covers a slow one without making a page with no banner take long to fail.
"""

_POLL_MS = 100
_MARGIN_S = 1.0
"""Time kept back from the runner's deadline, so a wait that runs out is a ``fail`` (with
its screenshot), not a timeout."""

BANNER_JS = """(selectors) => {
  const visible = (el) => {
    if (!el.isConnected) return false;
    // display:none (itself or an ancestor), visibility:hidden, opacity:0 up the tree.
    if (!el.checkVisibility({opacityProperty: true, visibilityProperty: true})) return false;
    const box = el.getBoundingClientRect();
    return box.width > 0 && box.height > 0;
  };
  const elements = new Set();
  let found = null;
  for (const selector of selectors) {
    for (const el of document.querySelectorAll(selector)) {
      elements.add(el);
      if (found === null && visible(el)) found = selector;
    }
  }
  return found === null
    ? {visible: false, elementCount: elements.size}
    : {visible: true, selector: found, elementCount: elements.size};
}"""
"""The banner's details, as the HTTP engine reports them, from the live DOM and styles."""

_BANNER_VISIBLE_JS = f"(selectors) => ({BANNER_JS})(selectors).visible"
_TITLE_SET_JS = "() => document.title.trim() !== ''"


class BrowserPageInput(BaseModel):
    """Input of a browser runner that checks one page."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)

    url: HttpUrl
    wait_ms: int = Field(
        default=DEFAULT_WAIT_MS,
        ge=0,
        le=600_000,
        alias="waitMs",
        description="Milliseconds to wait, after load, for what the runner looks for.",
    )


async def _wait_for(page: Page, ctx: RunnerContext, expression: str, arg: object = None) -> None:
    """Wait until ``expression`` is truthy in the page, for ``waitMs`` at most.

    Returns as soon as it holds; when the wait runs out (or the runner's deadline is near),
    returns anyway: the caller reads the page as it is then.
    """
    wait_ms = float(ctx.input.get("wait_ms", DEFAULT_WAIT_MS))
    budget_ms = min(wait_ms, (ctx.remaining() - _MARGIN_S) * 1000)
    if budget_ms <= 0:
        return
    try:
        await page.wait_for_function(expression, arg=arg, polling=_POLL_MS, timeout=budget_ms)
    except PlaywrightTimeoutError:
        return


async def cookie_banner_visible(page: Page, ctx: RunnerContext) -> RunnerResult:
    """Pass as soon as an element marked as a cookie banner is visible to a person."""
    selectors = list(COOKIE_BANNER_SELECTORS)
    await _wait_for(page, ctx, _BANNER_VISIBLE_JS, selectors)
    details = await page.evaluate(BANNER_JS, selectors)
    status = "pass" if details["visible"] else "fail"
    return RunnerResult(name=ctx.name, status=status, details=details)


async def title_visible(page: Page, ctx: RunnerContext) -> RunnerResult:
    """Pass as soon as the document has a non-blank title, set by HTML or by a script."""
    await _wait_for(page, ctx, _TITLE_SET_JS)
    title = " ".join((await page.title()).split())
    return RunnerResult(name=ctx.name, status="pass" if title else "fail", details={"title": title})


def register_browser_builtins(registry: RunnerRegistry) -> None:
    """Add the browser ``cookieBannerVisibleTest`` and ``exampleTitleVisibleTest``."""
    registry.register_browser("cookieBannerVisibleTest", input_model=BrowserPageInput)(
        cookie_banner_visible
    )
    registry.register_browser("exampleTitleVisibleTest", input_model=BrowserPageInput)(
        title_visible
    )
