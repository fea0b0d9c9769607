// Drives tests/browser/original_frontend.html in headless Chromium (through browser_lib.mjs): serves the page
// and the client libraries from its own HTTP server on 127.0.0.1 (another origin than the gateway), waits until
// the page's STOMP client is connected and its SUBSCRIBE has left the browser, submits a good and a failing task
// from the page (a cross-origin fetch with the token), and waits until the page shows progress, the images
// (loaded through <img src>) and the error. Prints one JSON line with what the page showed.
//
// usage: node original_frontend.mjs --scenario NAME --url GATEWAY_URL --artifacts DIR --token TOKEN --lib LIB
//        --transport TRANSPORT --good GOOD_WORKFLOW.json --bad BAD_WORKFLOW.json
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runScenario } from './browser_lib.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const TIMEOUT = 30_000; // ms for each wait in the page
const modules = path.join(here, '..', 'node', 'node_modules');
const FILES = {
  '/original_frontend.html': [path.join(here, 'original_frontend.html'), 'text/html'],
  '/lib/sockjs.min.js': [path.join(modules, 'sockjs-client/dist/sockjs.min.js'), 'text/javascript'],
  '/lib/stomp.js': [path.join(modules, 'stompjs/lib/stomp.js'), 'text/javascript'],
  '/lib/stomp.umd.min.js': [path.join(modules, '@stomp/stompjs/bundles/stomp.umd.min.js'), 'text/javascript'],
};

runScenario(async (ctx) => {
  const { url: gateway, token, lib, transport, good: goodPath, bad: badPath } = ctx.args;
  const out = { lib, transport, console: [], errors: [], requests: {} };
  const server = http.createServer((req, res) => {
    const file = FILES[new URL(req.url, 'http://x').pathname];
    if (!file) { res.writeHead(404); res.end(); return; }
    res.writeHead(200, { 'content-type': file[1] });
    res.end(fs.readFileSync(file[0]));
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const pageOrigin = `http://127.0.0.1:${server.address().port}`;

  try {
    const page = ctx.watch(await ctx.browser.newPage(), 'page');
    page.on('console', (m) => out.console.push(m.text().slice(0, 300)));
    page.on('pageerror', (e) => out.errors.push(String(e)));
    // the SUBSCRIBE has reached the gateway when the request (or WebSocket frame) carrying it went out
    let subscribed;
    const subscribeSent = new Promise((resolve) => { subscribed = resolve; });
    page.on('request', (req) => {  // SockJS requests per kind (xhr, xhr_send, xhr_streaming, info)
      const m = req.url().match(/\/ws\/(?:[^/]+\/[^/]+\/)?([a-z_]+)(?:\?|$)/);
      if (m) out.requests[m[1]] = (out.requests[m[1]] || 0) + 1;
    });
    page.on('requestfinished', (req) => { if ((req.postData() || '').includes('SUBSCRIBE')) subscribed(); });
    page.on('websocket', (ws) => ws.on('framesent', (f) => { if (String(f.payload).includes('SUBSCRIBE')) subscribed(); }));

    const q = new URLSearchParams({ gateway, token, lib, transport });
    await page.goto(`${pageOrigin}/original_frontend.html?${q}`);
    await page.waitForFunction(() => window.probe().connected, null, { timeout: TIMEOUT });
    await Promise.race([subscribeSent, new Promise((_, no) => setTimeout(() => no(new Error('no SUBSCRIBE seen')), TIMEOUT))]);
    out.transportUsed = (await page.evaluate(() => window.probe())).transport;

    const submit = (workflow) => page.evaluate(async ([gw, tok, wf]) => {
      const r = await fetch(gw + '/api/tasks', {
        method: 'POST',
        headers: { Authorization: 'Bearer ' + tok, 'content-type': 'application/json' },
        body: JSON.stringify({ clientId: 'user-123', workflow: wf }),
      });
      return { status: r.status, body: await r.json() };
    }, [gateway, token, workflow]);
    out.good = await submit(JSON.parse(fs.readFileSync(goodPath, 'utf8')));
    out.bad = await submit(JSON.parse(fs.readFileSync(badPath, 'utf8')));

    await page.waitForFunction(() => {
      const imgs = [...document.querySelectorAll('#images img')];
      return imgs.length > 0 && imgs.every((i) => i.complete) && document.querySelector('#errors p');
    }, null, { timeout: TIMEOUT });
    Object.assign(out, await page.evaluate(() => ({
      progress: window.progressSeen,
      images: [...document.querySelectorAll('#images img')].map((i) => ({ src: i.src, naturalWidth: i.naturalWidth })),
      shownErrors: [...document.querySelectorAll('#errors p')].map((p) => p.textContent),
    })));
    await ctx.shot(page, 'shown');
  } finally {
    server.close();
  }
  out.console = out.console.slice(-40);
  return out;
});
