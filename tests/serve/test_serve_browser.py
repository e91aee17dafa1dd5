"""The page in a real browser: Playwright driving Debian's chromium (no browser download) against a live server."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect, sync_playwright
from serve_helpers import ControlledBackend, wait_until

CHROMIUM = "/usr/bin/chromium"
# as root in a sandbox with a closed network: no sandbox, no GPU, and none of Chromium's own background traffic
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def page(tmp_path):
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1400, "height": 950},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def set_knobs(page, frames: int, budget: int, set_frames: int, max_tokens: int) -> None:
    page.click("#knobs summary")
    page.fill("#frames", str(frames))
    page.fill("#budget", str(budget))
    page.fill("#set-frames", str(set_frames))
    page.fill("#max-tokens", str(max_tokens))


def test_ask_watch_seek_follow_up_and_stop(make_server, red_finder, page, tmp_path):
    from flexselect.demo import DEMO_LAYER, needle_seconds

    backend = ControlledBackend(red_finder[0])
    server = make_server(backend, media_dirs=[str(red_finder[1])])
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    expect(page.locator("#model")).to_have_text("model tiny-qwen2_5_vl")
    expect(page.locator("#video-select option[value='red-square.mp4']")).to_have_count(1)
    page.select_option("#video-select", "red-square.mp4")
    page.wait_for_function("document.getElementById('player').readyState >= 1")  # the player loaded the file
    assert abs(page.evaluate("document.getElementById('player').duration") - 30.0) < 0.2

    # 12 units of 48 tokens in 3 frame sets, one unit's worth kept, at the demo's reference layer
    set_knobs(page, frames=24, budget=48, set_frames=4, max_tokens=12)
    page.fill("#layer", str(DEMO_LAYER))
    page.fill("#question", "When does the red square appear?")
    page.click("#ask")
    first = page.locator(".turn.assistant").first
    expect(first).to_have_class("turn assistant done", timeout=60_000)
    stats = first.locator(".stats")
    expect(stats).to_contain_text("kept 48 of 576 tokens (8.3%) in 3 frame set(s)")
    # every stage ran to its end (the answer may stop before max_tokens at an end-of-text token)
    bars = page.evaluate("[...document.querySelectorAll('#progress progress')].map((b) => [b.value, b.max])")
    assert [value == top > 0 for value, top in bars[:3]] == [True] * 3 and 0 < bars[3][0] <= bars[3][1] == 12
    assert page.locator(".turn.user").first.inner_text() == "When does the red square appear?"

    # the timeline drew its bars; its first peak is the evidence range that holds the red square
    peaks = page.locator("#peaks .peak")
    assert 1 <= peaks.count() <= 5
    ranges = page.locator("#evidence li")
    assert ranges.count() == peaks.count()
    red_start, red_end = needle_seconds()
    first_start = float(peaks.first.get_attribute("data-time"))
    assert first_start <= red_start and float(ranges.first.get_attribute("data-end")) >= red_end
    expect(first.locator(".evidence-text")).to_contain_text(f"of them from {first_start:.1f}-")
    page.wait_for_function(
        "document.getElementById('heatmap').complete && document.getElementById('heatmap').naturalWidth > 0"
    )
    red_pixels = """(() => { const c = document.getElementById('timeline');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let red = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 1] < 120) red++; return red; })()"""
    assert page.evaluate(red_pixels) > 50  # the density bars are drawn
    page.screenshot(path=str(tmp_path / "answered.png"), full_page=True)

    # clicking the peak seeks the player to the red square; the kept-token overlay follows the picture
    peaks.first.click()
    page.wait_for_function(f"Math.abs(document.getElementById('player').currentTime - {first_start}) < 0.05")
    page.wait_for_function("document.getElementById('player').readyState >= 2")
    assert page.evaluate("document.getElementById('overlay').width") > 0
    page.screenshot(path=str(tmp_path / "seeked.png"), full_page=True)

    # a follow-up in the same conversation reuses the video's tokens
    page.fill("#question", "And what comes after it?")
    page.keyboard.press("Enter")
    second = page.locator(".turn.assistant").nth(1)
    expect(second).to_have_class("turn assistant done", timeout=60_000)
    expect(second.locator(".stats")).to_contain_text("video tokens reused")

    # Stop while the frame sets are being scored: the run is cancelled on the server too
    backend.score_delay = 0.5
    page.fill("#set-frames", "1")
    page.fill("#question", "One more?")
    page.click("#ask")
    expect(page.locator("#progress .stage.active")).to_have_attribute("data-stage", "select", timeout=30_000)
    page.screenshot(path=str(tmp_path / "running.png"), full_page=True)
    page.click("#stop")
    third = page.locator(".turn.assistant").nth(2)
    expect(third).to_have_class("turn assistant stopped")
    expect(third).to_contain_text("[stopped]")
    runs = server.app.state.runs
    wait_until(lambda: runs.status()["cancelled"] == 1 and runs.status()["running"] is None, what="the cancel")
    assert backend.scored < 3 + 3 + 12  # 3 sets for each of the first two questions; this one stopped before its 12
    expect(page.locator("#ask")).to_be_enabled()
    page.screenshot(path=str(tmp_path / "stopped.png"), full_page=True)
    for name in ("answered", "seeked", "running", "stopped"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert errors == []
