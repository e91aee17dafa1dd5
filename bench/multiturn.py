"""Does giving the selection the conversation so far change what it keeps? Measured, to choose what `chat` does.

For each conversation (an earlier question, the model's answer to it, a follow-up), the follow-up's kept tokens are
selected twice on the same video: from the follow-up alone, and from [earlier turn + follow-up] as the text after the
video (every row of it scoring, as the paper's formula does for the whole text). Printed: the share of kept tokens
that differ, per conversation and on average, for the offline demo's red-finder model (its reference layer is
arranged, the rest random) and a random tiny model. With random weights this says how much the rows of earlier
turns move the selection, not whether that helps: the choice it supports is stated in README.md.

    python bench/multiturn.py
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
CONVERSATIONS = [
    ("When does the red square appear?", "What colour is the background then?"),
    ("What is the color of the car in the video?", "When does the red square appear?"),
    ("How many people appear in the video?", "Describe what happens after the person opens the door."),
    ("Describe what happens after the person opens the door.", "And after that?"),
]


def measure(pipe, video: str, sampling, options) -> list[float]:
    from flexselect.backends.base import GenerationConfig
    from flexselect.pipeline import conversation

    changed = []
    for first, follow in CONVERSATIONS:
        earlier = pipe.answer(
            video, first, sampling=sampling, options=options, generation=GenerationConfig(max_new_tokens=8)
        )
        visual = earlier.visual
        alone = pipe.select(visual, pipe.backend.prompt(follow), options)
        with_history = pipe.select(visual, pipe.backend.prompt(conversation([(first, earlier.text)], follow)), options)
        a, b = set(alone.kept.tolist()), set(with_history.kept.tolist())
        changed.append(1 - len(a & b) / len(a))
    return changed


def main() -> None:
    from flexselect import demo
    from flexselect.pipeline import FlexSelect, Sampling, SelectOptions
    from flexselect.tiny import build_tiny_qwen2_5_vl

    model, video = demo.demo_assets()
    setups = {
        "demo red-finder (layer 3 arranged)": (
            model,
            SelectOptions(budget=demo.DEMO_BUDGET * 4, set_frames=demo.DEMO_SET_FRAMES, layer=demo.DEMO_LAYER),
        ),
        "random tiny Qwen2.5-VL (layer 2)": (
            build_tiny_qwen2_5_vl(demo.cache_dir() / "bench-tiny-qwen2_5_vl"),
            SelectOptions(budget=demo.DEMO_BUDGET * 4, set_frames=demo.DEMO_SET_FRAMES, layer=2),
        ),
    }
    lines = [
        "share of the follow-up's kept tokens that change when the earlier turn is scored too "
        f"({demo.DEMO_FRAMES} frames of the demo video)"
    ]
    for name, (path, options) in setups.items():
        pipe = FlexSelect.load(path, device="cpu", dtype="float32")
        changed = measure(pipe, str(video), Sampling(frames=demo.DEMO_FRAMES), options)
        per = "  ".join(f"{c:.0%}" for c in changed)
        lines.append(f"{name:40s} mean {sum(changed) / len(changed):.0%}   per conversation: {per}")
    print("\n".join(lines))
    out = HERE / "results" / "multiturn.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
