"""FlexSelect as an lmms-eval model, against the real lmms-eval API (skipped where lmms-eval is not installed:
it is not a dependency; checked by hand with lmms-eval 0.7.3, including a full `lmms-eval eval` on a local task)."""

import pytest

lmms_eval_models = pytest.importorskip("lmms_eval.models", reason="lmms-eval is not installed (pip install lmms-eval)")


def test_registered_and_answers_a_generation_request(tiny_model_dir, test_video):
    from lmms_eval.api.instance import Instance

    assert "flexselect" in lmms_eval_models.list_available_models()  # through the pyproject entry point
    lm = lmms_eval_models.get_model("flexselect").create_from_arg_string(
        f"model={tiny_model_dir},device=cpu,dtype=float32,frames=8,budget=24,max_new_tokens=4")
    lm.task_dict = {"toy": {"test": [{"video": str(test_video)}]}}
    request = Instance(request_type="generate_until", idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1},
                       arguments=("Is there a red square?\nA. yes\nB. no", {"max_new_tokens": 3, "until": ["\n"]},
                                  lambda doc: [doc["video"]], 0, "toy", "test"))
    (reply,) = lm.generate_until([request])
    assert isinstance(reply, str) and "\n" not in reply
    with pytest.raises(NotImplementedError, match="generation tasks"):
        lm.loglikelihood([request])
