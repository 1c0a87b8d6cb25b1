// The blind A/B page: one item at a time. Served (/api/*) or offline (window.JUDGE_DATA, answers kept in
// localStorage and downloaded as JSONL). The page never learns which method wrote which reply. No framework, no CDN.
"use strict";
const $ = (id) => document.getElementById(id);
const DATA = window.JUDGE_DATA || null;
const OPTIONS = [["left", "A better"], ["tie", "Tie"], ["right", "B better"]];
const state = { criteria: [], item: null, choices: {} };

async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

const server = {
  info: () => api("/api/session"),
  next: () => api("/api/next"),
  answer: (item, choices) => api("/api/answer", { item, choices }),
};

const offline = {
  key: DATA ? "ab-judge:" + DATA.plan + ":" + DATA.rater : "",
  load() {
    try { return JSON.parse(localStorage.getItem(this.key) || "[]"); } catch (e) { return []; }
  },
  done() { return new Set(this.load().map((r) => r.item)); },
  async info() { return { criteria: DATA.criteria, total: DATA.items.length, answered: this.done().size }; },
  async next() {
    const done = this.done();
    const item = DATA.items.find((it) => !done.has(it.id)) || null;
    return { total: DATA.items.length, answered: done.size, item };
  },
  async answer(item, choices) {
    const rows = this.load();
    const saved = !rows.some((r) => r.item === item);
    if (saved) {
      rows.push({ item, rater: DATA.rater, plan: DATA.plan, choices, time: new Date().toISOString() });
      localStorage.setItem(this.key, JSON.stringify(rows));
    }
    return { saved, ...(await this.next()) };
  },
  jsonl() { return this.load().map((r) => JSON.stringify(r) + "\n").join(""); },
  download() {
    const blob = new Blob([this.jsonl()], { type: "application/x-ndjson" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "judge-answers-" + DATA.rater + ".jsonl";
    document.body.appendChild(a);
    a.click();
    a.remove();
  },
};
const backend = DATA ? offline : server;
window.abJudge = { offline, state };

function status(text) { $("status").textContent = text; }

function buildCriteria() {
  const box = $("criteria");
  box.textContent = "";
  for (const c of state.criteria) {
    const row = document.createElement("div");
    row.className = "criterion";
    row.setAttribute("role", "group");
    row.setAttribute("aria-labelledby", "q-" + c.name);
    const q = document.createElement("p");
    q.className = "question";
    q.id = "q-" + c.name;
    const name = document.createElement("strong");
    name.textContent = c.name + ": ";
    q.append(name, c.question);
    const choices = document.createElement("div");
    choices.className = "choices";
    for (const [value, text] of OPTIONS) {
      const b = document.createElement("button");
      b.type = "button";
      b.id = "c-" + c.name + "-" + value;
      b.textContent = text;
      b.setAttribute("aria-pressed", "false");
      b.addEventListener("click", () => choose(c.name, value));
      choices.appendChild(b);
    }
    row.append(q, choices);
    box.appendChild(row);
  }
}

function choose(name, value) {
  state.choices[name] = value;
  for (const [v] of OPTIONS) $("c-" + name + "-" + v).setAttribute("aria-pressed", String(v === value));
  $("save").disabled = !state.criteria.every((c) => state.choices[c.name]);
}

function show(next) {
  state.item = next.item;
  state.choices = {};
  $("progress").textContent = next.answered + " of " + next.total + " answered";
  if (!next.item) {
    $("item").hidden = true;
    $("done").hidden = false;
    return;
  }
  $("prompt").textContent = next.item.prompt;
  $("reply-left").textContent = next.item.left || "(empty reply)";
  $("reply-right").textContent = next.item.right || "(empty reply)";
  for (const c of state.criteria) for (const [v] of OPTIONS) $("c-" + c.name + "-" + v).setAttribute("aria-pressed", "false");
  $("save").disabled = true;
  $("item").hidden = false;
  $("done").hidden = true;
  status("");
  window.scrollTo(0, 0);
}

async function save() {
  if (!state.item || $("save").disabled) return;
  $("save").disabled = true;
  status("saving\u2026");
  try {
    const next = await backend.answer(state.item.id, { ...state.choices });
    show(next);
    status(next.saved ? "saved" : "already answered (kept the first answer)");
  } catch (e) {
    status("error: " + e.message + " (nothing was saved; try again)");
    $("save").disabled = false;
  }
}

async function start() {
  try {
    const info = await backend.info();
    state.criteria = info.criteria;
    buildCriteria();
    if (DATA) {
      $("offline").hidden = false;
      $("download").addEventListener("click", () => offline.download());
    }
    $("save").addEventListener("click", save);
    show(await backend.next());
  } catch (e) {
    $("progress").textContent = "error: " + e.message;
  }
}

start();
