"""A real browser for end-to-end tests of the web playground: Debian's Chromium driven by Playwright.

Playwright's own browser download cannot run here (no network), so the system Chromium is launched
instead: ``/usr/bin/chromium``, or the executable that ``SDGATE_TEST_CHROMIUM`` names. Without it, or
without the ``playwright`` package, the tests that need a browser are skipped with a line that says
how to get it; with ``CI=true`` they fail instead, so that a CI image that lost its browser does not
pass by testing nothing.

:class:`Pages` opens each page in a fresh context (its own storage, so its own API key) and fails
the test when a page threw an uncaught error or logged a console error that the test did not expect.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHROMIUM = "/usr/bin/chromium"
DEFAULT_ARTIFACTS = ROOT / "build" / "test-artifacts" / "playground"
DESKTOP = {"width": 1280, "height": 900}

# As root in a container Chromium needs --no-sandbox; the rest keep it off the network (there is none:
# it would otherwise wait on update checks, QUIC probes and sync) and off a GPU it does not have.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def unavailable(reason: str) -> NoReturn:
    """Skip (or, under ``CI=true``, fail) the tests that need a browser, saying why and what to do."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(
            f"{reason} (with CI=true a missing browser or Playwright fails the run instead of skipping it)",
            pytrace=False,
        )
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.sync_api import Browser, ConsoleMessage, Error, Locator, Page, Response, expect, sync_playwright
except ImportError:  # Raised at import, so a test module that imports from here is skipped as a whole.
    unavailable("the playwright package is missing: pip install -e '.[test]' (or pip install playwright)")

# The test modules take Playwright's names from here, so that a missing package skips them rather than
# failing their import.
__all__ = ["Browser", "Locator", "Page", "Pages", "Response", "artifacts_dir", "chromium", "expect", "screenshot"]


def chromium_path() -> str:
    """The Chromium executable to drive: ``SDGATE_TEST_CHROMIUM``, else Debian's."""
    wanted = os.environ.get("SDGATE_TEST_CHROMIUM") or DEFAULT_CHROMIUM
    found = shutil.which(wanted)
    if found is None:
        unavailable(
            f"no Chromium at {wanted}: apt-get install chromium (Debian/Ubuntu), "
            "or point SDGATE_TEST_CHROMIUM at a Chromium or Chrome executable"
        )
    return found


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for the tests of one module (each test opens its own contexts in it)."""
    path = chromium_path()
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        except Error as e:
            # It is there but does not start: a broken install is a failure to see, not a skip.
            pytest.fail(f"Chromium at {path} did not start: {e}", pytrace=False)
        try:
            yield browser
        finally:
            browser.close()


def artifacts_dir() -> Path:
    """Where screenshots go: ``SDGATE_TEST_ARTIFACTS``, else ``build/test-artifacts/playground/``."""
    path = Path(os.environ.get("SDGATE_TEST_ARTIFACTS") or DEFAULT_ARTIFACTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    """Save the page as ``<artifacts>/<name>.png`` (a test artifact: nothing compares it)."""
    path = artifacts_dir() / f"{name}.png"
    page.screenshot(path=path, full_page=full_page, animations="disabled")
    return path


@dataclass
class Watched:
    """One page and what went wrong in it."""

    page: Page
    allow_console: Sequence[re.Pattern[str]]
    errors: list[str] = field(default_factory=list)  # uncaught exceptions and unhandled rejections
    console: list[str] = field(default_factory=list)  # console.error() and the browser's own errors

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            where = message.location.get("url", "")
            self.console.append(f"{message.text} ({where})" if where else message.text)

    def on_error(self, error: Error) -> None:
        self.errors.append(error.stack or f"{error.name}: {error.message}")

    def problems(self) -> list[str]:
        unexpected = [m for m in self.console if not any(p.search(m) for p in self.allow_console)]
        return [f"uncaught: {e}" for e in self.errors] + [f"console error: {m}" for m in unexpected]


class Pages:
    """Opens pages for one test, each in a context of its own; :meth:`close` fails on their errors."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.watched: list[Watched] = []

    def new_page(self, *, allow_console: Sequence[str] = (), **context: Any) -> Page:
        """A page in a fresh context (``context``: Playwright's ``new_context`` options; desktop size
        by default). ``allow_console``: regular expressions of console errors the test expects, such
        as the browser's "Failed to load resource: ... status of 401" for a refused key."""
        context.setdefault("viewport", DESKTOP)
        ctx = self.browser.new_context(**context)
        page = ctx.new_page()
        watched = Watched(page, [re.compile(p) for p in allow_console])
        page.on("console", watched.on_console)
        page.on("pageerror", watched.on_error)
        self.watched.append(watched)
        return page

    def close(self) -> None:
        """Close every context; fail if any page had an uncaught error or an unexpected console error."""
        problems = [p for w in self.watched for p in w.problems()]
        for w in self.watched:
            w.page.context.close()
        self.watched.clear()
        if problems:
            pytest.fail("the page reported errors:\n" + "\n".join(problems), pytrace=False)
