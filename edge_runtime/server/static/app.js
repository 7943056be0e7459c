// The chat page of edge-serve. Talks only to the public API: GET /v1/models,
// POST /v1/chat/completions (streamed) and, for saving, /v1/conversations.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  conversations: [],   // {id, title, messages: [{role, text, image, figures, grounding, stopped}]}
  current: null,
  image: null,         // data: URL waiting to be sent with the next question
  controller: null,    // AbortController of the answer being streamed
  model: null,
};

// ------------------------------------------------------------------ helpers

function headers(json = true) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function apiError(resp) {
  let message = `HTTP ${resp.status}`;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON */ }
  return new Error(message);
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function newConversation() {
  const conv = { id: `c${Date.now().toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`,
                 title: "New conversation", messages: [] };
  state.conversations.unshift(conv);
  state.current = conv;
  render();
  return conv;
}

/** The conversation as OpenAI messages: every earlier image is sent again (the server's KV cache has it). */
function apiMessages(conv) {
  return conv.messages.map((m) => {
    if (m.role === "user" && m.image) {
      const parts = [{ type: "image_url", image_url: { url: m.image, detail: m.detail || "auto" } }];
      if (m.text) parts.push({ type: "text", text: m.text });
      return { role: "user", content: parts };
    }
    return { role: m.role, content: m.text };
  });
}

/** The image a grounding answer refers to: the latest one sent at or before its question. */
function imageBefore(conv, index) {
  for (let i = index; i >= 0; i--) if (conv.messages[i].image) return conv.messages[i].image;
  return null;
}

// Qwen3-VL's frame: integers 0..1000. The grammar converter has no minimum/maximum, so an enum
// bounds them (measured: about 20 ms of grammar work per token on a 2-core CPU).
const COORDINATES = Array.from({ length: 1001 }, (_, i) => i);

/** JSON schema of a grounding answer: [{"bbox_2d": [x1, y1, x2, y2], "label": one of the asked names}]. */
function locateSchema(labels) {
  const label = labels.length ? { type: "string", enum: labels } : { type: "string", maxLength: 40 };
  return {
    type: "array", minItems: 1, maxItems: 8,
    items: {
      type: "object",
      properties: {
        bbox_2d: { type: "array", items: { type: "integer", enum: COORDINATES }, minItems: 4, maxItems: 4 },
        label,
      },
      required: ["bbox_2d", "label"],
    },
  };
}

// ------------------------------------------------------------------ rendering

function render() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((conv) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = conv.title;
    b.className = conv === state.current ? "current" : "";
    b.addEventListener("click", () => { if (!state.controller) { state.current = conv; render(); } });
    li.append(b);
    return li;
  }));
  const box = $("messages");
  box.replaceChildren(...state.current.messages.map((m, i) => renderMessage(state.current, m, i)));
  box.scrollTop = box.scrollHeight;
}

function renderMessage(conv, m, index) {
  const div = document.createElement("div");
  div.className = `message ${m.role}`;
  if (m.image) {
    const img = document.createElement("img");
    img.src = m.image;
    img.alt = "image sent with this question";
    img.className = "thumb";
    div.append(img);
  } else if (m.missingImage) {
    const p = document.createElement("p");
    p.className = "muted small";
    p.textContent = "[an image the server did not keep]";
    div.append(p);
  }
  if (m.reasoning) div.append(reasoningBlock(m.reasoning));
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = m.text;
  div.append(text);
  if (m.grounding && m.grounding.length) {
    const src = imageBefore(conv, index);
    if (src) div.append(groundingFigure(src, m.grounding));
  }
  if (m.stopped) div.append(note("stopped"));
  if (m.error) div.append(note(m.error, "error"));
  if (m.figures) div.append(figuresLine(m.figures));
  return div;
}

function note(text, cls = "muted small") {
  const p = document.createElement("p");
  p.className = cls;
  p.textContent = text;
  return p;
}

function groundingFigure(src, found) {
  const fig = document.createElement("figure");
  fig.className = "grounding";
  const img = document.createElement("img");
  img.src = src;
  img.alt = "image with the boxes of this answer";
  fig.append(img);
  const colors = window.Grounding.labelColors(found);
  for (const item of found) {
    const el = document.createElement("div");
    const color = colors.get(item.label);
    if (item.kind === "box") {
      el.className = "box";
      Object.assign(el.style, { left: `${item.x1 / 10}%`, top: `${item.y1 / 10}%`,
                                width: `${(item.x2 - item.x1) / 10}%`, height: `${(item.y2 - item.y1) / 10}%`,
                                borderColor: color });
    } else {
      el.className = "point";
      Object.assign(el.style, { left: `${item.x / 10}%`, top: `${item.y / 10}%`, background: color });
    }
    if (item.label) {
      const tag = document.createElement("span");
      tag.className = "label";
      tag.textContent = item.label;
      tag.style.background = color;
      el.append(tag);
    }
    el.dataset.label = item.label;
    fig.append(el);
  }
  return fig;
}

function figuresLine(f) {
  const p = document.createElement("p");
  p.className = "figures";
  const parts = [];
  if (f.imageTokens != null) parts.push(`image tokens ${f.imageTokens}`);
  if (f.cachedTokens != null) parts.push(`cached ${f.cachedTokens}/${f.promptTokens} prompt tokens`);
  if (f.ttft != null) parts.push(`TTFT ${f.ttft.toFixed(2)} s`);
  if (f.tokPerS != null) parts.push(`${f.tokPerS.toFixed(1)} tok/s`);
  if (f.completionTokens != null) parts.push(`${f.completionTokens} tokens`);
  p.textContent = parts.join(" · ");
  return p;
}

// ------------------------------------------------------------------ asking

async function ask(event) {
  event.preventDefault();
  if (state.controller) return;
  const conv = state.current;
  const mode = $("mode").value;
  let text = $("question").value.trim();
  if (!text && !state.image) { showError("Type a question or attach an image."); return; }
  const labels = mode === "locate" ? text.split(",").map((s) => s.trim()).filter(Boolean) : [];
  if (mode === "locate") {
    text = `Locate every ${labels.join(", ") || "object"} in the image and output their bbox coordinates in JSON.`;
  }
  showError("");
  const user = { role: "user", text, image: state.image, detail: $("detail").value };
  const answer = { role: "assistant", text: "" };
  conv.messages.push(user, answer);
  if (conv.title === "New conversation") conv.title = (text || "image").slice(0, 40);
  state.image = null;
  $("attachment").hidden = true;
  $("question").value = "";
  render();

  const body = {
    model: state.model || undefined,
    messages: apiMessages(conv).slice(0, -1),
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 256,
  };
  if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
  if (mode === "locate") {
    body.response_format = { type: "json_schema", json_schema: { name: "boxes", schema: locateSchema(labels) } };
    body.temperature = 0;
  }
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let first = null;
  let last = null;
  let usage = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) throw await apiError(resp);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the server failed mid-answer");
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && (delta.content || delta.reasoning_content)) {
            if (first === null) first = performance.now();
            last = performance.now();
            answer.text += delta.content || "";
            answer.reasoning = (answer.reasoning || "") + (delta.reasoning_content || "");
            updateLast(answer);
          }
        }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") answer.stopped = true;
    else answer.error = err.message;
  } finally {
    state.controller = null;
    setBusy(false);
  }
  if (!answer.text && !answer.reasoning && (answer.error || answer.stopped)) {
    // nothing came back: take the turn out, so the next question does not resend a refused image
    conv.messages.splice(conv.messages.indexOf(user), 2);
    if (answer.error) showError(answer.error);
    render();
    return;
  }
  answer.figures = figures(started, first, last, usage);
  answer.grounding = window.Grounding.parseGrounding(answer.text);
  render();
}

function figures(started, first, last, usage) {
  const f = {};
  if (first !== null) f.ttft = (first - started) / 1000;
  if (usage) {
    const details = usage.prompt_tokens_details || {};
    f.promptTokens = usage.prompt_tokens;
    f.cachedTokens = details.cached_tokens ?? 0;
    if (details.image_tokens != null) f.imageTokens = details.image_tokens;
    f.completionTokens = usage.completion_tokens;
    if (first !== null && last > first && usage.completion_tokens > 1) {
      f.tokPerS = (usage.completion_tokens - 1) / ((last - first) / 1000);
    }
  }
  return f;
}

// A Thinking model's reasoning (reasoning_content), folded above its answer; it fills while streamed.
function reasoningBlock(reasoning) {
  const details = document.createElement("details");
  details.className = "reasoning";
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const body = document.createElement("div");
  body.className = "reasoning-text";
  body.textContent = reasoning;
  details.append(summary, body);
  return details;
}

function updateLast(answer) {
  const nodes = $("messages").querySelectorAll(".message.assistant .text");
  const node = nodes[nodes.length - 1];
  if (node) node.textContent = answer.text;
  if (node && answer.reasoning) {
    const block = node.previousElementSibling;
    if (block && block.classList.contains("reasoning")) {
      block.querySelector(".reasoning-text").textContent = answer.reasoning;
    } else {
      node.before(reasoningBlock(answer.reasoning));
    }
  }
  $("messages").scrollTop = $("messages").scrollHeight;
}

function setBusy(busy) {
  $("ask").disabled = busy;
  $("stop").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

// ------------------------------------------------------------------ images

function attach(dataUrl) {
  state.image = dataUrl;
  $("preview").src = dataUrl;
  $("attachment").hidden = false;
}

function readFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => attach(reader.result);   // sent as is: the server decodes (and refuses) it
  reader.onerror = () => showError(`Could not read ${file.name}`);
  reader.readAsDataURL(file);
}

async function openCamera() {
  if (!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)) {
    $("capture").click();   // no camera API (plain http from a phone): the phone's own camera picker
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
    $("video").srcObject = stream;
    $("camera").showModal();
  } catch (err) {
    $("capture").click();
  }
}

function closeCamera() {
  const stream = $("video").srcObject;
  if (stream) stream.getTracks().forEach((t) => t.stop());
  $("video").srcObject = null;
  $("camera").close();
}

function snap() {
  const video = $("video");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  attach(canvas.toDataURL("image/jpeg", 0.9));
  closeCamera();
}

// ------------------------------------------------------------------ saved on the server

async function saveOnServer() {
  const conv = state.current;
  if (!conv.messages.length) { showError("Nothing to save yet."); return; }
  try {
    const resp = await fetch(`/v1/conversations/${conv.id}`, {
      method: "PUT", headers: headers(), body: JSON.stringify({ messages: apiMessages(conv) }),
    });
    if (!resp.ok) throw await apiError(resp);
    const info = await resp.json();
    showError("");
    $("saved-list").replaceChildren(note(`saved ${conv.id}: ${info.tokens} tokens, ${(info.bytes / 1048576).toFixed(1)} MB`));
  } catch (err) { showError(`Saving failed: ${err.message}`); }
}

async function listSaved() {
  try {
    const resp = await fetch("/v1/conversations", { headers: headers(false) });
    if (!resp.ok) throw await apiError(resp);
    const { data } = await resp.json();
    $("saved-list").replaceChildren(...data.map((item) => {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = `${item.id} (${(item.bytes / 1048576).toFixed(1)} MB)`;
      b.addEventListener("click", () => restore(item.id));
      li.append(b);
      return li;
    }));
    if (!data.length) $("saved-list").replaceChildren(note("none yet"));
  } catch (err) { showError(`Listing failed: ${err.message}`); }
}

async function restore(id) {
  try {
    const resp = await fetch(`/v1/conversations/${id}/restore`, { method: "POST", headers: headers(false) });
    if (!resp.ok) throw await apiError(resp);
    const saved = await resp.json();
    const conv = { id, title: `restored ${id}`, messages: saved.messages.map(fromApi) };
    state.conversations.unshift(conv);
    state.current = conv;
    showError("");
    render();
  } catch (err) { showError(`Restoring failed: ${err.message}`); }
}

function fromApi(m) {
  if (!Array.isArray(m.content)) return { role: m.role, text: m.content || "" };
  const out = { role: m.role, text: "" };
  for (const part of m.content) {
    if (part.type === "text") out.text += part.text;
    else if (part.type === "image_url") out.image = part.image_url.url;
    else if (part.type === "image") out.missingImage = true;
  }
  return out;
}

// ------------------------------------------------------------------ start

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers(false) });
    if (!resp.ok) throw await apiError(resp);
    const { data } = await resp.json();
    state.model = data.length ? data[0].id : null;
    $("model").textContent = state.model ? `model: ${state.model}` : "no model";
    showError("");
  } catch (err) {
    $("model").textContent = "not connected";
    showError(err.message);
  }
}

function start() {
  $("api-key").value = localStorage.getItem("edge-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("edge-api-key", $("api-key").value.trim());
    loadModel();
  });
  $("composer").addEventListener("submit", ask);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("file").addEventListener("change", (e) => { readFile(e.target.files[0]); e.target.value = ""; });
  $("capture").addEventListener("change", (e) => { readFile(e.target.files[0]); e.target.value = ""; });
  $("camera-button").addEventListener("click", openCamera);
  $("snap").addEventListener("click", snap);
  $("close-camera").addEventListener("click", closeCamera);
  $("remove-image").addEventListener("click", () => { state.image = null; $("attachment").hidden = true; });
  $("new-chat").addEventListener("click", () => { if (!state.controller) newConversation(); });
  $("save-server").addEventListener("click", saveOnServer);
  $("list-server").addEventListener("click", listSaved);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) { e.preventDefault(); readFile(item.getAsFile()); }
  });
  newConversation();
  loadModel();
}

start();
