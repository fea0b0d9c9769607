// The benchmark's clients (scripts/bench_relay.py starts this with a JSON config file as its last argument):
// one Node process, N connections, STOMP over `ws` with @stomp/stompjs (cfg.mode "stomp"), the same over
// sockjs-client ("sockjs"), bare `ws` ("bare") or raw TCP ("floor"). Commands come as JSON lines on stdin (measure, status, churn, quit), events go out as JSON lines on stdout
// (ready, armed, tick, result, status, churned, failed).
import { createRequire } from 'node:module';
import readline from 'node:readline';
import { readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import net from 'node:net';

// The packages live in tests/node (scripts/test installs them there), not beside this file.
const require = createRequire(new URL('../tests/node/package.json', import.meta.url));
const { Client } = require('@stomp/stompjs');
const WebSocket = require('ws');

const now = () => performance.timeOrigin + performance.now();  // ms since the epoch, sub-ms resolution
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const cfg = JSON.parse(readFileSync(process.argv[process.argv.length - 1], 'utf8'));
const SockJS = cfg.mode === 'sockjs' ? require('sockjs-client') : null;  // only the sockjs mode loads it
const n = cfg.tokens.length;
// cfg.urls (bench_scale.py): client i connects to urls[i % urls.length], spreading the clients over processes
const urlOf = (i) => (cfg.urls ? cfg.urls[i % cfg.urls.length] : cfg.url);
const perClient = new Array(n).fill(0);
const errors = [];
let closed = 0;
let phase = null;
const err = (s) => { if (errors.length < 20) errors.push(String(s)); };

function onMessage(i, text) {
  const t = now();
  if (phase === null) return;
  let m;
  try { m = JSON.parse(text); } catch (e) { phase.bad++; return; }
  phase.total++;
  if (m.type === 'bench') {
    phase.lat.push(Math.round((t - m.t / 1000) * 1000) / 1000);
  } else if (m.type === 'progress') {
    phase.recs.push([m.prompt_id, m.value, t]);
  } else {
    return;
  }
  perClient[i]++;
  phase.count++;
  if (cfg.urls) phase.by[i % cfg.urls.length]++;  // per server (bench_scale.py keeps a window per server)
  if (phase.first === null) phase.first = t;
  phase.last = t;
  if (phase.count >= phase.expect) finish();
}

function finish() {
  if (phase === null) return;
  const p = phase;
  phase = null;
  clearTimeout(p.timer);
  if (p.ticker) clearInterval(p.ticker);
  const cpu = process.cpuUsage(p.cpu0);
  let lo = Infinity, hi = 0;
  for (const c of perClient) { lo = Math.min(lo, c); hi = Math.max(hi, c); }
  out({ event: 'result', count: p.count, total: p.total, bad: p.bad, first: p.first, last: p.last, wsMessages: p.wsMessages,
        lat: p.lat, recs: p.recs, perClientMin: lo, perClientMax: hi, closed, errors,
        cpu: (cpu.user + cpu.system) / 1e6, wall: (now() - p.t0) / 1000 });
}

// "sockjs" (idle mode, --sockjs): the same stompjs client over sockjs-client's websocket transport at the gateway's
// SockJS endpoint (cfg.url is then its http://…/ws), as the original's SockJS frontends connect
function connectStomp(i) {
  return new Promise((resolve, reject) => {
    const c = new Client({
      webSocketFactory: SockJS ? () => new SockJS(urlOf(i), null, { transports: ['websocket'] }) : () => {
        const ws = new WebSocket(urlOf(i), ['v12.stomp', 'v11.stomp', 'v10.stomp'], { perMessageDeflate: false });
        ws.on('message', () => { if (phase) phase.wsMessages++; });  // to see how many frames one message packs
        return ws;
      },
      connectHeaders: { Authorization: 'Bearer ' + cfg.tokens[i], clientId: cfg.clientId },
      reconnectDelay: 0, heartbeatIncoming: 10000, heartbeatOutgoing: 10000, debug: () => {},
    });
    let up = false;
    c.onConnect = () => {
      const receipt = 'sub-' + i;
      c.watchForReceipt(receipt, () => { up = true; resolve(c); });
      c.subscribe('/user/topic/messages', (msg) => onMessage(i, msg.body), { id: 'sub-0', receipt });
    };
    c.onStompError = (f) => { err(`client ${i}: ERROR ${f.headers.message}`); if (!up) reject(new Error(f.headers.message)); };
    c.onWebSocketClose = (ev) => { closed++; if (!up) reject(new Error(`client ${i}: closed ${ev.code}`)); };
    c.onWebSocketError = () => { if (!up) reject(new Error(`client ${i}: socket error`)); };
    c.activate();
  });
}

function connectBare(i) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(urlOf(i) + '?u=' + i, { perMessageDeflate: false });
    let up = false;
    ws.on('message', (data) => {
      const s = data.toString();
      if (!up) { if (s === 'hello') { up = true; resolve(ws); } return; }
      if (phase) phase.wsMessages++;
      onMessage(i, s);
    });
    let beat = null;  // idle mode: a "\n" every cfg.heartbeatMs, as the stompjs clients' heart-beats
    if (cfg.heartbeatMs) ws.on('open', () => { beat = setInterval(() => ws.send('\n'), cfg.heartbeatMs); });
    ws.on('close', (code) => { closed++; if (beat) clearInterval(beat); if (!up) reject(new Error(`client ${i}: closed ${code}`)); });
    ws.on('error', (e) => { err(`client ${i}: ${e.message}`); if (!up) reject(e); });
  });
}

// "floor" (idle mode): a raw TCP connection to the trio floor server, no HTTP and no WebSocket handshake; it sends
// what a stompjs client's heart-beat is on the wire (a masked WebSocket text frame holding "\n") every
// cfg.heartbeatMs and reads whatever comes
function connectFloor(i) {
  return new Promise((resolve, reject) => {
    const url = new URL(urlOf(i));
    const sock = net.connect(Number(url.port), url.hostname);
    sock.setNoDelay(true);
    let beat = null;
    sock.on('connect', () => {
      beat = setInterval(() => {
        const mask = randomBytes(4);
        sock.write(Buffer.from([0x81, 0x81, mask[0], mask[1], mask[2], mask[3], 0x0a ^ mask[0]]));
      }, cfg.heartbeatMs);
      resolve({ close: () => sock.destroy() });
    });
    sock.on('data', () => {});
    sock.on('close', () => { closed++; if (beat) clearInterval(beat); });
    sock.on('error', (e) => { err(`client ${i}: ${e.message}`); reject(e); });
  });
}

const conns = [];
async function connectAll() {
  const connect = { stomp: connectStomp, sockjs: connectStomp, bare: connectBare, floor: connectFloor }[cfg.mode];
  for (let i = 0; i < n; i += cfg.batch) {
    const batch = [];
    for (let j = i; j < Math.min(n, i + cfg.batch); j++) batch.push(connect(j));
    conns.push(...await Promise.all(batch));
  }
}

async function main() {
  const t0 = now();
  await connectAll();
  out({ event: 'ready', seconds: (now() - t0) / 1000, clockSkewMs: Date.now() - now() });
}

// A turnover of the whole population (idle mode, --churn): every client leaves (stompjs: DISCONNECT, then the close
// handshake), then all connect again, in batches as at the start.
async function churn() {
  if (cfg.mode !== 'stomp' && cfg.mode !== 'sockjs') throw new Error('churn is for the stomp clients');
  const t0 = now();
  const before = closed;
  const old = conns.splice(0);
  for (let i = 0; i < old.length; i += cfg.batch) await Promise.all(old.slice(i, i + cfg.batch).map((c) => c.deactivate()));
  const left = now();
  await connectAll();
  out({ event: 'churned', closed: closed - before, leaveSeconds: (left - t0) / 1000, seconds: (now() - t0) / 1000 });
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  const cmd = JSON.parse(line);
  if (cmd.cmd === 'measure') {
    phase = { expect: cmd.expect, count: 0, total: 0, bad: 0, wsMessages: 0, first: null, last: null, lat: [], recs: [],
              t0: now(), cpu0: process.cpuUsage(), timer: setTimeout(finish, cmd.deadlineMs),
              ticker: cmd.tickMs ? setInterval(() => { if (phase) out({ event: 'tick', count: phase.count, by: phase.by }); }, cmd.tickMs) : null,
              by: new Array(cfg.urls ? cfg.urls.length : 1).fill(0) };
    perClient.fill(0);
    out({ event: 'armed' });
  } else if (cmd.cmd === 'churn') {
    churn().catch((e) => { out({ event: 'failed', error: String(e && e.message || e), errors }); process.exit(1); });
  } else if (cmd.cmd === 'status') {
    out({ event: 'status', closed, errors });
  } else if (cmd.cmd === 'quit') {
    for (const c of conns) { try { c.deactivate ? c.deactivate() : c.close(); } catch (e) {} }
    setTimeout(() => process.exit(0), 300);
  }
}).on('close', () => process.exit(0));

main().catch((e) => { out({ event: 'failed', error: String(e && e.message || e), errors }); process.exit(1); });
