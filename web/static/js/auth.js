// Who the page acts as: a demo token (--simulate), a pasted token, or none (--auth open).

import { API_BASE, auth } from "./api.js";
import { $, randomHex, store } from "./dom.js";

// Read a JWT-like token's claims (sub = user, cid = clientId, exp) without checking it: display only.
function claims(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bin = atob(part.padEnd(Math.ceil(part.length / 4) * 4, "="));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0)))) || {};
  } catch (_) {
    return {};
  }
}

// One STOMP session per tab: sessionStorage survives a reload of this tab and is not shared with other tabs.
export function tabClientId() {
  let id = store.get(sessionStorage, "cg.clientId");
  if (!id) {
    id = "web-" + randomHex(6);
    store.set(sessionStorage, "cg.clientId", id);
  }
  return id;
}

export async function fetchDemoToken() {
  try {
    const res = await fetch(`${API_BASE}/api/demo-token?clientId=${encodeURIComponent(tabClientId())}`,
                            { headers: { Accept: "application/json" } });
    if (res.status !== 200) return null;
    const data = await res.json();
    return data && data.token ? { ...data, demo: true } : null;
  } catch (_) {
    return null; // gateway unreachable: the connection will say so
  }
}

export function setAuth({ token = "", userId = "", clientId = "", demo = false, open = false }) {
  const c = token ? claims(token) : {};
  Object.assign(auth, { token, demo, open, exp: Number(c.exp) || 0 });
  auth.clientId = c.cid || clientId || tabClientId();
  auth.userId = userId || c.sub || (open ? auth.clientId : "");
  $("userId").textContent = auth.userId || "?";
  $("userChip").title = demo ? "demo user (simulator mode)" : open ? "no token (--auth open)" : "signed in with a token";
}

export const tokenExpired = () => auth.exp > 0 && auth.exp * 1000 <= Date.now() + 5000;

// A fresh token when the demo one ran out; false when the user must paste a new one.
export async function renewToken() {
  if (!tokenExpired()) return true;
  const fresh = auth.demo ? await fetchDemoToken() : null;
  if (fresh) setAuth(fresh);
  return Boolean(fresh);
}

export function showTokenPanel(message = "") {
  $("tokenPanel").hidden = false;
  $("tokenMsg").textContent = message;
  $("tokenInput").focus();
}

// The token panel: paste a token, forget it, or use --auth open. `begin(credentials)` starts over as them.
export function bindTokenPanel(begin) {
  $("tokenForm").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("tokenInput").value.trim().replace(/^Bearer\s+/i, "");
    if (!token) { $("tokenMsg").textContent = "Paste a token first."; return; }
    $("tokenInput").value = "";
    store.set(localStorage, "cg.token", token);
    store.remove(localStorage, "cg.open");
    $("tokenPanel").hidden = true;
    begin({ token });
  });
  $("forgetToken").addEventListener("click", () => {
    store.remove(localStorage, "cg.token");
    store.remove(localStorage, "cg.open");
    $("tokenMsg").textContent = "The stored token is forgotten.";
  });
  $("openMode").addEventListener("click", () => {
    store.set(localStorage, "cg.open", "1");
    $("tokenPanel").hidden = true;
    begin({ open: true });
  });
  $("changeToken").addEventListener("click", () => showTokenPanel(""));
  $("closeTokenPanel").addEventListener("click", () => { $("tokenPanel").hidden = true; });
}

// The credentials to start with: the demo token in --simulate mode, else a stored token or open mode.
export async function initialCredentials() {
  const demo = await fetchDemoToken();
  if (demo) return demo;
  const saved = store.get(localStorage, "cg.token");
  if (saved) return { token: saved };
  if (store.get(localStorage, "cg.open") === "1") return { open: true };
  return null;
}
