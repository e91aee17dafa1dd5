"""The pack's example workflow, defined once: both shipped JSONs are generated from EXAMPLE (the UI format that
ComfyUI lists as a template and the frontend loads; the API format that scripts POST to /prompt), and
`prompt_from_ui` turns a UI workflow into what the frontend submits, so the tests run the UI file as shipped.

The frontend's serialisation (ComfyUI frontend 1.35, as in ComfyUI 0.8.0): `widgets_values` holds one value per
widget input in `input_order` (required, then optional), an INT with `control_after_generate` is followed by its
control value ("fixed"), and a combo with an upload button gets that button's value ("image") after all the others;
a video upload also gets a preview widget, which the prompt carries as "video-preview": "" (seen in the 0.8.0
frontend's graphToPrompt; ComfyUI ignores it).
Regenerate the files with `FLEXSELECT_WRITE_WORKFLOWS=1 python -m pytest tests/test_comfy_nodes.py -k workflow`.
"""

from __future__ import annotations

import copy

UI_FILE = "example_workflows/flexselect_qa.json"  # at the pack's root, where ComfyUI looks for templates
API_FILE = "comfy_nodes/api_workflows/flexselect_qa.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload")
UPLOAD_VALUE = "image"  # what the frontend stores for an upload button
VIDEO_PREVIEW = "video-preview"  # a widget the frontend adds below a video upload; graphToPrompt sends it as ""

# node id -> (class_type, title, inputs); a link is [source node id, output slot]
EXAMPLE: dict[str, tuple[str, str, dict]] = {
    "1": (
        "FlexSelectLoadVideo",
        "Load Video (FlexSelect)",
        {
            "file": "flexselect_example.mp4",
            "frames": 16,
            "fps": 0.0,
            "start": 0.0,
            "end": 0.0,
            "max_side": 336,
            "memory_limit_gb": 0.0,
            "preview_frames": 8,
            "frame_rate": 24.0,
        },
    ),
    "2": (
        "FlexSelectLoadModel",
        "Load Video-LLM (FlexSelect)",
        {
            "checkpoint": "Qwen2.5-VL-7B-Instruct",
            "mmproj": "auto (mmproj*.gguf beside the model)",
            "device": "auto",
            "dtype": "auto",
            "context": 32768,
        },
    ),
    "3": (
        "FlexSelect",
        "FlexSelect",
        {
            "clip": ["1", 0],
            "model": ["2", 0],
            "question": "What happens in this video, and when?",
            "budget": 256,
            "layer": -1,
            "set_frames": 0,
            "preview": "contact sheet",
            "preview_frames": 8,
        },
    ),
    "4": (
        "FlexSelectAnswer",
        "Answer (FlexSelect)",
        {"selection": ["3", 0], "model": ["2", 0], "max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": 0},
    ),
    "5": ("PreviewImage", "Kept tokens", {"images": ["3", 1]}),
}
LAYOUT = {
    "1": ([40, 60], [330, 620]),
    "2": ([40, 740], [330, 200]),
    "3": ([420, 60], [360, 360]),
    "4": ([830, 60], [360, 300]),
    "5": ([830, 420], [420, 360]),
}


def _kind(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def _options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    inputs = info["input"]
    return [
        (name, inputs[section][name])
        for section in ("required", "optional")
        for name in info.get("input_order", {}).get(section, inputs.get(section, {}))
    ]


def _is_widget(spec: list) -> bool:
    return _kind(spec) in WIDGET_TYPES and not _options(spec).get("forceInput")


def _widget_values(info: dict, values: dict) -> list:
    out, upload = [], False
    for name, spec in _ordered_inputs(info):
        if not _is_widget(spec):
            continue
        out.append(values[name])
        if _options(spec).get("control_after_generate"):
            out.append("fixed")
        upload = upload or any(_options(spec).get(flag) for flag in UPLOAD_FLAGS)
    return out + ([UPLOAD_VALUE] if upload else [])


def api_workflow(object_info: dict) -> dict:
    """EXAMPLE in API format: every widget input with its value (optional widgets included, as the frontend sends
    them), links as [node id, slot]."""
    wf = {}
    for node_id, (kind, title, values) in EXAMPLE.items():
        names = [name for name, _ in _ordered_inputs(object_info[kind])]
        inputs = {name: copy.deepcopy(values[name]) for name in names if name in values}
        assert set(inputs) == set(values), f"{kind}: {set(values) - set(inputs)} are not inputs of the node"
        if any(_options(spec).get("video_upload") for _, spec in _ordered_inputs(object_info[kind])):
            inputs[VIDEO_PREVIEW] = ""  # the frontend's preview widget under an uploadable video combo: sent, unused
        wf[node_id] = {"class_type": kind, "_meta": {"title": title}, "inputs": inputs}
    return wf


def ui_workflow(object_info: dict) -> dict:
    """EXAMPLE in the frontend's UI format (what "Save" writes and the template list opens)."""
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    link_of: dict[tuple[str, str], list] = {}  # (target node id, input name) -> its row in `links`
    for node_id, (_, _, values) in EXAMPLE.items():
        for name, value in values.items():
            if isinstance(value, list):
                link = [len(links) + 1, int(value[0]), value[1], int(node_id), None, None]
                links.append(link)
                link_of[node_id, name] = link
                out_links.setdefault((value[0], value[1]), []).append(link[0])
    for order, (node_id, (kind, title, values)) in enumerate(EXAMPLE.items()):
        info = object_info[kind]
        inputs = []
        for name, spec in _ordered_inputs(info):
            if _is_widget(spec):
                continue
            link = link_of.get((node_id, name))
            if link is not None:
                link[4], link[5] = len(inputs), _kind(spec)
            inputs.append({"name": name, "type": _kind(spec), "link": link[0] if link else None})
        outputs = [
            {"name": out_name, "type": out_type, "links": out_links.get((node_id, slot)) or None}
            for slot, (out_name, out_type) in enumerate(zip(info["output_name"], info["output"]))
        ]
        pos, size = LAYOUT[node_id]
        nodes.append(
            {
                "id": int(node_id),
                "type": kind,
                "title": title,
                "pos": pos,
                "size": size,
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": kind},
                "widgets_values": _widget_values(info, values),
            }
        )
    return {
        "id": "0b6f9c1e-5d2a-4c1e-9f3e-f1e25e1ec7a0",
        "revision": 0,
        "last_node_id": len(nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }


def prompt_from_ui(ui: dict, object_info: dict) -> dict:
    """What the frontend POSTs for a UI workflow (its graphToPrompt): widget values read back in the same order,
    links resolved through the links table."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        inputs, upload = {}, False
        for name, spec in _ordered_inputs(info):
            if not _is_widget(spec):
                continue
            assert values, f"{node['type']}: widgets_values ends before {name}"
            inputs[name] = values.pop(0)
            if _options(spec).get("control_after_generate"):
                values.pop(0)
            upload = upload or any(_options(spec).get(flag) for flag in UPLOAD_FLAGS)
        assert values == ([UPLOAD_VALUE] if upload else []), f"{node['type']}: widgets_values left over: {values}"
        if any(_options(spec).get("video_upload") for _, spec in _ordered_inputs(info)):
            inputs[VIDEO_PREVIEW] = ""
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {
            "class_type": node["type"],
            "_meta": {"title": node.get("title", node["type"])},
            "inputs": inputs,
        }
    return prompt
