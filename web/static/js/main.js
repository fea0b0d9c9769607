// The page: wires the modules together. Tasks come from live messages and from GET /api/tasks (after load,
// on `resync`, on status changes, and when a message names a task this page does not know).

import { api, auth, describeError, onUnauthorized } from "./api.js";
import { bindTokenPanel, initialCredentials, setAuth, showTokenPanel } from "./auth.js";
import { onCancel, render, clearCards } from "./cards.js";
import { $, debounce, toast } from "./dom.js";
import { bindForm, formMessage, loadForm, taskBody } from "./form.js";
import { balanceTicket, showBalance, showConnection, showStatus } from "./header.js";
import { bindLightbox } from "./images.js";
import { connected, reconnectNow, send, startLink, stompAvailable } from "./link.js";
import { loadOlder, refreshTasks, rememberOpen } from "./sync.js";
import { applyMessage, applySnapshot, clearTasks, isTaskMessage, markCancelling, onTask, positionsCollide,
         rememberParams, unfinished } from "./tasks.js";

const refreshSoon = debounce(() => refreshTasks(), 250);
const refreshActiveSoon = debounce(() => refreshTasks("active"), 250);
const waiting = () => unfinished().some((t) => t.state === "queued" || t.state === "submitted");
let pendingSubmit = null; // the summary of the task sent with SEND /app/tasks, until `queued` or `rejected`

async function loadBalance() {
  const ticket = balanceTicket();
  try {
    const data = await api("GET", "/api/balance");
    if (ticket === balanceTicket()) showBalance(data);
  } catch (err) {
    if (err.status !== 401) toast("Credits: " + err.message, "error");
  }
}

function onMessage(m) {
  if (isTaskMessage(m)) {
    if (m.type === "queued" && pendingSubmit) {
      const params = m.params || pendingSubmit;
      rememberParams(m.taskId, params);
      m = { ...m, params };
      settle("Queued.", "ok");
    }
    if (applyMessage(m)) refreshSoon(); // a task this page did not know: another tab's, or missed
    if (m.type === "queued") { positionsCollide(); refreshActiveSoon(); } // the others' positions may have moved
    return;
  }
  switch (m.type) {
    case "balance": showBalance(m, true); refreshSoon(); break; // credits move when any tab submits
    case "status": showStatus(m); if (waiting()) refreshActiveSoon(); break; // the queue moved
    case "rejected": settle(`Not accepted: ${m.detail || m.error}`, "error"); break;
    case "resync": refreshTasks(); loadBalance(); break;
    default: break;
  }
}

function settle(text, kind) {
  pendingSubmit = null;
  $("submitBtn").disabled = false;
  formMessage(text, kind);
}

async function submit() {
  let body, summary;
  try { ({ body, summary } = taskBody(auth.clientId)); } catch (err) { formMessage(err.message, "error"); return; }
  formMessage("Submitting…");
  if (connected() && send("/app/tasks", body)) { // the answer comes as `queued` or `rejected`
    pendingSubmit = summary;
    $("submitBtn").disabled = true;
    setTimeout(() => { if (pendingSubmit === summary) settle("No answer from the gateway yet: check the task list.", "error"); }, 10000);
    return;
  }
  try {
    const data = await api("POST", "/api/tasks", body);
    rememberParams(data.taskId, summary);
    applySnapshot({ ...data, clientId: auth.clientId, params: data.params || summary });
    formMessage("Queued.", "ok");
  } catch (err) {
    formMessage(describeError(err), "error");
  }
}

async function cancel(t) {
  markCancelling(t, true);
  try {
    const data = await api("DELETE", `/api/tasks/${encodeURIComponent(t.id)}`);
    if (data && data.state === "cancelled") applySnapshot({ taskId: t.id, state: "cancelled" });
  } catch (err) {
    markCancelling(t, false);
    toast(err.status === 409 ? "That task has already finished." : "Cancel failed: " + describeError(err), "error");
    refreshTasks();
  }
}

function begin(credentials) {
  setAuth(credentials);
  clearTasks();
  clearCards();
  loadForm(); // after the credentials: the templates (and whether raw workflows are allowed) depend on the user
  startLink({
    message: onMessage,
    state: (state, detail) => {
      showConnection(state, detail);
      if (state === "connected") { refreshTasks(); loadBalance(); }
      if (state === "error" && /token|auth|expired|credential/i.test(detail) && !auth.demo) showTokenPanel(detail);
    },
    resumedFromScratch: () => { refreshTasks(); loadBalance(); },
  });
}

async function init() {
  bindLightbox();
  bindForm(submit);
  bindTokenPanel(begin);
  onCancel(cancel);
  $("loadOlder").addEventListener("click", loadOlder);
  onTask((t) => { render(t); rememberOpen(); });
  onUnauthorized((err) => showTokenPanel("The gateway refused the token: " + err.message));
  window.addEventListener("online", reconnectNow);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) reconnectNow(); });
  if (!stompAvailable()) {
    showConnection("no-library", "web/static/vendor/stomp.umd.min.js is missing");
    $("noLibrary").hidden = false;
    return;
  }
  const credentials = await initialCredentials();
  if (credentials) begin(credentials);
  else { showConnection("no-token"); showTokenPanel(""); }
}

init();
