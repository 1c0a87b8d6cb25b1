// emorl serve's page: sliders -> /v1/chat/completions (streamed) -> /v1/score; the search's points from
// /v1/objectives as a scatter with a marker at the point nearest the current weights. No framework, no CDN.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { info: null, key: sessionStorage.getItem("emorl-key") || "", abort: null, lastScores: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (r.status === 401) { $("key-box").hidden = false; throw new Error("this server needs an API key"); }
  const data = await r.json();
  if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
  return data;
}

function weights() {
  const w = {};
  for (const o of state.info.objectives) w[o] = parseFloat($("w-" + o).value);
  return w;
}

function setWeights(w) {
  for (const o of state.info.objectives) {
    $("w-" + o).value = w[o] || 0;
    $("v-" + o).textContent = Number(w[o] || 0).toFixed(2);
  }
  drawFront();
}

function build(info) {
  state.info = info;
  const objs = info.objectives;
  $("run-info").textContent = `${objs.length} objectives: ${objs.join(", ")}` +
    (Object.keys(info.searched).length ? ` · searched: ${Object.keys(info.searched).join(", ")}` : "") +
    (info.note ? ` · note: ${info.note}` : "");
  const model = $("model");
  model.innerHTML = "";
  for (const m of info.methods) model.add(new Option(`${m.id} — ${m.label}`, m.id));
  model.value = "emorl";
  const sl = $("sliders");
  sl.innerHTML = "";
  for (const o of objs) {
    const d = document.createElement("div");
    d.className = "slider";
    d.innerHTML = `<label for="w-${o}"><span>${o}</span><output id="v-${o}">0.50</output></label>` +
      `<input id="w-${o}" type="range" min="0" max="1" step="0.05" value="0.5">`;
    sl.appendChild(d);
    d.querySelector("input").addEventListener("input", (e) => {
      $("v-" + o).textContent = Number(e.target.value).toFixed(2);
      drawFront();
    });
  }
  const pr = $("presets");
  pr.innerHTML = "";
  const add = (label, fn) => {
    const b = document.createElement("button");
    b.type = "button"; b.textContent = label; b.addEventListener("click", fn); pr.appendChild(b);
  };
  const keys = Object.keys(info.searched).sort((a, b) => (b === "hidden") - (a === "hidden"));
  for (const key of keys) {
    const s = info.searched[key];
    add(`searched (${key})`, () => {
      $("model").value = "emorl"; $("mode").value = s.mode; $("anchor").value = s.anchor; setWeights(s.weights);
    });
  }
  for (const o of objs) {
    add(`${o} alone`, () => { const w = {}; for (const p of objs) w[p] = p === o ? 1 : 0; setWeights(w); });
  }
  const bars = $("scores");
  bars.innerHTML = "";
  for (const o of objs) {
    const d = document.createElement("div");
    d.className = "bar";
    d.innerHTML = `<span>${o}</span><div class="track" role="meter" aria-label="${o} score" aria-valuemin="0" ` +
      `aria-valuemax="1" aria-valuenow="0" id="m-${o}"><div class="fill" id="b-${o}"></div></div>` +
      `<span class="val" id="s-${o}">–</span>`;
    bars.appendChild(d);
  }
  for (const id of ["x-axis", "y-axis"]) {
    const s = $(id);
    s.innerHTML = "";
    for (const o of objs) s.add(new Option(o, o));
    s.addEventListener("change", drawFront);
  }
  $("x-axis").value = objs[0];
  $("y-axis").value = objs[Math.min(1, objs.length - 1)];
  $("temperature").value = info.generation.do_sample ? info.generation.temperature : 0;
  $("max-tokens").value = info.generation.max_tokens;
  $("max-tokens").max = info.max_tokens;
  const first = "hidden" in info.searched ? "hidden" : Object.keys(info.searched)[0];
  if (first) {
    const s = info.searched[first];
    $("mode").value = s.mode; $("anchor").value = s.anchor; setWeights(s.weights);
  } else drawFront();
}

function frontPoints(mode) {
  // RUN/front/front.json (if the front stage ran) in any of {mode: [pts]}, {modes: {mode: {front: [pts]}}}
  const f = state.info.front;
  if (!f) return [];
  const m = (f.modes || f)[mode];
  const pts = Array.isArray(m) ? m : m && (m.front || m.points);
  return Array.isArray(pts) ? pts.filter((p) => p && p.scores) : [];
}

function drawFront() {
  const info = state.info;
  if (!info) return;
  const svg = $("front");
  const mode = $("mode").value, anchor = $("anchor").value;
  const key = Object.keys(info.searched).find((k) => info.searched[k].mode === mode &&
    info.searched[k].anchor === anchor) || (anchor === "none" && mode !== "probs" ? mode + "-convex" : mode);
  const pts = info.points[key] || [];
  const front = frontPoints(key);
  const xo = $("x-axis").value, yo = $("y-axis").value;
  const all = pts.concat(front);
  if (state.lastScores) all.push({ scores: state.lastScores });
  const xs = all.map((p) => p.scores[xo]), ys = all.map((p) => p.scores[yo]);
  const lo = (a) => Math.min(...a, 0), hi = (a) => Math.max(...a, 1e-6);
  const [x0, x1, y0, y1] = [lo(xs), hi(xs), lo(ys), hi(ys)];
  const W = 320, H = 260, P = 34;
  const sx = (v) => P + (v - x0) / (x1 - x0 || 1) * (W - 2 * P);
  const sy = (v) => H - P - (v - y0) / (y1 - y0 || 1) * (H - 2 * P);
  let s = `<line x1="${P}" y1="${H - P}" x2="${W - P / 2}" y2="${H - P}" stroke="#888"/>` +
    `<line x1="${P}" y1="${P / 2}" x2="${P}" y2="${H - P}" stroke="#888"/>` +
    `<text x="${W / 2}" y="${H - 8}" text-anchor="middle">${xo}</text>` +
    `<text x="10" y="${H / 2}" transform="rotate(-90 10 ${H / 2})" text-anchor="middle">${yo}</text>` +
    `<text x="${P}" y="${H - P + 12}">${x0.toFixed(2)}</text><text x="${W - P}" y="${H - P + 12}">${x1.toFixed(2)}</text>` +
    `<text x="2" y="${H - P}">${y0.toFixed(2)}</text><text x="2" y="${P / 2 + 4}">${y1.toFixed(2)}</text>`;
  for (const p of pts) s += `<circle class="pt" cx="${sx(p.scores[xo])}" cy="${sy(p.scores[yo])}" r="3"/>`;
  for (const p of front) s += `<circle class="pt front" cx="${sx(p.scores[xo])}" cy="${sy(p.scores[yo])}" r="3.5"/>`;
  // the search point whose weight direction is nearest the sliders'
  const w = weights(), objs = info.objectives;
  const unit = (v) => { const t = objs.reduce((a, o) => a + (v[o] || 0), 0) || 1; return objs.map((o) => (v[o] || 0) / t); };
  const wu = unit(w);
  let best = null, bd = Infinity;
  for (const p of pts) {
    const pu = unit(p.weights);
    const d = pu.reduce((a, v, i) => a + (v - wu[i]) ** 2, 0);
    if (d < bd) { bd = d; best = p; }
  }
  let desc = `${pts.length} searched points (${key})` + (front.length ? `, ${front.length} on the front` : "");
  if (best) {
    s += `<circle class="cur" cx="${sx(best.scores[xo])}" cy="${sy(best.scores[yo])}" r="8"/>`;
    desc += `; ring: the searched point nearest the current weights (${xo} ${best.scores[xo].toFixed(3)}, ` +
      `${yo} ${best.scores[yo].toFixed(3)})`;
  }
  if (state.lastScores) {
    s += `<rect class="reply" x="${sx(state.lastScores[xo]) - 4}" y="${sy(state.lastScores[yo]) - 4}" width="8" height="8"/>`;
    desc += "; square: the last reply";
  }
  svg.innerHTML = s;
  $("front-desc").textContent = desc + ".";
}

function showScores(sc) {
  state.lastScores = sc;
  for (const o of state.info.objectives) {
    const v = sc ? sc[o] : null;
    $("b-" + o).style.width = v === null ? "0" : `${Math.round(v * 100)}%`;
    $("s-" + o).textContent = v === null ? "–" : v.toFixed(3);
    $("m-" + o).setAttribute("aria-valuenow", v === null ? 0 : v);
  }
  drawFront();
}

// why a reply stopped, in words (OpenAI's finish_reason: stop = EOS or a stop string, length = max_tokens)
function finishText(reason, tokens) {
  const n = tokens === null ? "" : `${tokens} tokens · `;
  if (reason === "stop") return `${n}ended by the model (finish_reason: stop)`;
  if (reason === "length") return `${n}cut at max_tokens (finish_reason: length): raise max tokens for the rest`;
  if (reason === "cancelled") return `${n}cancelled`;
  return n;
}

async function generate() {
  if (state.abort) return;
  const prompt = $("prompt").value.trim();
  if (!prompt) { $("status").textContent = "write a statement first"; return; }
  const model = $("model").value, mode = $("mode").value;
  const body = { model, messages: [{ role: "user", content: prompt }], stream: true,
    stream_options: { include_usage: true },
    max_tokens: parseInt($("max-tokens").value, 10), temperature: parseFloat($("temperature").value),
    seed: parseInt($("seed").value, 10) };
  const m = state.info.methods.find((x) => x.id === model);
  if (m && m.kind === "mix") {
    body.emorl = { weights: weights(), ...(model === "emorl" ? { mode, anchor: $("anchor").value } : {}) };
  }
  $("reply").textContent = ""; $("finish").textContent = ""; showScores(null);
  $("status").textContent = "generating…"; $("status").className = "muted";
  $("generate").disabled = true; $("stop").disabled = false;
  state.abort = new AbortController();
  let text = "", finish = null, tokens = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: state.abort.signal });
    if (!r.ok) { const e = await r.json(); throw new Error(e.error ? e.error.message : r.statusText); }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, i).replace(/^data: /, ""); buf = buf.slice(i + 2);
        if (line === "[DONE]") continue;
        const ev = JSON.parse(line);
        if (ev.error) throw new Error(ev.error.message);
        for (const c of ev.choices || []) {
          if (c.delta && c.delta.content) { text += c.delta.content; $("reply").textContent = text; }
          if (c.finish_reason) finish = c.finish_reason;
        }
        if (ev.usage) tokens = ev.usage.completion_tokens;
      }
    }
    $("finish").textContent = finishText(finish, tokens);
    if (finish === "length") $("finish").className = "warn";
    else $("finish").className = "muted";
    $("status").textContent = "scoring…";
    const sc = await api("/v1/score", { pairs: [{ statement: prompt, reply: text }] });
    showScores(sc.scores[0]);
    $("status").textContent = "done";
  } catch (e) {
    $("status").textContent = e.name === "AbortError" ? "stopped" : "error: " + e.message;
    if (e.name !== "AbortError") $("status").className = "error";
  } finally {
    state.abort = null; $("generate").disabled = false; $("stop").disabled = true;
  }
}

async function load() {
  try { build(await api("/v1/objectives")); $("key-box").hidden = true; }
  catch (e) { $("run-info").textContent = "error: " + e.message; }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => state.abort && state.abort.abort());
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
$("mode").addEventListener("change", drawFront);
$("anchor").addEventListener("change", drawFront);
$("model").addEventListener("change", () => {
  const m = state.info.methods.find((x) => x.id === $("model").value);
  const mix = m && m.kind === "mix";
  $("mode").disabled = $("anchor").disabled = !(m && m.id === "emorl");
  if (mix && m.mode) { $("mode").value = m.mode; $("anchor").value = m.anchor; }
  for (const o of state.info.objectives) $("w-" + o).disabled = !mix;
  drawFront();
});
$("key-save").addEventListener("click", () => {
  state.key = $("api-key").value; sessionStorage.setItem("emorl-key", state.key); load();
});
load();
