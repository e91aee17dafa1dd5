"""Helpers for the serve tests: a backend a test can hold, servers on 127.0.0.1 (in-process and the real CLI)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class ControlledBackend:
    """The real tiny backend, with knobs a test uses to hold a run where it wants it: `gate` (cleared: the answer
    pass waits) and `score_delay` (seconds per frame set scored, indexed or not). Counts the frame sets scored."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.score_delay = 0.0
        self.scored = 0
        self.waiting_at_gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def score(self, *args, **kwargs):
        time.sleep(self.score_delay)
        self.scored += 1
        return self._inner.score(*args, **kwargs)

    def score_indexed(self, *args, **kwargs):  # the path the pipeline takes once it indexes the video
        time.sleep(self.score_delay)
        self.scored += 1
        return self._inner.score_indexed(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self.waiting_at_gate.set()
        if not self.gate.wait(timeout=60):
            raise TimeoutError("the test never opened the gate")
        return self._inner.generate(*args, **kwargs)


class LiveServer:
    """uvicorn serving `app` from a thread on 127.0.0.1:<free port>."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@contextmanager
def cli_server(*args: str, timeout: float = 300):
    """`flexselect serve ... --port 0` as a child process; yields (url, process); always stopped."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flexselect.cli", "serve", "--port", "0", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + timeout
        url = None
        lines = []
        while url is None:
            line = proc.stderr.readline()
            if not line:
                raise RuntimeError("flexselect serve exited: " + "".join(lines))
            lines.append(line)
            if match := re.search(r"(http://127\.0\.0\.1:\d+)/", line):
                url = match.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError("flexselect serve did not start in time: " + "".join(lines))
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def video_message(url: str, question: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


SMALL = {"frames": 16, "budget": 24, "set_frames": 4, "max_tokens": 8}  # 8 units in 2 sets: quick on 2 cores


def rss_mib(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")
