"""The status page in a real browser: headless Chromium (Debian's ``chromium``, driven by
Playwright for Python with ``executable_path`` set to it; no browser download) loads the
page from a running shim, and the figures it shows match the shim's own counters after
known traffic; a weight change shows up without a reload. A screenshot is saved to
``artifacts/status-page.png`` (git-ignored).

Skipped only outside CI when chromium or playwright is missing; with CI=true it runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.ctl import AdminClient
from tests.procs import req
from tests.reliability.helpers import fake_counts
from tests.shimproc import ROOT, Fake, ShimProc, shim_config, start_shim

CHROMIUM = os.environ.get("MMSHIM_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "artifacts"
N_REQUESTS = 30

pytestmark = pytest.mark.browser


def _need_browser() -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip)")
    if not shutil.which(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if missing and os.environ.get("CI") != "true":
        pytest.skip("no browser here: " + ", ".join(missing))


@pytest.fixture
def running(fakes: dict[str, Fake], tmp_path: Path) -> Iterator[ShimProc]:
    _need_browser()
    cfg = shim_config(fakes, tmp_path, routing={"weights": {"mma": 50, "mms": 50}})
    shim = start_shim(cfg, tmp_path)
    yield shim
    shim.kill()


def test_page_shows_the_counters_and_a_weight_change_live(
        running: ShimProc, fakes: dict[str, Fake], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    shim = running
    for i in range(N_REQUESTS):
        assert req(shim.endpoint, {"command": "status", "conversation_id": f"b{i}"},
                   timeout=10).get("status") != "error"
    served = {name: fake_counts(fake).get("status", 0) for name, fake in fakes.items()}
    assert sum(served.values()) == N_REQUESTS

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{shim.metrics_port}/", timeout=30_000)
            for name, count in served.items():
                row = page.locator(f'tr[data-backend="{name}"]')
                # The figure the shim counted, which is what the backend really received.
                expect(row.locator('td[data-k="requests_total"]')).to_have_text(
                    str(count), timeout=15_000)
                expect(row.locator('td[data-k="healthy"]')).to_have_text("up")
                expect(row.locator('td[data-k="weight"]')).to_have_text("50")
            expect(page.locator("#mode")).to_have_text("split")

            # A change on the admin socket appears without reloading the page.
            updates_before = int(page.locator("body").get_attribute("data-updates") or 0)
            token = (tmp_path / "state.token").read_text().strip()
            assert AdminClient(shim.admin_endpoint, token).call(
                "set_weights", weights={"mms": 10})["status"] == "ok"
            expect(page.locator("#weights")).to_have_text("mma=90, mms=10", timeout=15_000)
            expect(page.locator('tr[data-backend="mms"] td[data-k="weight"]')).to_have_text("10")
            assert int(page.locator("body").get_attribute("data-updates") or 0) > updates_before
            expect(page.locator("#audit tbody")).to_contain_text("set_weights")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "status-page.png").stat().st_size > 10_000
