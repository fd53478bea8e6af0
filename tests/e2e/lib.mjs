// What both end-to-end scripts share: polling, `apiary` child processes whose JSON lines can be awaited,
// and a client of the node's local API.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const targetDir = process.env.CARGO_TARGET_DIR ?? path.join(root, 'target');
export const APIARY = process.env.APIARY ?? path.join(targetDir, 'debug/apiary');
export const ARTIFACTS = process.env.APIARY_E2E_ARTIFACTS ?? path.join(root, 'target/e2e');

export const started = Date.now();
export const log = (msg) => console.error(`[e2e ${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}`);
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `probe` until it returns something other than undefined/false, or fails after `ms`. */
export async function poll(what, ms, probe, every = 250) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      const got = await probe();
      if (got !== undefined && got !== false && got !== null) return got;
      last = got;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last})`);
    await sleep(every);
  }
}

export const running = new Set();

/** An `apiary --json -q …` process whose JSON stdout lines can be waited for. */
export class Apiary {
  constructor(name, args) {
    this.name = name;
    this.lines = [];
    this.waiters = [];
    this.child = spawn(APIARY, ['--json', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info' },
    });
    running.add(this);
    this.exited = new Promise((resolve) => this.child.on('exit', (code, signal) => {
      running.delete(this);
      resolve({ code, signal });
    }));
    readline.createInterface({ input: this.child.stdout }).on('line', (text) => {
      let line;
      try {
        line = JSON.parse(text);
      } catch {
        line = { event: '(not JSON)', text };
      }
      if (line.event !== 'step') this.lines.push(line);
      for (const w of [...this.waiters]) if (w.pred(line)) w.resolve(line);
    });
    const errs = fs.createWriteStream(path.join(ARTIFACTS, `${name}.stderr.log`), { flags: 'a' });
    this.child.stderr.pipe(errs);
  }

  /** The first line from the start that `pred` accepts. */
  waitFor(what, ms, pred) {
    const seen = this.lines.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const w = { pred, resolve: (l) => { clearTimeout(timer); this.waiters.splice(this.waiters.indexOf(w), 1); resolve(l); } };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        reject(new Error(`\`apiary ${this.name}\`: no ${what} within ${ms} ms`));
      }, ms);
      this.waiters.push(w);
      this.exited.then(({ code, signal }) => reject(new Error(`\`apiary ${this.name}\` exited (${code ?? signal}) before ${what}`)));
    });
  }

  /** SIGTERM (a clean leave), then its exit; SIGKILL after `ms`. */
  async stop(ms = 60_000) {
    if (!running.has(this)) return this.exited;
    this.child.kill('SIGTERM');
    const timer = setTimeout(() => this.child.kill('SIGKILL'), ms);
    const result = await this.exited;
    clearTimeout(timer);
    return result;
  }
}

export function killAll() {
  for (const p of running) p.child.kill('SIGKILL');
}
process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM']) process.on(sig, () => { killAll(); process.exit(130); });

/** A client of the node's local API (what the test checks the UI against). */
export function apiClient(url, token) {
  return async (method, route, body) => {
    const response = await fetch(new URL(route, url), {
      method,
      signal: AbortSignal.timeout(30_000),
      headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await response.text();
    if (!response.ok) throw new Error(`${method} ${route}: ${response.status} ${text}`);
    return JSON.parse(text);
  };
}
