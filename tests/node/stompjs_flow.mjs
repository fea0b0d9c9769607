// The real @stomp/stompjs client (with the `ws` WebSocket) against the gateway: one task, one forced network
// drop, an automatic stompjs reconnect that resumes with `last-seq`, then a clean DISCONNECT.
//
// Driven by tests/test_stompjs.py. Options (argv, each with an env fallback):
//   --ws URL          STOMP_WS_URL       the gateway's STOMP endpoint, e.g. ws://127.0.0.1:8080/ws
//   --http URL        STOMP_HTTP_URL     the gateway's base URL (to read the task back over HTTP)
//   --token TOKEN     STOMP_TOKEN        a bearer token (sent as CONNECT header `Authorization: Bearer ...`)
//   --client-id ID    STOMP_CLIENT_ID    the clientId (CONNECT header and body of SEND /app/tasks)
//   --workflow PATH   STOMP_WORKFLOW     a ComfyUI API-format workflow (JSON file)
//   --drop MODE       STOMP_DROP         how the socket is dropped after the first `progress`:
//                       "terminate" (default): the underlying `ws` socket is destroyed with ws.terminate()
//                         (TCP torn down, no WebSocket close frame, no STOMP DISCONNECT: a network drop as
//                         the server sees it). `ws` then emits `close` (1006), stompjs's onclose runs
//                         onWebSocketClose and, since the client is still active, schedules the reconnect.
//                       "force": client.forceDisconnect(), stompjs's own way (it calls ws.close(): a clean
//                         WebSocket close handshake, but still no STOMP DISCONNECT) and it reconnects the same way.
//   --timeout-ms N    STOMP_TIMEOUT_MS   overall deadline (default 30000)
//   STOMP_DEBUG=1     stompjs debug lines on stderr
//
// Prints ONE JSON line on stdout and exits 0:
//   {"connects", "messages": [{"seq", "type", "taskId", "conn", "t", "value"?}], "disconnectReceipt",
//    "errors": [], "taskId", "subscribes": [{"conn", "lastSeq", "at"}], "droppedAt", "dropMode",
//    "closes": [{"code", "reason"}], "httpTask": {"status", "state"}}
// (`conn` is the 1-based connection a MESSAGE arrived on, `t`/`at`/`droppedAt` are Date.now() values.)
// On a failure or the timeout it prints the same object with an "error" field and exits 1.
import { readFileSync } from 'node:fs';
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

const USER_DESTINATION = '/user/topic/messages';
const TERMINAL = new Set(['completed', 'execution_error', 'cancelled']);
const SUBPROTOCOLS = ['v12.stomp', 'v11.stomp', 'v10.stomp'];

function options(argv) {
  const env = process.env;
  const opts = {
    ws: env.STOMP_WS_URL,
    http: env.STOMP_HTTP_URL,
    token: env.STOMP_TOKEN,
    clientId: env.STOMP_CLIENT_ID,
    workflow: env.STOMP_WORKFLOW,
    drop: env.STOMP_DROP || 'terminate',
    timeoutMs: Number(env.STOMP_TIMEOUT_MS || 30000),
  };
  const names = { '--ws': 'ws', '--http': 'http', '--token': 'token', '--client-id': 'clientId',
    '--workflow': 'workflow', '--drop': 'drop', '--timeout-ms': 'timeoutMs' };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (key === undefined || i + 1 >= argv.length) throw new Error(`bad argument ${JSON.stringify(argv[i])}`);
    opts[key] = key === 'timeoutMs' ? Number(argv[i + 1]) : argv[i + 1];
  }
  for (const key of ['ws', 'http', 'token', 'clientId', 'workflow']) {
    if (!opts[key]) throw new Error(`missing option ${key} (see the header of ${process.argv[1]})`);
  }
  if (!['terminate', 'force'].includes(opts.drop)) throw new Error(`--drop must be terminate or force, not ${opts.drop}`);
  if (!(opts.timeoutMs > 0)) throw new Error(`--timeout-ms must be > 0, not ${opts.timeoutMs}`);
  return opts;
}

const result = {
  connects: 0,
  messages: [],
  disconnectReceipt: false,
  errors: [],
  taskId: null,
  subscribes: [],
  droppedAt: null,
  dropMode: null,
  closes: [],
  httpTask: null,
};

const MAX_ERRORS = 50;
function fail(text) { // keep the output bounded when something repeats (a refused reconnect every 300 ms, say)
  if (result.errors.length < MAX_ERRORS) result.errors.push(text);
  else result.errorsDropped = (result.errorsDropped || 0) + 1;
}

let finished = false;
function finish(code, error) {
  if (finished) return;
  finished = true;
  if (error !== undefined) result.error = String(error && error.stack ? error.stack : error);
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(code));
}

async function main() {
  const opts = options(process.argv.slice(2));
  result.dropMode = opts.drop;
  const workflow = JSON.parse(readFileSync(opts.workflow, 'utf8'));
  const deadline = setTimeout(() => finish(1, `timed out after ${opts.timeoutMs} ms`), opts.timeoutMs);

  let lastSeq = null; // the highest `seq` header seen so far, over every connection
  let socket = null; // the current underlying `ws` WebSocket
  let submitted = false;
  let dropped = false;
  let resolveDone; // called with nothing when the task reached its end, or with the reason it cannot
  const done = new Promise(resolve => { resolveDone = resolve; });

  const client = new Client({
    webSocketFactory: () => {
      socket = new WebSocket(opts.ws, SUBPROTOCOLS);
      return socket;
    },
    connectHeaders: { clientId: opts.clientId, Authorization: `Bearer ${opts.token}` },
    heartbeatIncoming: 1000,
    heartbeatOutgoing: 1000,
    reconnectDelay: 300,
    debug: process.env.STOMP_DEBUG ? line => process.stderr.write(`stompjs: ${line}\n`) : () => {},
  });

  function onMessage(message) {
    const conn = result.connects;
    const seq = Number(message.headers.seq);
    for (const h of ['destination', 'subscription', 'message-id', 'content-type', 'seq']) {
      if (message.headers[h] === undefined) fail(`MESSAGE without ${h}: ${JSON.stringify(message.headers)}`);
    }
    if (message.headers.destination !== USER_DESTINATION) {
      fail(`MESSAGE for ${message.headers.destination} on the ${USER_DESTINATION} subscription`);
    }
    if (!Number.isInteger(seq)) fail(`MESSAGE with a bad seq header: ${message.headers.seq}`);
    let body;
    try {
      body = JSON.parse(message.body);
    } catch (e) {
      fail(`MESSAGE seq ${seq} with a non-JSON body: ${message.body.slice(0, 200)}`);
      return;
    }
    const entry = { seq, type: body.type, taskId: body.taskId ?? null, conn, t: Date.now() };
    if (body.type === 'progress') entry.value = body.value;
    result.messages.push(entry);
    if (Number.isInteger(seq) && (lastSeq === null || seq > lastSeq)) lastSeq = seq;

    if (body.type === 'rejected') {
      resolveDone(`task rejected: ${body.error}: ${body.detail}`);
    } else if (body.type === 'queued' && result.taskId === null) {
      result.taskId = body.taskId;
    } else if (body.type === 'progress' && body.taskId === result.taskId && !dropped) {
      dropped = true;
      // Leave the callback before tearing the socket down (stompjs is still dispatching this frame).
      setImmediate(() => {
        result.droppedAt = Date.now();
        if (opts.drop === 'terminate') socket.terminate();
        else client.forceDisconnect();
      });
    } else if (TERMINAL.has(body.type) && body.taskId === result.taskId) {
      resolveDone();
    }
  }

  client.onConnect = () => {
    result.connects += 1;
    const headers = {};
    if (lastSeq !== null) headers['last-seq'] = String(lastSeq);
    result.subscribes.push({ conn: result.connects, lastSeq, at: Date.now() });
    client.subscribe(USER_DESTINATION, onMessage, headers);
    if (!submitted) {
      submitted = true;
      client.publish({
        destination: '/app/tasks',
        body: JSON.stringify({ clientId: opts.clientId, workflow, size: 1 }),
      });
    }
  };
  client.onStompError = frame => {
    fail(`ERROR frame: ${frame.headers.message || ''}: ${frame.body}`);
  };
  client.onWebSocketError = evt => {
    fail(`WebSocket error: ${evt && evt.message ? evt.message : evt && evt.type}`);
  };
  client.onWebSocketClose = evt => {
    result.closes.push({ code: evt.code, reason: evt.reason || '' });
  };
  client.onUnhandledMessage = message => {
    fail(`MESSAGE for no subscription: ${JSON.stringify(message.headers)}`);
  };
  // onDisconnect runs only from the receipt watcher stompjs installs when it sends DISCONNECT
  // (StompHandler.dispose: `receipt: close-N`), i.e. only when the server's RECEIPT for it arrived.
  client.onDisconnect = frame => {
    if (frame.command === 'RECEIPT' && String(frame.headers['receipt-id']).startsWith('close-')) {
      result.disconnectReceipt = true;
    } else {
      fail(`onDisconnect with an unexpected frame: ${frame.command} ${JSON.stringify(frame.headers)}`);
    }
  };

  client.activate();
  const failure = await done;
  if (failure !== undefined) {
    clearTimeout(deadline);
    await client.deactivate({ force: true });
    finish(1, failure);
    return;
  }
  // deactivate() sends DISCONNECT with a receipt and resolves once the WebSocket has closed: after the RECEIPT
  // (then stompjs closes the socket itself) or after the server closed without one.
  let stopTimer;
  await Promise.race([
    client.deactivate(),
    new Promise(resolve => { stopTimer = setTimeout(() => { fail('deactivate() did not finish in 5 s'); resolve(); }, 5000); }),
  ]);
  clearTimeout(stopTimer);

  if (result.taskId !== null) {
    try {
      const r = await fetch(`${opts.http.replace(/\/$/, '')}/api/tasks/${encodeURIComponent(result.taskId)}`, {
        headers: { Authorization: `Bearer ${opts.token}` },
      });
      const text = await r.text();
      let state = null;
      try { state = JSON.parse(text).state ?? null; } catch { /* not JSON: reported as null */ }
      result.httpTask = { status: r.status, state };
    } catch (e) {
      fail(`GET /api/tasks/${result.taskId} failed: ${e}`);
    }
  }
  clearTimeout(deadline);
  finish(0);
}

main().catch(e => finish(1, e));
