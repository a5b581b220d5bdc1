// Shared browser-test harness: serves dist/ on a free localhost port and launches
// Debian's chromium through playwright-core (no browser download), with WebGPU on
// SwiftShader unless asked otherwise.
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { readFileSync, mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const OUT = path.join(ROOT, 'tests/e2e/out');
mkdirSync(OUT, { recursive: true });
/** Where scripts/setup.sh --tests keeps the Python venv with ONNX Runtime. */
export const CACHE = process.env.COMPRESSLAB_CACHE || path.join(os.homedir(), '.cache/compresslab');

/** A float32 .npy file's shape and values. */
export function readNpy(file) {
  const bytes = readFileSync(file);
  const headerLength = bytes.readUInt16LE(8);
  const header = bytes.subarray(10, 10 + headerLength).toString();
  const shape = header.match(/'shape': \(([^)]*)\)/)[1].split(',').filter((s) => s.trim()).map(Number);
  const data = new Float32Array(bytes.buffer.slice(bytes.byteOffset + 10 + headerLength, bytes.byteOffset + bytes.length));
  return { shape, data };
}

/** Writes `data` (a Float32Array) as a version-1 float32 .npy of `shape`. */
export function writeNpy(file, shape, data) {
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(', ')},), }`;
  header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n';
  const prefix = Buffer.alloc(10);
  prefix.write('\x93NUMPY', 0, 'latin1');
  prefix.writeUInt8(1, 6);
  prefix.writeUInt8(0, 7);
  prefix.writeUInt16LE(header.length, 8);
  writeFileSync(file, Buffer.concat([prefix, Buffer.from(header, 'latin1'), Buffer.from(data.buffer, data.byteOffset, data.byteLength)]));
}

/**
 * Clicks `button` and saves the download whose name ends in `extension` (an export also
 * downloads recipe.json) as `file` under OUT; returns the name the page gave it and the path.
 */
export async function downloadFrom(page, button, extension, file) {
  const [download] = await Promise.all([
    page.waitForEvent('download', (d) => d.suggestedFilename().endsWith(extension)),
    page.click(button),
  ]);
  const saved = path.join(OUT, file);
  await download.saveAs(saved);
  return { name: download.suggestedFilename(), file: saved };
}

/** ONNX Runtime (Python, CPU) on `model` for the batch in the .npy `input`: its first output. */
export function onnxRuntime(model, input, output) {
  const run = spawnSync(path.join(CACHE, 'venv/bin/python'), [
    path.join(ROOT, 'tests/models/run_ort.py'), model, input, output,
  ], { encoding: 'utf8' });
  if (run.status !== 0) throw new Error(`ONNX Runtime failed on ${model}: ${run.stderr}`);
  return readNpy(output);
}

const BASE_FLAGS = [
  '--headless', '--no-sandbox', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
export const WEBGPU_FLAGS = ['--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader'];
// No WebGPU at all: the page must fall back to its CPU path and say why.
export const NO_WEBGPU_FLAGS = ['--disable-features=WebGPU'];

async function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
    srv.on('error', reject);
  });
}

/** Serves dist/ with the cross-origin isolation headers (`{ isolated: false }`: without). */
export async function serveSite({ isolated = true } = {}) {
  const port = await freePort();
  const flags = isolated ? [] : ['--no-isolation'];
  const proc = spawn('python3', [path.join(ROOT, 'scripts/serve.py'), path.join(ROOT, 'dist'), String(port), ...flags], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise((resolve, reject) => {
    proc.stdout.on('data', (d) => { if (String(d).includes('serving')) resolve(); });
    proc.on('exit', (code) => reject(new Error(`server exited with ${code}`)));
  });
  return { url: `http://127.0.0.1:${port}/`, close: () => proc.kill() };
}

export async function launch(flags) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [...BASE_FLAGS, ...flags],
    headless: true,
  });
  const context = await browser.newContext({ viewport: { width: 1100, height: 1000 } });
  const page = await context.newPage();
  const logs = [];
  page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[pageerror] ${e.message}`));
  return { browser, page, logs };
}

/** Drops files on the page the way a person's drag and drop does (a real DataTransfer). */
export async function dropFiles(page, files) {
  const payload = files.map((f) => ({
    name: f.name,
    type: f.type ?? '',
    b64: Buffer.from(f.bytes).toString('base64'),
  }));
  const dataTransfer = await page.evaluateHandle((items) => {
    const dt = new DataTransfer();
    for (const it of items) {
      const bin = Uint8Array.from(atob(it.b64), (c) => c.charCodeAt(0));
      dt.items.add(new File([bin], it.name, { type: it.type }));
    }
    return dt;
  }, payload);
  await page.dispatchEvent('main', 'dragover', { dataTransfer });
  await page.dispatchEvent('main', 'drop', { dataTransfer });
}

export function sample(name) {
  return readFileSync(path.join(ROOT, 'assets/samples', name));
}

/** Waits for the model to be ready; returns the backend the page reports. */
export async function waitReady(page, timeout = 300_000) {
  await page.waitForSelector('#status[data-state="ready"]', { timeout });
  return page.getAttribute('#status', 'data-backend');
}

/** Top-5 of the newest finished card whose file name is `name`. */
export async function resultFor(page, name, timeout = 600_000) {
  const card = page.locator('article.result', { has: page.locator('h3.name', { hasText: name }) }).first();
  await card.locator(':scope[data-state="done"], :scope[data-state="error"]').waitFor({ timeout });
  const state = await card.getAttribute('data-state');
  if (state === 'error') return { error: await card.locator('.error').innerText() };
  const labels = await card.locator('.prediction .label').allInnerTexts();
  const probs = (await card.locator('.prediction .prob').allInnerTexts()).map((p) => parseFloat(p));
  const classes = await card.locator('.prediction').evaluateAll((els) => els.map((e) => Number(e.dataset.class)));
  const timing = card.locator('.timing');
  return {
    labels, probs, classes,
    ms: parseFloat(await timing.getAttribute('data-ms')),
    cold: (await timing.getAttribute('data-cold')) === 'true',
  };
}

/** The lab's comparison table as { metric: { before, after, change } }. */
export async function comparison(page) {
  return page.locator('#lab-compare tbody tr').evaluateAll((rows) => Object.fromEntries(rows.map((r) => {
    const cells = r.querySelectorAll('td');
    return [r.dataset.metric, { before: cells[0].innerText, after: cells[1].innerText, change: cells[2].innerText }];
  })));
}

/**
 * Milliseconds from navigating to `url` until the first photo's top-5 is on the page
 * (`performance.now()` in the page, whose origin is the navigation). `file` is dropped from
 * inside the page the moment it says ready (no test-harness round trip in the figure), and
 * the clock stops when the card shows its result. Also returns when the page said ready.
 */
export async function firstPrediction(page, url, file) {
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  const item = { name: file.name, type: file.type ?? '', b64: Buffer.from(file.bytes).toString('base64') };
  const times = await page.evaluate(async (it) => {
    const dt = new DataTransfer();
    dt.items.add(new File([Uint8Array.from(atob(it.b64), (c) => c.charCodeAt(0))], it.name, { type: it.type }));
    const when = (found) => new Promise((resolve) => {
      if (found()) return resolve(performance.now());
      const observer = new MutationObserver(() => {
        if (found()) { observer.disconnect(); resolve(performance.now()); }
      });
      observer.observe(document.documentElement, { subtree: true, childList: true, attributes: true });
    });
    const readyMs = await when(() => document.querySelector('#status[data-state="ready"]'));
    const main = document.querySelector('main');
    for (const type of ['dragover', 'drop']) {
      main.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
    }
    const firstMs = await when(() => document.querySelector('article.result[data-state="done"], article.result[data-state="error"]'));
    return { readyMs, firstMs };
  }, item);
  return { ...times, result: await resultFor(page, file.name) };
}
