// The desktop app, for real: the `apiary-desktop` binary (the dashboard embedded), driven through
// tauri-driver and WebKitWebDriver under Xvfb and a private D-Bus session, in a fresh home folder,
// beside a real `apiary demo` swarm whose catalog lists `local-demo`. Nothing is mocked.
//
// Checks: a first run starts paused and opens the wizard; the wizard's three steps complete (the
// hardware check, joining `local-demo` with its plan shown, a mode and autostart), after which the node
// works and hosts the experiment (seen through the app's local HTTP API), the mode and the autostart entry
// are saved; the overview renders; in Only-when-away mode, finding the user away (Xvfb gets no input, so
// its idle time grows) delays the start: the status says "Starting in 30 s because you are away", a
// desktop notification with a Cancel button goes to a fake notification server on the session bus
// (`fake-notifications`, crates/testkit), and its Cancel, invoked there as a click would be
// (`ActionInvoked`), calls the start off; a tray-menu action (through the app's `tray_action` command,
// as Linux trays take no synthetic clicks) pauses the node; closing the window keeps the app and its
// node; a second launch hands over to the first instance, which opens its window again, and exits; the
// dashboard's first paint is logged; Quit from the tray leaves the experiment and exits.
// Screenshots land in $APIARY_E2E_ARTIFACTS/desktop.
//
//   xvfb-run -a -s '-screen 0 1280x900x24' dbus-run-session -- node tests/e2e/desktop.mjs
//                                                               (run by `cargo xtask test`)
//
// Environment: APIARY_DESKTOP (default $CARGO_TARGET_DIR/debug/apiary-desktop, built with the
// `custom-protocol` feature), APIARY (for the demo swarm), TAURI_DRIVER (default `tauri-driver` on the
// PATH), WEBKIT_DRIVER (default /usr/bin/WebKitWebDriver), APIARY_FAKE_NOTIFICATIONS (default
// $CARGO_TARGET_DIR/debug/fake-notifications) and APIARY_CLOSE_WINDOW (default
// $CARGO_TARGET_DIR/debug/close-window), both `cargo build -p apiary-testkit --bins`.

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

import { ARTIFACTS as ARTIFACTS_ROOT, Apiary, apiClient, killAll, log, poll, running, sleep, started, targetDir } from './lib.mjs';

const DESKTOP = process.env.APIARY_DESKTOP ?? path.join(targetDir, 'debug/apiary-desktop');
const TAURI_DRIVER = process.env.TAURI_DRIVER ?? 'tauri-driver';
const WEBKIT_DRIVER = process.env.WEBKIT_DRIVER ?? '/usr/bin/WebKitWebDriver';
const FAKE_NOTIFICATIONS = process.env.APIARY_FAKE_NOTIFICATIONS ?? path.join(targetDir, 'debug/fake-notifications');
const CLOSE_WINDOW = process.env.APIARY_CLOSE_WINDOW ?? path.join(targetDir, 'debug/close-window');
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

/** The X screen's window tree (`xwininfo -root -tree`): names of mapped and unmapped windows. */
function xWindows() {
  return execFileSync('xwininfo', ['-root', '-tree'], { encoding: 'utf8', timeout: 10_000 });
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

/**
 * The fake notification server (crates/testkit/src/bin/fake-notifications.rs) on the session bus: its
 * JSON stdout lines are kept (`notifications` holds the `Notify` calls), `send` writes a command
 * (`invoke ID KEY`) to its stdin.
 */
async function notificationServer() {
  const proc = spawn(FAKE_NOTIFICATIONS, [], { stdio: ['pipe', 'pipe', 'pipe'] });
  const entry = { child: proc, lines: [], notifications: [] };
  running.add(entry);
  const out = fs.createWriteStream(path.join(ARTIFACTS, 'fake-notifications.log'));
  proc.stderr.on('data', (d) => out.write(d));
  readline.createInterface({ input: proc.stdout }).on('line', (text) => {
    out.write(`${text}\n`);
    try {
      const line = JSON.parse(text);
      entry.lines.push(line);
      if (line.summary !== undefined) entry.notifications.push(line);
    } catch {
      entry.lines.push({ text });
    }
  });
  entry.exited = new Promise((resolve) => proc.on('exit', (code, signal) => {
    running.delete(entry);
    resolve({ code, signal });
  }));
  entry.send = (command) => proc.stdin.write(`${command}\n`);
  entry.stop = async () => {
    if (!running.has(entry)) return entry.exited;
    proc.stdin.end(); // it exits when its stdin closes
    const timer = setTimeout(() => proc.kill('SIGKILL'), 5_000);
    const r = await entry.exited;
    clearTimeout(timer);
    return r;
  };
  await poll('the fake notification server to own org.freedesktop.Notifications', 10_000, async () => {
    if (!running.has(entry)) throw new Error(`fake-notifications exited: ${JSON.stringify(await entry.exited)}`);
    return entry.lines.some((l) => l.ready);
  }, 100);
  return entry;
}

async function main() {
  assert.ok(process.env.DISPLAY, 'run under Xvfb (xvfb-run -a dbus-run-session -- node tests/e2e/desktop.mjs)');
  assert.ok(process.env.DBUS_SESSION_BUS_ADDRESS, 'run inside dbus-run-session (single-instance and notifications use the session bus)');
  assert.ok(fs.existsSync(DESKTOP), `no desktop binary at ${DESKTOP}`);
  assert.ok(fs.existsSync(FAKE_NOTIFICATIONS), `no fake notification server at ${FAKE_NOTIFICATIONS}`);
  assert.ok(fs.existsSync(CLOSE_WINDOW), `no close-window at ${CLOSE_WINDOW}`);
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
  // the session bus's notification server, before the app shows its first notification
  const notifications = await notificationServer();
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

    const logDir = path.join(xdg.XDG_DATA_HOME, 'org.apiary.desktop', 'logs');
    const appLog = () => (fs.existsSync(logDir) ? fs.readdirSync(logDir).map((f) => fs.readFileSync(path.join(logDir, f), 'utf8')).join('') : '');

    // 4c. Only when away: finding the user away starts work after a delay, announced by a notification
    // whose Cancel calls the start off. Xvfb gets no input (WebDriver's clicks are WebKit's own events),
    // so the X idle time grows from the server's start and the user is away once it passes 2 s.
    const policy = await call('GET', 'api/policy');
    await call('PUT', 'api/policy', { ...policy, mode: 'only_when_away', idle_threshold_s: 2, away_start_delay_s: 30 });
    // the wizard's start was a manual one ("manual start wins"): a 1 s snooze hands control back to the
    // automatic rules when it ends
    await call('POST', 'api/snooze', { seconds: 1 });
    const soon = await poll('the start to be due because the user is away', 15_000, async () => {
      const s = await call('GET', 'api/status');
      return s.directive?.cause === 'starting_soon' && s;
    }, 200);
    const idle = soon.telemetry?.activity?.idle_s;
    log(`starting soon: ${soon.reason} (until in ${(soon.until - Date.now() / 1000).toFixed(1)} s; X idle ${JSON.stringify(idle)})`);
    assert.ok(idle?.known >= 2, `the X idle time is known and past the threshold: ${JSON.stringify(idle)}`);
    assert.equal(soon.state, 'paused');
    assert.equal(soon.reason, 'Starting in 30 s because you are away');
    assert.ok(soon.until > Date.now() / 1000 + 20, `until is the start, about 30 s away: ${soon.until}`);
    const shown = await poll('the starting-soon notification at the notification server', 10_000, async () =>
      notifications.notifications.find((n) => n.summary === soon.reason));
    log(`notification ${shown.id}: ${JSON.stringify(shown)}`);
    const actions = Object.fromEntries(shown.actions.flatMap((v, i, a) => (i % 2 === 0 ? [[v, a[i + 1]]] : [])));
    assert.equal(actions.cancel_start, 'Cancel', `a Cancel button: ${JSON.stringify(shown.actions)}`);
    assert.ok('default' in actions, 'a click on the notification is reported too (action `default`)');
    // the dashboard offers the same while the start is due (the window is open here)
    const cancelButton = await wd.byId('cancel-start-button', 5_000);
    assert.equal(await wd.cmd('GET', `/element/${cancelButton}/displayed`), true, 'the overview shows "Don\'t start now"');
    await wd.screenshot('starting-soon');
    notifications.send(`invoke ${shown.id} cancel_start`);
    const cancelled = await poll('the start called off through the notification\'s Cancel', 10_000, async () => {
      const s = await call('GET', 'api/status');
      return s.directive?.cause === 'start_cancelled' && s;
    }, 200);
    assert.equal(cancelled.state, 'paused');
    assert.ok(notifications.lines.some((l) => l.invoked === shown.id && l.action === 'cancel_start'));
    assert.match(appLog(), /notification action action=cancel_start/, 'the app heard the click on Cancel');
    log(`cancelled from the notification: ${cancelled.reason}`);
    // back to the wizard's settings and its manual start
    await call('PUT', 'api/policy', policy);
    await call('POST', 'api/resume');
    await poll('the node to work again', 15_000, async () => {
      const s = await call('GET', 'api/status');
      return ['running', 'throttled'].includes(s.state) && s.mode === 'quiet';
    });

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

    // 6. closing the window keeps the app in the tray: its node runs on, its API answers. Closed the
    // way a window manager's close button does (WM_DELETE_WINDOW; Xvfb runs no window manager):
    // WebDriver's own "close window" ends the session with the last window, and WebKitWebDriver then
    // kills the app.
    const [oldHandle] = await wd.cmd('GET', '/window/handles');
    await poll('close-window to ask the window titled Apiary to close', 10_000, async () => {
      execFileSync(CLOSE_WINDOW, ['Apiary'], { timeout: 10_000, stdio: ['ignore', 'ignore', 'pipe'] });
      return true;
    }, 500);
    await poll('the window to be gone from the X screen', 10_000, async () => !xWindows().includes('"Apiary"'), 250);
    await sleep(1_000);
    assert.equal((await call('GET', 'api/status')).state, 'paused', 'the node runs on without its window');

    // 7. a second launch hands over to the first instance, which opens its window again, and exits
    const second = child('second-launch', DESKTOP, [], env);
    const t1 = Date.now();
    // (a cleared timer: a pending one would keep node alive for 30 s after the test)
    let timer;
    const exited = await Promise.race([second.exited, new Promise((resolve) => { timer = setTimeout(resolve, 30_000, null); })]);
    clearTimeout(timer);
    assert.ok(exited, 'the second launch exits');
    assert.equal(exited.code, 0, `the second launch exits cleanly: ${JSON.stringify(exited)} ${second.output.slice(-500)}`);
    await poll('the first instance to hear of the second launch', 10_000, async () => appLog().includes('launched again'));
    log(`second launch handed over and exited in ${Date.now() - t1} ms`);
    assert.equal((await call('GET', 'api/status')).state, 'paused', 'the first instance runs on');
    await poll('the window to be back on the X screen', 15_000, async () => xWindows().includes('"Apiary"'), 250);
    // WebDriver attaches to the new window's browsing context
    const handle = await poll('a new window handle', 15_000, async () => {
      const handles = await wd.cmd('GET', '/window/handles');
      return handles.find((h) => h !== oldHandle) ?? undefined;
    }, 250);
    await wd.cmd('POST', '/window', { handle });
    const reopened = await poll('the reopened overview\'s state', 15_000, async () => (await wd.text('state')) || undefined);
    assert.equal(reopened, 'paused');
    await poll('the reopened dashboard to follow the node live', 15_000, async () => (await wd.text('connection')) === 'live');
    await wd.screenshot('reopened');
    log(`window closed and opened again (WebDriver handle ${oldHandle} → ${handle})`);

    // 8. the first paint was logged (the cold-start figure)
    const paint = appLog().match(/dashboard painted (\d+) ms after start/);
    assert.ok(paint, 'the dashboard reports its first paint');
    log(`first paint ${paint[1]} ms after start (debug build, under WebDriver)`);

    // 9. Quit from the tray leaves the experiment and ends the app
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
    await notifications.stop();
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
