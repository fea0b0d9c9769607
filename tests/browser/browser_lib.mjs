// Shared by the browser scenarios: playwright-core (from tests/node/node_modules) driving Debian's Chromium.
// A scenario script prints one JSON line on stdout (its result) and exits 0, or prints {"error"} and exits 1.
import { createRequire } from 'node:module';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const require = createRequire(new URL('../node/package.json', import.meta.url));
export const { chromium } = require('playwright-core');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

export function parseArgs(argv = process.argv.slice(2)) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, '')] = argv[i + 1];
  return out;
}

export async function launch() {
  return chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
}

// Runs `body(ctx)` with a browser, saving a screenshot of every open page on failure; prints the result.
export async function runScenario(body) {
  const args = parseArgs();
  mkdirSync(args.artifacts, { recursive: true });
  const browser = await launch();
  const logs = [];
  const ctx = { args, browser, logs, shot: null };
  ctx.shot = async (page, name) => {
    const path = join(args.artifacts, `${args.scenario}-${name}.png`);
    await page.screenshot({ path, fullPage: true });
    return path;
  };
  ctx.watch = (page, tag) => {
    page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') logs.push(`${tag} ${m.type()}: ${m.text()}`); });
    page.on('pageerror', (e) => logs.push(`${tag} pageerror: ${e.message}`));
    return page;
  };
  let code = 0;
  try {
    const result = await body(ctx);
    console.log(JSON.stringify({ ...result, logs }));
  } catch (err) {
    code = 1;
    for (const c of browser.contexts()) for (const [i, p] of c.pages().entries()) {
      await p.screenshot({ path: join(args.artifacts, `${args.scenario}-FAILED-${i}.png`), fullPage: true }).catch(() => {});
    }
    console.log(JSON.stringify({ error: String(err && err.stack || err), logs }));
  } finally {
    await browser.close();
  }
  process.exit(code);
}

// ---- page helpers

export async function openPage(ctx, { width = 1280, height = 900, context = null, tag = 'page' } = {}) {
  const c = context || await ctx.browser.newContext({ viewport: { width, height } });
  const page = ctx.watch(await c.newPage(), tag);
  await page.goto(ctx.args.url + '/');
  await connected(page);
  await page.waitForSelector('#taskForm[data-mode]'); // the form is built (from the templates, or raw)
  await page.waitForFunction(() => /^\d+$/.test(document.querySelector('#available').textContent)); // credits shown
  return page;
}

export const formMode = (page) => page.getAttribute('#taskForm', 'data-mode');

export const connected = (page) => page.waitForSelector('#connChip[data-state=connected]', { timeout: 15000 });

export const card = (page, id) => page.locator(`.card[data-task-id="${id}"]`);

export const cardIds = (page) => page.$$eval('.card', (cs) => cs.map((c) => c.dataset.taskId));

// Press Generate and return the id of the card that appears for the new task. A template form gets a prompt
// when its prompt box is empty (the raw editor needs nothing).
export async function submit(page, prompt = 'a lighthouse on a cliff at dawn, oil painting') {
  const before = new Set(await cardIds(page));
  const box = page.locator('[data-param=prompt]');
  if (await box.isVisible() && !(await box.inputValue())) await box.fill(prompt);
  await page.click('#submitBtn');
  const handle = await page.waitForFunction((known) => {
    const fresh = [...document.querySelectorAll('.card')].find((c) => !known.includes(c.dataset.taskId));
    return fresh ? fresh.dataset.taskId : null;
  }, [...before], { timeout: 15000 });
  return handle.jsonValue();
}

// The raw workflow editor (behind "Advanced" when the gateway has templates), filled with `workflow`.
export async function useRawWorkflow(page, workflow) {
  if (await page.isHidden('#rawSection')) await page.click('#advancedToggle');
  await page.fill('#workflow', JSON.stringify(workflow, null, 1));
}

export async function waitState(page, id, states, timeout = 20000) {
  const want = Array.isArray(states) ? states : [states];
  await page.waitForFunction(([id, want]) => {
    const c = document.querySelector(`.card[data-task-id="${id}"]`);
    return c && want.includes(c.dataset.state);
  }, [id, want], { timeout });
}

// What a card shows, as the user sees it.
export function cardView(page, id) {
  return page.evaluate((id) => {
    const c = document.querySelector(`.card[data-task-id="${id}"]`);
    if (!c) return null;
    const visible = (sel) => { const e = c.querySelector(sel); return Boolean(e && !e.hidden && e.offsetParent !== null); };
    return {
      state: c.dataset.state, where: c.dataset.where, badge: c.querySelector('.badge').textContent,
      title: c.querySelector('.card-title').textContent, details: c.querySelector('.card-details').textContent,
      status: c.querySelector('.card-status').textContent, progress: Number(c.querySelector('.bar').getAttribute('aria-valuenow')),
      previews: c.querySelectorAll('img.preview').length, error: visible('.card-error') ? c.querySelector('.card-error').textContent : '',
      refund: visible('.card-refund') ? c.querySelector('.card-refund').textContent : '', cancelVisible: visible('.cancel'),
      images: [...c.querySelectorAll('img.result')].map((i) => ({ width: i.naturalWidth, src: i.currentSrc })),
      otherTab: visible('.origin'),
    };
  }, id);
}

// Sample a card every `ms` until `until(view)` holds; returns every view seen.
export async function sample(page, id, until, { ms = 25, timeout = 20000 } = {}) {
  const seen = [];
  const end = Date.now() + timeout;
  for (;;) {
    const v = await cardView(page, id);
    if (v) seen.push(v);
    if (v && until(v)) return seen;
    if (Date.now() > end) throw new Error(`card ${id} never reached the wanted view; last: ${JSON.stringify(v)}`);
    await page.waitForTimeout(ms);
  }
}

export const availableCredits = (page) => page.$eval('#available', (e) => Number(e.textContent));

// Pairs of elements (by selector) whose boxes intersect, and whether the page is wider than the viewport.
export function overlaps(page, selectors) {
  return page.evaluate((selectors) => {
    const boxes = [];
    for (const sel of selectors) {
      document.querySelectorAll(sel).forEach((e, i) => {
        const r = e.getBoundingClientRect();
        if (r.width && r.height) boxes.push({ name: `${sel}[${i}]`, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height });
      });
    }
    const hits = [];
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
      const a = boxes[i], b = boxes[j];
      if (a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h) hits.push([a.name, b.name]);
    }
    return { boxes, hits, scrollWidth: document.documentElement.scrollWidth, viewport: innerWidth };
  }, selectors);
}
