"""The OpenAI chat-completions shape: a request body -> a checked `Job`, and a run's result -> response objects.

A video comes as a content part `{"type": "video_url", "video_url": {"url": ...}}` (or the `input_video` spelling,
`{"type": "input_video", "input_video": {"url": ...}}` / `"video_url": "..."`); the question is the text of the last
user message, and a text-only follow-up uses the latest video earlier in the conversation. FlexSelect's own knobs
are extra top-level fields (`frames`, `fps`, `start`, `end`, `max_frames`, `max_side`, `budget`, `layer`,
`set_frames`, `aggregate`, `selector`), which the `openai` client sends through `extra_body`.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import numpy as np

from ..backends.base import GenerationConfig
from ..errors import FlexSelectError
from ..evidence import describe, unit_ends
from ..pipeline import Sampling, SelectOptions
from .security import Refused

MAX_TOKENS_LIMIT = 4096
VIDEO_PART_TYPES = ("video_url", "input_video", "video")


class ApiError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        type_: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type_ or _error_type(status)
        self.headers = headers or {}

    @classmethod
    def from_refused(cls, e: Refused) -> ApiError:
        return cls(e.status, str(e), e.code, e.param)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_type(status: int) -> str:
    return {
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")


def video_url_of(part: dict) -> str | None:
    """The URL of a video content part in any of the spellings clients use, None for other parts."""
    if part.get("type") not in VIDEO_PART_TYPES:
        return None
    value = part.get(part["type"], part.get("video_url"))
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str):
        raise ApiError(
            400,
            f'the {part["type"]} part needs a url: {{"type": "video_url", "video_url": {{"url": "clip.mp4"}}}}',
            "invalid_video",
            "messages",
        )
    return value


def conversation_video_and_question(messages: Any) -> tuple[str, str]:
    """(the latest video URL in the conversation, the last user message's text)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "invalid_messages", "messages")
    video = None
    for message in messages:
        if not isinstance(message, dict):
            raise ApiError(
                400, "each message must be an object with a role and content", "invalid_messages", "messages"
            )
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and (url := video_url_of(part)) is not None:
                    video = url
    if video is None:
        raise ApiError(
            400,
            "no video in the conversation: add a content part "
            '{"type": "video_url", "video_url": {"url": "clip.mp4"}} to a user message',
            "missing_video",
            "messages",
        )
    last = messages[-1]
    if last.get("role") != "user":
        raise ApiError(400, "the last message must be the user's question", "invalid_messages", "messages")
    content = last.get("content")
    if isinstance(content, str):
        question = content
    elif isinstance(content, list):
        question = "\n".join(
            p.get("text", "")
            for p in content
            if isinstance(p, dict) and p.get("type") in ("text", "input_text") and isinstance(p.get("text"), str)
        )
    else:
        question = ""
    if not question.strip():
        raise ApiError(400, "the question is empty: put text in the last user message", "empty_question", "messages")
    return video, question.strip()


def _number(
    body: dict, name: str, kind: type, low: float | None = None, high: float | None = None, low_open: bool = False
) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        ok = ok and float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = (
            f" in {'(' if low_open else '['}{low}, {high}]"
            if high is not None
            else (f" > {low}" if low_open else f" >= {low}")
            if low is not None
            else ""
        )
        raise ApiError(
            400,
            f"{name} must be {'a whole number' if kind is int else 'a number'}{bounds}, got {value!r}",
            "invalid_value",
            name,
        )
    return kind(value)


def parse_options(body: dict) -> tuple[Sampling, SelectOptions, GenerationConfig]:
    """FlexSelect's knobs and the sampling parameters, checked: an `ApiError` names the field that is wrong."""
    frames, fps = _number(body, "frames", int, 1), _number(body, "fps", float, 0, low_open=True)
    if frames is not None and fps is not None:
        raise ApiError(400, "give frames or fps, not both", "invalid_value", "frames")
    start, end = _number(body, "start", float, 0), _number(body, "end", float, 0, low_open=True)
    if start is not None and end is not None and end <= start:
        raise ApiError(400, "end must be after start", "invalid_value", "end")
    sampling = Sampling(
        frames=frames,
        fps=fps,
        start=start,
        end=end,
        max_frames=_number(body, "max_frames", int, 1),
        max_side=_number(body, "max_side", int, 28),
    )
    try:
        options = SelectOptions(
            budget=body.get("budget"),
            layer=body.get("layer"),
            set_frames=body.get("set_frames"),
            aggregate=body.get("aggregate"),
            selector=body.get("selector"),
        )
    except FlexSelectError as e:
        param = next((k for k in ("budget", "layer", "set_frames", "aggregate", "selector") if k in str(e)), None)
        raise ApiError(400, str(e), "invalid_value", param) from None
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n = 1 is supported", "invalid_value", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    generation = GenerationConfig(
        max_new_tokens=_number({"max_tokens": max_tokens}, "max_tokens", int, 1, MAX_TOKENS_LIMIT) or 128,
        temperature=_number(body, "temperature", float, 0, 2) or 0.0,
        top_p=_number(body, "top_p", float, 0, 1, low_open=True) or 1.0,
        seed=_number(body, "seed", int) or 0,
    )
    return sampling, options, generation


# -- responses -------------------------------------------------------------------------------------------------------
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(result: dict) -> dict:
    prompt = result["generation"].prompt_tokens
    completion = len(result["generation"].token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(result: dict, max_tokens: int) -> str:
    return "length" if len(result["generation"].token_ids) >= max_tokens else "stop"


def completion(run_id: str, model: str, result: dict, max_tokens: int, extra: dict) -> dict:
    return {
        "id": run_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result["text"]},
                "finish_reason": finish_reason(result, max_tokens),
                "logprobs": None,
            }
        ],
        "usage": usage(result),
        "flexselect": extra,
    }


def chunk(run_id: str, model: str, delta: dict | None = None, finish: str | None = None, **extra: Any) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    return {
        "id": run_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        **extra,
    }


def flexselect_report(result: dict, sheet_url: str) -> dict:
    """The `flexselect` object of a response: what was kept, where in the video, and how long each stage took."""
    visual, selection = result["visual"], result["selection"]
    per_unit = selection.kept_per_frame(visual)
    starts, ends = np.asarray(visual.timestamps, dtype=np.float64), unit_ends(visual.timestamps)
    rows, cols = visual.grid
    kept = selection.kept.numpy()
    evidence = selection.evidence(visual)
    return {
        "frames": result["encoded"].get("sampled_frames"),
        "frame_units": visual.num_frames,
        "tokens_per_frame": visual.tokens_per_frame,
        "visual_tokens": visual.num_tokens,
        "kept_tokens": len(kept),
        "budget": selection.budget,
        "frame_sets": len(selection.sets),
        "frame_set_units": [[int(u) for u in s] for s in selection.sets],
        "selector": selection.selector,
        "reference_layer": selection.layer,
        "video_cached": bool(result["encoded"]["cached"]),
        "seconds": {k: round(float(v), 4) for k, v in result["seconds"].items()},
        "peak_memory_mb": result["peak_memory_mb"],
        "evidence": [r.to_dict() for r in evidence],  # ranked; see flexselect.evidence
        "evidence_text": describe(evidence, len(kept), visual.num_tokens),
        # kept-token density over time: one entry per temporal unit, for the page's timeline
        "timeline": [
            {"start": round(float(starts[u]), 3), "end": round(float(ends[u]), 3), "kept": int(per_unit[u])}
            for u in range(visual.num_frames)
        ],
        # the kept-token grid of each unit as a 0/1 string (rows x cols, row-major), for the player overlay
        "heatmap": {"grid": [rows, cols], "units": _unit_masks(kept, visual)},
        "heatmap_sheet": sheet_url,
    }


def _unit_masks(kept: np.ndarray, visual) -> list[str]:
    from ..show import kept_mask

    mask = kept_mask(visual, kept)
    return ["".join("1" if v else "0" for v in unit.reshape(-1)) for unit in mask]
