// The task model: one record per task, fed by live messages and by HTTP snapshots, in the HTTP API's
// vocabulary (queued, submitted, running, succeeded, failed, cancelled). Renderers subscribe with onTask.

import { toMillis } from "./dom.js";

export const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const RANK = { queued: 0, submitted: 1, running: 2, succeeded: 3, failed: 3, cancelled: 3 };
const LEGACY = { completed: "succeeded", error: "failed", canceled: "cancelled" };

export const tasks = new Map(); // taskId -> task
const listeners = [];
export const onTask = (fn) => listeners.push(fn);
const changed = (t) => listeners.forEach((fn) => fn(t));

export const isFinished = (t) => FINISHED.has(t.state);

// Where an unfinished task waits: the task's own `where`, else what its state says.
export function whereOf(t) {
  if (t.state === "running") return "running";
  if (t.where === "gateway" || t.where === "comfyui") return t.where;
  return t.state === "submitted" ? "comfyui" : "gateway";
}

// What this browser submitted (a raw workflow's prompt and seed), so its cards can say it after a reload.
const NOTES_KEY = "cg.notes";
const MAX_NOTES = 200;
function notes() {
  try { return JSON.parse(localStorage.getItem(NOTES_KEY) || "{}") || {}; } catch (_) { return {}; }
}
export function rememberParams(taskId, params) {
  const all = notes();
  all[taskId] = params;
  const keys = Object.keys(all);
  for (const k of keys.slice(0, Math.max(0, keys.length - MAX_NOTES))) delete all[k];
  try { localStorage.setItem(NOTES_KEY, JSON.stringify(all)); } catch (_) { /* quota */ }
}

function get(taskId, createdAt) {
  let t = tasks.get(taskId);
  if (!t) {
    t = { id: taskId, state: "queued", where: null, position: null, cost: null, urls: [], error: "", reason: "",
          node: "", refunded: null, cancelling: false, progress: null, preview: null, template: null, params: null,
          clientId: null, createdAt: toMillis(createdAt) || Date.now() };
    t.params = notes()[taskId] || null;
    tasks.set(taskId, t);
  } else if (toMillis(createdAt)) {
    t.createdAt = toMillis(createdAt);
  }
  return t;
}

// Live messages arrive in order: they may move a task anywhere but out of a finished state.
// HTTP snapshots can be older than what the socket already said: they only move it forward.
function setState(t, state, forwardOnly) {
  state = LEGACY[state] || state;
  if (!(state in RANK) || state === t.state || isFinished(t)) return;
  if (forwardOnly && RANK[state] < RANK[t.state]) return;
  t.state = state;
  t.where = null; // said for the old state
  if (state !== "queued" && state !== "submitted") t.position = null;
  if (isFinished(t)) { t.cancelling = false; t.preview = null; }
}

function addUrls(t, urls) {
  for (const u of urls || []) if (typeof u === "string" && !t.urls.includes(u)) t.urls.push(u);
}

function setParams(t, m) {
  if (m.template) t.template = m.template;
  if (m.params && typeof m.params === "object") t.params = m.params;
}

const LIVE = {
  queued(t, m) { setState(t, "queued"); t.position = m.position ?? null; t.where = m.where ?? null; },
  started(t) { setState(t, "running"); },
  progress(t, m) {
    setState(t, "running");
    t.progress = { value: Number(m.value) || 0, max: Number(m.max) || 0 };
  },
  preview(t, m) { if (m.data && !isFinished(t)) t.preview = `data:${m.mime || "image/jpeg"};base64,${m.data}`; },
  imageResult(t, m) { addUrls(t, m.urls); },
  completed(t, m) { addUrls(t, m.urls); setState(t, "succeeded"); },
  execution_error(t, m) {
    t.error = m.error || "";
    t.reason = m.reason || "";
    t.node = m.node_type || (m.node_id != null ? `node ${m.node_id}` : "");
    if (m.refunded != null) t.refunded = m.refunded;
    setState(t, "failed");
  },
  cancelled(t, m) { if (m.refunded != null) t.refunded = m.refunded; setState(t, "cancelled"); },
};

export const isTaskMessage = (m) => m.type in LIVE && typeof m.taskId === "string";

// Apply a live message about a task; returns true when the page did not know the task before.
export function applyMessage(m) {
  const known = tasks.has(m.taskId);
  const t = get(m.taskId);
  LIVE[m.type](t, m);
  if (m.cost != null) t.cost = m.cost;
  setParams(t, m);
  changed(t);
  return !known;
}

// Apply an HTTP view of a task (GET /api/tasks, /api/tasks/{id}, /api/results).
export function applySnapshot(r) {
  if (!r || typeof r.taskId !== "string") return;
  const t = get(r.taskId, r.createdAt);
  setState(t, r.state, true);
  if (!isFinished(t)) {
    t.position = r.position ?? null;
    t.where = r.where ?? null;
  }
  if (r.cost != null) t.cost = r.cost;
  if (r.clientId) t.clientId = r.clientId;
  addUrls(t, r.urls);
  if (r.error) t.error = typeof r.error === "string" ? r.error : r.error.error || JSON.stringify(r.error);
  if (r.reason) t.reason = r.reason;
  if (r.refunded != null) t.refunded = r.refunded;
  else if ((t.state === "failed" || t.state === "cancelled") && t.refunded == null) t.refunded = true;
  setParams(t, r);
  changed(t);
}

// A task the gateway no longer lists as active, seen before as active: fetch it on its own.
export const unfinished = () => Array.from(tasks.values()).filter((t) => !isFinished(t));

export function markCancelling(t, on) {
  t.cancelling = on && !isFinished(t);
  changed(t);
}

export function clearTasks() {
  tasks.clear();
}

// Positions shown on cards must never collide: when two waiting tasks claim the same number (one of them
// from stale data), neither shows a number until fresh data arrives. Returns true when a collision was found.
export function positionsCollide() {
  const seen = new Map();
  let collide = false;
  for (const t of unfinished()) {
    if (t.position == null) continue;
    const key = `${whereOf(t)}:${t.position}`;
    if (seen.has(key)) { collide = true; seen.get(key).push(t); } else seen.set(key, [t]);
  }
  for (const group of seen.values()) {
    if (group.length > 1) for (const t of group) { t.position = null; changed(t); }
  }
  return collide;
}
