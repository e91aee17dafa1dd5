// Shows the text a FlexSelect node returns in {"ui": {"text": [...]}} (the answer, the free-models note) on the node.
import { app } from "../../scripts/app.js";

const SHOWS_TEXT = new Set(["FlexSelectAnswer", "FlexSelectFreeModels"]);

function showText(node, lines) {
  const text = (Array.isArray(lines) ? lines : [lines]).join("\n");
  let widget = node.widgets?.find((w) => w.name === "flexselect_text");
  if (!widget) {
    const el = document.createElement("textarea");
    el.readOnly = true;
    el.style.opacity = 0.85;
    el.style.fontFamily = "monospace";
    widget = node.addDOMWidget("flexselect_text", "customtext", el, {
      getValue: () => el.value,
      setValue: (v) => { el.value = v; },
      serialize: false,
    });
  }
  widget.value = text;
  if (widget.element) widget.element.value = text;
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    app.graph.setDirtyCanvas(true, false);
  });
}

app.registerExtension({
  name: "flexselect.showText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!SHOWS_TEXT.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showText(this, message.text);
    };
  },
});
