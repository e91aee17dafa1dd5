"""One run at a time on the model: a worker thread, a bounded queue, cancellation, and what a run reports.

The model is not thread-safe and holds most of the GPU, so every question goes through one worker thread. A request
submits a `Run` and reads its events (progress, answer text, the result or an error) from an asyncio queue that the
worker feeds thread-safely. Cancelling (Stop, or a client that went away) sets a flag that the pipeline's progress
callbacks check between frames, frame sets and tokens; a run that fails or is cancelled never stops the worker.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backends.base import GenerationConfig
from ..errors import FlexSelectError
from ..pipeline import FlexSelect, Sampling, SelectOptions, peak_memory_mb

log = logging.getLogger("flexselect")


class Cancelled(Exception):
    """Raised inside a progress callback to stop a run between steps."""


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


@dataclass
class Job:
    """What one question asks for, already checked (see openai_api.parse_request)."""

    video: Path
    question: str
    sampling: Sampling
    options: SelectOptions
    generation: GenerationConfig


@dataclass
class Run:
    job: Job
    loop: asyncio.AbstractEventLoop
    id: str
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.time)

    def emit(self, kind: str, **data: Any) -> None:
        """From the worker thread: hand an event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, {"type": kind, **data})
        except RuntimeError:  # the event loop is closed: the server is stopping and nobody listens any more
            self.cancel()

    def cancel(self) -> None:
        self.cancelled.set()


class RunQueue:
    """A single worker thread over a bounded FIFO. `max_waiting` runs may wait behind the one running."""

    def __init__(self, pipe: FlexSelect, max_waiting: int = 4) -> None:
        self.pipe = pipe
        self.max_waiting = max_waiting
        self._queue: queue.Queue[Run | None] = queue.Queue()
        self._lock = threading.Lock()
        self._active = 0  # submitted and not finished: the running one plus those waiting
        self.running: Run | None = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._recent_seconds: list[float] = []
        self._thread = threading.Thread(target=self._work, name="flexselect-runs", daemon=True)
        self._thread.start()

    def submit(self, run: Run) -> None:
        with self._lock:
            if self._active >= 1 + self.max_waiting:
                self.counts["rejected"] += 1
                raise QueueFull(self.retry_after())
            self._active += 1
        self._queue.put(run)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean of recent run times times the runs ahead."""
        mean = sum(self._recent_seconds) / len(self._recent_seconds) if self._recent_seconds else 5.0
        return max(1, round(mean * self._active))

    def status(self) -> dict:
        running = self.running
        return {
            "running": running.id if running else None,
            "waiting": self._active - (running is not None),
            "max_waiting": self.max_waiting,
            **self.counts,
        }

    def close(self) -> None:
        if self.running is not None:
            self.running.cancel()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while (run := self._queue.get()) is not None:
            with self._lock:
                self.running = run
            start = time.perf_counter()
            try:
                if run.cancelled.is_set():
                    raise Cancelled
                result = execute(self.pipe, run)
                run.emit("done", result=result)
                self.counts["completed"] += 1
            except Cancelled:
                run.emit("cancelled")
                self.counts["cancelled"] += 1
            except FlexSelectError as e:
                run.emit("error", status=400, message=str(e), code="invalid_request")
                self.counts["failed"] += 1
            except (MemoryError, torch.OutOfMemoryError):
                _free_memory()
                run.emit(
                    "error",
                    status=503,
                    code="out_of_memory",
                    message="out of memory on this run: ask for "
                    "fewer frames, a smaller max_side or budget; the server keeps running",
                )
                self.counts["failed"] += 1
            except Exception:  # a bug in one run must not take the server down: log it, report it, go on
                log.exception("run %s failed", run.id)
                run.emit(
                    "error",
                    status=500,
                    code="internal_error",
                    message="the run failed inside the server (see the server's log); the server keeps running",
                )
                self.counts["failed"] += 1
            finally:
                with self._lock:
                    self.running = None
                    self._active -= 1
                self._recent_seconds = (self._recent_seconds + [time.perf_counter() - start])[-8:]


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def execute(pipe: FlexSelect, run: Run) -> dict:
    """video -> visual tokens -> frame sets -> kept tokens -> answer, reporting progress and text as it goes."""
    job = run.job

    def progress(stage: str, done: int, total: int) -> None:
        if run.cancelled.is_set():
            raise Cancelled
        run.emit("progress", stage=stage, done=done, total=total)

    t0 = time.perf_counter()
    visual, encoded = pipe.encode(job.video, job.sampling, progress)
    prompt = pipe.backend.prompt(job.question)
    selection = pipe.select(visual, prompt, job.options, progress)
    t_answer = time.perf_counter()

    backend = pipe.backend
    token_ids: list[int] = []
    sent = ""

    def on_token(token: int) -> None:
        # The decoded text may still change within its last word (a character split over byte tokens decodes to
        # U+FFFD, or differently, until its last byte arrives): send only up to the last whitespace, as
        # transformers' TextStreamer does; the rest goes when the answer is complete.
        nonlocal sent
        token_ids.append(token)
        text = backend.decode(token_ids).lstrip()
        stable = text[: max(text.rfind(" "), text.rfind("\n")) + 1]
        if len(stable) > len(sent) and stable.startswith(sent):
            run.emit("text", delta=stable[len(sent) :])
            sent = stable

    generated = backend.generate(
        visual,
        selection.kept,
        prompt,
        job.generation,
        lambda done, total: progress("answer", done, total),
        on_token=on_token,
    )
    if generated.text.startswith(sent) and len(generated.text) > len(sent):
        run.emit("text", delta=generated.text[len(sent) :])
    end = time.perf_counter()
    return {
        "text": generated.text,
        "visual": visual,
        "selection": selection,
        "generation": generated,
        "encoded": encoded,
        "seconds": {
            "decode": encoded["decode_s"],
            "encode": encoded["encode_s"],
            "select": selection.seconds,
            "ttft_answer": generated.ttft_s,
            "answer": end - t_answer,
            "total": end - t0,
        },
        "peak_memory_mb": peak_memory_mb(),
    }
