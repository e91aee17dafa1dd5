"""A short bounded load test on 127.0.0.1: 20 concurrent questions against a bounded queue, then repeated bursts
that all fit, with the process's memory compared before and after. Each burst is cut off at 60 s."""

from __future__ import annotations

import asyncio
import gc

import httpx
from serve_helpers import rss_mib, video_message, wait_until

# the cheapest real run: 4 units in one frame set, one scoring pass, one answer token
QUICK = {"frames": 8, "budget": 24, "set_frames": 4, "max_tokens": 1}


async def burst(url: str, n: int) -> list[httpx.Response]:
    body = {"messages": video_message("clip.mp4", "What is shown?"), **QUICK}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(n))), timeout=60
        )


def test_twenty_concurrent_requests(make_server, controlled):
    server = make_server(max_waiting=4)
    runs = server.app.state.runs
    assert [r.status_code for r in asyncio.run(burst(server.url, 1))] == [200]  # warm: the video's tokens cached
    gc.collect()
    rss_before = rss_mib()

    # the model held: one runs, four wait, fifteen are told when to come back; none is lost
    controlled.gate.clear()

    async def held_burst():
        task = asyncio.ensure_future(burst(server.url, 20))
        await asyncio.get_running_loop().run_in_executor(
            None, wait_until, lambda: runs.status()["rejected"] == 15, 30, "15 rejections"
        )
        controlled.gate.set()
        return await task

    responses = asyncio.run(held_burst())
    assert sorted(r.status_code for r in responses) == [200] * 5 + [429] * 15
    for r in responses:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
        else:
            assert r.json()["flexselect"]["kept_tokens"] == 24
    assert runs.status()["completed"] == 6

    # a queue that holds a whole burst: every request answered, burst after burst, and memory stays flat
    runs.max_waiting = 10
    for _ in range(2):
        assert [r.status_code for r in asyncio.run(burst(server.url, 10))] == [200] * 10
    gc.collect()
    status = runs.status()
    assert status["completed"] == 26 and status["failed"] == status["cancelled"] == 0 and status["running"] is None
    assert rss_mib() - rss_before < 64  # MiB; keeping each run's tokens or answers would grow far beyond
