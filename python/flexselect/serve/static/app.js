// The page: pick or upload a video, ask, stream the answer, show where the kept tokens are. Talks only to this
// server's own API (POST /v1/chat/completions with stream: true, and /v1/flexselect/* for media and heatmaps).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, video: null, messages: [], controller: null, report: null };

async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  return response;
}

// -- video: list, choose, upload --------------------------------------------------------------------------------
async function loadMedia() {
  const models = await (await api("/v1/models")).json();
  state.model = models.data[0].id;
  $("model").textContent = `model ${state.model}`;
  const media = await (await api("/v1/flexselect/media")).json();
  for (const item of media.data) addVideoOption(item.name, item.name);
}

function addVideoOption(url, label) {
  const option = new Option(label, url);
  $("video-select").add(option);
  return option;
}

function chooseVideo(url) {
  state.video = url || null;
  state.messages = [];
  $("conversation").replaceChildren();
  clearEvidence();
  $("player").src = url ? `/v1/flexselect/media/${encodeURIComponent(url).replaceAll("%2F", "/")}` : "";
}

$("video-select").addEventListener("change", (e) => chooseVideo(e.target.value));

$("upload").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  $("upload-status").textContent = `uploading ${file.name}…`;
  try {
    const response = await api(`/v1/flexselect/uploads?filename=${encodeURIComponent(file.name)}`, {
      method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
    });
    const { url } = await response.json();
    const option = addVideoOption(url, `${file.name} (upload)`);
    $("video-select").value = option.value;
    chooseVideo(url);
    $("upload-status").textContent = "";
  } catch (err) {
    $("upload-status").textContent = `upload failed: ${err.message}`;
  }
});

$("new-chat").addEventListener("click", () => chooseVideo(state.video));

// -- asking ---------------------------------------------------------------------------------------------------------
function knobs() {
  const body = {};
  const number = (id) => ($(id).value === "" ? null : Number($(id).value));
  if (number("frames") !== null) body.frames = number("frames");
  if (number("budget") !== null) body.budget = number("budget");
  if (number("set-frames") !== null) body.set_frames = number("set-frames");
  if (number("layer") !== null) body.layer = number("layer");
  body.max_tokens = number("max-tokens") ?? 256;
  body.temperature = number("temperature") ?? 0;
  return body;
}

function addTurn(role, text) {
  const div = document.createElement("div");
  div.className = `turn ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(body);
  $("conversation").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setRunning(running) {
  $("ask").disabled = running;
  $("stop").disabled = !running;
  $("progress").hidden = !running && !state.report;
}

function showProgress({ stage, done, total }) {
  const stages = ["decode", "encode", "select", "answer"];
  for (const el of document.querySelectorAll("#progress .stage")) {
    const bar = el.querySelector("progress");
    const index = stages.indexOf(el.dataset.stage);
    el.classList.toggle("active", el.dataset.stage === stage);
    if (el.dataset.stage === stage) { bar.max = total; bar.value = done; }
    else if (index < stages.indexOf(stage) && bar.value === 0) { bar.max = 1; bar.value = 1; } // skipped: cached
  }
}

function resetProgress() {
  for (const bar of document.querySelectorAll("#progress progress")) { bar.max = 1; bar.value = 0; }
  $("progress").hidden = false;
}

async function ask(question) {
  if (!state.video) { $("ask-status").textContent = "choose a video first"; return; }
  const content = state.messages.length === 0
    ? [{ type: "video_url", video_url: { url: state.video } }, { type: "text", text: question }]
    : question;
  const messages = [...state.messages, { role: "user", content }];
  addTurn("user", question);
  const turn = addTurn("assistant", "");
  turn.classList.add("pending");
  const text = turn.querySelector(".text");
  state.controller = new AbortController();
  setRunning(true);
  resetProgress();
  $("ask-status").textContent = "";
  let answer = "";
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", signal: state.controller.signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: state.model, messages, stream: true, ...knobs() }),
    });
    for await (const event of serverEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.flexselect && event.flexselect.progress) showProgress(event.flexselect.progress);
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) { answer += delta.content; text.textContent = answer; }
      if (event.flexselect && event.flexselect.kept_tokens !== undefined) {
        showReport(event.flexselect, turn);
      }
    }
    state.messages = [...messages, { role: "assistant", content: answer }];
    turn.classList.remove("pending");
    turn.classList.add("done");
  } catch (err) {
    turn.classList.remove("pending");
    turn.classList.add(err.name === "AbortError" ? "stopped" : "error");
    text.textContent = answer + (err.name === "AbortError" ? " [stopped]" : `error: ${err.message}`);
  } finally {
    state.controller = null;
    setRunning(false);
  }
}

async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue; // a keep-alive comment
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.controller) return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());

// -- the report: stats, timeline, evidence, heatmaps ----------------------------------------------------------
function showReport(report, turn) {
  state.report = report;
  const s = report.seconds;
  const share = (100 * report.kept_tokens / report.visual_tokens).toFixed(1);
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.textContent = `kept ${report.kept_tokens} of ${report.visual_tokens} tokens (${share}%) in ` +
    `${report.frame_sets} frame set(s) · ${report.frame_units} units · selector ${report.selector}` +
    (report.reference_layer !== null ? `, layer ${report.reference_layer}` : "") +
    ` · ${report.video_cached ? "video tokens reused"
      : `decode ${s.decode.toFixed(2)}s, encode ${s.encode.toFixed(2)}s`}` +
    ` · select ${s.select.toFixed(2)}s · first token ${s.ttft_answer.toFixed(2)}s · total ${s.total.toFixed(2)}s`;
  const where = document.createElement("div");
  where.className = "evidence-text";
  where.textContent = report.evidence_text;
  turn.append(stats, where);
  drawTimeline();
  showEvidence(report.evidence || []);
  $("heatmap").src = report.heatmap_sheet;
  $("heatmap").hidden = false;
  drawOverlay();
}

function clearEvidence() {
  state.report = null;
  $("peaks").replaceChildren();
  $("evidence").replaceChildren();
  $("heatmap").hidden = true;
  const canvas = $("timeline");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  drawOverlay();
}

function duration() {
  const d = $("player").duration;
  if (Number.isFinite(d) && d > 0) return d;
  const t = state.report.timeline;
  return t[t.length - 1].end;
}

function seek(seconds) {
  const player = $("player");
  player.currentTime = Math.max(0, Math.min(seconds, duration()));
  movePlayhead();
  drawOverlay();
}

function drawTimeline() {
  const report = state.report;
  if (!report) return;
  const canvas = $("timeline");
  canvas.width = canvas.clientWidth * devicePixelRatio;
  canvas.height = canvas.clientHeight * devicePixelRatio;
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, total = duration();
  g.clearRect(0, 0, w, h);
  for (const range of report.evidence || []) {
    g.fillStyle = "rgba(255, 90, 79, 0.15)";
    g.fillRect(range.start_s / total * w, 0, (range.end_s - range.start_s) / total * w, h);
  }
  const peak = Math.max(1, ...report.timeline.map((u) => u.kept));
  g.fillStyle = "#ff5a4f";
  report.timeline.forEach((unit) => {
    const x0 = unit.start / total * w, x1 = unit.end / total * w;
    const bar = unit.kept / peak * (h - 22);
    g.fillRect(x0, h - bar, Math.max(1, x1 - x0 - 1), bar);
  });
  // the peaks are the evidence ranges (flexselect.evidence: ranked, where the kept tokens concentrate)
  $("peaks").replaceChildren(...(report.evidence || []).map((range, rank) => {
    const button = document.createElement("button");
    button.className = "peak";
    button.dataset.time = String(range.start_s);
    button.style.left = `${(range.start_s + range.end_s) / 2 / total * 100}%`;
    button.textContent = `#${rank + 1} ${range.start_s.toFixed(1)}s`;
    button.title = `${range.tokens} kept tokens (${(100 * range.share).toFixed(0)}%) from ` +
      `${range.start_s.toFixed(1)}–${range.end_s.toFixed(1)} s`;
    button.addEventListener("click", () => seek(range.start_s));
    return button;
  }));
}

function showEvidence(ranges) {
  $("evidence").replaceChildren(...ranges.map((range) => {
    const li = document.createElement("li");
    li.textContent = `${range.start_s.toFixed(1)}–${range.end_s.toFixed(1)} s · ` +
      `${(100 * range.share).toFixed(0)}% ` +
      `of the kept tokens (${range.tokens})`;
    li.dataset.time = String(range.start_s);
    li.dataset.end = String(range.end_s);
    li.addEventListener("click", () => seek(range.start_s));
    return li;
  }));
}

function movePlayhead() {
  if (!state.report) return;
  $("playhead").style.left = `${$("player").currentTime / duration() * 100}%`;
}

// The kept-token grid of the unit on screen, over the picture (the model saw the whole frame, resized).
function drawOverlay() {
  const player = $("player"), canvas = $("overlay");
  const g = canvas.getContext("2d");
  const report = state.report;
  if (!report || !$("show-overlay").checked || !player.videoWidth) {
    g.clearRect(0, 0, canvas.width, canvas.height);
    return;
  }
  const scale = Math.min(player.clientWidth / player.videoWidth, player.clientHeight / player.videoHeight);
  const w = player.videoWidth * scale, h = player.videoHeight * scale;
  Object.assign(canvas.style, { left: `${(player.clientWidth - w) / 2}px`, top: `${(player.clientHeight - h) / 2}px`,
    width: `${w}px`, height: `${h}px` });
  canvas.width = Math.round(w); canvas.height = Math.round(h);
  let unit = 0;
  while (unit + 1 < report.timeline.length && report.timeline[unit + 1].start <= player.currentTime + 1e-3) unit++;
  const [rows, cols] = report.heatmap.grid, mask = report.heatmap.units[unit];
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      g.fillStyle = mask[r * cols + c] === "1" ? "rgba(255, 32, 32, 0.38)" : "rgba(0, 0, 0, 0.5)";
      const cw = canvas.width / cols, ch = canvas.height / rows;
      g.fillRect(c * cw, r * ch, cw + 0.5, ch + 0.5);
    }
  }
}

for (const event of ["timeupdate", "seeked", "loadedmetadata"]) {
  $("player").addEventListener(event, () => { movePlayhead(); drawOverlay(); });
}
$("player").addEventListener("loadedmetadata", drawTimeline);
$("show-overlay").addEventListener("change", drawOverlay);
window.addEventListener("resize", () => { drawTimeline(); drawOverlay(); });
$("timeline").addEventListener("click", (e) => {
  if (!state.report) return;
  const box = e.target.getBoundingClientRect();
  seek((e.clientX - box.left) / box.width * duration());
});

async function pollStatus() {
  try {
    const s = await (await api("/v1/flexselect/status")).json();
    $("server-status").textContent = s.running ? `busy · ${s.waiting} waiting` : "idle";
  } catch (_) {
    $("server-status").textContent = "server unreachable";
  }
}

loadMedia().catch((err) => { $("ask-status").textContent = `cannot reach the server: ${err.message}`; });
setInterval(pollStatus, 3000);
pollStatus();
