"""The official `openai` client against `flexselect serve` started from the command line, on the tiny model."""

from __future__ import annotations

import openai
import pytest
from serve_helpers import SMALL, cli_server, video_message

KNOBS = {k: v for k, v in SMALL.items() if k != "max_tokens"}


@pytest.fixture(scope="module")
def client(tiny_model_dir, media_dir):
    with cli_server(
        "--model", str(tiny_model_dir), "--media-dir", str(media_dir), "--device", "cpu", "--dtype", "float32"
    ) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="not-needed-on-loopback", max_retries=0, timeout=120)


def test_models_lists_the_loaded_model(client):
    assert [m.id for m in client.models.list()] == ["tiny-qwen2_5_vl"]


def _check_report(fx: dict) -> None:
    assert fx["visual_tokens"] == fx["frame_units"] * fx["tokens_per_frame"] == 8 * 24
    assert fx["kept_tokens"] == fx["budget"] == 24
    assert fx["frame_sets"] == 2 and fx["frame_set_units"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert len(fx["timeline"]) == 8 and sum(u["kept"] for u in fx["timeline"]) == 24
    starts = [u["start"] for u in fx["timeline"]]
    assert starts == sorted(starts) and 0 <= starts[0] < starts[-1] < 6.0
    assert set(fx["seconds"]) >= {"decode", "encode", "select", "ttft_answer", "answer", "total"}
    assert fx["heatmap"]["grid"] == [4, 6]
    assert sum(m.count("1") for m in fx["heatmap"]["units"]) == 24
    assert fx["heatmap_sheet"].endswith("/heatmap.png")


def test_plain_streamed_and_follow_up(client):
    messages = video_message("clip.mp4", "What appears in the middle of the video?")
    plain = client.chat.completions.create(model="tiny-qwen2_5_vl", messages=messages, max_tokens=8, extra_body=KNOBS)
    assert plain.object == "chat.completion" and plain.model == "tiny-qwen2_5_vl"
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 8 and plain.usage.prompt_tokens > 24
    fx = plain.model_extra["flexselect"]
    _check_report(fx)
    assert fx["video_cached"] is False and fx["seconds"]["encode"] > 0

    # the same question streamed: same greedy answer, now from the cached visual tokens
    stream = client.chat.completions.create(
        model="tiny-qwen2_5_vl",
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=KNOBS,
    )
    text, stages, final, usage = "", set(), None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-")
        extra = chunk.model_extra.get("flexselect") or {}
        if "progress" in extra:
            stages.add(extra["progress"]["stage"])
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if "kept_tokens" in extra:
            final = extra
            assert chunk.choices[0].finish_reason == choice.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert text.strip() == choice.message.content
    assert {"select", "answer"} <= stages or (plain.usage.completion_tokens == 0 and "select" in stages)
    _check_report(final)
    assert final["video_cached"] is True and final["seconds"]["decode"] == final["seconds"]["encode"] == 0
    assert usage.completion_tokens == plain.usage.completion_tokens

    # a follow-up names no video: the conversation's video is used, its tokens reused
    follow = messages + [
        {"role": "assistant", "content": choice.message.content},
        {"role": "user", "content": "And what happens right after that?"},
    ]
    again = client.chat.completions.create(model="tiny-qwen2_5_vl", messages=follow, max_tokens=8, extra_body=KNOBS)
    assert again.model_extra["flexselect"]["video_cached"] is True


def test_errors_reach_the_client_as_openai_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-qwen2_5_vl", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "missing_video"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=video_message("clip.mp4", "hi"))
    with pytest.raises(openai.APIError, match="budget"):  # found only after encoding: an error event mid-stream
        for _ in client.chat.completions.create(
            model="tiny-qwen2_5_vl",
            messages=video_message("clip.mp4", "hi"),
            stream=True,
            extra_body={**KNOBS, "budget": 10**6},
        ):
            pass
