// The STOMP link, on @stomp/stompjs (loaded from /static/vendor/ as the StompJs global): connect with the
// token, subscribe to this session's messages resuming with `last-seq`, and to the broadcasts; stompjs
// reconnects by itself (exponential backoff up to 30 s). Every personal message is deduplicated by `seq`.

import { WS_URL, auth } from "./api.js";
import { renewToken } from "./auth.js";
import { store } from "./dom.js";

const HEARTBEAT_MS = 10000;
const USER_QUEUE = "/user/topic/messages";
const BROADCASTS = "/topic/messages";

let client = null;
let lastSeq = 0; // highest seq seen on USER_QUEUE, kept per tab so a reload resumes
let firstAfterSubscribe = false;
let handlers = null;
let everConnected = false;

const seqKey = () => `cg.seq.${auth.userId}.${auth.clientId}`;

export const stompAvailable = () => Boolean(globalThis.StompJs && globalThis.StompJs.Client);
export const connected = () => Boolean(client && client.connected);

// handlers: {message(body), state(name, detail), resumedFromScratch()}
export function startLink(h) {
  stopLink();
  handlers = h;
  lastSeq = Number(store.get(sessionStorage, seqKey())) || 0;
  everConnected = false;
  const { Client, ReconnectionTimeMode } = globalThis.StompJs;
  const c = new Client({
    brokerURL: WS_URL,
    heartbeatIncoming: HEARTBEAT_MS,
    heartbeatOutgoing: HEARTBEAT_MS,
    reconnectDelay: 1000,
    maxReconnectDelay: 30000,
    reconnectTimeMode: ReconnectionTimeMode.EXPONENTIAL,
    connectionTimeout: 10000,
  });
  c.beforeConnect = async () => {
    if (!(await renewToken())) {
      h.state("no-token", "the token has expired");
      await c.deactivate();
      return;
    }
    const headers = { clientId: auth.clientId };
    if (auth.token) headers.Authorization = "Bearer " + auth.token;
    c.connectHeaders = headers;
    h.state(everConnected ? "reconnecting" : "connecting", "");
  };
  c.onConnect = (frame) => {
    const resume = lastSeq > 0 ? { "last-seq": String(lastSeq) } : {};
    firstAfterSubscribe = true;
    everConnected = true;
    c.subscribe(USER_QUEUE, onPersonal, { id: "sub-0", ...resume });
    c.subscribe(BROADCASTS, (m) => deliver(m.body), { id: "sub-1" });
    h.state("connected", `${frame.headers.server || "STOMP"} as ${frame.headers["user-name"] || auth.userId}`);
  };
  c.onStompError = (frame) => {
    const message = frame.headers.message || frame.body || "ERROR frame";
    h.state("error", message);
    if (auth.demo && /token|expired|auth/i.test(message)) auth.exp = 1; // fetch a fresh demo token next time
  };
  c.onWebSocketClose = (event) => {
    if (client === c && c.active) h.state("reconnecting", `connection lost (code ${event.code})`);
  };
  client = c;
  c.activate();
}

export function stopLink() {
  const c = client;
  client = null;
  if (c) c.deactivate();
}

// Reconnect now instead of waiting for the backoff (the network or the tab came back).
export function reconnectNow() {
  if (client && !client.connected && client.active) {
    const h = handlers;
    startLink(h);
  }
}

export function send(destination, body) {
  if (!connected()) return false;
  client.publish({ destination, body: JSON.stringify(body), headers: { "content-type": "application/json" } });
  return true;
}

function deliver(text) {
  let body;
  try { body = JSON.parse(text); } catch (_) { return; }
  if (body && typeof body === "object") handlers.message(body);
}

function onPersonal(message) {
  const seq = Number.parseInt(message.headers.seq, 10);
  if (Number.isFinite(seq)) {
    const first = firstAfterSubscribe;
    firstAfterSubscribe = false;
    if (seq <= lastSeq && !first) return; // a duplicate
    if (seq <= lastSeq && first) handlers.resumedFromScratch(); // the gateway's numbering started over
    lastSeq = seq;
    store.set(sessionStorage, seqKey(), String(lastSeq));
  }
  deliver(message.body);
}
