// Small DOM helpers shared by the page's modules.

export const $ = (id) => document.getElementById(id);

// el("div", {class: "x", text: "hi", onclick: fn}, child, ...)
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

export function toast(text, kind = "info", ms = 8000) {
  const close = el("button", { type: "button", class: "icon", title: "Dismiss", "aria-label": "Dismiss", text: "✕" });
  const box = el("div", { class: "toast " + kind, role: kind === "error" ? "alert" : "status" }, el("span", { text }), close);
  close.addEventListener("click", () => box.remove());
  $("toasts").append(box);
  setTimeout(() => box.remove(), ms);
}

export const store = {
  get(area, key) { try { return area.getItem(key); } catch (_) { return null; } },
  set(area, key, value) { try { area.setItem(key, value); } catch (_) { /* private mode or quota */ } },
  remove(area, key) { try { area.removeItem(key); } catch (_) { /* ignore */ } },
};

export function randomHex(bytes) {
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a); // works on plain http too, unlike crypto.randomUUID
  return Array.from(a, (x) => x.toString(16).padStart(2, "0")).join("");
}

// Millisecond timestamp from epoch seconds, epoch milliseconds or an ISO string.
export function toMillis(v) {
  if (typeof v === "number" && Number.isFinite(v)) return v < 1e11 ? v * 1000 : v;
  if (typeof v === "string" && v) {
    const n = Number(v);
    if (Number.isFinite(n)) return toMillis(n);
    const d = Date.parse(v);
    return Number.isNaN(d) ? null : d;
  }
  return null;
}

export function formatTime(ms) {
  const d = new Date(ms);
  return d.toDateString() === new Date().toDateString()
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : d.toLocaleString();
}

// Run fn at most once per `ms`, trailing: many triggers in a burst make one call after the burst.
export function debounce(fn, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}
