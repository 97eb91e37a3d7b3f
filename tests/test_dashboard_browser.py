"""The operator dashboard in a real browser: Debian's ``chromium`` (headless, driven by Playwright) against a
running ``qflare server`` with a live federation of device processes.

An operator logs in (after one wrong attempt), mints enrollment tokens (the devices enroll with exactly those),
watches both rounds complete on the overview without a reload, opens a round's detail, revokes a device and
filters the security events.  Each page is checked with axe-core (vendored under tests/vendor/axe-core,
injected as an init script, so the pages' own Content-Security-Policy stays in force): a serious or critical
violation fails the test.  Screenshots and axe reports go to ``artifacts/dashboard/`` (git-ignored; override
with ``QFLARE_TEST_ARTIFACTS``).

Only a missing ``chromium`` skips this test (``apt-get install -y chromium``); Playwright's own browser
download is never used.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from http_fixtures import Federation
from playwright.sync_api import expect, sync_playwright

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
ARTIFACTS = Path(os.environ.get("QFLARE_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed: apt-get install -y chromium"),
]

_AXE_RUN = """async () => {
  const result = await axe.run(document, {resultTypes: ["violations"]});
  return result.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.slice(0, 5).map(n => n.target.join(" "))}));
}"""


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, devices=3, rounds=2, per_round=3)
    try:
        fed.start_server()
        fed.wait_ready()
        yield fed
    finally:
        fed.close()


class Browser:
    """One page of a headless chromium, with screenshots and axe reports saved under ``out``."""

    def __init__(self, page: Any, out: Path) -> None:
        self.page, self.out = page, out
        self.console: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.out / f"{name}.png"), full_page=True)

    def accessible(self, name: str) -> None:
        violations = self.page.evaluate(_AXE_RUN)
        (self.out / f"{name}.axe.json").write_text(json.dumps(violations, indent=2))
        bad = [v for v in violations if v["impact"] in ("serious", "critical")]
        assert not bad, f"axe-core: serious/critical violations on {name}: {json.dumps(bad, indent=2)}"

    def visit(self, url: str, name: str) -> None:
        self.page.goto(url)
        expect(self.page.locator("#live")).to_contain_text("Live:")  # the page loaded and follows the stream
        self.accessible(name)


def test_operator_session_in_chromium(federation: Federation) -> None:
    fed, base = federation, federation.url
    out = ARTIFACTS / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.add_init_script(script=AXE.read_text(encoding="utf-8"))
            context.set_default_timeout(30_000)
            b = Browser(context.new_page(), out)
            page = b.page

            # without a session: the login page; a wrong secret is refused and shown
            page.goto(f"{base}/dashboard")
            assert page.url.endswith("/dashboard/login")
            b.accessible("login")
            page.fill("#secret", "not-the-admin-token")
            page.click("button[type=submit]")
            expect(page.get_by_role("alert")).to_contain_text("Wrong admin token")
            b.shot("01-login-refused")
            page.fill("#secret", fed.admin)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/dashboard")
            expect(page.locator("#ov-state")).to_have_text("waiting")
            b.accessible("overview-empty")
            b.shot("02-overview-waiting")

            # mint three tokens: shown once, and the devices enroll with exactly these
            b.visit(f"{base}/dashboard/tokens", "tokens")
            page.fill("#m-count", "3")
            page.fill("#m-label", "browser test")
            page.click("#mint button[type=submit]")
            expect(page.locator("#minted-list code")).to_have_count(3)
            tokens = page.locator("#minted-list code").all_inner_texts()
            expect(page.locator("#tokens tbody tr")).to_have_count(3)
            b.shot("03-tokens-minted")
            for i, token in enumerate(tokens):
                fed.start_device(i, token)

            # watch the federation on the overview: live updates, no reload
            page.goto(f"{base}/dashboard")
            page.evaluate("window.__sameDocument = true")
            expect(page.locator("#ov-state")).to_have_text("open", timeout=120_000)
            b.shot("04-overview-round-open")
            expect(page.locator("#ov-state")).to_have_text("finished", timeout=240_000)
            expect(page.locator("#chart-quality canvas")).to_have_count(1, timeout=120_000)
            expect(page.locator("#chart-quality-empty")).to_be_hidden()
            assert page.evaluate("window.__sameDocument === true"), "the overview reloaded instead of updating live"
            expect(page.locator("#ov-round")).to_have_text("2 of 2")
            b.accessible("overview-finished")
            b.shot("05-overview-finished")

            # a round's participants and accepted updates
            b.visit(f"{base}/dashboard/rounds", "rounds")
            expect(page.locator("#rounds tbody tr")).to_have_count(2)
            page.get_by_role("button", name="Show round 1").click()
            expect(page.locator("#round-detail")).to_be_visible()
            accepted = page.locator("#round-detail table").nth(1)
            expect(accepted.locator("tbody tr")).to_have_count(3)
            b.accessible("round-detail")
            b.shot("06-round-1")

            # revoke a device
            b.visit(f"{base}/dashboard/devices", "devices")
            expect(page.locator("#devices tbody tr")).to_have_count(3)
            first = page.locator("#devices tbody tr").first
            device_id = first.locator("[data-device]").get_attribute("data-device")
            assert device_id
            first.locator("input.reason").fill("lost in the field")
            first.get_by_role("button", name="Revoke").click()
            expect(page.locator(f'[data-device="{device_id}"]')).to_have_text("revoked")
            expect(page.locator("#devices-msg")).to_contain_text("revoked")
            b.shot("07-device-revoked")
            db, store = fed.store()
            try:
                row = store.get_device(device_id)
                assert row is not None and row.status == "revoked" and row.revoked_reason == "lost in the field"
            finally:
                db.dispose()

            # filter the security events: the failed login is there, and only events of that kind are listed
            b.visit(f"{base}/dashboard/events", "events")
            page.fill("#f-reason", "login_failed")
            page.click("#event-filter button[type=submit]")
            expect(page.locator("#events-msg")).to_contain_text("(filtered)")
            kinds = page.locator("#events tbody .kind").all_inner_texts()
            assert kinds and set(kinds) == {"login_failed"}, kinds
            assert "reason=login_failed" in page.url
            b.shot("08-events-filtered")

            b.visit(f"{base}/dashboard/ledger", "ledger")
            expect(page.locator("#lineage tbody tr")).to_have_count(3)  # v0 and the two rounds' models
            b.shot("09-ledger")

            page.get_by_role("button", name="Log out").click()
            page.wait_for_url(f"{base}/dashboard/login")
            page.goto(f"{base}/dashboard")
            assert page.url.endswith("/dashboard/login")

            violations = [m for m in b.console if "Content Security Policy" in m or "Refused to" in m]
            assert not violations, violations
        finally:
            browser.close()
