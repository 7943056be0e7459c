// Boxes and points in a Qwen3-VL grounding answer (0..1000 coordinates), as edge_runtime/grounding.py
// reads them: JSON fenced or bare, inside prose, one object or a list, or a list cut off by the token limit.
"use strict";

const BOX_KEYS = ["bbox_2d", "bbox", "box_2d"];
const POINT_KEYS = ["point_2d", "point"];

/** The end index (exclusive) of the balanced JSON value opening at `start`, or -1 if it never closes. */
function closingIndex(text, start) {
  const stack = [];
  let inString = false;
  for (let i = start; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') inString = true;
    else if (c === "[" || c === "{") stack.push(c === "[" ? "]" : "}");
    else if (c === "]" || c === "}") {
      if (stack.pop() !== c) return -1;
      if (stack.length === 0) return i + 1;
    }
  }
  return -1;
}

/** Every JSON array/object in `text`, left to right; a truncated array gives its complete objects. */
function jsonValues(text) {
  const values = [];
  let pos = 0;
  while (pos < text.length) {
    const start = text.slice(pos).search(/[[{]/);
    if (start < 0) break;
    const at = pos + start;
    const end = closingIndex(text, at);
    if (end > 0) {
      try { values.push(JSON.parse(text.slice(at, end))); pos = end; continue; } catch (e) { /* not JSON */ }
    } else if (text[at] === "[") {
      const salvaged = [];
      let p = at + 1;
      for (;;) {
        const next = text.slice(p).search(/\{/);
        if (next < 0) break;
        const close = closingIndex(text, p + next);
        if (close < 0) break;
        try { salvaged.push(JSON.parse(text.slice(p + next, close))); } catch (e) { break; }
        p = close;
      }
      if (salvaged.length) { values.push(salvaged); pos = p; continue; }
    }
    pos = at + 1;
  }
  return values;
}

function numbers(raw, n) {
  if (!Array.isArray(raw) || raw.length !== n) return null;
  const out = raw.map((v) => (typeof v === "boolean" ? NaN : Number(v)));
  return out.every(Number.isFinite) ? out : null;
}

const clamp = (v) => Math.min(Math.max(v, 0), 1000);

function items(value, out) {
  if (Array.isArray(value)) { value.forEach((v) => items(v, out)); return; }
  if (!value || typeof value !== "object") return;
  const label = value.label == null ? "" : String(value.label);
  const box = numbers(BOX_KEYS.map((k) => value[k]).find((v) => v !== undefined), 4);
  if (box) {
    const [x1, x2] = [clamp(box[0]), clamp(box[2])].sort((a, b) => a - b);
    const [y1, y2] = [clamp(box[1]), clamp(box[3])].sort((a, b) => a - b);
    out.push({ kind: "box", label, x1, y1, x2, y2 });
    return;
  }
  const point = numbers(POINT_KEYS.map((k) => value[k]).find((v) => v !== undefined), 2);
  if (point) out.push({ kind: "point", label, x: clamp(point[0]), y: clamp(point[1]) });
}

/** [{kind: "box", label, x1, y1, x2, y2} | {kind: "point", label, x, y}] in 0..1000 coordinates. */
function parseGrounding(text) {
  const out = [];
  for (const value of jsonValues(text || "")) items(value, out);
  return out;
}

const PALETTE = ["#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#00bebe", "#f032e6", "#96c800"];

/** One colour per label, in order of first appearance (as grounding.label_colors). */
function labelColors(found) {
  const colors = new Map();
  for (const item of found) {
    if (!colors.has(item.label)) colors.set(item.label, PALETTE[colors.size % PALETTE.length]);
  }
  return colors;
}

window.Grounding = { parseGrounding, labelColors };
