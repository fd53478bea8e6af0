// The dashboard in a real browser against a real headless node: Chromium (Debian's, driven by
// playwright-core) opens the `ui/dist` a real `apiary node run` serves, while `apiary demo` runs a
// local swarm whose trainer sends the node work. Nothing is mocked.
//
// Checks: the token leaves the address bar; the overview shows live numbers that change; joining an
// experiment from its card (plan first) starts hosting (seen through the node's API); the hosted
// experts get traffic; Pause in the UI pauses the node (through the API), Resume resumes it; a setting
// saved in the UI survives a node restart (API, settings file and UI); the log lists the join; no page
// scrolls sideways at 800×600; light and dark screenshots land in $APIARY_E2E_ARTIFACTS
// (default target/e2e).
//
//   node tests/e2e/dashboard.mjs        (run by `cargo xtask test` after `npm --prefix ui run build`)
//
// Environment: APIARY (the apiary binary; default $CARGO_TARGET_DIR/debug/apiary), CHROMIUM (default
// /usr/bin/chromium), APIARY_E2E_ARTIFACTS.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';

import { APIARY, ARTIFACTS, Apiary, apiClient, killAll, log, poll, root, sleep, started } from './lib.mjs';

const { chromium } = createRequire(path.join(root, 'ui/package.json'))('playwright-core');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const UI_DIST = path.join(root, 'ui/dist');
const EXPERIMENT = 'local-demo';

async function main() {
  fs.rmSync(ARTIFACTS, { recursive: true, force: true });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  assert.ok(fs.existsSync(path.join(UI_DIST, 'index.html')), `build the dashboard first (${UI_DIST})`);
  assert.ok(fs.existsSync(APIARY), `no apiary binary at ${APIARY}`);
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'apiary-e2e-'));

  // the swarm: bootstrap, three volunteers, a trainer that publishes `local-demo` and trains for long
  const demo = new Apiary('demo', ['demo', '--steps', '1000000', '--kill-after', '0', '--keep-running']);
  const published = await demo.waitFor('the published event', 180_000, (l) => l.event === 'published');
  const boot = published.bootstrap[0];
  log(`demo published ${published.experiment} (bootstrap ${boot})`);

  // the headless node: loopback only; a 6 s update period so its replicas' declarations win often enough
  // against the demo's own volunteers for the trainer to call them (hivemind's latest-record-wins)
  const data = path.join(tmp, 'node');
  const config = path.join(tmp, 'node.toml');
  fs.writeFileSync(config, [
    'listen_maddrs = ["/ip4/127.0.0.1/tcp/0"]',
    `initial_peers = ["${boot}"]`,
    'update_period = 6.0',
    '',
  ].join('\n'));
  const startNode = async () => {
    const node = new Apiary('node', ['node', 'run', '--config', config, '--data-dir', data, '--resume',
      '--api-bind', '127.0.0.1:0', '--ui-dir', UI_DIST]);
    const api = await node.waitFor('the api line', 60_000, (l) => l.event === 'api');
    await node.waitFor('the ready line', 60_000, (l) => l.event === 'ready');
    const token = fs.readFileSync(path.join(data, 'api-token'), 'utf8').trim();
    return { node, url: api.url, token, call: apiClient(api.url, token) };
  };
  let { node, url, token, call } = await startNode();
  log(`node API at ${url}`);
  await poll('the node to be working', 30_000, async () => ['running', 'throttled'].includes((await call('GET', 'api/status')).state));

  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(m.text()); });
  const byId = (id) => page.getByTestId(id);
  const shot = async (name) => page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`), fullPage: true });

  try {
    // 1. the overview, with the token taken out of the address bar
    await page.goto(`${url}#token=${token}`);
    await byId('state').waitFor({ timeout: 30_000 });
    assert.ok(!page.url().includes(token), `the token stays out of the address bar: ${page.url()}`);
    await poll('the UI to show the node working', 30_000, async () => ['running', 'throttled'].includes((await byId('state').textContent()).trim()));
    assert.ok((await byId('reason').textContent()).trim().length > 0, 'the state comes with its reason');
    const cpu = new Set();
    await poll('the CPU reading to change on the overview', 60_000, async () => {
      const text = (await byId('cpu-percent').textContent()).trim();
      if (text !== 'unknown' && Number.isFinite(Number.parseFloat(text))) cpu.add(text);
      return cpu.size >= 2;
    }, 500);
    log(`overview live: CPU readings ${[...cpu].join(', ')}`);
    await shot('overview');

    // 2. join from the experiment's card: the plan first, then hosting starts
    await poll('the demo experiment listed from the DHT', 90_000, async () =>
      (await call('GET', 'api/experiments')).some((c) => c.id === EXPERIMENT && c.source === 'dht'));
    await byId('nav-experiments').click();
    await byId(`card-${EXPERIMENT}`).waitFor({ timeout: 30_000 });
    await shot('experiments');
    await byId(`join-${EXPERIMENT}`).click();
    await byId('plan-uids').waitFor({ timeout: 60_000 });
    const planned = (await byId('plan-uids').textContent()).match(/ffn_demo\.[0-9.]+/g) ?? [];
    assert.ok(planned.length > 0, 'the plan names the experts before joining');
    await shot('join-plan');
    await byId('join-confirm').click();
    const hosted = await poll('the node to host the experiment', 60_000, async () =>
      (await call('GET', 'api/status')).experiments.find((e) => e.id === EXPERIMENT));
    assert.ok(hosted.uids.length > 0, JSON.stringify(hosted));
    log(`joined from the UI: ${hosted.uids.length} experts`);

    // 3. the hosted experts get the trainer's work, and the overview's numbers follow
    await byId('nav-overview').click();
    const samples = new Set();
    await poll('forward samples served, growing on the overview', 180_000, async () => {
      const n = Number.parseInt((await byId('forward-samples').textContent()).replace(/[^0-9]/g, ''), 10);
      if (n > 0) samples.add(n);
      return samples.size >= 2;
    }, 1000);
    log(`overview forward samples: ${[...samples].join(' → ')}`);
    await shot('overview-hosting');

    // 4. Pause in the UI pauses the node; Resume resumes it
    await byId('pause-button').click();
    await poll('the node paused (API)', 10_000, async () => (await call('GET', 'api/status')).state === 'paused');
    await poll('the UI to show paused', 10_000, async () => (await byId('state').textContent()).trim() === 'paused');
    await byId('resume-button').waitFor({ timeout: 5_000 });
    await shot('paused');
    await byId('resume-button').click();
    await poll('the node working again (API)', 10_000, async () => ['running', 'throttled'].includes((await call('GET', 'api/status')).state));

    // 5. a setting saved in the UI survives a node restart
    await byId('nav-settings').click();
    const idle = byId('setting-idle_threshold_s');
    await idle.waitFor({ timeout: 10_000 });
    await idle.fill('123');
    await byId('settings-save').click();
    await byId('settings-saved').waitFor({ timeout: 10_000 });
    assert.equal((await call('GET', 'api/policy')).idle_threshold_s, 123);
    await shot('settings');
    const stopped = await node.stop();
    assert.equal(stopped.code, 0, `the node exits cleanly on SIGTERM: ${JSON.stringify(stopped)}`);
    assert.match(fs.readFileSync(config, 'utf8'), /idle_threshold_s = 123(\.0)?\b/);
    ({ node, url, token, call } = await startNode());
    assert.equal((await call('GET', 'api/policy')).idle_threshold_s, 123);
    await page.goto(`${url}#token=${token}`);
    await byId('nav-settings').click();
    await poll('the saved setting shown after the restart', 15_000, async () => (await byId('setting-idle_threshold_s').inputValue()) === '123');
    log('setting kept across the restart');

    // 6. the log lists the join (the restart re-joined it from joined.json)
    await byId('nav-log').click();
    await poll('a joined row in the log', 60_000, async () => {
      const rows = await byId('log-row').allTextContents();
      return rows.some((r) => r.includes('joined'));
    });
    await shot('log');

    // 7. 800×600 and dark: nothing scrolls sideways
    await page.setViewportSize({ width: 800, height: 600 });
    await page.emulateMedia({ colorScheme: 'dark' });
    for (const nav of ['overview', 'experiments', 'contributions', 'settings', 'log']) {
      await byId(`nav-${nav}`).click();
      await sleep(300);
      const [scroll, client] = await page.evaluate(() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]);
      assert.ok(scroll <= client + 1, `${nav} scrolls sideways at 800×600: ${scroll} > ${client}`);
      await shot(`dark-800x600-${nav}`);
    }
    // keyboard: the first Tab lands on something focusable with a visible name
    await byId('nav-overview').click();
    await page.keyboard.press('Tab');
    const focused = await page.evaluate(() => document.activeElement?.tagName ?? '');
    assert.ok(['A', 'BUTTON', 'INPUT', 'SELECT'].includes(focused), `Tab focuses a control, not ${focused}`);

    assert.deepEqual(pageErrors, [], 'no errors in the page');
    console.log(JSON.stringify({ event: 'e2e', ok: true, seconds: (Date.now() - started) / 1000, screenshots: ARTIFACTS }));
  } catch (e) {
    await shot('failure').catch(() => {});
    for (const route of ['api/status', 'api/log']) {
      const got = await call('GET', route).catch((err) => String(err));
      fs.writeFileSync(path.join(ARTIFACTS, `failure-${route.replace('/', '-')}.json`), JSON.stringify(got, null, 2));
    }
    if (pageErrors.length) console.error(`page errors: ${pageErrors.join('\n')}`);
    throw e;
  } finally {
    await browser.close();
    await node.stop();
    await demo.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(`e2e: FAILED: ${e.stack ?? e}`);
  killAll();
  process.exit(1);
});
