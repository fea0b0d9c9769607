// The real @stomp/stompjs client on one gateway process while its task is submitted over HTTP to another.
//
// Driven by tests/test_scale_out.py. Connects to --ws, subscribes to /user/topic/messages (with a receipt), then
// POSTs --workflow to --http/api/tasks (another process) and follows that task to its end. stompjs's automatic
// reconnect is off: the point is that the client never has to reconnect. Every MESSAGE is printed at once as a
// JSON line {"seq", "type", "taskId", "t"}, so the test can act on them (kill the core at the first progress).
// Options: --ws URL --http URL --token TOKEN --client-id ID --workflow PATH [--timeout-ms N]
// The last line is {"done": true, "connects", "closes", "errors", "taskId", "end"} (exit 0), or the same with an
// "error" field (exit 1).
import { readFileSync } from 'node:fs';
import { Client } from '@stomp/stompjs';
import WebSocket from 'ws';

const TERMINAL = new Set(['completed', 'execution_error', 'cancelled']);
const args = process.argv.slice(2);
const opts = { timeoutMs: 60000 };
const names = { '--ws': 'ws', '--http': 'http', '--token': 'token', '--client-id': 'clientId',
  '--workflow': 'workflow', '--timeout-ms': 'timeoutMs' };
for (let i = 0; i < args.length; i += 2) {
  const key = names[args[i]];
  if (key === undefined || i + 1 >= args.length) throw new Error(`bad argument ${JSON.stringify(args[i])}`);
  opts[key] = key === 'timeoutMs' ? Number(args[i + 1]) : args[i + 1];
}
for (const key of ['ws', 'http', 'token', 'clientId', 'workflow']) {
  if (!opts[key]) throw new Error(`missing option ${key}`);
}

const result = { done: true, connects: 0, closes: [], errors: [], taskId: null, end: null };
let finished = false;
function finish(code, error) {
  if (finished) return;
  finished = true;
  if (error !== undefined) result.error = String(error && error.stack ? error.stack : error);
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(code));
}
setTimeout(() => finish(1, `timed out after ${opts.timeoutMs} ms`), opts.timeoutMs);

const client = new Client({
  webSocketFactory: () => new WebSocket(opts.ws, ['v12.stomp', 'v11.stomp', 'v10.stomp']),
  connectHeaders: { clientId: opts.clientId, Authorization: `Bearer ${opts.token}` },
  heartbeatIncoming: 1000,
  heartbeatOutgoing: 1000,
  reconnectDelay: 0, // no automatic reconnect
  debug: () => {},
});
const early = []; // messages that came before the POST answered (the task id is not known yet)
let ending = false; // our own DISCONNECT closes the socket too
client.onWebSocketClose = evt => {
  result.closes.push({ code: evt.code, reason: evt.reason });
  if (!ending) finish(1, `the WebSocket closed (${evt.code})`);
};
client.onStompError = frame => result.errors.push(`ERROR ${frame.headers.message}`);
client.onConnect = () => {
  result.connects += 1;
  client.watchForReceipt('sub', async () => {
    try {
      const r = await fetch(`${opts.http}/api/tasks`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${opts.token}` },
        body: JSON.stringify({ clientId: opts.clientId, workflow: JSON.parse(readFileSync(opts.workflow, 'utf8')) }),
      });
      const body = await r.json();
      if (r.status !== 202) return finish(1, `POST /api/tasks answered ${r.status}: ${JSON.stringify(body)}`);
      result.taskId = body.taskId;
      for (const m of early) seen(m);
    } catch (e) {
      finish(1, e);
    }
  });
  client.subscribe('/user/topic/messages', message => {
    const body = JSON.parse(message.body);
    const m = { seq: Number(message.headers.seq), type: body.type, taskId: body.taskId ?? null, t: Date.now(),
      refunded: body.refunded, reason: body.reason };
    process.stdout.write(JSON.stringify(m) + '\n');
    if (result.taskId === null) early.push(m);
    else seen(m);
  }, { receipt: 'sub' });
};
function seen(m) {
  if (m.taskId === result.taskId && TERMINAL.has(m.type)) {
    result.end = m;
    ending = true;
    client.deactivate().then(() => finish(0));
  }
}
client.activate();
