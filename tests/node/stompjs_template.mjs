// The real @stomp/stompjs client (with the `ws` WebSocket) runs workflow templates: it reads GET /api/templates,
// submits one template task with SEND /app/tasks and one with POST /api/tasks, waits for both to finish, then
// reads them back with GET /api/tasks/{id} and GET /api/results.
//
// Driven by tests/test_stompjs_templates.py. Options (argv):
//   --ws URL            the gateway's STOMP endpoint, e.g. ws://127.0.0.1:8080/ws
//   --http URL          the gateway's base URL
//   --token TOKEN       a bearer token (CONNECT header `Authorization: Bearer ...`, and HTTP)
//   --client-id ID      the clientId
//   --template NAME     the template both tasks use
//   --stomp-params JSON its parameters for the STOMP task
//   --http-params JSON  its parameters for the HTTP task
//   --timeout-ms N      overall deadline (default 30000)
//
// Prints ONE JSON line on stdout and exits 0:
//   {"templates": GET /api/templates body, "stomp": {"queued", "terminal"}, "http": {"status", "body", "queued",
//    "terminal"}, "tasks": {taskId: GET /api/tasks/{id} body}, "results": GET /api/results body, "errors": []}
// On a failure or the timeout it prints the same object with an "error" field and exits 1.
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

const USER_DESTINATION = '/user/topic/messages';
const TERMINAL = new Set(['completed', 'execution_error', 'cancelled']);

function options(argv) {
  const names = { '--ws': 'ws', '--http': 'http', '--token': 'token', '--client-id': 'clientId',
    '--template': 'template', '--stomp-params': 'stompParams', '--http-params': 'httpParams',
    '--timeout-ms': 'timeoutMs' };
  const opts = { timeoutMs: 30000 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = names[argv[i]];
    if (key === undefined || i + 1 >= argv.length) throw new Error(`bad argument ${JSON.stringify(argv[i])}`);
    opts[key] = argv[i + 1];
  }
  for (const key of ['ws', 'http', 'token', 'clientId', 'template', 'stompParams', 'httpParams']) {
    if (!opts[key]) throw new Error(`missing option ${key} (see the header of ${process.argv[1]})`);
  }
  opts.stompParams = JSON.parse(opts.stompParams);
  opts.httpParams = JSON.parse(opts.httpParams);
  opts.timeoutMs = Number(opts.timeoutMs);
  opts.http = opts.http.replace(/\/$/, '');
  return opts;
}

const result = { templates: null, stomp: {}, http: {}, tasks: {}, results: null, errors: [] };
let finished = false;
function finish(code, error) {
  if (finished) return;
  finished = true;
  if (error !== undefined) result.error = String(error && error.stack ? error.stack : error);
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(code));
}

async function main() {
  const opts = options(process.argv.slice(2));
  const deadline = setTimeout(() => finish(1, `timed out after ${opts.timeoutMs} ms`), opts.timeoutMs);
  const auth = { Authorization: `Bearer ${opts.token}` };
  const getJson = async path => (await fetch(`${opts.http}${path}`, { headers: auth })).json();

  result.templates = await getJson('/api/templates');
  if (!result.templates.templates.some(t => t.name === opts.template)) {
    throw new Error(`GET /api/templates does not list ${opts.template}`);
  }

  // every message of the session by task; the STOMP task is the first one queued (nothing else is submitted)
  const byTask = new Map();
  const waiters = [];
  const changed = () => { for (const w of waiters.splice(0)) w(); };
  const until = async predicate => { while (!predicate()) await new Promise(resolve => waiters.push(resolve)); };
  let stompTaskId = null;
  let httpTaskId = null;
  let rejected = null;

  const client = new Client({
    webSocketFactory: () => new WebSocket(opts.ws, ['v12.stomp', 'v11.stomp', 'v10.stomp']),
    connectHeaders: { clientId: opts.clientId, ...auth },
    heartbeatIncoming: 1000,
    heartbeatOutgoing: 1000,
    reconnectDelay: 0,
  });
  client.onStompError = frame => result.errors.push(`ERROR frame: ${frame.headers.message}: ${frame.body}`);
  client.onWebSocketError = evt => result.errors.push(`WebSocket error: ${evt && evt.message}`);
  let subscribed = false;
  client.onConnect = () => {
    client.subscribe(USER_DESTINATION, message => {
      const body = JSON.parse(message.body);
      if (body.type === 'rejected') rejected = body;
      if (body.taskId !== undefined) {
        const seen = byTask.get(body.taskId) || {};
        if (body.type === 'queued') seen.queued = body;
        if (TERMINAL.has(body.type)) seen.terminal = body;
        byTask.set(body.taskId, seen);
        if (body.type === 'queued' && stompTaskId === null) stompTaskId = body.taskId;
      }
      changed();
    }, { receipt: 'sub-1' });
    client.watchForReceipt('sub-1', () => { subscribed = true; changed(); });
  };
  client.activate();
  await until(() => subscribed);

  // over STOMP; its `queued` comes before the HTTP task exists
  client.publish({
    destination: '/app/tasks',
    body: JSON.stringify({ clientId: opts.clientId, template: opts.template, params: opts.stompParams }),
  });
  await until(() => stompTaskId !== null || rejected !== null);
  if (rejected) throw new Error(`SEND /app/tasks rejected: ${rejected.error}: ${rejected.detail}`);

  // over HTTP
  const r = await fetch(`${opts.http}/api/tasks`, {
    method: 'POST',
    headers: { ...auth, 'content-type': 'application/json' },
    body: JSON.stringify({ clientId: opts.clientId, template: opts.template, params: opts.httpParams }),
  });
  result.http.status = r.status;
  result.http.body = await r.json();
  if (r.status !== 202) throw new Error(`POST /api/tasks answered ${r.status}: ${JSON.stringify(result.http.body)}`);
  httpTaskId = result.http.body.taskId;

  const finishedTask = id => byTask.get(id)?.terminal !== undefined;
  await until(() => finishedTask(stompTaskId) && finishedTask(httpTaskId));
  Object.assign(result.stomp, byTask.get(stompTaskId));
  Object.assign(result.http, byTask.get(httpTaskId));
  await client.deactivate();
  for (const id of [stompTaskId, httpTaskId]) {
    result.tasks[id] = await getJson(`/api/tasks/${encodeURIComponent(id)}`);
  }
  result.results = await getJson('/api/results');
  clearTimeout(deadline);
  finish(0);
}

main().catch(e => finish(1, e));
