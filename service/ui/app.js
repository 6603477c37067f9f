// The demo page: plain JS, no framework, no external URLs. Every piece of data is put on the
// page with textContent (never innerHTML), so titles and names cannot inject markup.
"use strict";

const KEY_STORE = "recsys.apiKey"; // sessionStorage: the key lives as long as the tab
const RECENT_STORE = "recsys.recentUsers"; // localStorage: users picked before, newest first
const SAMPLE_USERS = ["alice", "bob", "carol"];
// /model keys with a place of their own in the panel; any other key a newer service adds is
// shown as it comes, in the A/B section.
const MODEL_KEYS = new Set(["path", "manifest", "refused_versions", "last_error", "experiment",
  "variants"]);

const $ = (id) => document.getElementById(id);
const state = { user: null, rec: null, seq: 0 };

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) node.append(child); // strings become text nodes
  return node;
}

// --- HTTP ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(ApiError.describe(status, body));
    this.status = status;
    this.body = body;
  }

  static describe(status, body) {
    const detail = body && body.detail;
    if (status === 401) return "401: this service needs an API key (open \u201cAPI key\u201d)";
    if (Array.isArray(detail)) return `${status}: ${detail.map((d) => d.msg).join("; ")}`;
    return `${status}: ${detail || "request failed"}`;
  }
}

async function call(method, path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers["X-API-Key"] = key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null; // not JSON (e.g. a proxy's error page)
  }
  if (response.status === 401) $("key-box").open = true;
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Relative paths: resolved against the page's own URL, so a path prefix is kept.
const historyPath = (user) => `users/${encodeURIComponent(user)}/history/titles`;

function newEventId() {
  // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "ui-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function setStatus(text, isError = false) {
  const node = $("status");
  node.textContent = text;
  node.classList.toggle("error", isError);
}

// --- users ----------------------------------------------------------------------------------

function recentUsers() {
  try {
    const list = JSON.parse(localStorage.getItem(RECENT_STORE) || "[]");
    return Array.isArray(list) ? list.filter((u) => typeof u === "string") : [];
  } catch (_) {
    return [];
  }
}

function remember(user) {
  const list = [user, ...recentUsers().filter((u) => u !== user)].slice(0, 8);
  localStorage.setItem(RECENT_STORE, JSON.stringify(list));
  renderUserChoices();
}

function renderUserChoices() {
  const users = [...new Set([...recentUsers(), ...SAMPLE_USERS])];
  $("user-list").replaceChildren(...users.map((u) => el("option", { value: u })));
  $("samples").replaceChildren(
    "try:",
    ...users.slice(0, 6).map((u) => el("button", {
      type: "button", class: "sample", text: u, "data-user": u,
      onclick: () => { $("user").value = u; load(); },
    })),
  );
}

// --- loading ------------------------------------------------------------------------------

// `click` (after a click): {id, label, before}: the clicked item and the list it was in, so
// that what changed is highlighted.
async function load(chosen, click = null) {
  const user = chosen || $("user").value.trim(); // ids never start or end with whitespace
  if (!user) {
    setStatus("type a user id", true);
    return;
  }
  const seq = ++state.seq; // a slower, older answer must not overwrite a newer one
  const k = Math.max(1, Math.min(200, parseInt($("k").value, 10) || 20));
  const diversity = Math.max(0, Math.min(1, parseFloat($("diversity").value) || 0));
  const rowCount = Math.max(0, Math.min(10, parseInt($("row-count").value, 10) || 0));
  setStatus(`loading ${user}\u2026`);
  try {
    const [history, rec] = await Promise.all([
      call("GET", historyPath(user)),
      call("POST", "recommend", { user_id: user, k, exclude_seen: $("exclude-seen").checked,
                                  diversity, rows: rowCount }),
    ]);
    if (seq !== state.seq) return;
    state.user = user;
    state.rec = rec;
    renderHistory(history, click);
    renderRecommendations(rec, click);
    remember(user);
    await Promise.all([loadModel(), loadAbReport()]); // a new version; the clicks counted
    const clicked = click ? ` \u2014 recorded a click on \u201c${click.label}\u201d` : "";
    setStatus(`${user}: ${history.items.length} items in the history, ` +
              `${rec.items.length} recommendations${clicked}`);
    document.body.dataset.loaded = String(seq); // a hook for the browser test
  } catch (error) {
    if (seq === state.seq) setStatus(error.message, true);
  }
}

async function loadModel() {
  try {
    renderModel(await call("GET", "model"));
  } catch (error) {
    $("model").replaceChildren(...row("error", error.message));
  }
}

// Per-variant counts (GET /ab/report); a service without the report hides the section.
async function loadAbReport() {
  try {
    renderAbReport(await call("GET", "ab/report"));
    $("ab-report-box").hidden = false;
  } catch (error) {
    $("ab-report-box").hidden = error.status === 404;
    $("ab-report").replaceChildren(...row("error", error.message));
  }
}

async function choose(item) {
  const user = state.user;
  const event = { user_id: user, item_id: item.item_id, event_id: newEventId() };
  // With an A/B test the answer carries a request id; the click is attributed to it.
  if (state.rec && state.rec.request_id) event.request_id = state.rec.request_id;
  setStatus(`recording a click on ${item.item_id}\u2026`);
  try {
    try {
      await call("POST", "events", event);
    } catch (error) {
      // A service whose events do not take request_id (yet): the click still counts.
      if (!(error.status === 422 && event.request_id)) throw error;
      delete event.request_id;
      await call("POST", "events", event);
    }
  } catch (error) {
    setStatus(`the click was not recorded: ${error.message}`, true);
    return;
  }
  await load(user, { id: item.item_id, label: item.title || item.item_id,
                    before: new Set(state.rec.items.map((i) => i.item_id)) });
}

// --- rendering ------------------------------------------------------------------------------

function row(term, value) {
  return [el("dt", { text: term }), el("dd", { text: String(value), "data-term": term })];
}

function rows(target, pairs) {
  $(target).replaceChildren(...pairs.flatMap(([term, value]) => row(term, value)));
}

function renderHistory(history, click) {
  const items = [...history.items].reverse(); // newest first
  $("history").replaceChildren(...items.map((item, i) => el(
    "li", {
      "data-item-id": item.item_id,
      class: click && i === 0 && item.item_id === click.id ? "new" : "",
    },
    el("span", { class: "title", text: item.title || "(untitled)" }),
    el("span", { class: "meta", text: ` ${item.item_id}` }),
  )));
  $("history-note").textContent = items.length
    ? `${items.length} stored items`
    : "No stored history yet: click a recommendation to add one.";
}

function interestLabel(index, summary) {
  if (index === null) return "Popular items (fallback)";
  let label = `Interest ${index + 1}`;
  if (!summary || summary.name === undefined) return label; // a service without names
  if (summary.name) {
    label += `: ${summary.name}`;
    if (typeof summary.confidence === "number") {
      label += ` (${Math.round(summary.confidence * 100)}%)`;
    }
  } else {
    label += " (unnamed)";
  }
  return label;
}

// Fields newer services add (weight, merged_into, dropped) are shown when present.
function interestMeta(s) {
  const parts = [`${s.items} in the list`];
  if (typeof s.weight === "number") parts.push(`weight ${percent(s.weight)}`);
  if (typeof s.merged_into === "number") parts.push(`merged into interest ${s.merged_into + 1}`);
  if (s.dropped) parts.push("dropped: no history item supports it");
  return parts.join(", ");
}

function renderRecommendations(rec, click) {
  const summaries = new Map((rec.interests || []).map((s) => [s.interest, s]));
  $("fallback").hidden = !rec.fallback;
  $("degraded").hidden = !rec.degraded;
  $("answer-meta").textContent = `(${rec.history_source} history, ` +
    `${rec.history_length} items used` +
    (rec.unknown_items ? `, ${rec.unknown_items} unknown` : "") + ")";

  $("interests").replaceChildren(...(rec.interests || []).map((s) => el(
    "li", { "data-interest": String(s.interest), class: s.items ? "" : "empty" },
    el("span", { class: "title", text: interestLabel(s.interest, s) }),
    el("span", { class: "meta", text: ` \u2014 ${interestMeta(s)}` }),
  )));

  // Groups in the order of their best item; items keep their overall rank.
  const groups = new Map();
  rec.items.forEach((item, rank) => {
    const key = item.interest === null || item.interest === undefined ? null : item.interest;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push({ item, rank });
  });
  $("groups").replaceChildren(...[...groups].map(([interest, entries]) => el(
    "section", { class: "group", "data-interest": interest === null ? "fallback" : String(interest) },
    el("h3", { text: interestLabel(interest, summaries.get(interest)) }),
    el("ol", {}, ...entries.map(({ item, rank }) => el("li", {}, itemButton(item, rank, click)))),
  )));
  renderRows(rec.rows || [], click);

  const last = [["model", `${rec.model_name} v${rec.model_version}`]];
  if (rec.variant !== undefined && rec.variant !== null) last.push(["variant", rec.variant]);
  if (rec.request_id) last.push(["request id", rec.request_id]);
  rows("last-answer", last);
}

function itemButton(item, rank, click) {
  return el("button", {
    type: "button", class: click && !click.before.has(item.item_id) ? "item new" : "item",
    "data-item-id": item.item_id, title: `record a click on ${item.item_id}`,
    onclick: () => choose(item),
  },
  el("span", { class: "rank", text: `${rank + 1}.` }),
  el("span", { class: "title", text: item.title || "(untitled)" }),
  // An item nobody has chosen yet (placed by its text; NEW_ITEM_SHARE).
  ...(item.new ? [el("span", { class: "fresh", text: "new", title: "no events yet" })] : []),
  el("span", { class: "meta", text: `${item.item_id} \u00b7 ${item.score.toFixed(3)}` }));
}

// Interest rows: one named explicit interest each, with the history items it stands for.
function renderRows(rowList, click) {
  $("rows-box").hidden = rowList.length === 0;
  $("rows").replaceChildren(...rowList.map((r) => el(
    "section", { class: "row", "data-interest": r.interest },
    el("h3", {},
      el("span", { class: "title", text: r.name }),
      el("span", { class: "meta", text: `${r.source} \u00b7 ${percent(r.confidence)}` })),
    el("p", { class: "because", text: "Because you watched " +
      r.because.map((id, i) => r.because_titles[i] || id).slice(0, 4).join(", ") +
      (r.because.length > 4 ? ` and ${r.because.length - 4} more` : "") }),
    el("ol", {}, ...r.items.map((item, rank) => el("li", {}, itemButton(item, rank, click)))),
  )));
}

function formatValue(value) {
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(4);
  if (value === null) return "\u2014";
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

// Nested objects flattened to "a / b" terms (metrics: {"test": {"recall@20": ...}}).
function flatten(value, prefix = "") {
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    return [[prefix || "value", formatValue(value)]];
  }
  return Object.entries(value).flatMap(([k, v]) => flatten(v, prefix ? `${prefix} / ${k}` : k));
}

function renderModel(info) {
  const m = info.manifest || {};
  $("model").dataset.version = String(m.version);
  const pairs = [
    ["name", m.name], ["version", m.version], ["created", m.created], ["backbone", m.backbone],
    ["interests", m.interests], ["items", m.item_count],
    ["index", m.index ? `${m.index.kind} (recall@50 ${formatValue(m.index.recall_at_50)})` : "?"],
  ];
  if (m.git_commit) pairs.push(["commit", String(m.git_commit).slice(0, 12)]);
  if (info.refused_versions && info.refused_versions.length) {
    pairs.push(["refused versions", info.refused_versions.join(", ")]);
  }
  if (info.last_error) pairs.push(["last error", info.last_error]);
  rows("model", pairs.map(([t, v]) => [t, v === undefined ? "?" : v]));

  const metrics = flatten(m.metrics || {});
  rows("metrics", metrics.length ? metrics : [["metrics", "none in the manifest"]]);

  // The split: which share of users each variant's model serves (GET /model `variants`).
  const ab = [];
  if (info.experiment) ab.push(["experiment", info.experiment]);
  for (const v of Array.isArray(info.variants) ? info.variants : []) {
    const version = v.model_version === null ? "not loaded" : `v${v.model_version}`;
    const pinned = v.pinned_version ? ` (pinned @${v.pinned_version})` : "";
    ab.push([v.variant, `${percent(v.share)} of users \u2192 ${v.model_name} ${version}${pinned}`]);
  }
  for (const [k, v] of Object.entries(info).filter(([k]) => !MODEL_KEYS.has(k))) {
    ab.push(...flatten(v, k));
  }
  rows("ab", ab.length ? ab : [["split", "no A/B test reported by this service"]]);
}

function percent(value) {
  return typeof value === "number" ? `${Math.round(value * 1000) / 10}%` : "?";
}

function renderAbReport(report) {
  if (!report.tracking) {
    rows("ab-report", [["tracking", "off (one variant; AB_VARIANTS unset)"]]);
    return;
  }
  const pairs = (report.variants || []).map((v) => {
    const ci = Array.isArray(v.ctr_ci95) ? ` [${percent(v.ctr_ci95[0])}, ${percent(v.ctr_ci95[1])}]` : "";
    return [v.variant, `${v.clicked_requests}/${v.requests} answers clicked, CTR ` +
                       `${v.ctr === null ? "\u2014" : percent(v.ctr)}${ci}`];
  });
  pairs.push(["unattributed", report.unattributed_events]);
  rows("ab-report", pairs);
}

// --- start ----------------------------------------------------------------------------------

function start() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    loadModel();
    loadAbReport();
    if (state.user) load(state.user);
  });
  $("user-form").addEventListener("submit", (e) => {
    e.preventDefault();
    load();
  });
  renderUserChoices();
  // ?user=ID opens a user directly (a link to share); &diversity=D sets the spread.
  const params = new URLSearchParams(location.search);
  const user = params.get("user");
  if (params.has("diversity")) $("diversity").value = params.get("diversity");
  if (params.has("rows")) $("row-count").value = params.get("rows");
  loadModel();
  loadAbReport();
  if (user) {
    $("user").value = user;
    load();
  }
}

start();
