// The desktop app, for real: the `apiary-desktop` binary (the dashboard embedded), driven through
// tauri-driver and WebKitWebDriver under Xvfb and a private D-Bus session, in a fresh home folder,
// beside a real `apiary demo` swarm whose catalog lists `local-demo`. Nothing is mocked.
//
// Checks: a first run starts paused and opens the wizard; the wizard's three steps complete (the
// hardware check, joining `local-demo` with its plan shown, a mode and autostart), after which the node
// works and hosts the experiment (seen through the app's local HTTP API), the mode and the autostart entry
// are saved; the overview renders; a tray-menu action (through the app's `tray_action` command, as Linux
// trays take no synthetic clicks) pauses the node; a second launch hands over to the first instance and
// exits; the dashboard's first paint is logged; Quit from the tray leaves the experiment and exits.
// Screenshots land in $APIARY_E2E_ARTIFACTS/desktop.
//
//   xvfb-run -a -s '-screen 0 1280x900x24' dbus-run-session -- node tests/e2e/desktop.mjs
//                                                               (run by `cargo xtask test`)
//
// Environment: APIARY_DESKTOP (default $CARGO_TARGET_DIR/debug/apiary-desktop, built with the
// `custom-protocol` feature), APIARY (for the demo swarm), TAURI_DRIVER (default `tauri-driver` on the
// PATH), WEBKIT_DRIVER (default /usr/bin/WebKitWebDriver).

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

import { ARTIFACTS as ARTIFACTS_ROOT, Apiary, apiClient, killAll, log, poll, running, sleep, started, targetDir } from './lib.mjs';

const DESKTOP = process.env.APIARY_DESKTOP ?? path.join(targetDir, 'debug/apiary-desktop');
const TAURI_DRIVER = process.env.TAURI_DRIVER ?? 'tauri-driver';
const WEBKIT_DRIVER = process.env.WEBKIT_DRIVER ?? '/usr/bin/WebKitWebDriver';
const ARTIFACTS = path.join(ARTIFACTS_ROOT, 'desktop');
const EXPERIMENT = 'local-demo';

/** A free loopback port (listen on 0, close). */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** A W3C WebDriver session over plain HTTP (tauri-driver speaks the protocol; no client library). */
class WebDriver {
  constructor(base) {
    this.base = base;
    this.session = null;
  }

  async cmd(method, route, body) {
    const url = this.session ? `${this.base}/session/${this.session}${route}` : `${this.base}${route}`;
    const response = await fetch(url, {
      method,
      // a hung command fails the test instead of stalling it
      signal: AbortSignal.timeout(60_000),
      headers: body ? { 'Content-Type': 'application/json' } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
    const json = await response.json();
    if (!response.ok || json.value?.error) {
      throw new Error(`WebDriver ${method} ${route}: ${response.status} ${JSON.stringify(json.value ?? json).slice(0, 500)}`);
    }
    return json.value;
  }

  async start(application, args) {
    const value = await this.cmd('POST', '/session', {
      capabilities: { alwaysMatch: { 'tauri:options': { application, args } } },
    });
    this.session = value.sessionId;
  }

  async end() {
    if (!this.session) return;
    await this.cmd('DELETE', '').catch(() => {});
    this.session = null;
  }

  /** The element with `data-testid`, waited for up to `ms`. */
  async byId(id, ms = 15_000) {
    const found = await poll(`[data-testid="${id}"]`, ms, async () => {
      const els = await this.cmd('POST', '/elements', { using: 'css selector', value: `[data-testid="${id}"]` });
      return els.length ? els[0] : undefined;
    });
    return Object.values(found)[0];
  }

  async click(id, ms) {
    const el = await this.byId(id, ms);
    await this.cmd('POST', `/element/${el}/click`, {});
  }

  async text(id, ms) {
    const el = await this.byId(id, ms);
    return (await this.cmd('GET', `/element/${el}/text`)).trim();
  }

  async selected(id) {
    const el = await this.byId(id);
    return this.cmd('GET', `/element/${el}/selected`);
  }

  /** Runs `body` (an async function's body, its arguments in `args`) in the page; returns its value. */
  async run(body, args = []) {
    return this.cmd('POST', '/execute/async', {
      script: `const done = arguments[arguments.length - 1];
        (async (...args) => { ${body} })(...Array.from(arguments).slice(0, -1))
          .then((v) => done({ ok: v ?? null }), (e) => done({ err: String(e?.message ?? JSON.stringify(e)) }));`,
      args,
    }).then((r) => {
      if (r && r.err !== undefined) throw new Error(`in the page: ${r.err}`);
      return r?.ok;
    });
  }

  /** A Tauri command, invoked the way the dashboard invokes it. */
  invoke(command, args = {}) {
    return this.run('return window.__TAURI_INTERNALS__.invoke(args[0], args[1]);', [command, args]);
  }

  /**
   * The X screen as the user would see it (ImageMagick's `import`). WebKitWebDriver's own screenshot
   * command never answers under Xvfb (WebKitGTK 2.50 here; tried with compositing and DMA-BUF off).
   */
  async screenshot(name) {
    execFileSync('import', ['-window', 'root', path.join(ARTIFACTS, `${name}.png`)], { timeout: 20_000 });
  }
}

/** A child process that is not an `apiary` one, tracked so it is killed with the rest. */
function child(name, cmd, args, env) {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
  const entry = { child: proc, output: '' };
  running.add(entry);
  const out = fs.createWriteStream(path.join(ARTIFACTS, `${name}.log`));
  for (const stream of [proc.stdout, proc.stderr]) {
    stream.on('data', (d) => {
      entry.output += d;
      out.write(d);
    });
  }
  entry.exited = new Promise((resolve) => proc.on('exit', (code, signal) => {
    running.delete(entry);
    resolve({ code, signal });
  }));
  entry.stop = async () => {
    if (!running.has(entry)) return entry.exited;
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 20_000);
    const r = await entry.exited;
    clearTimeout(timer);
    return r;
  };
  return entry;
}

async function main() {
  assert.ok(process.env.DISPLAY, 'run under Xvfb (xvfb-run -a dbus-run-session -- node tests/e2e/desktop.mjs)');
  assert.ok(process.env.DBUS_SESSION_BUS_ADDRESS, 'run inside dbus-run-session (single-instance and notifications use the session bus)');
  assert.ok(fs.existsSync(DESKTOP), `no desktop binary at ${DESKTOP}`);
  fs.rmSync(ARTIFACTS, { recursive: true, force: true });
  fs.mkdirSync(ARTIFACTS, { recursive: true });

  // a fresh home: the app's settings, data, logs and autostart entry all land in it
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'apiary-desktop-e2e-'));
  const xdg = {
    HOME: home,
    XDG_CONFIG_HOME: path.join(home, '.config'),
    XDG_DATA_HOME: path.join(home, '.local/share'),
    XDG_CACHE_HOME: path.join(home, '.cache'),
    XDG_STATE_HOME: path.join(home, '.local/state'),
  };
  for (const dir of Object.values(xdg)) fs.mkdirSync(dir, { recursive: true });
  const dataDir = path.join(xdg.XDG_DATA_HOME, 'apiary');

  const demo = new Apiary('desktop-demo', ['demo', '--steps', '1000000', '--kill-after', '0', '--keep-running']);
  const published = await demo.waitFor('the published event', 180_000, (l) => l.event === 'published');
  log(`demo published ${published.experiment}`);
  // the user's settings: loopback only, the demo's bootstrap peer; no saved state, so a first run
  fs.mkdirSync(path.join(xdg.XDG_CONFIG_HOME, 'apiary'), { recursive: true });
  fs.writeFileSync(path.join(xdg.XDG_CONFIG_HOME, 'apiary/node.toml'), [
    'listen_maddrs = ["/ip4/127.0.0.1/tcp/0"]',
    `initial_peers = ["${published.bootstrap[0]}"]`,
    'update_period = 6.0',
    '',
  ].join('\n'));

  // a release feed on loopback offering 9.9.9 (the endpoint is a config value; plain http is accepted
  // from loopback by debug builds only); the signature is only checked when an update is downloaded
  const feedHits = [];
  const feed = http.createServer((req, res) => {
    feedHits.push(req.url);
    const release = { signature: 'not checked before a download', url: 'http://127.0.0.1:9/apiary.AppImage' };
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end(JSON.stringify({
      version: '9.9.9',
      notes: 'A test release.',
      pub_date: '2026-11-27T00:00:00Z',
      platforms: { 'linux-x86_64': release, 'linux-x86_64-appimage': release, 'linux-x86_64-deb': release },
    }));
  });
  await new Promise((resolve) => feed.listen(0, '127.0.0.1', resolve));

  const env = {
    ...process.env,
    ...xdg,
    APIARY_UPDATE_ENDPOINT: `http://127.0.0.1:${feed.address().port}/latest.json`,
    APIARY_API_BIND: '127.0.0.1:0',
    RUST_LOG: 'info',
    // no GPU under Xvfb: software rendering, no DMA-BUF renderer
    WEBKIT_DISABLE_DMABUF_RENDERER: '1',
    LIBGL_ALWAYS_SOFTWARE: '1',
  };
  const port = await freePort();
  const nativePort = await freePort();
  const driver = child('tauri-driver', TAURI_DRIVER,
    ['--port', String(port), '--native-port', String(nativePort), '--native-driver', WEBKIT_DRIVER], env);
  const wd = new WebDriver(`http://127.0.0.1:${port}`);
  await poll('tauri-driver to listen', 30_000, async () => (await fetch(`http://127.0.0.1:${port}/status`)).ok);

  let call = null;
  try {
    const t0 = Date.now();
    await wd.start(DESKTOP, []);
    log(`session started in ${Date.now() - t0} ms`);

    // the app's local API (the same node; the test checks the UI against it)
    const urlFile = path.join(dataDir, 'api-url');
    const url = await poll('the app\'s api-url file', 60_000, async () => fs.existsSync(urlFile) && fs.readFileSync(urlFile, 'utf8').trim());
    log(`app API at ${url}`);
    call = apiClient(url, fs.readFileSync(path.join(dataDir, 'api-token'), 'utf8').trim());
    const first = await call('GET', 'api/status');
    assert.equal(first.state, 'paused', 'a first run starts paused');
    assert.ok(!fs.existsSync(path.join(dataDir, 'setup-done')));

    // 1. the wizard opens by itself: the hardware check
    await wd.byId('wizard-step-1', 30_000);
    const machine = await wd.text('wizard-machine');
    assert.match(machine, /\d+ (logical )?(cores|CPUs?|threads)/i, `the hardware check names the CPU: ${machine}`);
    await wd.screenshot('wizard-1-hardware');
    await wd.click('wizard-next');

    // 2. the catalog's local demo, its plan, then join
    await wd.byId('wizard-step-2');
    await poll('the demo experiment in the wizard', 120_000, async () => {
      try {
        await wd.byId(`wizard-pick-${EXPERIMENT}`, 1_000);
        return true;
      } catch {
        // the catalog arrives through the DHT: go back and forth to list it again
        await wd.click('wizard-back');
        await wd.click('wizard-next');
        return false;
      }
    }, 2_000);
    await wd.click(`wizard-pick-${EXPERIMENT}`);
    await wd.click('wizard-next');
    const plan = await poll('the join plan naming the experts', 60_000, async () => {
      const t = await wd.text('wizard-plan', 60_000);
      return /ffn_demo\.[0-9.]+/.test(t) && t;
    }, 500);
    log(`plan: ${plan.slice(0, 120).replace(/\s+/g, ' ')}…`);
    await wd.screenshot('wizard-2-plan');
    await wd.click('wizard-next');

    // 3. mode and autostart; start contributing
    await wd.byId('wizard-step-3', 60_000);
    await wd.click('wizard-mode-quiet');
    assert.equal(await wd.selected('wizard-mode-quiet'), true);
    await wd.click('wizard-autostart');
    await wd.screenshot('wizard-3-mode');
    await wd.click('wizard-finish');

    const hosted = await poll('the node to work and host the experiment', 60_000, async () => {
      const s = await call('GET', 'api/status');
      const e = s.experiments.find((x) => x.id === EXPERIMENT);
      return ['running', 'throttled'].includes(s.state) && e && e.uids.length > 0 ? s : undefined;
    });
    assert.equal(hosted.mode, 'quiet');
    assert.ok(fs.existsSync(path.join(dataDir, 'setup-done')), 'the finished wizard is remembered');
    const autostart = path.join(xdg.XDG_CONFIG_HOME, 'autostart');
    const entries = fs.existsSync(autostart) ? fs.readdirSync(autostart) : [];
    assert.equal(entries.length, 1, `one autostart entry in ${autostart}: ${entries}`);
    assert.match(fs.readFileSync(path.join(autostart, entries[0]), 'utf8'), /--minimized/);
    assert.match(fs.readFileSync(path.join(xdg.XDG_CONFIG_HOME, 'apiary/node.toml'), 'utf8'), /mode = "quiet"/);
    log(`wizard done: hosting ${hosted.experiments[0].uids.length} experts, quiet mode, autostart on`);

    // 4. the overview renders the node's state
    const state = await poll('the overview\'s state', 15_000, async () => {
      const t = await wd.text('state');
      return ['running', 'throttled'].includes(t) && t;
    });
    assert.ok((await wd.text('reason')).length > 0, 'the state comes with its reason');
    await wd.screenshot('overview');
    log(`overview shows ${state}`);

    // 4b. Settings: the app's own section (autostart as the wizard left it, where things are, updates)
    await wd.click('nav-settings');
    assert.equal(await wd.text('path-data'), dataDir);
    assert.equal(await wd.selected('setting-autostart'), true, 'autostart shows as on');
    assert.equal(feedHits.length, 0, 'no update check before the user asks');
    await wd.click('check-updates');
    const offered = await poll('the update offered', 20_000, async () => {
      try {
        return await wd.text('update-available', 500);
      } catch {
        return undefined;
      }
    }, 500);
    assert.equal(offered, 'Version 9.9.9 is available (this is 0.1.0).');
    assert.ok(feedHits.length >= 1, 'the feed was asked');
    await wd.screenshot('settings-update');
    await wd.click('nav-overview');

    // 5. the tray's "Pause ▸ 1 hour", through the app's tray_action command
    const before = Date.now() / 1000;
    await wd.invoke('tray_action', { id: 'pause_1h' });
    const paused = await poll('the node paused by the tray action', 15_000, async () => {
      const s = await call('GET', 'api/status');
      return s.state === 'paused' && s;
    });
    assert.ok(paused.until > before + 3500 && paused.until < before + 3700, `paused for an hour: until ${paused.until}`);
    await poll('the overview to show paused', 10_000, async () => (await wd.text('state')) === 'paused');
    await wd.screenshot('paused-from-tray');

    // 6. a second launch hands over to the first instance and exits
    const logDir = path.join(xdg.XDG_DATA_HOME, 'org.apiary.desktop', 'logs');
    const appLog = () => (fs.existsSync(logDir) ? fs.readdirSync(logDir).map((f) => fs.readFileSync(path.join(logDir, f), 'utf8')).join('') : '');
    const second = child('second-launch', DESKTOP, [], env);
    const t1 = Date.now();
    const exited = await Promise.race([second.exited, sleep(30_000).then(() => null)]);
    assert.ok(exited, 'the second launch exits');
    assert.equal(exited.code, 0, `the second launch exits cleanly: ${JSON.stringify(exited)} ${second.output.slice(-500)}`);
    await poll('the first instance to hear of the second launch', 10_000, async () => appLog().includes('launched again'));
    log(`second launch handed over and exited in ${Date.now() - t1} ms`);
    assert.equal((await call('GET', 'api/status')).state, 'paused', 'the first instance runs on');

    // 7. the first paint was logged (the cold-start figure)
    const paint = appLog().match(/dashboard painted (\d+) ms after start/);
    assert.ok(paint, 'the dashboard reports its first paint');
    log(`first paint ${paint[1]} ms after start (debug build, under WebDriver)`);

    // 8. Quit from the tray leaves the experiment and ends the app
    await wd.invoke('tray_action', { id: 'quit' }).catch(() => {});
    await poll('the app to exit (its API gone)', 60_000, async () => {
      try {
        await call('GET', 'api/status');
        return false;
      } catch (e) {
        return /fetch failed|ECONNREFUSED/.test(String(e?.cause ?? e)) || /fetch failed/.test(String(e));
      }
    }, 500);
    const tail = appLog();
    assert.match(tail, /checkpoints saved saved=\d+/, 'the experts\' checkpoints were saved on quit');
    assert.match(tail, /left experiment=local-demo/, 'the experiment was left on quit');
    assert.match(tail, /node stopped/, 'the node stopped before the app exited');
    console.log(JSON.stringify({ event: 'e2e-desktop', ok: true, seconds: (Date.now() - started) / 1000, screenshots: ARTIFACTS }));
  } catch (e) {
    await wd.screenshot('failure').catch((err) => log(`no screenshot: ${err}`));
    await wd.cmd('GET', '/source').then((html) => fs.writeFileSync(path.join(ARTIFACTS, 'failure-page.html'), html), (err) => log(`no page source: ${err}`));
    if (call) {
      for (const route of ['api/status', 'api/log']) {
        const got = await call('GET', route).catch((err) => String(err));
        fs.writeFileSync(path.join(ARTIFACTS, `failure-${route.replace('/', '-')}.json`), JSON.stringify(got, null, 2));
      }
    }
    throw e;
  } finally {
    const logDir = path.join(home, '.local/share/org.apiary.desktop/logs');
    if (fs.existsSync(logDir)) fs.cpSync(logDir, path.join(ARTIFACTS, 'app-logs'), { recursive: true });
    await wd.end();
    feed.close();
    await driver.stop();
    await demo.stop();
    fs.rmSync(home, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(`e2e desktop: FAILED: ${e.stack ?? e}`);
  killAll();
  process.exit(1);
});
