"""Fixtures for the serve tests. Every server binds 127.0.0.1 on a free port and is shut down after its test."""

from __future__ import annotations

import os
import shutil

import pytest
from serve_helpers import ControlledBackend, LiveServer


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory, test_video):
    """A media folder with the test video, a file that is not a video, and a link pointing out of the folder."""
    root = tmp_path_factory.mktemp("media")
    shutil.copy(test_video, root / "clip.mp4")
    (root / "sub").mkdir()
    shutil.copy(test_video, root / "sub" / "again.mp4")
    (root / "broken.mp4").write_bytes(b"this is not a video" * 100)
    outside = tmp_path_factory.mktemp("outside")
    shutil.copy(test_video, outside / "secret.mp4")
    (root / "escape.mp4").symlink_to(outside / "secret.mp4")
    return root


@pytest.fixture
def controlled(tiny_backend):
    return ControlledBackend(tiny_backend)


@pytest.fixture
def make_server(controlled, media_dir):
    """make_server(**settings) -> a running LiveServer over the controlled tiny backend; all closed at the end."""
    from flexselect.pipeline import FlexSelect
    from flexselect.serve.app import Settings, create_app

    servers = []

    def make(backend: ControlledBackend | None = None, **settings):
        pipe = FlexSelect(backend or controlled)
        settings = {"model_id": "tiny-qwen2_5_vl", "media_dirs": [str(media_dir)], **settings}
        servers.append(LiveServer(create_app(pipe, Settings(**settings))))
        return servers[-1]

    yield make
    controlled.gate.set()
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def red_finder(tmp_path_factory):
    """The demo's tiny model arranged to attend to red, and its 30 s video with the red square at 19-21 s, in a
    media folder of its own: its evidence is known, so the page's peaks can be checked."""
    from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend
    from flexselect.demo import demo_assets

    cache = tmp_path_factory.mktemp("demo-cache")
    old = os.environ.get("FLEXSELECT_CACHE")
    os.environ["FLEXSELECT_CACHE"] = str(cache)
    try:
        model, video = demo_assets()
    finally:
        if old is None:
            del os.environ["FLEXSELECT_CACHE"]
        else:
            os.environ["FLEXSELECT_CACHE"] = old
    media = tmp_path_factory.mktemp("demo-media")
    shutil.copy(video, media / "red-square.mp4")
    return Qwen25VLBackend.load(model, device="cpu", dtype="float32"), media
