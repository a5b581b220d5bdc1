// Browser benchmark: warm latency p50/p95 of our page (WebGPU on SwiftShader, and the CPU
// fallback) next to ONNX Runtime Web running the same weights in the same Chromium.
// usage: node tests/bench/browser-bench.mjs <bench-data-dir> [runs]
import path from 'node:path';
import { spawn } from 'node:child_process';
import { ROOT, launch, dropFiles, sample, waitReady, resultFor, WEBGPU_FLAGS } from '../e2e/harness.mjs';

const dataDir = path.resolve(process.argv[2] ?? 'target/bench-data');
const runs = Number(process.argv[3] ?? 20);
const port = 18000 + Math.floor(Math.random() * 1000);
const server = spawn('python3', [
  path.join(ROOT, 'scripts/serve.py'), path.join(ROOT, 'dist'), String(port),
  '--mount', `/ort=${path.join(ROOT, 'node_modules/onnxruntime-web/dist')}`,
  '--mount', `/bench=${path.join(ROOT, 'tests/bench')}`,
  '--mount', `/bench-data=${dataDir}`,
], { stdio: ['ignore', 'pipe', 'inherit'] });
await new Promise((resolve) => server.stdout.on('data', resolve));
const base = `http://127.0.0.1:${port}/`;

async function ours(query, label) {
  const { browser, page } = await launch(WEBGPU_FLAGS);
  try {
    await page.goto(base + query);
    const backend = await waitReady(page);
    await dropFiles(page, [{ name: 'coffee.png', type: 'image/png', bytes: sample('coffee.png') }]);
    const first = await resultFor(page, 'coffee.png');
    await page.fill('#bench-runs', String(runs));
    await page.dispatchEvent('#bench-runs', 'change');
    await page.click('#bench-run');
    await page.waitForSelector('#bench-result[data-state="done"], #bench-result[data-state="failed"]', { timeout: 3_600_000 });
    const text = await page.innerText('#bench-result');
    const m = text.match(/p50 ([\d.]+) ms · p95 ([\d.]+) ms/);
    if (!m) throw new Error(`${label}: ${text}`);
    return { label, backend, coldMs: first.ms, p50: Number(m[1]), p95: Number(m[2]), top1: first.classes[0] };
  } finally {
    await browser.close();
  }
}

async function ort(provider, threads) {
  const { browser, page } = await launch(WEBGPU_FLAGS);
  try {
    await page.goto(base + 'bench/ort.html');
    await page.waitForFunction(() => document.getElementById('out').textContent === 'ready');
    const r = await page.evaluate((o) => window.runOrt(o), { provider, threads, runs });
    return { label: `ONNX Runtime Web 1.30 ${provider}${provider === 'wasm' ? `, ${threads || 'auto'} thread(s)` : ''}`, ...r };
  } finally {
    await browser.close();
  }
}

const rows = [];
try {
  rows.push(await ours('', 'compresslab WebGPU (SwiftShader)'));
  rows.push(await ours('?backend=cpu', 'compresslab CPU fallback (wasm SIMD, 1 thread)'));
  rows.push(await ort('wasm', 1));
  rows.push(await ort('wasm', 0));
  rows.push(await ort('webgpu', 0));
} finally {
  server.kill();
}
console.log(`\n| browser (headless Chromium, this machine) | cold ms | warm p50 ms | warm p95 ms | runs | top-1 |`);
console.log('|---|---|---|---|---|---|');
for (const r of rows) {
  console.log(`| ${r.label} | ${r.coldMs.toFixed(0)} | ${r.p50.toFixed(1)} | ${r.p95.toFixed(1)} | ${runs} | ${r.top1} |`);
}
const cpu = rows.find((r) => r.label.startsWith('compresslab CPU'));
const gpu = rows.find((r) => r.label.startsWith('compresslab WebGPU'));
for (const r of rows.filter((r) => r.label.startsWith('ONNX'))) {
  const ref = r.provider === 'webgpu' ? gpu : cpu;
  console.log(`ratio ${ref.label} / ${r.label} (warm p50): ${(ref.p50 / r.p50).toFixed(2)}×` +
    (r.maxDiff !== undefined ? `   (ORT vs our logits: max |diff| ${r.maxDiff.toExponential(2)}, cross-origin isolated: ${r.isolated})` : ''));
}
