"""FlexSelect as an lmms-eval model, against the real lmms-eval API: registration, a generation request, refused
model_args, and lmms-eval's data-parallel launch (two processes on CPU, one shard each).

lmms-eval is not a dependency: tests/run_all.sh runs this file in a side venv that has it (.venv-lmms); anywhere
else the skip is listed, with its reason, in the summary at the end of the run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flexselect.errors import FlexSelectError

lmms_eval_models = pytest.importorskip(
    "lmms_eval.models", reason="lmms-eval is not installed here: tests/run_all.sh runs this file in .venv-lmms"
)

ARGS = "device=cpu,dtype=float32,frames=8,budget=24,max_new_tokens=3"


def request(video, doc_id=0):
    from lmms_eval.api.instance import Instance

    return Instance(
        request_type="generate_until",
        idx=0,
        metadata={"task": "toy", "doc_id": doc_id, "repeats": 1},
        arguments=(
            "Is there a red square?\nA. yes\nB. no",
            {"max_new_tokens": 3, "until": ["\n"]},
            lambda doc: [doc["video"]],
            doc_id,
            "toy",
            "test",
        ),
    )


def test_registered_and_answers_a_generation_request(tiny_model_dir, test_video):
    assert "flexselect" in lmms_eval_models.list_available_models()  # through the pyproject entry point
    lm = lmms_eval_models.get_model("flexselect").create_from_arg_string(f"model={tiny_model_dir},{ARGS}")
    assert (lm.rank, lm.world_size) == (0, 1)
    lm.task_dict = {"toy": {"test": [{"video": str(test_video)}]}}
    (reply,) = lm.generate_until([request(test_video)])
    assert isinstance(reply, str) and "\n" not in reply
    with pytest.raises(NotImplementedError, match="generation tasks"):
        lm.loglikelihood([request(test_video)])


def test_mistyped_model_args_are_refused(tiny_model_dir):
    model = lmms_eval_models.get_model("flexselect")
    with pytest.raises(FlexSelectError, match="unknown FlexSelect model_args: budjet; known: model, gguf"):
        model.create_from_arg_string(f"model={tiny_model_dir},budjet=24")
    # what lmms-eval itself passes from its command line is accepted
    lm = model.create_from_arg_string(
        f"model={tiny_model_dir},dtype=float32,frames=8", {"batch_size": 1, "max_batch_size": None, "device": "cpu"}
    )
    assert lm.device.type == "cpu"


WORKER = """
import json, sys
import torch
from lmms_eval.models import get_model
from lmms_eval.utils import create_iterator
sys.path.insert(0, {tests!r})
from test_lmms_eval import request

model_dir, video, out = sys.argv[1:4]
lm = get_model("flexselect").create_from_arg_string(f"model={{model_dir}},{args}")
docs = list(range(5))
lm.task_dict = {{"toy": {{"test": [{{"video": video}} for _ in docs]}}}}
mine = list(create_iterator(iter(docs), rank=lm.rank, world_size=lm.world_size))  # lmms-eval's own sharding
replies = lm.generate_until([request(video, d) for d in mine])
counts = lm.accelerator.gather(torch.tensor([len(mine)], device=lm.device)).tolist()  # as lmms-eval's evaluator does
with open(f"{{out}}/rank{{lm.rank}}.json", "w") as f:
    json.dump({{"rank": lm.rank, "world_size": lm.world_size, "docs": mine, "replies": replies, "counts": counts}}, f)
"""


def test_data_parallel_launch_answers_one_shard_per_process(tiny_model_dir, test_video, tmp_path):
    """`accelerate launch --num_processes 2`: each process takes its rank and the world size from accelerate and
    answers its own shard; together they answer every request once. On a CPU-only machine accelerate picks no
    multi-process launcher by itself, so `--multi_gpu` asks for the one it uses on GPUs (torchrun); with
    device=cpu the processes then join over gloo."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), args=ARGS))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            str(script),
            str(tiny_model_dir),
            str(test_video),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        _, stderr = launch.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)  # the launcher and both workers: nothing is left running
        launch.communicate()
        raise
    assert launch.returncode == 0, stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(x["rank"], x["world_size"]) for x in results] == [(0, 2), (1, 2)]
    assert results[0]["docs"] == [0, 2, 4] and results[1]["docs"] == [1, 3]
    assert all(len(x["replies"]) == len(x["docs"]) for x in results)
    assert all(x["counts"] == [3, 2] for x in results)
