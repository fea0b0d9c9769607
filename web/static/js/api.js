// HTTP API: the gateway's base URL, the auth headers, JSON requests with {"error","detail"} errors.

export const params = new URLSearchParams(location.search);
// The gateway is the page's own origin, or ?gateway=http://host:port for one on another origin (CORS).
export const API_BASE = (params.get("gateway") || location.origin).replace(/\/+$/, "");
export const WS_URL = API_BASE.replace(/^http/i, "ws") + "/ws";

export const auth = { token: "", userId: "", clientId: "", demo: false, open: false, exp: 0 };

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail || code);
    Object.assign(this, { status, code, detail });
  }
}

export function authHeaders() {
  if (auth.token) return { Authorization: "Bearer " + auth.token };
  if (auth.open) return { "X-Client-Id": auth.clientId };
  return {};
}

const listeners = { unauthorized: [] };
export const onUnauthorized = (fn) => listeners.unauthorized.push(fn);

// JSON request; any non-2xx answer becomes an ApiError carrying the gateway's code and detail.
export async function api(method, path, body) {
  const headers = { Accept: "application/json", ...authHeaders() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(API_BASE + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, "network_error", "the gateway cannot be reached");
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const err = new ApiError(res.status, (data && data.error) || "http_" + res.status,
                             (data && data.detail) || res.statusText);
    if (res.status === 401) listeners.unauthorized.forEach((fn) => fn(err));
    throw err;
  }
  return data;
}

const STATUS_WORDS = { 400: "Rejected", 401: "Not signed in", 402: "Not enough credits", 403: "Not allowed",
                       404: "Not found", 409: "Already finished", 413: "Too large", 429: "Too many tasks" };

export function describeError(err) {
  const what = STATUS_WORDS[err.status];
  return what ? `${what}: ${err.message}` : err.message;
}
