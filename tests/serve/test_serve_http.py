"""HTTP edge cases of `flexselect serve`: each answered with its status and an OpenAI-style error body."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from serve_helpers import SMALL, video_message, wait_until


def ask(server, url="clip.mp4", question="What is shown?", headers=None, **fields):
    body = {"model": "tiny-qwen2_5_vl", "messages": video_message(url, question), **SMALL, **fields}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def assert_error(response, status: int, code: str | None = None, type_: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if type_ is not None:
        assert error["type"] == type_, error
    return error


@pytest.fixture
def server(make_server):
    return make_server()


def test_malformed_json(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b'{"messages": [',
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert_error(r, 400, "invalid_json", "invalid_request_error")


def test_no_video_part(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        timeout=30,
        json={"messages": [{"role": "user", "content": [{"type": "text", "text": "what happens?"}]}]},
    )
    assert "video_url" in assert_error(r, 400, "missing_video")["message"]


@pytest.mark.parametrize(
    "url", ["../outside/secret.mp4", "sub/../../outside/secret.mp4", "/etc/passwd", "file:///etc/passwd"]
)
def test_path_outside_the_media_dir(server, url):
    assert_error(ask(server, url), 403, "media_forbidden", "permission_error")


def test_symlink_escape(server, media_dir):
    assert (media_dir / "escape.mp4").is_file()  # the link works: only the server refuses to follow it out
    assert_error(ask(server, "escape.mp4"), 403, "media_forbidden")
    names = [v["name"] for v in httpx.get(server.url + "/v1/flexselect/media").json()["data"]]
    assert "clip.mp4" in names and "sub/again.mp4" in names and "escape.mp4" not in names
    assert_error(httpx.get(server.url + "/v1/flexselect/media/escape.mp4"), 403, "media_forbidden")


def test_other_url_schemes_are_refused(server):
    assert_error(ask(server, "http://127.0.0.1:1/clip.mp4"), 400, "unsupported_url_scheme")


def test_unreadable_video(server):
    error = assert_error(ask(server, "broken.mp4"), 400, "invalid_video")
    assert "broken.mp4" in error["message"] and "/" not in error["message"].split("broken.mp4")[0][-1:]
    assert_error(ask(server, "missing.mp4"), 404, "video_not_found")


def test_empty_question(server):
    assert_error(ask(server, question="   "), 400, "empty_question")


def test_budget_too_large_then_the_server_still_answers(server):
    error = assert_error(ask(server, budget=10**6), 400, "invalid_request")
    assert "budget" in error["message"]
    assert ask(server).status_code == 200


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("temperature", -1),
        ("top_p", 0),
        ("budget", -5),
        ("frames", "many"),
        ("selector", "magic"),
        ("stream", "yes"),
    ],
)
def test_bad_fields_name_the_field(server, field, value):
    assert assert_error(ask(server, **{field: value}), 400)["param"] == field


def test_unknown_model_and_route(server):
    assert_error(ask(server, model="gpt-4o"), 404, "model_not_found")
    assert_error(httpx.get(server.url + "/v1/nothing"), 404, "not_found", "not_found_error")


def test_api_key(make_server):
    server = make_server(api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert_error(
            httpx.get(server.url + "/v1/models", headers=headers), 401, "invalid_api_key", "authentication_error"
        )
        assert_error(ask(server, headers=headers), 401, "invalid_api_key")
        assert_error(httpx.get(server.url + "/", headers=headers), 401)
    good = {"Authorization": "Bearer s3cret"}
    assert httpx.get(server.url + "/v1/models", headers=good).status_code == 200
    assert ask(server, headers=good).status_code == 200
    # the page's login link trades the key for a cookie, which then opens the page and the API
    with httpx.Client(base_url=server.url, follow_redirects=True) as browser:
        assert browser.get("/?api_key=s3cret").status_code == 200
        assert browser.get("/v1/flexselect/media").status_code == 200


def test_uploads(make_server):
    server = make_server(max_upload_mb=1)
    uploads = server.app.state.media.uploads
    r = httpx.post(server.url + "/v1/flexselect/uploads?filename=big.mp4", content=b"\0" * (2 * 2**20))
    assert_error(r, 413, "upload_too_large")

    def chunks():  # no Content-Length: the limit is enforced while streaming, and nothing half-written stays
        for _ in range(40):
            yield b"\0" * 65536

    assert_error(httpx.post(server.url + "/v1/flexselect/uploads", content=chunks()), 413, "upload_too_large")
    assert list(uploads.iterdir()) == []

    video = server.app.state.media.roots[0] / "clip.mp4"
    r = httpx.post(server.url + "/v1/flexselect/uploads?filename=mine.mp4", content=video.read_bytes())
    assert r.status_code == 200
    url = r.json()["url"]
    assert url.startswith("upload:") and [p.name for p in uploads.iterdir()] == [url[len("upload:") :]]
    assert ask(server, url).status_code == 200
    assert httpx.get(f"{server.url}/v1/flexselect/media/{url}").content == video.read_bytes()
    assert_error(ask(server, "upload:../clip.mp4"), 404, "upload_not_found")
    server.close()
    assert not uploads.exists()  # the private folder goes with the server


def test_full_queue_answers_429(make_server, controlled):
    server = make_server(max_waiting=1)
    controlled.gate.clear()
    results = {}

    def background(name):
        results[name] = ask(server, question=f"question {name}")

    first = threading.Thread(target=background, args=("first",))
    first.start()
    assert controlled.waiting_at_gate.wait(30)  # the first run holds the model
    second = threading.Thread(target=background, args=("second",))
    second.start()
    wait_until(lambda: server.app.state.runs.status()["waiting"] == 1, what="the second run to wait")
    r = ask(server, question="third")
    error = assert_error(r, 429, "queue_full", "rate_limit_error")
    assert int(r.headers["Retry-After"]) >= 1 and "busy" in error["message"]
    controlled.gate.set()
    first.join(60)
    second.join(60)
    assert results["first"].status_code == results["second"].status_code == 200


def test_disconnect_mid_stream_cancels_the_run(make_server, controlled):
    server = make_server()
    controlled.score_delay = 0.3  # 8 frame sets, ~2.4 s of scoring: time to hang up in the middle
    body = {"messages": video_message("clip.mp4", "What is shown?"), **SMALL, "set_frames": 1, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and '"stage":"select"' in line:
                break  # hang up after the first frame set
    runs = server.app.state.runs
    wait_until(lambda: runs.status()["cancelled"] == 1 and runs.status()["running"] is None, what="the cancel")
    assert controlled.scored < 8
    controlled.score_delay = 0.0
    assert ask(server).status_code == 200


def test_a_crashing_run_does_not_take_the_server_down(make_server, controlled, monkeypatch):
    server = make_server()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug deep inside the model")

    monkeypatch.setattr(controlled, "generate", broken)
    error = assert_error(ask(server), 500, "internal_error", "server_error")
    assert "bug" not in error["message"]  # internals stay in the server's log
    monkeypatch.undo()
    assert ask(server).status_code == 200
    assert server.app.state.runs.status()["failed"] == 1


def test_streamed_error_event(server):
    body = {"messages": video_message("clip.mp4", "hi"), **SMALL, "budget": 10**6, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "budget" in json.loads(events[-2])["error"]["message"]


def test_foreign_host_header_is_refused(server):
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host
    assert httpx.get(server.url + "/v1/models", headers={"Host": "evil.example"}).status_code == 400


def test_other_spellings_of_the_video_part(server, media_dir):
    import base64

    inline = "data:video/mp4;base64," + base64.b64encode((media_dir / "clip.mp4").read_bytes()).decode()
    for part in (
        {"type": "input_video", "input_video": {"url": "clip.mp4"}},
        {"type": "input_video", "video_url": "sub/again.mp4"},
        {"type": "video_url", "video_url": {"url": inline}},
        {"type": "video_url", "video_url": {"url": f"file://{media_dir / 'clip.mp4'}"}},
    ):
        body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "What is shown?"}]}], **SMALL}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, (part["type"], r.text)
        assert r.json()["flexselect"]["kept_tokens"] == 24


def test_disconnect_while_waiting_for_a_plain_answer(make_server, controlled):
    server = make_server()
    controlled.gate.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/chat/completions",
            timeout=httpx.Timeout(30, read=3),
            json={"messages": video_message("clip.mp4", "What is shown?"), **SMALL, "max_tokens": 64},
        )
    controlled.gate.set()  # the run goes on to its next frame set or first token, sees the flag and stops there
    runs = server.app.state.runs
    wait_until(lambda: runs.status()["cancelled"] == 1 and runs.status()["running"] is None, what="the cancel")
    assert ask(server).status_code == 200
