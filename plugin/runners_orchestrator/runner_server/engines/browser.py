"""The browser engine: runners evaluated in headless Chromium, through Playwright.

One Chromium per runner server, launched in the server's lifespan and reused by every
check; each check gets a browser context of its own (no cookie, storage or consent choice
survives it), closed whatever the outcome. A browser that crashes or is killed fails the
checks in flight as ``error`` results and is launched again for the next check.

Every request a page makes, its subresources included, passes the server's target policy
before it leaves (a Playwright route); a page whose document came from a refused address
(after a redirect, say) is an ``error`` and nothing of it is reported.

A check that fails, or errors with its page open, takes a screenshot of the viewport (a
small JPEG) that the server keeps and serves; the result carries its URL in
``details.screenshot``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeoutError
from playwright.async_api import async_playwright

from runners_orchestrator.exceptions import ConfigurationError, RunnerError, TargetNotAllowedError
from runners_orchestrator.models import RunnerResult
from runners_orchestrator.runner_server._registry import Runner
from runners_orchestrator.runner_server.engines._browser_builtins import (
    register_browser_builtins,
)
from runners_orchestrator.target_policy import TargetPolicy

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable

    from playwright.async_api import Browser, BrowserContext, Page, Playwright, Route

    from runners_orchestrator.runner_server._registry import (
        AnyRunner,
        BrowserRunner,
        EngineName,
        RunnerContext,
        RunnerRegistry,
    )

__all__ = ["CHROMIUM_ARGS", "CHROMIUM_SETTING", "BrowserEngine", "find_chromium"]

logger = logging.getLogger("runners_orchestrator.runner_server.browser")

CHROMIUM_SETTING = "ORCHESTRATOR_CHROMIUM"
"""The environment variable (and ``--chromium`` the flag) naming the Chromium to launch."""

CHROMIUM_NAMES = (
    "chromium-headless-shell",
    "chromium",
    "chromium-browser",
    "google-chrome-stable",
    "google-chrome",
)
"""Looked for on the PATH, in this order: Debian's packages first, the headless shell before
the full browser. The headless shell (Debian's ``chromium-headless-shell``, the binary that
Playwright itself launches for headless pages) renders the same pages with a third of the
CPU per check: 100-104 ms against 313-354 ms for ``chromium``, same machine and minutes
(``docs/benchmarks.md``)."""

CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
"""Headless, and quiet: without the background-networking flags Chromium calls Google."""

NO_CHROMIUM = (
    f"no Chromium found for the browser engine: set {CHROMIUM_SETTING} (or --chromium) to "
    "its path, install Debian's package (apt-get install chromium), "
    "or run `playwright install chromium`"
)

CLOSE_TIMEOUT = 5.0
"""Seconds a context may take to close before it is left to the browser's relaunch."""

CRASHED = "the browser closed during the check (it crashed or was killed); it is relaunched"

SCREENSHOT_QUALITY = 50
"""JPEG quality of failure screenshots: a 1280x720 viewport is then some tens of KB."""

SCREENSHOT_RESERVE = 1.5
"""Seconds of a check's budget kept back from loading the page, to screenshot a page that
does not finish loading before the server's deadline."""

_T = TypeVar("_T")


@dataclass
class _Launched:
    """One launch of Chromium, and an event set the moment it disconnects."""

    browser: Browser
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def alive(self) -> bool:
        return not self.gone.is_set() and self.browser.is_connected()

    async def unless_gone(self, work: Awaitable[_T]) -> _T:
        """Await ``work``, or raise :data:`CRASHED` as soon as the browser disconnects.

        A call in flight when Chromium dies does not always return (a ``new_page`` can
        wait forever): the check must not wait for it.
        """
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        raise RunnerError(CRASHED)


def _playwright_chromiums() -> list[Path]:
    """Chromiums that ``playwright install chromium`` put in its cache, newest first."""
    root = os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or str(Path.home() / ".cache/ms-playwright")
    patterns = (
        "chromium-*/chrome-linux*/chrome",
        "chromium-*/chrome-mac*/Chromium.app/Contents/MacOS/Chromium",
        "chromium_headless_shell-*/chrome-linux*/headless_shell",
    )
    found = [path for pattern in patterns for path in Path(root).glob(pattern)]

    def version(path: Path) -> int:
        match = re.search(r"-(\d+)", path.relative_to(root).parts[0])
        return int(match.group(1)) if match else 0

    return sorted((p for p in found if os.access(p, os.X_OK)), key=version, reverse=True)


def _unwrapped(found: str) -> str:
    """The binary that Debian's ``chromium-headless-shell`` wrapper script runs, if it is one.

    That wrapper runs the binary without ``exec``, which would leave a shell between
    Playwright and the browser (and two "browser" processes where a crash is looked for);
    the binary itself takes the same arguments.
    """
    try:
        with Path(found).open("rb") as file:
            head = file.read(4096)
    except OSError:
        return found
    if not head.startswith(b"#!"):
        return found
    match = re.search(rb"(/\S+/chromium-headless-shell)\b", head)
    if match is None:
        return found
    binary = match.group(1).decode()
    return binary if os.access(binary, os.X_OK) else found


def find_chromium(configured: str | None = None) -> str:
    """Return the Chromium executable the browser engine launches.

    ``configured`` (a path or a command name) when given; else the first of
    :data:`CHROMIUM_NAMES` on the PATH (Debian's ``chromium-headless-shell``, then
    ``chromium``); else a Chromium that ``playwright install chromium`` downloaded.

    Raises:
        ConfigurationError: none found, or ``configured`` is not an executable; the
            message is one line naming the setting, the Debian package and Playwright.
    """
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise ConfigurationError(
                f"Chromium {configured!r} ({CHROMIUM_SETTING} / --chromium) is not an "
                "executable file; point it at one, install Debian's package "
                "(apt-get install chromium), or run `playwright install chromium`"
            )
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return _unwrapped(found)
    installed = _playwright_chromiums()
    if installed:
        return str(installed[0])
    raise ConfigurationError(NO_CHROMIUM)


def _first_line(exc: PlaywrightError) -> str:
    message = (exc.message or str(exc) or type(exc).__name__).strip()
    return message.splitlines()[0] if message else type(exc).__name__


class _Guard:
    """A route handler that lets a page's requests out only to addresses the policy allows."""

    def __init__(self, policy: TargetPolicy) -> None:
        self.policy = policy
        self.refused: TargetNotAllowedError | None = None
        self._hosts: dict[tuple[str, int | None], TargetNotAllowedError | None] = {}

    async def handle(self, route: Route) -> None:
        url = route.request.url
        parts = urlsplit(url)
        refused: TargetNotAllowedError | None = None
        if parts.scheme in {"http", "https"} and parts.hostname:
            key = (parts.hostname, parts.port)
            if key not in self._hosts:
                try:
                    await self.policy.check_url(url)
                except TargetNotAllowedError as exc:
                    self._hosts[key] = exc
                except (OSError, ValueError):
                    self._hosts[key] = None  # does not resolve: the browser says so itself
                else:
                    self._hosts[key] = None
            refused = self._hosts[key]
        with contextlib.suppress(PlaywrightError):  # the context closed meanwhile
            if refused is None:
                await route.continue_()
            else:
                self.refused = self.refused or refused
                await route.abort("blockedbyclient")


class BrowserEngine:
    """One reused headless Chromium; a fresh browser context and page for every check."""

    name: EngineName = "browser"
    default_capacity = 4
    """See ``docs/benchmarks.md``: on 2 cores, checks at once beyond 4 add no throughput
    (or lose some) and multiply latency; the rest is better refused (429) than queued."""

    def __init__(self, executable: str | None = None, policy: TargetPolicy | None = None) -> None:
        self._configured = executable
        self.executable: str | None = None
        """The Chromium launched, once the lifespan found it."""
        self.policy = policy or TargetPolicy()
        self.launches = 0
        """How many times Chromium was launched: 1, plus one per crash recovered from."""
        self._playwright: Playwright | None = None
        self._launched: _Launched | None = None
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()

    def register_builtins(self, registry: RunnerRegistry) -> None:
        """Add the rendered-page ``cookieBannerVisibleTest`` and ``exampleTitleVisibleTest``."""
        register_browser_builtins(registry)

    @property
    def open_contexts(self) -> int:
        """Browser contexts open right now: as many as checks in flight, 0 at rest."""
        launched = self._launched
        return len(launched.browser.contexts) if launched is not None and launched.alive() else 0

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Find Chromium, start Playwright and launch the browser; close both at the end.

        Raises:
            ConfigurationError: no Chromium found, or it does not start.
        """
        self.executable = find_chromium(self._configured)
        async with async_playwright() as playwright:
            self._playwright = playwright
            try:
                try:
                    await self._ready_browser()
                except RunnerError as exc:
                    raise ConfigurationError(str(exc)) from exc
                logger.info("browser engine: Chromium %s", self.executable)
                yield
            finally:
                if self._closing:
                    await asyncio.wait(self._closing, timeout=CLOSE_TIMEOUT)
                if self._launched is not None:
                    with contextlib.suppress(PlaywrightError):
                        await self._launched.browser.close()
                self._launched = None
                self._playwright = None

    async def _ready_browser(self) -> _Launched:
        """The running browser; launched (again) if it is gone."""
        launched = self._launched
        if launched is not None and launched.alive():
            return launched
        async with self._lock:
            if self._launched is not None and self._launched.alive():
                return self._launched
            if self._playwright is None:
                raise RuntimeError("the browser engine is not started: run the app's lifespan")
            if self._launched is not None:
                logger.warning("Chromium is gone (crashed or killed); launching it again")
                with contextlib.suppress(PlaywrightError, TimeoutError):
                    await asyncio.wait_for(self._launched.browser.close(), CLOSE_TIMEOUT)
                self._launched = None
            try:
                browser = await self._playwright.chromium.launch(
                    executable_path=self.executable, args=list(CHROMIUM_ARGS), timeout=30_000
                )
            except PlaywrightError as exc:
                raise RunnerError(
                    f"could not launch Chromium at {self.executable}: {_first_line(exc)}"
                ) from exc
            launched = _Launched(browser)
            browser.on("disconnected", lambda _: launched.gone.set())
            self._launched = launched
            self.launches += 1
            return launched

    async def run(self, runner: AnyRunner, ctx: RunnerContext) -> RunnerResult:
        """Run ``runner``: a plain one with its context, a browser one in a fresh page."""
        if isinstance(runner, Runner):
            return await runner.fn(ctx)
        return await self._run_in_page(runner, ctx)

    async def _run_in_page(self, runner: BrowserRunner, ctx: RunnerContext) -> RunnerResult:
        launched = await self._ready_browser()
        context = await launched.unless_gone(self._new_context(launched.browser))
        pages: list[Page] = []
        try:
            try:
                result = await launched.unless_gone(self._check(runner, ctx, context, pages))
            except PlaywrightError as exc:
                if not launched.alive():
                    raise RunnerError(CRASHED) from exc
                if isinstance(exc, PlaywrightTimeoutError):
                    raise RunnerError(f"runner {ctx.name} timed out: {_first_line(exc)}") from exc
                raise RunnerError(_first_line(exc)) from exc
            if result.status != "pass":  # the page is still open: show what it looked like
                shot = await self._screenshot(launched, pages, ctx)
                if shot is not None:
                    details = {**(result.details or {}), "screenshot": shot}
                    result = result.model_copy(update={"details": details})
        except RunnerError as exc:
            shot = await self._screenshot(launched, pages, ctx)
            if shot is None:
                raise
            return RunnerResult(
                name=ctx.name,
                status="error",
                error_message=str(exc),
                details={"screenshot": shot},
            )
        finally:
            if launched.alive():  # a dead browser took its contexts with it
                await self._close(context)
        return result

    async def _check(
        self, runner: BrowserRunner, ctx: RunnerContext, context: BrowserContext, pages: list[Page]
    ) -> RunnerResult:
        guard = _Guard(self.policy)
        await context.route("**/*", guard.handle)
        page = await context.new_page()
        pages.append(page)
        if ctx.url:
            await self._open(page, ctx, guard)
        return await runner.fn(page, ctx)

    @staticmethod
    async def _screenshot(launched: _Launched, pages: list[Page], ctx: RunnerContext) -> str | None:
        """Screenshot the check's page for a failure; its URL, or ``None`` if none was taken.

        Not for a refused target (nothing of such a page is reported), a dead browser, or
        when the deadline is too near.
        """
        budget = ctx.remaining() - 0.2
        if not pages or ctx.keep_screenshot is None or not launched.alive() or budget < 0.3:  # noqa: PLR2004
            return None
        shooting = pages[0].screenshot(
            type="jpeg", quality=SCREENSHOT_QUALITY, timeout=min(budget, 5.0) * 1000
        )
        try:
            data = await launched.unless_gone(shooting)
        except (PlaywrightError, RunnerError):
            return None
        return ctx.keep_screenshot(data)

    async def _new_context(self, browser: Browser) -> BrowserContext:
        """A new context; if the check is cancelled meanwhile, it is closed once it exists."""
        creating = asyncio.ensure_future(browser.new_context(service_workers="block"))
        try:
            return await asyncio.shield(creating)
        except asyncio.CancelledError:
            creating.add_done_callback(self._close_created)
            raise

    def _close_created(self, creating: asyncio.Future[BrowserContext]) -> None:
        if not creating.cancelled() and creating.exception() is None:
            self._closing_task(creating.result())

    def _closing_task(self, context: BrowserContext) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._close_now(context))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    @staticmethod
    async def _close_now(context: BrowserContext) -> None:
        with contextlib.suppress(PlaywrightError, TimeoutError):
            await asyncio.wait_for(context.close(), CLOSE_TIMEOUT)

    async def _close(self, context: BrowserContext) -> None:
        """Close ``context`` and its pages; a cancellation does not stop the closing."""
        await asyncio.shield(self._closing_task(context))

    async def _open(self, page: Page, ctx: RunnerContext, guard: _Guard) -> None:
        """Load ``ctx.url`` in ``page`` up to its ``load`` event, as the policy allows.

        Raises:
            RunnerError: the page is unreachable, answers 4xx/5xx or does not load in time.
            TargetNotAllowedError: the page, or where it redirected, is a refused address.
        """
        url = ctx.url or ""
        remaining = ctx.remaining()
        timeout = max(remaining - SCREENSHOT_RESERVE, remaining / 2, 0.001)
        try:
            response = await page.goto(url, wait_until="load", timeout=timeout * 1000)
        except PlaywrightTimeoutError as exc:
            raise RunnerError(f"{url} did not finish loading within {timeout:.1f}s") from exc
        except PlaywrightError as exc:
            if guard.refused is not None:
                raise guard.refused from exc
            if not page.context.browser or not page.context.browser.is_connected():
                raise
            raise RunnerError(f"could not fetch {url}: {_first_line(exc)}") from exc
        if response is None:
            return
        # Redirect hops are not routed through the guard: check where the document came from.
        address = await response.server_addr()
        if address is not None:
            self.policy.check_address(address["ipAddress"], urlsplit(response.url).hostname)
        if response.status >= 400:  # noqa: PLR2004 - HTTP's own boundary
            raise RunnerError(f"{url} answered HTTP {response.status}")
