// The page's task flows in headless Chromium, one scenario per run (driven by test_page.py):
//   flow     submit, progress, previews, the image, the lightbox, then a reload shows it finished
//   failure  a raw workflow with `sim_error`: the error and the refund, also after a reload
//   reload   a reload mid-task resumes (last-seq) and the task finishes on the same card
//   drop     the WebSocket is cut mid-task: the page reconnects by itself and resumes with last-seq
//   queue    four tasks: where each waits, distinct positions, cancel a waiting and a running one
import { availableCredits, card, cardView, connected, formMode, openPage, runScenario, sample, submit, useRawWorkflow,
         waitState } from './browser_lib.mjs';
import { readFileSync } from 'node:fs';

const scenarios = {
  async flow(ctx) {
    const page = await openPage(ctx);
    const credits = await availableCredits(page);
    const mode = await formMode(page);
    await ctx.shot(page, 'form');
    const id = await submit(page);
    const views = await sample(page, id, (v) => v.state === 'succeeded' && v.images.length > 0 && v.images.every((i) => i.width > 0));
    await ctx.shot(page, 'done');
    await card(page, id).locator('a.shot').first().click();
    await page.waitForFunction(() => document.querySelector('#lightbox').open && document.querySelector('#lightboxImg').naturalWidth > 0);
    const lightbox = await page.evaluate(() => ({
      width: document.querySelector('#lightboxImg').naturalWidth,
      download: document.querySelector('#lightboxDownload').getAttribute('download'),
      href: document.querySelector('#lightboxDownload').href,
    }));
    await ctx.shot(page, 'lightbox');
    await page.click('#lightboxClose');
    await page.reload();
    await connected(page);
    await waitState(page, id, ['succeeded']);
    await page.waitForFunction((id) => [...document.querySelectorAll(`.card[data-task-id="${id}"] img.result`)]
      .some((i) => i.naturalWidth > 0), id);
    const reloaded = await cardView(page, id);
    await ctx.shot(page, 'reloaded');
    return { taskId: id, mode, credits, views, lightbox, reloaded, creditsAfter: await availableCredits(page) };
  },

  async failure(ctx) {
    const page = await openPage(ctx);
    const credits = await availableCredits(page);
    await useRawWorkflow(page, JSON.parse(readFileSync(ctx.args.workflow, 'utf8')));
    const id = await submit(page);
    await waitState(page, id, ['failed']);
    await page.waitForFunction((c) => Number(document.querySelector('#available').textContent) === c, credits);
    const failed = await cardView(page, id);
    await ctx.shot(page, 'failed');
    await page.reload();
    await connected(page);
    await waitState(page, id, ['failed']);
    const reloaded = await cardView(page, id);
    return { taskId: id, credits, creditsAfter: await availableCredits(page), failed, reloaded };
  },

  async reload(ctx) {
    const page = await openPage(ctx);
    const id = await submit(page);
    const before = await sample(page, id, (v) => v.progress >= 20 || v.state === 'succeeded');
    await ctx.shot(page, 'before-reload');
    await page.reload();
    await connected(page);
    const after = await sample(page, id, (v) => v.state === 'succeeded' && v.images.some((i) => i.width > 0));
    await ctx.shot(page, 'after-reload');
    return { taskId: id, before, after, cards: await page.$$eval('.card', (cs) => cs.length) };
  },

  async drop(ctx) {
    const context = await ctx.browser.newContext({ viewport: { width: 1280, height: 900 } });
    const sockets = [];
    const subscribes = [];
    // every page WebSocket goes through the test, which can cut it like a network failure would
    await context.routeWebSocket(/\/ws$/, (ws) => {
      const server = ws.connectToServer();
      ws.onMessage((m) => {
        if (typeof m === 'string' && m.startsWith('SUBSCRIBE\n') && m.includes('/user/topic/messages')) subscribes.push(m);
        server.send(m);
      });
      server.onMessage((m) => ws.send(m));
      sockets.push({ ws, server });
    });
    const page = await openPage(ctx, { context });
    const id = await submit(page);
    const before = await sample(page, id, (v) => v.progress >= 20 || v.state === 'succeeded');
    const { ws, server } = sockets[sockets.length - 1];
    await ws.close({ code: 4000, reason: 'network drop (test)' });
    await server.close();
    await page.waitForSelector('#connChip:not([data-state=connected])');
    const conn = await page.getAttribute('#connChip', 'data-state');
    await ctx.shot(page, 'dropped');
    const after = await sample(page, id, (v) => v.state === 'succeeded' && v.images.some((i) => i.width > 0));
    await ctx.shot(page, 'resumed');
    return { taskId: id, before, after, conn, sockets: sockets.length, subscribes };
  },

  async queue(ctx) {
    const page = await openPage(ctx);
    const ids = [];
    for (let i = 0; i < 4; i++) ids.push(await submit(page));
    // wait until the page knows where each waits: one running, one inside ComfyUI, two in the gateway queue
    const timeline = [];
    await page.waitForFunction((ids) => {
      const wheres = ids.map((id) => document.querySelector(`.card[data-task-id="${id}"]`)?.dataset.where).sort();
      return JSON.stringify(wheres) === JSON.stringify(['comfyui', 'gateway', 'gateway', 'running']);
    }, ids, { timeout: 15000 }).catch(async (err) => {
      throw new Error(`${err.message}; cards: ${JSON.stringify(await Promise.all(ids.map((id) => cardView(page, id))))}`);
    });
    const waiting = await Promise.all(ids.map((id) => cardView(page, id)));
    await ctx.shot(page, 'waiting');
    const inGateway = ids.filter((id, i) => waiting[i].where === 'gateway');
    const running = ids[waiting.findIndex((v) => v.where === 'running')];
    await card(page, inGateway[1]).locator('.cancel').click();
    await card(page, running).locator('.cancel').click();
    await waitState(page, inGateway[1], ['cancelled']);
    await waitState(page, running, ['cancelled']);
    // the one left in the gateway queue moves up: its position comes from fresh data
    await page.waitForFunction((id) => /#1$/.test(document.querySelector(`.card[data-task-id="${id}"] .card-status`).textContent)
      || document.querySelector(`.card[data-task-id="${id}"]`).dataset.where !== 'gateway', inGateway[0]);
    const cancelled = { waiting: await cardView(page, inGateway[1]), running: await cardView(page, running) };
    await ctx.shot(page, 'cancelled');
    for (const id of ids) await waitState(page, id, ['succeeded', 'cancelled'], 30000);
    return { ids, waiting, inGateway, running, cancelled, final: await Promise.all(ids.map((id) => cardView(page, id))) };
  },
};

runScenario((ctx) => scenarios[ctx.args.scenario](ctx));
