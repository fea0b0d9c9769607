// The page's other views in headless Chromium, one scenario per run (driven by test_page.py):
//   tabs        a second tab of the same user shows the first tab's task
//   mobile      390 px wide: header, form, list and cards never overlap, nothing wider than the screen
//   nobackend   no ComfyUI backend is up: the page says so, a task waits in the gateway queue
//   templates   the form built from GET /api/templates (served by the test), and what it SENDs
//   older       "Show older" pages through GET /api/tasks with its `next` cursor (served by the test)
//   nolibrary   the vendored stompjs is missing: the page says how to get it
import { cardView, openPage, overlaps, runScenario, sample, submit, useRawWorkflow, waitState } from './browser_lib.mjs';
import { readFileSync } from 'node:fs';

const LAYOUT = ['.topbar', '.compose', '.tasks > h2', '.card', '#noBackend'];

const scenarios = {
  async tabs(ctx) {
    const context = await ctx.browser.newContext({ viewport: { width: 1280, height: 900 } });
    const second = await openPage(ctx, { context, tag: 'tab2' });
    const first = await openPage(ctx, { context, tag: 'tab1' });
    const id = await submit(first);
    const seen = await sample(second, id, (v) => v.state === 'succeeded' && v.images.some((i) => i.width > 0));
    await ctx.shot(second, 'second-tab');
    return { taskId: id, seen, firstTab: await cardView(first, id) };
  },

  async mobile(ctx) {
    const page = await openPage(ctx, { width: 390, height: 844 });
    const ok = await submit(page);
    await sample(page, ok, (v) => v.previews > 0 || v.state === 'succeeded');
    const midRun = await overlaps(page, LAYOUT);
    await ctx.shot(page, 'running');
    await waitState(page, ok, 'succeeded');
    await useRawWorkflow(page, JSON.parse(readFileSync(ctx.args.workflow, 'utf8')));
    const bad = await submit(page);
    await waitState(page, bad, 'failed');
    await page.waitForFunction((id) => [...document.querySelectorAll(`.card[data-task-id="${id}"] img.result`)]
      .some((i) => i.naturalWidth > 0), ok);
    const done = await overlaps(page, LAYOUT);
    const inside = await page.$$eval('.card *', (els) => els.filter((e) => {
      const r = e.getBoundingClientRect(), c = e.closest('.card').getBoundingClientRect();
      return r.width && (r.left < c.left - 0.5 || r.right > c.right + 0.5);
    }).map((e) => e.className || e.tagName));
    await ctx.shot(page, 'done');
    return { midRun, done, outsideTheirCard: inside, views: [await cardView(page, ok), await cardView(page, bad)] };
  },

  async nobackend(ctx) {
    const page = await openPage(ctx, { width: 390, height: 844 });
    await page.waitForSelector('#noBackend', { state: 'visible' });
    const id = await submit(page);
    await page.waitForFunction((id) => /gateway queue/.test(document.querySelector(`.card[data-task-id="${id}"] .card-status`).textContent), id);
    const layout = await overlaps(page, LAYOUT);
    await ctx.shot(page, 'banner');
    return { banner: await page.textContent('#noBackend'), chip: await page.textContent('#backendChip'), card: await cardView(page, id), layout };
  },

  async templates(ctx) {
    const fixture = JSON.parse(readFileSync(ctx.args.templates, 'utf8'));
    const context = await ctx.browser.newContext({ viewport: { width: 390, height: 844 } });
    await context.route('**/api/templates', (route) => route.fulfill({ json: fixture }));
    const page = ctx.watch(await context.newPage(), 'page');
    const sent = [];
    page.on('websocket', (ws) => ws.on('framesent', (f) => {
      const text = typeof f.payload === 'string' ? f.payload : f.payload.toString();
      if (text.startsWith('SEND\n')) sent.push(text);
    }));
    await page.goto(ctx.args.url + '/');
    await page.waitForSelector('#connChip[data-state=connected]');
    await page.waitForSelector('#taskForm[data-mode=template]');
    const fields = await page.$$eval('[data-param]', (els) => els.map((e) => ({
      name: e.dataset.param, tag: e.tagName.toLowerCase(), type: e.type, min: e.min, max: e.max, value: e.type === 'checkbox' ? e.checked : e.value,
      options: e.tagName === 'SELECT' ? [...e.options].map((o) => o.value) : undefined, placeholder: e.placeholder })));
    const toggle = { visible: await page.isVisible('#advancedToggle'), rawHidden: await page.isHidden('#rawSection') };
    const costs = [await page.textContent('#templateCost')];
    await page.fill('[data-param=steps]', '41');
    costs.push(await page.textContent('#templateCost'));
    await page.fill('[data-param=prompt]', 'a red fox in the snow');
    await page.fill('[data-param=steps]', '7');
    await page.selectOption('[data-param=sampler]', 'dpmpp_2m');
    await page.check('[data-param=hires]');
    await ctx.shot(page, 'form');
    await page.click('#submitBtn');
    await page.waitForFunction(() => /Queued|Not accepted/.test(document.querySelector('#formMsg').textContent));
    const frame = sent.find((f) => f.includes('destination:/app/tasks'));
    const body = frame ? JSON.parse(frame.slice(frame.indexOf('\n\n') + 2).replace(/\0$/, '')) : null;
    const answer = await page.textContent('#formMsg');
    // a gateway that allows no raw workflows: no "Advanced" toggle
    await context.unroute('**/api/templates');
    await context.route('**/api/templates', (route) => route.fulfill({ json: { ...fixture, rawWorkflows: false } }));
    await page.reload();
    await page.waitForSelector('[data-param=prompt]');
    const noRaw = { visible: await page.isVisible('#advancedToggle'), rawHidden: await page.isHidden('#rawSection') };
    return { fields, toggle, body, answer, noRaw, costs };
  },

  async older(ctx) {
    const context = await ctx.browser.newContext({ viewport: { width: 1280, height: 900 } });
    const task = (n, day) => ({ taskId: `t-old-${n}`, state: n === 3 ? 'failed' : 'succeeded', cost: 1, urls: [],
      createdAt: `2026-11-${day}T10:00:00Z`, updatedAt: `2026-11-${day}T10:00:05Z`, clientId: 'elsewhere',
      params: { prompt: `old picture ${n}` }, error: n === 3 ? 'out of memory' : undefined });
    const asked = [];
    await context.route((url) => url.pathname === '/api/tasks', (route) => {
      const q = new URL(route.request().url()).searchParams;
      asked.push(Object.fromEntries(q));
      if (q.get('before') === 'cursor-1') return route.fulfill({ json: { tasks: [task(3, 10)] } });
      return route.fulfill({ json: q.get('state') === 'all' ? { tasks: [task(1, 20), task(2, 19)], next: 'cursor-1' } : { tasks: [] } });
    });
    const page = await openPage(ctx, { context });
    await page.waitForSelector('#loadOlder', { state: 'visible' });
    const before = await page.$$eval('.card', (cs) => cs.map((c) => c.dataset.taskId));
    await page.click('#loadOlder');
    await page.waitForSelector('.card[data-task-id="t-old-3"]');
    const after = await page.$$eval('.card', (cs) => cs.map((c) => c.dataset.taskId));
    await ctx.shot(page, 'list');
    return { before, after, buttonHidden: await page.isHidden('#loadOlder'), asked, failed: await cardView(page, 't-old-3') };
  },

  async nolibrary(ctx) {
    const context = await ctx.browser.newContext({ viewport: { width: 1280, height: 900 } });
    await context.route('**/static/vendor/stomp.umd.min.js', (route) => route.fulfill({ status: 404, body: 'missing' }));
    const page = ctx.watch(await context.newPage(), 'page');
    await page.goto(ctx.args.url + '/');
    await page.waitForSelector('#noLibrary', { state: 'visible' });
    await ctx.shot(page, 'banner');
    return { banner: await page.textContent('#noLibrary'), conn: await page.getAttribute('#connChip', 'data-state') };
  },
};

runScenario((ctx) => scenarios[ctx.args.scenario](ctx));
