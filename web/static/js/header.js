// The header: connection state, credits, and the ComfyUI backends (with the "no backend is up" banner).

import { $ } from "./dom.js";

const CONN_TEXT = { connecting: "Connecting…", connected: "Connected", reconnecting: "Reconnecting…",
                    error: "Connection refused", "no-token": "Not signed in", "no-library": "Page incomplete" };

export function showConnection(state, detail = "") {
  $("connChip").dataset.state = state;
  $("connText").textContent = CONN_TEXT[state] || state;
  $("connChip").title = detail;
}

let liveBalance = 0; // count of live balance messages: an older HTTP answer never overwrites a newer one

export function showBalance({ balance, frozen, available }, live = false) {
  if (live) liveBalance++;
  const avail = available ?? (balance != null && frozen != null ? balance - frozen : balance);
  $("available").textContent = avail ?? "—";
  $("frozen").textContent = frozen ? `${frozen} reserved` : "";
  $("balanceChip").title = `balance ${balance ?? "?"}, reserved for running tasks ${frozen ?? 0}`;
}
export const balanceTicket = () => liveBalance;

export function showStatus(m) {
  const up = m.backends ? m.backends.up : null;
  const total = m.backends ? m.backends.total : null;
  const chip = $("backendChip");
  chip.dataset.health = up == null ? "unknown" : up === 0 ? "down" : up < total ? "partial" : "up";
  $("backends").textContent = up == null ? "—" : `${up}/${total}`;
  chip.title = `queued ${m.queued ?? "?"} · running ${m.running ?? "?"}`;
  $("noBackend").hidden = up !== 0;
}
