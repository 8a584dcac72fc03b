// The zoo dashboard: plain JavaScript over the same HTTP API everyone uses (no build step, nothing
// from a CDN). One view at a time, chosen by the address's hash (#/zoo, #/paths/<id>, ...).
"use strict";
const $ = (sel, root = document) => root.querySelector(sel);
const pct = (x) => (typeof x === "number" ? (100 * x).toFixed(1) + "%" : "–");
const METHODS = ["reprogram", "resample", "clone", "reassemble"];
const COLOURS = {reprogram: "#2456c7", resample: "#b35c00", clone: "#1d7a3d", reassemble: "#8e2aa8"};
const ABOUT = {
  reprogram: "CLR: a 3x3 depthwise kernel after every convolution of a frozen base, and a new head: a new task for a few percent of the base's bytes.",
  resample: "Integral Neural Networks: the base resampled to fewer channels, without fine-tuning.",
  clone: "Partial Network Cloning: the target's layers shared; the labels it lacks cloned from the masked later layers of other bases.",
  reassemble: "Deep Model Reassembly: blocks of several bases, chosen within a budget, stitched, the stitches and head tuned.",
};

function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : n) + " " + units[i];
}
const count = (n) => (n >= 1e6 ? (n / 1e6).toFixed(2) + " M" : n >= 1e3 ? (n / 1e3).toFixed(1) + " k" : String(n));

// h("div", {class: "x", onclick: f}, child, "text", ...): an element
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}
const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

// ---- the API: the key kept for this tab (sessionStorage), sent as a bearer header ----
const KEY = "zoo.apiKey";
const authed = (options = {}) => ({...options, headers: {...(options.headers || {}),
                                                        Authorization: "Bearer " + (sessionStorage.getItem(KEY) || "")}});
class ApiError extends Error { constructor(status, detail) { super(detail); this.status = status; } }

async function api(path, options = {}) {
  const r = await fetch(path, authed(options));
  const body = (r.headers.get("content-type") || "").includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new ApiError(r.status, body.detail || body.error || r.statusText);
  return body;
}
const post = (path, body) => api(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});

async function items(path) {
  let out = [], cursor = null;
  do {
    const page = await api(path + (cursor ? "?cursor=" + encodeURIComponent(cursor) : ""));
    out = out.concat(page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return out;
}

async function blobUrl(path) {
  const r = await fetch(path, authed());
  if (!r.ok) throw new Error((r.headers.get("content-type") || "").includes("json") ? (await r.json()).detail : r.statusText);
  return URL.createObjectURL(await r.blob());
}

async function download(path, name) {  // fetched with the key, then saved; a refusal said in the status line
  try {
    const a = h("a", {href: await blobUrl(path), download: name});
    document.body.append(a);
    a.click();
    a.remove();
  } catch (err) { say(`${name}: ${err.message}`); }
}

function say(message) { $("#status").textContent = message; }

// Server-sent events read with fetch (EventSource cannot send the key): each event's data to onEvent.
async function events(path, onEvent, signal) {
  const r = await fetch(path, authed({signal}));
  if (!r.ok) throw new Error((await r.json()).detail || r.statusText);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += value;
    for (let i; (i = buf.indexOf("\n\n")) >= 0; buf = buf.slice(i + 2)) {
      const block = buf.slice(0, i), name = /^event: (.*)$/m.exec(block), data = /^data: (.*)$/m.exec(block);
      if (name && data) await onEvent(name[1], JSON.parse(data[1]));
    }
  }
}

// ---- charts: SVG with axes, units and a grid ----
function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toFixed(10));
  return out;
}
function logTicks(lo, hi) {  // lo, hi: log10 of the range; 1-2-5 steps where it spans under two decades
  const out = [];
  const steps = hi - lo < 2 ? [1, 2, 5] : [1];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) for (const m of steps) out.push(m * 10 ** e);
  return out;
}
const fmt = (v) => (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-2 && v !== 0) ? v.toExponential(1) : +v.toPrecision(3));

// series: [{name, colour, points: [[x, y], ...]}]; opts: {x: "label (unit)", y: "...", logX, yMin, yMax, dots}
function chart(series, opts) {
  const W = 480, H = 230, L = 52, R = 12, T = 12, B = 40;
  const all = series.flatMap((se) => se.points);
  const tx = (v) => (opts.logX ? Math.log10(Math.max(v, 1e-12)) : v);
  const xs = all.map((p) => tx(p[0])), ys = all.map((p) => p[1]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = opts.yMin ?? Math.min(...ys), y1 = opts.yMax ?? Math.max(...ys);
  if (!all.length) { x0 = 0; x1 = 1; y0 = opts.yMin ?? 0; y1 = opts.yMax ?? 1; }
  if (x1 === x0) { x0 -= 0.5; x1 += 0.5; }
  if (y1 === y0) { y0 -= y0 === 0 ? 0 : Math.abs(y0) * 0.1; y1 += y1 === 0 ? 1 : Math.abs(y1) * 0.1; }
  const X = (v) => L + (W - L - R) * (tx(v) - x0) / (x1 - x0), Y = (v) => T + (H - T - B) * (1 - (v - y0) / (y1 - y0));
  const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.label || `${opts.y} against ${opts.x}`});
  for (const v of niceTicks(y0, y1, 4)) {
    svg.append(s("line", {class: "grid", x1: L, x2: W - R, y1: Y(v), y2: Y(v)}));
    svg.append(s("text", {x: L - 6, y: Y(v) + 4, "text-anchor": "end"}, fmt(v)));
  }
  const xt = opts.logX ? logTicks(x0, x1) : niceTicks(x0, x1, 5);
  for (const v of xt) {
    if (tx(v) < x0 - 1e-9 || tx(v) > x1 + 1e-9) continue;
    svg.append(s("line", {class: "grid", x1: X(v), x2: X(v), y1: T, y2: H - B}));
    svg.append(s("text", {x: X(v), y: H - B + 15, "text-anchor": "middle"}, opts.logX ? bytes(v) : fmt(v)));
  }
  svg.append(s("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  svg.append(s("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
  svg.append(s("text", {x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle"}, opts.x));
  svg.append(s("text", {x: 12, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(T + H - B) / 2})`}, opts.y));
  for (const se of series) {
    if (!opts.dots && se.points.length > 1) {
      svg.append(s("polyline", {class: "line", stroke: se.colour, points: se.points.map((p) => `${X(p[0])},${Y(p[1])}`).join(" ")}));
    }
    for (const p of se.points) {
      if (!opts.dots && se.points.length > 1) continue;
      const dot = s("circle", {cx: X(p[0]), cy: Y(p[1]), r: opts.dots ? 5 : 3, fill: se.colour, "fill-opacity": 0.8});
      if (p[2]) dot.append(s("title", {}, p[2]));
      if (p[3]) dot.addEventListener("click", p[3]);
      svg.append(dot);
    }
  }
  const box = h("div", {class: "chart", dataset: {points: String(all.length)}}, svg);
  if (series.length > 1 || opts.legend) {
    box.append(h("div", {class: "legend"}, series.map((se) => h("span", {style: `--c: ${se.colour}`}, se.name))));
  }
  return box;
}

// ---- state ----
let models = [], datasets = [], paths = [], jobs = [];
const views = ["zoo", "datasets", "compose", "jobs", "paths", "path", "predict", "server"];

function route() {
  if (location.hash && !location.hash.startsWith("#/")) return;  // an anchor in the page (the skip link)
  const [view, raw] = (location.hash.slice(2) || "zoo").split("/");
  let arg = raw;
  try { arg = raw && decodeURIComponent(raw); } catch { arg = null; }
  const name = views.includes(view) ? (view === "paths" && arg ? "path" : view) : "zoo";
  for (const v of views) $("#" + v).hidden = v !== name;
  for (const a of document.querySelectorAll(".top nav a")) {
    const here = a.getAttribute("href") === "#/" + (name === "path" ? "paths" : name);
    if (here) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  document.title = `zoo · ${name}`;
  if (name === "path") showPath(arg);
  if (name === "server") startServer(); else stopServer();
  if (name === "jobs") loadJobs().catch(() => {});  // no key yet: the header says so
}

// ---- zoo ----
async function loadZoo() {
  models = await items("/v1/zoo/models");
  const list = $("#models");
  list.replaceChildren(...models.map(modelCard));
  if (!models.length) list.append(h("p", {class: "muted"}, "No base yet: zoo models add, or zoo models build demo."));
}

function modelCard(m) {
  const maxC = Math.max(...m.taps.map((t) => t.channels), 1);
  const spatial = m.taps.filter((t) => t.stride);
  const inp = m.input;
  return h("article", {class: "card", id: "model-" + m.id, "aria-labelledby": "model-h-" + m.id},
    h("header", {}, h("h2", {id: "model-h-" + m.id}, m.id), h("span", {class: "chip"}, m.arch)),
    m.description ? h("p", {class: "muted"}, m.description) : null,
    h("div", {class: "big", title: "accuracy on its own held-out data"}, pct(m.metrics.accuracy),
      h("span", {class: "muted", style: "font-size:.8rem;font-weight:400"}, " held-out accuracy")),
    h("dl", {},
      h("dt", {}, "parameters"), h("dd", {}, count(m.num_params)),
      h("dt", {}, "stored"), h("dd", {}, bytes(m.bytes)),
      h("dt", {}, "input"), h("dd", {}, `${inp.channels} x ${inp.size} x ${inp.size}`),
      h("dt", {}, "knows"), h("dd", {}, `${m.labels.length} labels` + (m.metrics.dataset ? ` of ${m.metrics.dataset}` : ""))),
    h("div", {class: "chips", "aria-label": "labels"}, m.labels.slice(0, 14).map((l) => h("span", {class: "chip"}, l)),
      m.labels.length > 14 ? h("span", {class: "chip"}, `+${m.labels.length - 14}`) : null),
    h("div", {class: "taps", role: "img", "aria-label": "taps along the network's depth: " +
      m.taps.map((t) => `${t.name} ${t.channels} channels` + (t.stride ? ` at stride ${t.stride}` : "")).join(", ")},
      m.taps.map((t) => h("div", {style: `height:${Math.round(100 * Math.sqrt(t.channels / maxC))}%`,
                                  title: `${t.name}: ${t.channels} channels` + (t.stride ? `, stride ${t.stride}` : ", pooled")}))),
    h("div", {class: "taps-names", "aria-hidden": "true"}, m.taps.map((t) => h("span", {}, t.name))),
    h("p", {class: "muted", style: "font-size:.8rem;margin:.2rem 0 0"}, `${spatial.length} spatial taps; bar height: channels`));
}

// ---- datasets ----
async function loadDatasets() {
  datasets = await items("/v1/datasets");
  $("#datasets-list").replaceChildren(...datasets.map(datasetCard));
}

function datasetCard(d) {
  const grid = h("div", {class: "samples"});
  const [c, hgt, w] = d.shape;
  api(`/v1/datasets/${encodeURIComponent(d.id)}/samples?n=16`).then(async (strip) => {
    const url = await blobUrl(strip.png);
    const scale = 40 / Math.max(hgt, w);  // each cell 40 px (style.css)
    grid.replaceChildren(...strip.labels.map((label, i) => h("figure", {class: "sample", style: "margin:0"},
      h("div", {role: "img", "aria-label": `a held-out image of ${label}`,
                style: `background-image:url(${url});background-size:${strip.labels.length * w * scale}px ${hgt * scale}px;` +
                       `background-position:-${i * w * scale}px 0`}),
      h("figcaption", {}, label))));
    grid.dataset.loaded = "yes";
  }).catch((err) => { grid.textContent = err.message; });
  return h("article", {class: "card", id: "dataset-" + d.id},
    h("header", {}, h("h2", {}, d.id), h("span", {class: "chip"}, d.source)),
    h("p", {class: "muted"}, d.name),
    h("dl", {}, h("dt", {}, "images"), h("dd", {}, `${d.num_samples.toLocaleString()} (${c} x ${hgt} x ${w})`),
      h("dt", {}, "splits"), h("dd", {}, Object.entries(d.splits).map(([k, v]) => `${k} ${v.toLocaleString()}`).join(", ")),
      h("dt", {}, "labels"), h("dd", {}, d.labels.length)),
    grid);
}

// ---- compose: a form per method, generated from the OpenAPI schema of its spec ----
let schemas = {}, method = "reprogram", edited = false, formState = {};

async function loadSchemas() {
  const doc = await fetch("/openapi.json").then((r) => r.json());
  schemas = doc.components.schemas;
}
const deref = (sc) => (sc && sc.$ref ? schemas[sc.$ref.split("/").pop()] : sc);
function unwrap(sc) {  // anyOf [X, null] -> X (optional)
  sc = deref(sc);
  if (sc && sc.anyOf) { const o = sc.anyOf.filter((a) => a.type !== "null"); if (o.length === 1) return {...deref(o[0]), title: sc.title, description: sc.description, default: sc.default}; }
  return sc;
}
const title = (name, sc) => (sc && sc.title && !/^[A-Z][a-z]+( [A-Z][a-z]+)*$/.test(sc.title) ? sc.title : name.replace(/_/g, " "));

function memberSchema(m) { return schemas[m[0].toUpperCase() + m.slice(1) + "Spec"]; }

function buildTabs(focus = false) {
  const pick = (m) => { method = m; edited = false; buildTabs(true); buildForm(); };
  $("#method-tabs").replaceChildren(...METHODS.map((m, i) => h("button", {type: "button", role: "radio", id: "method-" + m,
    "aria-checked": String(m === method), tabindex: m === method ? "0" : "-1", onclick: () => pick(m),
    onkeydown: (e) => {
      const step = {ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1}[e.key];
      if (step) { e.preventDefault(); pick(METHODS[(i + step + METHODS.length) % METHODS.length]); }
    }}, m)));
  $("#method-about").textContent = ABOUT[method];
  if (focus) $("#method-" + method).focus();
}

// each widget: {path: "task.samples_per_label", get: () => value|undefined}
let widgets = [];
const off = new Set();  // the optional groups turned off: their fields are not sent

function buildForm() {
  const member = memberSchema(method);
  widgets = [];
  off.clear();
  const root = $("#fields");
  root.replaceChildren();
  for (const name of member["x-zoo-fields"]) {
    root.append(renderField(name, member.properties[name], member.required.includes(name), name));
  }
  $("#form-error").textContent = "";
  syncJson();
}

function fieldWrap(path, label, sc, control, required) {
  const id = "f-" + path.replace(/\./g, "-");
  const err = h("p", {class: "error", id: id + "-error", "data-error-for": path});
  const help = sc && sc.description ? h("span", {class: "help", id: id + "-help"}, sc.description) : null;
  const single = control.matches("input,select,textarea") ? control
    : control.classList.contains("slider") ? control.querySelector("input[type=number]") : null;
  let name;
  if (single) {  // one control: a label for it
    single.id = id;
    name = h("label", {for: id}, label, required ? " *" : "");
    if (help) single.setAttribute("aria-describedby", help.id);
  } else {  // a group (chips, sources): named by its heading
    name = h("span", {class: "name", id: id + "-name"}, label, required ? " *" : "");
    control.setAttribute("role", "group");
    control.setAttribute("aria-labelledby", name.id);
    if (help) control.setAttribute("aria-describedby", help.id);
  }
  return h("div", {class: "field", "data-path": path}, name, h("div", {}, control, help, err));
}

function renderField(name, raw, required, path) {
  const sc = unwrap(raw) || {};
  const label = title(name, sc);
  if (sc.type === "object" && sc.properties) {
    // an optional group that needs something from you (a task for resample) is off until turned on
    const on = required || !(sc.required || []).length;
    const toggle = required ? null : h("input", {type: "checkbox", "aria-label": "send " + label, onchange: () => {
      if (toggle.checked) off.delete(path); else off.add(path);
      inner.hidden = !toggle.checked;
      syncJson();
    }});
    const inner = h("div", {});
    if (toggle) { toggle.checked = on; if (!on) { off.add(path); inner.hidden = true; } }
    const fs = h("fieldset", {"data-path": path}, h("legend", {}, toggle, toggle ? " " : "", name, required ? " *" : ""), inner);
    for (const [k, v] of Object.entries(sc.properties)) inner.append(renderField(k, v, (sc.required || []).includes(k), `${path}.${k}`));
    fs.append(h("p", {class: "error", "data-error-for": path}));
    return fs;
  }
  if (name === "base" || name === "model") return fieldWrap(path, label, sc, modelSelect(path, required), required);
  if (name === "dataset") return fieldWrap(path, label, sc, datasetSelect(path), required);
  if (name === "models") return fieldWrap(path, label, sc, chipPicker(path, () => models.map((m) => m.id), false), required);
  if (name === "labels" && path === "task.labels") return fieldWrap(path, label, sc, chipPicker(path, taskLabels, true), required);
  if (name === "sources") return fieldWrap(path, label, sc, sourcesEditor(path), required);
  if (sc.type === "boolean") {
    const box = h("input", {type: "checkbox", onchange: syncJson});
    if (sc.default) box.checked = true;
    widgets.push({path, get: () => (box.checked === !!sc.default ? undefined : box.checked)});
    return fieldWrap(path, label, sc, box, required);
  }
  if (sc.type === "integer" || sc.type === "number") return fieldWrap(path, label, sc, numberInput(path, name, sc), required);
  if (sc.type === "object") {  // free-form: JSON
    const ta = h("input", {type: "text", placeholder: "{}", oninput: syncJson});
    widgets.push({path, get: () => { const t = ta.value.trim(); if (!t) return undefined; try { return JSON.parse(t); } catch { return t; } }});
    return fieldWrap(path, label, sc, ta, required);
  }
  if (sc.enum) {  // a choice among named values (reassemble's proxy): the default is sent by leaving it
    const sel = h("select", {onchange: syncJson}, sc.enum.map((v) => h("option", {value: v, selected: v === sc.default}, v)));
    widgets.push({path, get: () => (sel.value === sc.default ? undefined : sel.value)});
    return fieldWrap(path, label, sc, sel, required);
  }
  const inp = h("input", {type: "text", oninput: syncJson});
  widgets.push({path, get: () => inp.value.trim() || undefined});
  return fieldWrap(path, label, sc, inp, required);
}

// sliders where the range is small enough to slide over; a number box beside (or alone) otherwise
const SLIDERS = {"task.samples_per_label": [1, 500, 1, 20], "train.epochs": [1, 30, 1, 3], "budget.width": [0.05, 1, 0.05, 0.5],
                 "blocks": [2, 8, 1, 3]};
function numberInput(path, name, sc) {
  const lo = sc.minimum ?? (sc.exclusiveMinimum !== undefined ? sc.exclusiveMinimum : undefined), hi = sc.maximum;
  const preset = SLIDERS[path];
  const num = h("input", {type: "number", step: sc.type === "integer" ? 1 : "any", min: lo, max: hi,
                          placeholder: sc.default !== undefined && sc.default !== null ? String(sc.default) : "default"});
  if (preset) {
    const [a, b, st, start] = preset;
    const range = h("input", {type: "range", min: a, max: b, step: st, value: start, "aria-label": title(name, sc) + " (slider)"});
    num.value = start;
    range.oninput = () => { num.value = range.value; syncJson(); };
    num.oninput = () => { range.value = num.value; syncJson(); };
    widgets.push({path, get: () => (num.value === "" ? undefined : Number(num.value))});
    return h("div", {class: "slider"}, num, range);
  }
  num.oninput = syncJson;
  widgets.push({path, get: () => (num.value === "" ? undefined : Number(num.value))});
  return num;
}

function modelSelect(path, required) {
  const sel = h("select", {onchange: () => { if (path === "base") refreshLabels(); syncJson(); }},
    required ? null : h("option", {value: ""}, "(chosen for you)"), models.map((m) => h("option", {value: m.id}, `${m.id} (${m.arch})`)));
  widgets.push({path, get: () => sel.value || undefined});
  return sel;
}

function datasetSelect(path) {
  const sel = h("select", {onchange: () => { refreshLabels(); syncJson(); }},
    datasets.map((d) => h("option", {value: d.id}, `${d.id} (${d.labels.length} labels)`)));
  const first = datasets.find((d) => d.id === "digits") || datasets[0];
  if (first) sel.value = first.id;
  widgets.push({path, get: () => sel.value || undefined});
  return sel;
}

function taskLabels() {
  const w = widgets.find((x) => x.path === "task.dataset");
  const d = datasets.find((x) => w && x.id === w.get());
  return d ? d.labels : [];
}

// toggle chips; allOn: every chip starts pressed and "all pressed" sends nothing (the default)
function chipPicker(path, options, allOn) {
  const box = h("div", {class: "chips"});
  const fill = () => {
    box.replaceChildren(...options().map((o) => h("button", {type: "button", class: "chip", "aria-pressed": String(allOn),
      onclick: (e) => { const b = e.currentTarget; b.setAttribute("aria-pressed", String(b.getAttribute("aria-pressed") !== "true")); syncJson(); }}, o)));
  };
  fill();
  const press = (v) => () => { for (const b of box.children) b.setAttribute("aria-pressed", String(v)); syncJson(); };
  const wrap = h("div", {}, box, h("div", {class: "chip-actions"},
    h("button", {type: "button", class: "link", "data-chips": "all", onclick: press(true)}, "all"), " · ",
    h("button", {type: "button", class: "link", "data-chips": "none", onclick: press(false)}, "none")));
  widgets.push({path, refill: fill, get: () => {
    const all = [...box.children], on = all.filter((b) => b.getAttribute("aria-pressed") === "true").map((b) => b.textContent);
    if (allOn && on.length === all.length) return undefined;
    return on.length ? on : undefined;
  }});
  return wrap;
}

function refreshLabels() {
  for (const w of widgets) if (w.refill && w.path === "task.labels") w.refill();
}

function sourcesEditor(path) {
  const rows = h("div", {});
  const add = h("button", {type: "button", onclick: () => { rows.append(sourceRow()); syncJson(); }}, "Add a source");
  const sourceRow = () => {
    const sel = h("select", {"aria-label": "source base", onchange: () => { fillLabels(); syncJson(); }}, models.map((m) => h("option", {value: m.id}, m.id)));
    const chips = h("div", {class: "chips", role: "group", "aria-label": "labels to clone"});
    const fillLabels = () => {
      const m = models.find((x) => x.id === sel.value);
      chips.replaceChildren(...(m ? m.labels : []).map((l) => h("button", {type: "button", class: "chip", "aria-pressed": "false",
        onclick: (e) => { const b = e.currentTarget; b.setAttribute("aria-pressed", String(b.getAttribute("aria-pressed") !== "true")); syncJson(); }}, l)));
    };
    fillLabels();
    const row = h("div", {class: "source-row"}, sel, chips, h("button", {type: "button", class: "link", onclick: () => { row.remove(); syncJson(); }}, "remove"));
    row.value = () => ({model: sel.value, labels: [...chips.children].filter((b) => b.getAttribute("aria-pressed") === "true").map((b) => b.textContent)});
    return row;
  };
  widgets.push({path, get: () => (rows.children.length ? [...rows.children].map((r) => r.value()) : undefined)});
  return h("div", {}, rows, add, h("span", {class: "help"}, "none: the server picks the sources from the cards"));
}

function formSpec() {
  const spec = {method};
  for (const w of widgets) {
    if ([...off].some((o) => w.path === o || w.path.startsWith(o + "."))) continue;
    const v = w.get();
    if (v === undefined) continue;
    const keys = w.path.split(".");
    let at = spec;
    for (const k of keys.slice(0, -1)) at = at[k] = at[k] || {};
    at[keys[keys.length - 1]] = v;
  }
  return spec;
}

function syncJson() {
  if (!edited) $("#spec").value = JSON.stringify(formSpec(), null, 2);
  clearErrors();
}

function clearErrors() {
  for (const e of document.querySelectorAll("#compose-form .error")) e.textContent = "";
  for (const e of document.querySelectorAll("#compose-form [aria-invalid]")) e.removeAttribute("aria-invalid");
}

// a 422's detail names the field first ("task.samples_per_label: ..."): shown at that field
function showError(message) {
  const m = /^(?:bad \w+ )?([a-z_]+(?:\.[a-z_0-9]+)*):\s/.exec(message);
  let path = m && m[1];
  while (path && !document.querySelector(`#compose-form [data-error-for="${path}"]`)) path = path.includes(".") ? path.replace(/\.[^.]+$/, "") : null;
  if (path) {
    document.querySelector(`#compose-form [data-error-for="${path}"]`).textContent = message;
    const field = document.querySelector(`#compose-form [data-path="${path}"]`);
    const control = field && field.querySelector("input,select,textarea");
    if (control) { control.setAttribute("aria-invalid", "true"); control.focus(); }
  } else {
    $("#form-error").textContent = message;
  }
}

async function compose(e) {
  e.preventDefault();
  clearErrors();
  let spec;
  try { spec = JSON.parse($("#spec").value); } catch (err) { $("#form-error").textContent = "the JSON does not parse: " + err.message; return; }
  try {
    const job = await post("/v1/compositions", spec);
    followJob(job.id, $("#compose-job"), spec.train && spec.train.epochs);
    loadJobs().catch((err) => say(err.message));
  } catch (err) { showError(err.message); }
}

// ---- jobs: live progress, loss and validation accuracy against epochs, cancel, metrics ----
const following = new Map();  // element -> AbortController

function followJob(jobId, into, epochs) {
  if (following.has(into)) following.get(into).abort();
  const stop = new AbortController();
  following.set(into, stop);
  delete into.dataset.state;
  const state = h("span", {class: "state", id: into.id + "-state"}, "queued");
  const step = h("span", {class: "muted"});
  const bar = h("progress", {max: 1, value: 0, "aria-label": "progress"});
  const cancel = h("button", {type: "button", class: "danger", onclick: async () => {
    try { await api(`/v1/jobs/${encodeURIComponent(jobId)}/cancel`, {method: "POST"}); } catch (err) { step.textContent = err.message; }
  }}, "Cancel");
  const lossBox = h("figure", {class: "chart-box", id: into.id + "-loss"}, h("figcaption", {}, "Training loss"));
  const accBox = h("figure", {class: "chart-box", id: into.id + "-acc"}, h("figcaption", {}, "Validation accuracy"));
  const result = h("div", {id: into.id + "-result"});
  into.replaceChildren(h("div", {class: "panel"},
    h("h2", {}, "Job ", h("code", {}, jobId)), h("p", {}, state, " ", bar, " ", step, " ", cancel),
    h("div", {class: "charts"}, lossBox, accBox), result));
  const losses = [], accs = [];
  const xOf = (p) => (typeof p.epoch === "number" ? p.epoch : epochs ? (p.fraction || 0) * epochs : (p.fraction || 0) * 100);
  const xName = () => (losses.some((q) => q.epoch) || epochs ? "epoch" : "progress (%)");
  const redraw = () => {
    lossBox.replaceChildren(h("figcaption", {}, "Training loss"), chart([{name: "loss", colour: "#2456c7", points: losses.map((q) => [q.x, q.y])}],
      {x: xName(), y: "cross-entropy (nats)", legend: false}));
    accBox.replaceChildren(h("figcaption", {}, "Validation accuracy"), accs.length
      ? chart([{name: "val", colour: "#1d7a3d", points: accs.map((q) => [q.x, q.y])}], {x: xName(), y: "accuracy (%)", yMin: 0, yMax: 100, dots: accs.length < 3})
      : h("p", {class: "muted"}, "none reported while it trains (the held-out accuracy is in the metrics when it ends)"));
  };
  redraw();
  events(`/v1/jobs/${encodeURIComponent(jobId)}/events`, async (name, job) => {
    if (name !== "job") return;
    const p = job.progress || {};
    state.textContent = job.state;
    state.className = "state state-" + job.state;
    step.textContent = p.step || (p.epoch !== undefined ? "epoch " + p.epoch : "");
    bar.value = p.fraction || 0;
    if (Array.isArray(p.curve)) {  // the job's whole curve so far, kept by the server
      losses.length = accs.length = 0;
      for (const q of p.curve) {
        if (typeof q.loss === "number") losses.push({x: xOf(q), y: q.loss, epoch: typeof q.epoch === "number"});
        if (typeof q.val_accuracy === "number") accs.push({x: xOf(q), y: 100 * q.val_accuracy});
      }
    }
    redraw();
    if (["succeeded", "failed", "cancelled"].includes(job.state)) {
      cancel.remove();
      result.replaceChildren(job.state === "succeeded"
        ? h("div", {}, h("p", {}, "path ", h("a", {href: `#/paths/${job.path_id}`}, job.path_id), `, held-out accuracy ${pct(job.metrics.accuracy)}`),
            metricsTable(job.metrics))
        : h("p", {class: "error"}, job.error || job.state));
      into.dataset.state = job.state;
      await Promise.all([loadJobs(), loadPaths()]).catch((err) => say(err.message));
    }
  }, stop.signal).catch((err) => { if (err.name !== "AbortError") step.textContent = err.message; });
}

function metricsTable(metrics) {
  const rows = Object.entries(metrics).filter(([, v]) => typeof v !== "object" || v === null);
  return h("div", {class: "scroll"}, h("table", {class: "metrics"}, h("caption", {class: "sr"}, "the job's metrics"),
    h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "metric"), h("th", {scope: "col", class: "num"}, "value"))),
    h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("td", {}, k),
      h("td", {class: "num"}, typeof v === "number" ? (k.includes("accuracy") ? pct(v) : k.includes("bytes") ? bytes(v) : fmt(v)) : String(v)))))));
}

async function loadJobs() {
  jobs = await items("/v1/jobs");
  jobs.sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  $("#jobs-table tbody").replaceChildren(...jobs.map((j) => h("tr", {class: "clickable", "data-job": j.id,
      onclick: () => followJob(j.id, $("#job-detail"))},
    h("td", {}, h("button", {type: "button", class: "link", title: "follow job " + j.id}, h("code", {}, j.id.slice(0, 16) + "…"))),
    h("td", {}, h("span", {class: "tag " + j.method}, j.method)),
    h("td", {}, h("span", {class: "state state-" + j.state}, j.state)),
    h("td", {}, h("progress", {max: 1, value: j.progress.fraction || 0, "aria-label": "progress of " + j.id}), " ", pct(j.progress.fraction || 0)),
    h("td", {}, j.path_id ? h("a", {href: `#/paths/${j.path_id}`, onclick: (e) => e.stopPropagation()}, h("code", {}, j.path_id.slice(0, 14) + "…")) : "–"),
    h("td", {}, ["queued", "running"].includes(j.state) ? h("button", {type: "button", class: "danger", onclick: async (e) => {
      e.stopPropagation();
      await api(`/v1/jobs/${encodeURIComponent(j.id)}/cancel`, {method: "POST"}).catch((err) => say(err.message));
      loadJobs().catch((err) => say(err.message));
    }}, "Cancel") : null))));
}

// ---- paths: a sortable, filterable table and the accuracy-against-bytes scatter ----
const COLUMNS = [
  {key: "id", name: "Path", get: (p) => p.id},
  {key: "method", name: "Method", get: (p) => p.method},
  {key: "bases", name: "Bases", get: (p) => p.bases.map((b) => b.id).join(", ")},
  {key: "labels", name: "Labels", get: (p) => p.labels.length, num: true},
  {key: "accuracy", name: "Accuracy", get: (p) => p.metrics.accuracy ?? -1, num: true, show: (p) => pct(p.metrics.accuracy)},
  {key: "bytes", name: "Stored", get: (p) => p.bytes, num: true, show: (p) => bytes(p.bytes)},
  {key: "ratio", name: "Of dense", get: (p) => p.bytes / p.dense_bytes, num: true, show: (p) => pct(p.bytes / p.dense_bytes)},
  {key: "created", name: "Created", get: (p) => p.created_at, show: (p) => h("span", {style: "white-space:nowrap"}, p.created_at.replace("T", " ").slice(0, 16))},
];
let sortBy = {key: "created", dir: -1};

async function loadPaths() {
  paths = await items("/v1/paths");
  const methodSel = $("#paths-method"), chosen = methodSel.value;
  methodSel.replaceChildren(h("option", {value: ""}, "all"), ...[...new Set(paths.map((p) => p.method))].map((m) => h("option", {value: m}, m)));
  methodSel.value = chosen;
  for (const sel of [$("#predict-path"), $("#predict-path-b")]) {
    const was = sel.value, none = sel.id === "predict-path-b" ? [h("option", {value: ""}, "(none)")] : [];
    sel.replaceChildren(...none, ...paths.map((p) => h("option", {value: p.id}, `${p.id.slice(0, 14)}… ${p.method} (${p.labels.length} labels)`)));
    if (was && paths.some((p) => p.id === was)) sel.value = was;
  }
  renderPaths();
}

function renderPaths() {
  const q = $("#paths-filter").value.trim().toLowerCase(), m = $("#paths-method").value;
  const shown = paths.filter((p) => (!m || p.method === m) &&
    (!q || [p.id, p.method, ...p.bases.map((b) => b.id), ...p.labels].some((t) => t.toLowerCase().includes(q))));
  const col = COLUMNS.find((c) => c.key === sortBy.key);
  shown.sort((a, b) => { const x = col.get(a), y = col.get(b); return (x < y ? -1 : x > y ? 1 : 0) * sortBy.dir; });
  $("#paths-table thead tr").replaceChildren(...COLUMNS.map((c) => h("th", {scope: "col", class: c.num ? "num" : null,
      "aria-sort": c.key === sortBy.key ? (sortBy.dir > 0 ? "ascending" : "descending") : "none", "data-key": c.key},
    h("button", {type: "button", onclick: () => { sortBy = {key: c.key, dir: sortBy.key === c.key ? -sortBy.dir : (c.num ? -1 : 1)}; renderPaths(); }}, c.name))),
    h("th", {scope: "col"}, h("span", {class: "sr"}, "Downloads")));
  $("#paths-table tbody").replaceChildren(...shown.map((p) => h("tr", {"data-path": p.id},
    ...COLUMNS.map((c) => h("td", {class: c.num ? "num" : null, "data-value": c.num ? String(c.get(p)) : null},
      c.key === "id" ? h("a", {href: `#/paths/${p.id}`}, h("code", {}, p.id)) :
      c.key === "method" ? h("span", {class: "tag " + p.method}, p.method) : (c.show ? c.show(p) : c.get(p)))),
    h("td", {}, h("button", {type: "button", class: "link bundle", onclick: () => download(`/v1/paths/${p.id}/bundle`, p.id + ".zoopath")}, "bundle")))));
  const series = METHODS.filter((k) => paths.some((p) => p.method === k)).map((k) => ({name: k, colour: COLOURS[k],
    points: shown.filter((p) => p.method === k && typeof p.metrics.accuracy === "number")
      .map((p) => [p.bytes, 100 * p.metrics.accuracy, `${p.id} (${p.method} on ${p.bases.map((b) => b.id).join(", ")}): ` +
                   `${pct(p.metrics.accuracy)}, ${bytes(p.bytes)}`, () => { location.hash = `#/paths/${p.id}`; }])}));
  $("#paths-scatter").replaceChildren(chart(series, {x: "stored bytes (log)", y: "held-out accuracy (%)", logX: true, dots: true,
                                                      yMin: 0, yMax: 100, legend: true, label: "accuracy against stored bytes, per path"}));
}

// ---- a path's page: manifest, bases, sharing, downloads, a confusion matrix on held-out images ----
let shownPath = 0;  // the latest showPath call: an earlier one that ends later draws nothing

async function showPath(pathId) {
  const mine = ++shownPath;
  const body = $("#path-body");
  $("#path-h").textContent = "Path " + pathId;
  body.replaceChildren(h("p", {class: "muted"}, "loading…"));
  let p, sharing = null;
  try { p = await api(`/v1/paths/${encodeURIComponent(pathId)}`); } catch (err) { body.replaceChildren(h("p", {class: "error"}, err.message)); return; }
  try { sharing = await api(`/v1/paths/${encodeURIComponent(pathId)}/sharing`); } catch (err) { if (err.status !== 403) say(`sharing of ${pathId}: ${err.message}`); }  // 403: not an owner
  if (mine !== shownPath) return;
  const job = jobs.find((j) => j.path_id === pathId);  // the dataset it was composed on, where this server composed it
  const guess = datasets.find((d) => job && job.spec.task && d.id === job.spec.task.dataset) ||
    datasets.filter((d) => p.labels.every((l) => d.labels.includes(l))).sort((a, b) => a.labels.length - b.labels.length)[0] ||
    datasets.find((d) => p.labels.some((l) => d.labels.includes(l)));
  const dsSel = h("select", {id: "eval-dataset"}, datasets.map((d) => h("option", {value: d.id}, d.id)));
  if (guess) dsSel.value = guess.id;
  const evalBox = h("div", {id: "confusion"});
  const evaluate = async () => {
    evalBox.replaceChildren(h("p", {class: "muted"}, "predicting the held-out images…"));
    try {
      const ev = await api(`/v1/paths/${encodeURIComponent(pathId)}/evaluation?dataset=${encodeURIComponent(dsSel.value)}&n=500`);
      if (mine === shownPath) evalBox.replaceChildren(confusion(ev));
    } catch (err) { evalBox.replaceChildren(h("p", {class: "error"}, err.message)); }
  };
  dsSel.onchange = evaluate;
  body.replaceChildren(
    h("p", {}, h("span", {class: "tag " + p.method}, p.method), " ", `${p.labels.length} labels, held-out accuracy ${pct(p.metrics.accuracy)}, ` +
      `stores ${bytes(p.bytes)} (${pct(p.bytes / p.dense_bytes)} of its bases' ${bytes(p.dense_bytes)})`),
    h("div", {class: "downloads"},
      h("button", {type: "button", onclick: () => download(`/v1/paths/${pathId}/bundle`, pathId + ".zoopath")}, "Bundle (.zoopath)"),
      h("button", {type: "button", onclick: () => download(`/v1/paths/${pathId}/export?format=onnx`, pathId + ".onnx")}, "ONNX"),
      h("button", {type: "button", onclick: () => download(`/v1/paths/${pathId}/export?format=pt2`, pathId + ".pt2")}, "torch.export (.pt2)"),
      h("button", {type: "button", onclick: () => { $("#predict-path").value = pathId; location.hash = "#/predict"; }}, "Predict with it")),
    h("h2", {}, "Held-out predictions"),
    h("p", {}, h("label", {for: "eval-dataset"}, "Dataset "), dsSel, h("span", {class: "muted"}, " (labels match by name)")),
    evalBox,
    h("h2", {}, "Bases"),
    h("ul", {}, p.bases.map((b) => h("li", {}, h("a", {href: "#/zoo", onclick: () => setTimeout(() => { const el = $("#model-" + b.id); if (el) el.scrollIntoView(); })}, b.id),
      " ", h("code", {class: "muted"}, b.digest.slice(0, 16) + "…")))),
    h("h2", {}, "Sharing"),
    sharing ? h("p", {}, `owners: ${(sharing.owners || []).join(", ") || "–"}; ` +
      `shared with: ${(sharing.tenants || []).join(", ") || "nobody"}` + (sharing.public ? "; public" : "")) : h("p", {class: "muted"}, "only an owner sees who it is shared with"),
    h("h2", {}, "Manifest"),
    h("pre", {tabindex: "0", "aria-label": "the path's manifest"}, JSON.stringify(p, null, 2)));
  if (guess) evaluate(); else evalBox.replaceChildren(h("p", {class: "muted"}, "no dataset here has this path's labels"));
}

function confusion(ev) {
  const max = ev.matrix.reduce((m, row) => row.reduce((a, v) => Math.max(a, v), m), 1);
  return h("div", {}, h("p", {}, `${ev.samples} held-out images of ${ev.dataset}: accuracy ${pct(ev.accuracy)}`),
    h("div", {class: "scroll", style: "max-width:max-content"}, h("table", {class: "confusion", "data-accuracy": String(ev.accuracy)},
      h("caption", {class: "sr"}, "confusion matrix: rows the true label, columns the predicted one"),
      h("thead", {}, h("tr", {}, h("th", {scope: "col"}, "true \\ predicted"), ev.labels.map((l) => h("th", {scope: "col"}, l)))),
      h("tbody", {}, ev.matrix.map((row, i) => h("tr", {}, h("th", {scope: "row"}, ev.labels[i]),
        row.map((v, j) => h("td", {style: `background: rgba(${i === j ? "29,122,61" : "179,38,30"}, ${(0.45 * v / max).toFixed(3)})`}, v))))))));
}

// ---- predict: drop, paste, choose or draw; one path or two side by side ----
async function predictWith(pathId, blob, bars) {
  if (!pathId) { bars.replaceChildren(); delete bars.dataset.top; return; }
  const form = new FormData();
  form.append("files", blob, "input.png");
  form.append("top_k", "5");
  try {
    const out = await api(`/v1/paths/${encodeURIComponent(pathId)}/predict`, {method: "POST", body: form});
    const top = out.predictions[0];
    bars.replaceChildren(...top.top_k.map((sc) => h("div", {class: "bar"}, h("span", {class: "label", title: sc.label}, sc.label),
      h("span", {class: "track"}, h("span", {class: "fill", style: `width:${(100 * sc.score).toFixed(1)}%`})),
      h("span", {class: "score"}, sc.score.toFixed(3)))));
    bars.dataset.top = top.label;
  } catch (err) { bars.textContent = err.message; delete bars.dataset.top; }
}

let lastInput = null;
async function predict(blob) {
  if (!blob) return;
  lastInput = blob;
  $("#predict-preview").src = URL.createObjectURL(blob);
  const a = $("#predict-path").value, b = $("#predict-path-b").value;
  $("#predict-a-h").textContent = a ? "Path " + a.slice(0, 14) + "…" : "Path";
  $("#predict-b-h").textContent = b ? "Compared " + b.slice(0, 14) + "…" : "Compared";
  await Promise.all([predictWith(a, blob, $("#predict-bars")), predictWith(b, blob, $("#predict-bars-b"))]);
}

function setUpDrawing() {
  const c = $("#draw"), g = c.getContext("2d");
  const clear = () => { g.fillStyle = "#000"; g.fillRect(0, 0, c.width, c.height); };
  clear();
  let down = false;
  const at = (e) => { const r = c.getBoundingClientRect(); return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height]; };
  c.addEventListener("pointerdown", (e) => { down = true; c.setPointerCapture(e.pointerId); g.beginPath(); g.moveTo(...at(e)); });
  c.addEventListener("pointermove", (e) => {
    if (!down) return;
    g.strokeStyle = "#fff"; g.lineWidth = c.width / 11; g.lineCap = "round"; g.lineJoin = "round";
    g.lineTo(...at(e)); g.stroke();
  });
  c.addEventListener("pointerup", () => { down = false; });
  $("#draw-clear").onclick = clear;
  $("#draw-predict").onclick = () => c.toBlob((b) => predict(b), "image/png");
}

function setUpPredict() {
  $("#predict-file").onchange = (e) => predict(e.target.files[0]);
  const drop = $("#drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.onkeydown = (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("#predict-file").click(); } };
  drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); predict(e.dataTransfer.files[0]); };
  document.addEventListener("paste", (e) => {
    if ($("#predict").hidden) return;
    const file = [...(e.clipboardData || {files: []}).files].find((f) => f.type.startsWith("image/"));
    if (file) predict(file);
  });
  for (const sel of [$("#predict-path"), $("#predict-path-b")]) sel.onchange = () => predict(lastInput);
  setUpDrawing();
}

// ---- server: /metrics read every few seconds, a chart each ----
const EVERY_MS = 2000, KEEP = 60;
let serverTimer = null, samples = [];

function parseMetrics(text) {  // Prometheus text: [{name, labels: {}, value}]
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    out.push({name: m[1], labels, value: Number(m[3])});
  }
  return out;
}
const total = (ms, name, pred = () => true) => ms.filter((m) => m.name === name && pred(m.labels)).reduce((a, m) => a + m.value, 0);

function quantile(q, before, now) {  // from the delta of zoo_http_request_seconds buckets (every route), in ms
  const buckets = new Map();
  for (const m of now.filter((x) => x.name === "zoo_http_request_seconds_bucket")) buckets.set(m.labels.le, (buckets.get(m.labels.le) || 0) + m.value);
  for (const m of before.filter((x) => x.name === "zoo_http_request_seconds_bucket")) buckets.set(m.labels.le, (buckets.get(m.labels.le) || 0) - m.value);
  const sorted = [...buckets.entries()].map(([le, c]) => [le === "+Inf" ? Infinity : Number(le), c]).sort((a, b) => a[0] - b[0]);
  const n = sorted.length ? sorted[sorted.length - 1][1] : 0;
  if (!n) return null;
  let prevLe = 0, prevC = 0;
  for (const [le, c] of sorted) {
    if (c >= q * n) {
      if (le === Infinity) return prevLe * 1000;
      return 1000 * (prevLe + (le - prevLe) * (c > prevC ? (q * n - prevC) / (c - prevC) : 0));
    }
    prevLe = le; prevC = c;
  }
  return null;
}

async function sampleServer() {
  const text = await fetch("/metrics").then((r) => r.text());
  samples.push({t: Date.now() / 1000, ms: parseMetrics(text)});
  if (samples.length > KEEP) samples.shift();
  drawServer();
}

function drawServer() {
  const box = $("#server-charts");
  const t0 = samples.length ? samples[0].t : 0;
  const pairs = samples.slice(1).map((now, i) => [samples[i], now]);
  const rate = (name, pred) => pairs.map(([a, b]) => [b.t - t0, Math.max(0, total(b.ms, name, pred) - total(a.ms, name, pred)) / (b.t - a.t)]);
  const mean = (name) => pairs.map(([a, b]) => {
    const n = total(b.ms, name + "_count") - total(a.ms, name + "_count");
    return [b.t - t0, n > 0 ? (total(b.ms, name + "_sum") - total(a.ms, name + "_sum")) / n : 0];
  });
  const gauge = (name, scale = 1) => samples.map((x) => [x.t - t0, total(x.ms, name) * scale]);
  const lat = (q) => pairs.map(([a, b]) => [b.t - t0, quantile(q, a.ms, b.ms)]).filter((p) => p[1] !== null);
  const x = "time (s)";
  const charts = [
    ["Throughput", [{name: "all requests", colour: "#2456c7", points: rate("zoo_http_requests_total")},
                    {name: "predicts", colour: "#1d7a3d", points: rate("zoo_http_requests_total", (l) => /predict|infer/.test(l.route || ""))}],
     {x, y: "requests / s", yMin: 0, legend: true}],
    ["Latency percentiles", [{name: "p50", colour: "#2456c7", points: lat(0.5)}, {name: "p95", colour: "#b35c00", points: lat(0.95)},
                             {name: "p99", colour: "#b3261e", points: lat(0.99)}], {x, y: "ms", yMin: 0, legend: true}],
    ["Batch size", [{name: "inputs per forward", colour: "#2456c7", points: mean("zoo_batch_size")}], {x, y: "inputs (mean)", yMin: 0}],
    ["Paths per batch", [{name: "paths per forward", colour: "#8e2aa8", points: mean("zoo_paths_per_batch")}], {x, y: "paths (mean)", yMin: 0}],
    ["Cache", [{name: "materialized paths", colour: "#2456c7", points: gauge("zoo_path_cache_bytes", 1e-6)},
               {name: "host tier", colour: "#b35c00", points: gauge("zoo_path_host_bytes", 1e-6)}], {x, y: "MB", yMin: 0, legend: true}],
    ["Slots and queue", [{name: "path slots in use", colour: "#1d7a3d", points: gauge("zoo_path_slots_in_use")},
                         {name: "inputs waiting", colour: "#b3261e", points: gauge("zoo_batch_queue_inputs")}], {x, y: "count", yMin: 0, legend: true}],
  ];
  box.replaceChildren(...charts.map(([name, series, opts]) => h("figure", {class: "chart-box"}, h("h2", {}, name), chart(series, {...opts, label: name}))));
}

function startServer() {
  if (serverTimer) return;
  samples = [];
  $("#server-every").textContent = String(EVERY_MS / 1000);
  sampleServer().catch(() => {});
  serverTimer = setInterval(() => sampleServer().catch(() => {}), EVERY_MS);
}
function stopServer() { clearInterval(serverTimer); serverTimer = null; }

// ---- signing in ----
// A sign-in link (zoo serve prints one at start, zoo dashboard opens one): /#token=<one-time token>,
// taken out of the address bar at once and exchanged for an admin key of this tab's own.
// The answer: null, or why the link did not sign in.
async function signInFromLink() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (!token) return null;
  history.replaceState(null, "", location.pathname + location.search + "#/zoo");
  try {
    const out = await post("/v1/keys/exchange", {token});
    sessionStorage.setItem(KEY, out.key);
    return null;
  } catch (err) { return "sign-in link: " + err.message; }
}

async function main() {
  $("#key-form").onsubmit = (e) => { e.preventDefault(); sessionStorage.setItem(KEY, $("#api-key").value.trim()); location.reload(); };
  const linkError = await signInFromLink();
  const ready = await fetch("/readyz").then((r) => r.json()).catch(() => ({}));
  $("#ready").textContent = ready.status === "ready" ? `ready: ${ready.bases} bases on ${ready.device}` : "not ready";
  window.addEventListener("hashchange", async () => {
    if (new URLSearchParams(location.hash.slice(1)).has("token")) {  // a sign-in link pasted into this tab
      const why = await signInFromLink();
      if (why) say(why); else location.reload();
      return;
    }
    route();
  });
  route();
  try { await loadZoo(); } catch (err) {  // no key yet, or a revoked one: ask for one
    $("#whoami").textContent = linkError || err.message;
    document.body.dataset.loaded = "needs-key";
    return;
  }
  $("#whoami").textContent = "signed in";
  $("#key-form").querySelector("input").placeholder = "another API key";
  await Promise.all([loadDatasets(), loadSchemas()]);
  buildTabs();
  buildForm();
  $("#spec").oninput = () => { edited = true; };
  $("#spec-reset").onclick = () => { edited = false; syncJson(); };
  $("#compose-form").onsubmit = compose;
  $("#paths-filter").oninput = renderPaths;
  $("#paths-method").onchange = renderPaths;
  setUpPredict();
  await Promise.all([loadJobs(), loadPaths()]);
  route();
  document.body.dataset.loaded = "yes";
}
main().catch((err) => { say("the dashboard could not load: " + err.message); document.body.dataset.loaded = "error"; });
