// One card per task: what it is, where it waits, progress, previews, images, errors, refunds, cancel.

import { auth } from "./api.js";
import { $, el, formatTime } from "./dom.js";
import { resultImage } from "./images.js";
import { isFinished, tasks, whereOf } from "./tasks.js";

const BADGE = { queued: "Waiting", submitted: "Waiting", running: "Running", succeeded: "Done", failed: "Failed",
                cancelled: "Cancelled" };
const REASONS = { validation: "ComfyUI refused the workflow", execution_error: "a node failed", interrupted: "interrupted",
                  backend_lost: "the ComfyUI backend was lost", timeout: "it took too long", internal: "gateway error" };
const cards = new Map(); // taskId -> {card, parts...}
let cancelHandler = () => {};
export const onCancel = (fn) => { cancelHandler = fn; };

export function titleOf(t) {
  const p = t.params || {};
  if (typeof p.prompt === "string" && p.prompt.trim()) return p.prompt.trim();
  return t.template ? `Template ${t.template}` : "Workflow";
}

function details(t) {
  const p = t.params || {};
  const out = [];
  if (p.seed != null) out.push(`seed ${p.seed}`);
  if (p.steps != null) out.push(`${p.steps} steps`);
  if (p.width != null && p.height != null) out.push(`${p.width}×${p.height}`);
  if (t.cost != null) out.push(`${t.cost} credit${t.cost === 1 ? "" : "s"}`);
  out.push(formatTime(t.createdAt));
  return out.join(" · ");
}

function statusLine(t) {
  if (t.cancelling) return "Cancelling…";
  switch (t.state) {
    case "succeeded": return `Finished · ${t.urls.length} image${t.urls.length === 1 ? "" : "s"}`;
    case "failed": return "Failed" + (REASONS[t.reason] ? `: ${REASONS[t.reason]}` : "");
    case "cancelled": return "Cancelled";
    default: break;
  }
  const where = whereOf(t);
  if (where === "running") return t.progress && t.progress.max ? `Running · step ${t.progress.value} of ${t.progress.max}` : "Running · starting…";
  if (where === "comfyui") return t.position != null ? `In ComfyUI's queue · #${t.position}` : "Sent to ComfyUI · waiting for the GPU";
  return t.position != null ? `In the gateway queue · #${t.position}` : "In the gateway queue";
}

function build(t) {
  const c = {
    title: el("h3", { class: "card-title" }),
    details: el("p", { class: "card-details" }),
    origin: el("span", { class: "origin", text: "other tab", title: "Submitted from another tab or device" }),
    badge: el("span", { class: "badge" }),
    status: el("p", { class: "card-status" }),
    fill: el("div", { class: "bar-fill" }),
    pictures: el("div", { class: "pictures" }),
    error: el("p", { class: "card-error" }),
    refund: el("p", { class: "card-refund" }),
    cancel: el("button", { type: "button", class: "button ghost danger cancel", text: "Cancel",
                           onclick: () => cancelHandler(t) }),
    preview: null,
    shown: new Set(),
  };
  c.bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-label": "progress" }, c.fill);
  c.card = el("article", { class: "card", "data-task-id": t.id },
    el("header", { class: "card-head" }, el("div", { class: "card-name" }, c.title, c.details), c.origin, c.badge),
    c.status, c.bar, c.pictures, c.error, c.refund, el("div", { class: "card-actions" }, c.cancel));
  return c;
}

function place(t, c) {
  const list = $("taskList");
  const before = Array.from(list.children).find((n) => n !== c.card && tasks.get(n.dataset.taskId)?.createdAt < t.createdAt);
  if (c.card.parentNode !== list || (before || null) !== c.card.nextSibling) list.insertBefore(c.card, before || null);
  $("emptyHint").hidden = true;
}

function renderPictures(t, c) {
  const showPreview = t.preview && !isFinished(t) && t.urls.length === 0;
  if (showPreview) {
    if (!c.preview) {
      c.preview = el("img", { class: "preview", alt: "live preview" });
      c.pictures.prepend(el("figure", { class: "preview-wrap" }, c.preview, el("figcaption", { text: "live preview" })));
    }
    if (c.preview.getAttribute("src") !== t.preview) c.preview.src = t.preview;
  } else if (c.preview) {
    c.preview.parentNode.remove();
    c.preview = null;
  }
  t.urls.forEach((url, n) => {
    if (c.shown.has(url)) return;
    c.shown.add(url);
    c.pictures.append(resultImage(url, n, titleOf(t)));
  });
}

export function render(t) {
  let c = cards.get(t.id);
  if (!c) { c = build(t); cards.set(t.id, c); }
  const finished = isFinished(t);
  const shown = t.cancelling ? "cancelling" : t.state;
  c.card.dataset.state = t.state;
  c.card.dataset.where = finished ? "" : whereOf(t);
  c.title.textContent = titleOf(t);
  c.title.title = titleOf(t);
  c.details.textContent = details(t);
  c.origin.hidden = !t.clientId || t.clientId === auth.clientId;
  c.badge.className = "badge " + shown;
  c.badge.textContent = t.cancelling ? "Cancelling" : BADGE[t.state] || t.state;
  c.status.textContent = statusLine(t);
  let pct = 0;
  if (t.state === "succeeded") pct = 100;
  else if (t.progress && t.progress.max > 0) pct = Math.min(100, (100 * t.progress.value) / t.progress.max);
  c.fill.style.width = pct + "%";
  c.bar.setAttribute("aria-valuenow", String(Math.round(pct)));
  c.bar.setAttribute("aria-valuemax", "100");
  c.bar.hidden = finished && t.state !== "succeeded";
  c.error.textContent = t.state === "failed" ? (t.error || "The task failed.") + (t.node ? ` (${t.node})` : "") : "";
  c.error.hidden = !c.error.textContent;
  const refunded = (t.state === "failed" || t.state === "cancelled") && t.refunded != null && t.refunded !== false;
  const back = typeof t.refunded === "number" ? t.refunded : t.cost;
  c.refund.textContent = !refunded ? "" : back == null ? "Credits returned" : `${back} credit${back === 1 ? "" : "s"} returned`;
  c.refund.hidden = !refunded;
  c.cancel.hidden = finished;
  c.cancel.disabled = t.cancelling;
  renderPictures(t, c);
  place(t, c);
}

export function clearCards() {
  cards.clear();
  $("taskList").replaceChildren();
  $("emptyHint").hidden = false;
}
