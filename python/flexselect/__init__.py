"""FlexSelect: keep only the visual tokens of a long video that the question needs, then answer.

from flexselect import FlexSelect
pipe = FlexSelect.load("/models/Qwen2.5-VL-7B-Instruct")
print(pipe.answer("talk.mp4", "When does the speaker show the chart?").text)
"""

from .errors import FlexSelectError

__all__ = ["FlexSelect", "FlexSelectError", "GenerationConfig", "Sampling", "SelectOptions", "answer"]


def __getattr__(name: str):
    # Lazy: `import flexselect` stays cheap (no torch/transformers) until the pipeline is used.
    if name in ("FlexSelect", "Sampling", "SelectOptions", "answer"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "GenerationConfig":
        from .backends.base import GenerationConfig

        return GenerationConfig
    raise AttributeError(name)
