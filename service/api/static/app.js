// The zoo dashboard: plain JavaScript over the same HTTP API everyone uses (no build step).
"use strict";
const $ = (sel) => document.querySelector(sel);
const pct = (x) => (typeof x === "number" ? (100 * x).toFixed(2) + "%" : "-");
const kb = (n) => (n / 1000).toFixed(1) + " KB";

// The API key: kept for this browser tab only (sessionStorage), sent as a bearer header.
const KEY = "zoo.apiKey";
const authed = (options = {}) => ({...options, headers: {...(options.headers || {}),
                                                        Authorization: "Bearer " + (sessionStorage.getItem(KEY) || "")}});

async function api(path, options = {}) {
  const r = await fetch(path, authed(options));
  const body = (r.headers.get("content-type") || "").includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error(body.detail || body.error || r.statusText);
  return body;
}

async function items(path) {
  let out = [], cursor = null;
  do {
    const page = await api(path + (cursor ? "?cursor=" + encodeURIComponent(cursor) : ""));
    out = out.concat(page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return out;
}

function row(table, cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c); else td.textContent = c;
    tr.appendChild(td);
  }
  $(table + " tbody").appendChild(tr);
  return tr;
}

let models = [], datasets = [];

async function loadZoo() {
  models = await items("/v1/zoo/models");
  $("#models tbody").replaceChildren();
  for (const m of models) {
    row("#models", [m.id, m.arch, m.num_params.toLocaleString(), m.labels.length,
                    m.taps.map((t) => t.name).join(", "), pct(m.metrics.accuracy)]);
  }
}

async function loadDatasets() {
  datasets = await items("/v1/datasets");
  $("#datasets-table tbody").replaceChildren();
  for (const d of datasets) {
    const img = document.createElement("img");
    blobUrl(`${d.samples}?n=8`).then((u) => { img.src = u; });  // the link the API gives
    img.alt = d.id + " samples";
    img.height = 28;
    row("#datasets-table", [d.id, d.num_samples.toLocaleString(), d.labels.length, img]);
  }
}

function templates() {
  const base = models.length ? models[0].id : "BASE";
  const others = models.map((m) => m.id);
  const dataset = datasets.some((d) => d.id === "digits") ? "digits" : (datasets[0] || {}).id;
  return {
    reprogram: {method: "reprogram", base, task: {dataset, samples_per_label: 20}, train: {epochs: 1, seed: 0}},
    resample: {method: "resample", base, budget: {width: 0.7}},
    clone: {method: "clone", base, task: {dataset, samples_per_label: 20}, train: {epochs: 1, steps: 30}},
    reassemble: {method: "reassemble", models: others, task: {dataset, samples_per_label: 20},
                 train: {epochs: 1, seed: 0}},
  };
}

function fillMethods() {
  const t = templates();
  $("#method").replaceChildren(...Object.keys(t).map((k) => new Option(k, k)));
  $("#spec").value = JSON.stringify(t[$("#method").value], null, 1);
  $("#method").onchange = () => { $("#spec").value = JSON.stringify(templates()[$("#method").value], null, 1); };
}

function drawLoss(losses) {
  const c = $("#loss"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if (losses.length < 1) return;
  const hi = Math.max(...losses), lo = Math.min(...losses), span = hi - lo || 1;
  g.strokeStyle = "#47a"; g.lineWidth = 2; g.beginPath();
  losses.forEach((v, i) => {
    const x = 10 + (c.width - 20) * (losses.length > 1 ? i / (losses.length - 1) : 0);
    const y = 10 + (c.height - 20) * (1 - (v - lo) / span);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
  g.fillStyle = "#555"; g.fillText(`loss ${losses[losses.length - 1].toFixed(4)}`, 12, 14);
}

async function blobUrl(path) {
  const r = await fetch(path, authed());
  if (!r.ok) throw new Error(r.statusText);
  return URL.createObjectURL(await r.blob());
}

// Server-sent events read with fetch (EventSource cannot send the key): each event's data to onEvent.
async function events(path, onEvent) {
  const r = await fetch(path, authed());
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

function follow(jobId) {
  $("#job").hidden = false;
  $("#job-id").textContent = jobId;
  $("#job-result").textContent = "";
  const losses = [];
  events(`/v1/jobs/${encodeURIComponent(jobId)}/events`, async (name, job) => {
    if (name !== "job") return;
    const p = job.progress || {};
    $("#job-state").textContent = job.state;
    $("#job-state").className = "state-" + job.state;
    $("#job-step").textContent = p.step || (p.epoch !== undefined ? "epoch " + p.epoch : "");
    $("#job-progress").value = p.fraction || 0;
    $("#job-percent").textContent = pct(p.fraction || 0);
    if (typeof p.loss === "number") { losses.push(p.loss); drawLoss(losses); }
    if (["succeeded", "failed", "cancelled"].includes(job.state)) {
      $("#job-result").textContent = job.state === "succeeded"
        ? `path ${job.path_id}, accuracy ${pct(job.metrics.accuracy)}` : (job.error || job.state);
      await Promise.all([loadJobs(), loadPaths()]);
      if (job.path_id) $("#predict-path").value = job.path_id;
    }
  });
}

async function compose(e) {
  e.preventDefault();
  let spec;
  try { spec = JSON.parse($("#spec").value); } catch (err) { alert("the spec is not JSON: " + err.message); return; }
  try { follow((await api("/v1/compositions", {method: "POST", headers: {"content-type": "application/json"},
                                                body: JSON.stringify(spec)})).id); }
  catch (err) { $("#job").hidden = false; $("#job-state").textContent = "refused"; $("#job-result").textContent = err.message; }
}

async function loadJobs() {
  $("#jobs-table tbody").replaceChildren();
  for (const j of await items("/v1/jobs")) {
    row("#jobs-table", [j.id, j.method, j.state, pct(j.progress.fraction), j.path_id || "-"]);
  }
}

async function loadPaths() {
  const paths = await items("/v1/paths");
  $("#paths-table tbody").replaceChildren();
  const select = $("#predict-path"), chosen = select.value;
  select.replaceChildren(...paths.map((p) => new Option(`${p.id} (${p.method})`, p.id)));
  if (chosen) select.value = chosen;
  for (const p of paths) {
    const link = document.createElement("a");
    link.href = "#";
    link.textContent = "bundle";
    link.className = "bundle";
    link.onclick = async (e) => {  // fetched with the key, then saved
      e.preventDefault();
      const save = document.createElement("a");
      save.href = await blobUrl(`/v1/paths/${p.id}/bundle`);
      save.download = p.id + ".zoopath";
      save.click();
    };
    row("#paths-table", [p.id, p.method, p.bases.map((b) => b.id).join(", "), pct(p.metrics.accuracy),
                         `${kb(p.bytes)} / ${kb(p.dense_bytes)}`, link]);
  }
}

async function predict(file) {
  const pathId = $("#predict-path").value;
  if (!pathId || !file) return;
  $("#predict-preview").src = URL.createObjectURL(file);
  const form = new FormData();
  form.append("files", file);
  form.append("top_k", "5");
  const bars = $("#predict-bars");
  try {
    const out = await api(`/v1/paths/${pathId}/predict`, {method: "POST", body: form});
    bars.replaceChildren(...out.predictions[0].top_k.map((s) => {
      const div = document.createElement("div");
      div.className = "bar";
      div.innerHTML = `<span class="label"></span><span class="fill"></span><span class="score"></span>`;
      div.querySelector(".label").textContent = s.label;
      div.querySelector(".fill").style.width = Math.max(2, 300 * s.score) + "px";
      div.querySelector(".score").textContent = s.score.toFixed(3);
      return div;
    }));
    bars.dataset.top = out.predictions[0].label;
  } catch (err) { bars.textContent = err.message; }
}

// A sign-in link (zoo serve prints one at start, zoo dashboard opens one): /#token=<one-time token>,
// taken out of the address bar at once and exchanged for an admin key of this tab's own.
// The answer: null, or why the link did not sign in.
async function signInFromLink() {
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  if (!token) return null;
  history.replaceState(null, "", location.pathname + location.search);
  try {
    const out = await api("/v1/keys/exchange", {method: "POST", headers: {"Content-Type": "application/json"},
                                                body: JSON.stringify({token})});
    sessionStorage.setItem(KEY, out.key);
    return null;
  } catch (err) { return "sign-in link: " + err.message; }
}

async function main() {
  $("#key-form").onsubmit = (e) => { e.preventDefault(); sessionStorage.setItem(KEY, $("#api-key").value.trim()); location.reload(); };
  const linkError = await signInFromLink();
  const ready = await fetch("/readyz").then((r) => r.json()).catch(() => ({}));
  $("#ready").textContent = ready.status === "ready" ? `ready: ${ready.bases} bases on ${ready.device}` : "not ready";
  try { await loadZoo(); } catch (err) {  // no key yet, or a revoked one: ask for one
    $("#whoami").textContent = linkError || err.message;
    document.body.dataset.loaded = "needs-key";
    return;
  }
  $("#whoami").textContent = "key accepted";
  await loadDatasets();
  fillMethods();
  await Promise.all([loadJobs(), loadPaths()]);
  $("#compose-form").onsubmit = compose;
  $("#predict-file").onchange = (e) => predict(e.target.files[0]);
  const drop = $("#drop");
  drop.ondragover = (e) => e.preventDefault();
  drop.ondrop = (e) => { e.preventDefault(); predict(e.dataTransfer.files[0]); };
  document.body.dataset.loaded = "yes";
}
main();
