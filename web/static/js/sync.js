// Fresh task data over HTTP: GET /api/tasks?state=all (every tab and device of the user), falling back to
// /api/results plus one GET per unfinished task on a gateway without the list endpoint. Runs are coalesced.

import { api, auth } from "./api.js";
import { $, store } from "./dom.js";
import { applySnapshot, positionsCollide, tasks, unfinished } from "./tasks.js";

const LIST_LIMIT = 50;
let listMissing = false;
let running = null;
let again = false;
let wanted = "active"; // what the next run lists: "all" after load/resync, "active" for position updates
let older = null; // the list's `next` cursor: more (older) tasks exist

const openKey = () => `cg.open.${auth.userId}.${auth.clientId}`;

// Unfinished task ids, kept per tab, so a reload brings their cards back even without the list endpoint.
export function rememberOpen() {
  store.set(sessionStorage, openKey(), JSON.stringify(unfinished().map((t) => t.id).slice(0, LIST_LIMIT)));
}

function rememberedOpen() {
  try { return JSON.parse(store.get(sessionStorage, openKey()) || "[]").filter((id) => typeof id === "string"); }
  catch (_) { return []; }
}

async function fetchOne(taskId) {
  try {
    applySnapshot(await api("GET", `/api/tasks/${encodeURIComponent(taskId)}`));
  } catch (err) {
    if (err.status === 404) tasks.delete(taskId);
  }
}

async function once(which) {
  let listed = null;
  if (!listMissing) {
    try {
      const data = await api("GET", `/api/tasks?state=${which}&limit=${LIST_LIMIT}`);
      listed = data.tasks || [];
      if (which === "all") showOlder(data.next);
    } catch (err) {
      if (err.status === 404 || err.status === 405) listMissing = true;
      else if (err.status !== 401) console.warn("task list:", err.message);
    }
  }
  if (listed === null && listMissing) {
    const data = await api("GET", `/api/results?limit=${LIST_LIMIT}`).catch(() => null);
    listed = (data && data.results) || [];
  }
  if (listed === null) return;
  // a task that was queued without a position in the fresh data has none: stale numbers go
  for (const r of listed) applySnapshot(r);
  const seen = new Set(listed.map((r) => r.taskId));
  const missing = new Set([...unfinished().map((t) => t.id), ...rememberedOpen()].filter((id) => !seen.has(id)));
  await Promise.all([...missing].map(fetchOne));
  if (positionsCollide()) again = true;
}

function showOlder(next) {
  older = next ?? null;
  $("loadOlder").hidden = older == null;
}

// The next page of older tasks (the "Show older" button).
export async function loadOlder() {
  if (older == null) return;
  try {
    const data = await api("GET", `/api/tasks?state=all&limit=${LIST_LIMIT}&before=${encodeURIComponent(older)}`);
    for (const r of data.tasks || []) applySnapshot(r);
    showOlder(data.next);
  } catch (err) {
    console.warn("older tasks:", err.message);
  }
}

// which: "all" (after load, resync, an unknown task) or "active" (positions and states of unfinished tasks).
export function refreshTasks(which = "all") {
  if (which === "all") wanted = "all";
  if (running) { again = true; return running; }
  running = (async () => {
    try {
      for (let run = 0; run < 3; run++) { // a collision in fresh data itself must not loop forever
        again = false;
        const now = wanted;
        wanted = "active";
        await once(now);
        if (!again) break;
      }
    } finally {
      running = null;
    }
  })();
  return running;
}
