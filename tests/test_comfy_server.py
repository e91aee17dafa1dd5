"""End to end against a real ComfyUI 0.3.75 server (tests/comfy_env.py), with the pack installed the way a user
installs it: the repository's files in custom_nodes/flexselect (what a ComfyUI-Manager clone or a registry zip
holds) and its requirements.txt installed by pip into a ComfyUI venv that has no flexselect of its own.

Checked: the pack loads without IMPORT FAILED and brings its library; the shipped UI workflow, turned into the prompt
the frontend submits, runs and its answer comes back in /history; the ranker path; the core VIDEO and the IMAGE batch
(core Load Video -> Get Video Components, as a VideoHelperSuite graph passes frames) inputs; validation refuses a
missing or corrupt video and an empty question with HTTP 400; a run error is one node-worded line with short inputs;
POST /free (ComfyUI's model unloading) and a rerun; POST /interrupt stops a long run. The server listens on
127.0.0.1 only. No ComfyUI file is ever written into the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import comfy_workflow as W
from comfy_env import (
    comfy_or_skip,
    comfyui_source,
    run,
    server_environment,
    torchvision_stub,
)
from helpers import save_tiny_ranker

pytestmark = pytest.mark.comfy_server

ROOT = Path(__file__).resolve().parents[1]
PACK_DIR = "flexselect"  # the folder name a ComfyUI-Manager clone of the repository gets
VIDEO = "flexselect_example.mp4"  # the name the shipped workflow uses (the README tells users to put theirs there)
LONG_VIDEO = "long.mp4"
MODEL = "Qwen2.5-VL-7B-Instruct"  # the shipped workflow's model: here the tiny random checkpoint stands in for it
OUR_IDS = [
    "FlexSelectLoadVideo",
    "FlexSelectLoadModel",
    "FlexSelectLoadRanker",
    "FlexSelect",
    "FlexSelectAnswer",
    "FlexSelectFreeModels",
]


def install_pack(custom_nodes: Path, python: Path) -> Path:
    """The repository's files (tracked and not ignored: what a clone or a registry zip has), then its
    requirements.txt with ComfyUI's pip, from the pack's folder, as ComfyUI-Manager runs it."""
    files = run(["git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard", "-z"], 60).stdout
    pack = custom_nodes / PACK_DIR
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file():
            (pack / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, pack / rel)
    run([python, "-m", "pip", "install", "-q", "-r", "requirements.txt"], 900, cwd=pack)
    return pack


def write_tiny_ranker(folder: Path, tiny_backend) -> None:
    save_tiny_ranker(tiny_backend, folder / "tiny-ranker")
    for decoy in ("weights.pt", "model.bin", "other.safetensors"):  # what load_ranker refuses: never offered
        (folder / decoy).write_bytes(b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path, python: Path) -> None:
        self.url, self.proc, self.log, self.python = url, proc, log, python

    def request(self, method: str, path: str, body=None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def submit(self, workflow: dict) -> str:
        status, body = self.request("POST", "/prompt", {"prompt": workflow, "client_id": "flexselect-test"})
        assert status == 200, f"POST /prompt -> {status}: {body}"
        return body["prompt_id"]

    def run(self, workflow: dict, timeout: float = 240) -> dict:
        return self.wait_history(self.submit(workflow), timeout)

    def wait_history(self, prompt_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited:\n{self.log_text()[-4000:]}"
            _, hist = self.request("GET", f"/history/{prompt_id}")
            entry = (hist or {}).get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s\n{self.log_text()[-3000:]}")

    def wait_running(self, prompt_id: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _, queue = self.request("GET", "/queue")
            if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
                return
            time.sleep(0.1)
        raise AssertionError(f"prompt {prompt_id} never started running")


def errors_of(entry: dict) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


def succeeded(entry: dict) -> None:
    assert entry["status"]["status_str"] == "success", [
        (e["exception_message"], e["traceback"][-3:]) for e in errors_of(entry)
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, tiny_backend):
    t0 = time.monotonic()
    env = comfy_or_skip(server_environment)
    tree = comfyui_source()
    python = env / "venv" / "bin" / "python"
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    install_pack(base / "custom_nodes", python)
    setup_s = time.monotonic() - t0

    from flexselect.video import write_test_video

    (base / "models" / "LLM").mkdir(parents=True)
    shutil.copytree(tiny_model_dir, base / "models" / "LLM" / MODEL)
    (base / "models" / "flexselect").mkdir()
    write_tiny_ranker(base / "models" / "flexselect", tiny_backend)
    (base / "input").mkdir()
    # 336x224: 96 tokens per temporal unit for the tiny model, 768 for the shipped 16 frames (budget 256)
    write_test_video(base / "input" / VIDEO, num_frames=48, fps=8.0, width=336, height=224, needle_frames=(20, 21))
    write_test_video(base / "input" / LONG_VIDEO, num_frames=1200, fps=24.0, width=112, height=84)
    (base / "input" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    stubs = torchvision_stub(base / "stubs")
    (base / "user").mkdir()

    port = free_port()
    log = base / "server.log"
    server_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    server_env.update(PYTHONPATH=str(stubs), PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                python,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(port),
                "--base-directory",
                base,
                "--user-directory",
                base / "user",
                "--database-url",
                "sqlite:///:memory:",
                "--disable-auto-launch",
                "--log-stdout",
            ],
            cwd=tree,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=server_env,
            start_new_session=True,
        )
    srv = Server(f"http://127.0.0.1:{port}", proc, log, python)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited with {proc.returncode}:\n{srv.log_text()[-4000:]}")
            try:
                if srv.request("GET", "/system_stats", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"ComfyUI did not answer within 180 s:\n{srv.log_text()[-4000:]}")
            time.sleep(0.5)
        print(
            f"\nComfyUI e2e: environment + pack install {setup_s:.1f} s, server start "
            f"{time.monotonic() - t0 - setup_s:.1f} s",
            file=sys.stderr,
        )
        _, srv.info = srv.request("GET", "/object_info")
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def shipped_prompt(server, **overrides) -> dict:
    """The shipped UI workflow as the frontend submits it (it must equal the shipped API twin)."""
    prompt = W.prompt_from_ui(json.loads((ROOT / W.UI_FILE).read_text()), server.info)
    assert prompt == json.loads((ROOT / W.API_FILE).read_text())
    for node_id, inputs in overrides.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


def small(server, **overrides) -> dict:
    """The shipped workflow at a tiny size (8 frames at 112 px: 4 temporal units x 12 tokens), for other paths."""
    prompt = shipped_prompt(
        server,
        **{"1": {"frames": 8, "max_side": 112}, "3": {"budget": 12, "set_frames": 2}, "4": {"max_new_tokens": 4}},
    )
    for node_id, inputs in overrides.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


def show_info(prompt: dict, source: list) -> dict:
    """Adds core Preview as Text (PreviewAny) on an info output, so it is kept in the history."""
    prompt["90"] = {"class_type": "PreviewAny", "inputs": {"source": source}}
    return prompt


def test_pack_installs_and_loads_with_its_library(server):
    done = subprocess.run([server.python, "-c", "import flexselect"], capture_output=True, text=True, check=False)
    assert done.returncode != 0, "the ComfyUI venv has a flexselect of its own: the test would not show the pack's"
    log = server.log_text()
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not [line for line in failed if f"custom_nodes/{PACK_DIR}" in line], "\n".join(failed)
    assert f"custom_nodes/{PACK_DIR}" in log  # listed under "Import times for custom nodes"
    info = server.info
    for node_id in OUR_IDS:
        assert node_id in info, f"{node_id} missing from /object_info"
    assert info["FlexSelectLoadVideo"]["display_name"] == "Load Video (FlexSelect)"
    assert info["FlexSelectAnswer"]["output_node"] is True
    file_input = info["FlexSelectLoadVideo"]["input"]["required"]["file"]
    assert file_input[1]["video_upload"] is True and VIDEO in file_input[1]["options"]
    assert "corrupt.mp4" in file_input[1]["options"]  # listed by name; refused at validation (below)
    assert info["FlexSelectLoadModel"]["input"]["required"]["checkpoint"][1]["options"] == [MODEL]
    assert info["FlexSelectLoadRanker"]["input"]["required"]["ranker_name"][1]["options"] == ["tiny-ranker"]
    assert info["LoadVideo"]["display_name"] == "Load Video"  # core's node is untouched
    status, extensions = server.request("GET", "/extensions")
    assert status == 200 and any(e.endswith("/flexselect.js") for e in extensions), extensions
    status, templates = server.request("GET", "/workflow_templates")
    assert status == 200 and templates.get(PACK_DIR) == ["flexselect_qa"], templates  # UI workflows only


def test_shipped_ui_workflow_runs(server):
    t0 = time.monotonic()
    entry = server.run(shipped_prompt(server))
    succeeded(entry)
    answer = entry["outputs"]["4"]["text"]
    assert isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], str)
    assert entry["outputs"]["5"]["images"], "the heatmap preview was not saved"
    print(
        f"\nComfyUI e2e: the shipped workflow {time.monotonic() - t0:.1f} s, answer {answer[0][:60]!r}", file=sys.stderr
    )


def test_ranker_path(server):
    prompt = small(server)
    prompt["6"] = {"class_type": "FlexSelectLoadRanker", "inputs": {"ranker_name": "tiny-ranker"}}
    prompt["3"]["inputs"]["ranker"] = ["6", 0]
    entry = server.run(show_info(prompt, ["3", 2]))
    succeeded(entry)
    assert "selector lite" in entry["outputs"]["90"]["text"][0] and "kept 12 of 48" in entry["outputs"]["90"]["text"][0]
    assert isinstance(entry["outputs"]["4"]["text"][0], str)


def test_core_video_and_image_batch_inputs(server):
    core = {
        "7": {"class_type": "LoadVideo", "inputs": {"file": VIDEO}},
        "8": {"class_type": "GetVideoComponents", "inputs": {"video": ["7", 0]}},
    }
    as_video = small(server, **{"1": {"video": ["7", 0]}})
    as_images = small(server, **{"1": {"images": ["8", 0], "frame_rate": ["8", 2]}})
    texts = []
    for prompt in (as_video, as_images):
        prompt.update(core)
        entry = server.run(show_info(prompt, ["1", 2]))
        succeeded(entry)
        texts.append(entry["outputs"]["90"]["text"][0])
    assert texts[0].startswith(f"8 frames 112x74 from {VIDEO}, ")  # the VIDEO's file, sampled while decoding
    assert texts[1].startswith("8 frames 112x74 from IMAGE input, ")


def test_validation_refuses_bad_videos_and_questions(server):
    for overrides, node, words in [
        ({"1": {"file": "missing.mp4"}}, "1", "video not found in ComfyUI's input folder"),
        ({"1": {"file": "corrupt.mp4"}}, "1", "the file is damaged or incomplete"),
        ({"3": {"question": "  "}}, "3", "the question is empty"),
        ({"3": {"layer": -5}}, "3", "smaller than min"),
    ]:
        status, body = server.request("POST", "/prompt", {"prompt": small(server, **overrides)})
        assert status == 400 and node in body["node_errors"], body
        assert words in json.dumps(body["node_errors"][node]), body["node_errors"][node]


def test_run_error_is_one_node_worded_line(server):
    entry = server.run(small(server, **{"3": {"budget": 100_000}}), timeout=120)
    assert entry["status"]["status_str"] == "error"
    (error,) = errors_of(entry)
    message = error["exception_message"]
    # ComfyUI itself appends "\n" and its (empty) tips to every run error; the pack's own line ends clean.
    assert message == (
        "the budget of 100000 tokens is larger than the clip's 48 visual tokens (4 temporal units x "
        "12 tokens): lower budget, or sample more frames in Load Video\n"
    ), message
    inputs = json.dumps(error["current_inputs"])
    assert len(inputs) < 1500 and "<FlexSelect clip: 8 frames 112x74" in inputs, inputs[:500]


def test_comfyui_can_unload_the_model(server):
    succeeded(server.run(small(server)))
    status, _ = server.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    succeeded(server.run(small(server, **{"3": {"question": "And after the unload?"}})))


def test_interrupt_stops_a_long_run(server):
    # 1200 frames decoded one by one, encoded in chunks, then 600 one-unit frame sets scored one by one: Cancel is
    # checked between each of them.
    prompt = small(
        server,
        **{
            "1": {"file": LONG_VIDEO, "frames": 1200, "max_side": 56, "preview_frames": 2},
            "3": {"budget": 1, "set_frames": 1, "question": "What happens in the long video?"},
        },
    )
    prompt_id = server.submit(prompt)
    server.wait_running(prompt_id, timeout=60)
    time.sleep(0.5)
    t0 = time.monotonic()
    status, _ = server.request("POST", "/interrupt", {})
    assert status == 200
    entry = server.wait_history(prompt_id, timeout=60)
    stopped_s = time.monotonic() - t0
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False, entry["status"]
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, (kinds, [e["exception_message"] for e in errors_of(entry)])
    assert "4" not in entry.get("outputs", {})
    assert stopped_s < 20, f"the run took {stopped_s:.1f} s to stop"
    print(f"\nComfyUI e2e: interrupt honoured after {stopped_s:.2f} s", file=sys.stderr)
