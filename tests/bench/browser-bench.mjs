// Browser benchmark: warm latency p50/p95 of our page (WebGPU on SwiftShader, and the CPU
// fallback) next to ONNX Runtime Web running the same weights in the same Chromium.
// usage: node tests/bench/browser-bench.mjs <bench-data-dir> [runs]
import path from 'node:path';
import { spawn } from 'node:child_process';
import { ROOT, launch, dropFiles, sample, waitReady, resultFor, firstPrediction, comparison, WEBGPU_FLAGS } from '../e2e/harness.mjs';

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

/**
 * Navigation → first top-5 on the CPU fallback with the site's files and the weights
 * cached (a returning visitor): one visit to fill the caches, then `visits` timed ones.
 */
async function firstPredictionCpu(visits) {
  const { browser, page } = await launch(WEBGPU_FLAGS);
  const file = { name: 'coffee.png', type: 'image/png', bytes: sample('coffee.png') };
  try {
    await firstPrediction(page, base + '?backend=cpu', file);
    const timed = [];
    for (let i = 0; i < visits; i++) {
      const r = await firstPrediction(page, base + '?backend=cpu', file);
      if (r.result.labels?.[0] !== 'espresso') throw new Error(`first prediction: ${JSON.stringify(r.result)}`);
      timed.push(r);
    }
    const median = (xs) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    return { visits, readyMs: median(timed.map((r) => r.readyMs)), firstMs: median(timed.map((r) => r.firstMs)) };
  } finally {
    await browser.close();
  }
}

/**
 * The Fashion-MNIST lab's evaluation of the original network on its 10 000 test images
 * (CPU executor), with the page's query (`workers=1` or the default pool): wall ms per image.
 */
async function fashionEvaluation(query) {
  const { browser, page } = await launch(WEBGPU_FLAGS);
  try {
    await page.goto(base + query);
    await waitReady(page);
    await page.click('#model-fashion');
    await page.click('button[data-preset="int8-channel"]');
    await page.click('#lab-apply');
    await page.waitForSelector('#lab-state[data-state="done"], #lab-state[data-state="failed"]', { timeout: 1_200_000 });
    const c = await comparison(page);
    const m = c.latency?.before?.match(/([\d.]+) ms · (\d+) workers?/);
    if (!m) throw new Error(`Fashion evaluation: ${JSON.stringify(c)}`);
    return { msPerImage: Number(m[1]), workers: Number(m[2]), accuracy: c.accuracy.before };
  } finally {
    await browser.close();
  }
}

/** The page's device report on the CPU fallback: every variant timed side by side. */
async function deviceReportCpu() {
  const { browser, page } = await launch(WEBGPU_FLAGS);
  try {
    await page.goto(base + '?backend=cpu');
    await waitReady(page);
    await dropFiles(page, [{ name: 'coffee.png', type: 'image/png', bytes: sample('coffee.png') }]);
    await resultFor(page, 'coffee.png');
    await page.fill('#bench-runs', String(Math.min(runs, 100)));
    await page.dispatchEvent('#bench-runs', 'change');
    await page.click('#device-report-run');
    await page.waitForSelector('#bench-result[data-state="done"], #bench-result[data-state="failed"]', { timeout: 3_600_000 });
    const report = await page.locator('#device-report tbody tr').evaluateAll((trs) => trs.map((tr) => ({
      variant: tr.dataset.variant, cells: [...tr.querySelectorAll('td')].map((td) => td.innerText),
    })));
    if (report.length === 0) throw new Error(await page.innerText('#bench-result'));
    return report;
  } finally {
    await browser.close();
  }
}

const rows = [];
let first, oneWorker, pool, device;
try {
  first = await firstPredictionCpu(5);
  device = await deviceReportCpu();
  oneWorker = await fashionEvaluation('?backend=cpu&workers=1');
  pool = await fashionEvaluation('?backend=cpu');
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
console.log(`\nCPU fallback, assets cached, median of ${first.visits} visits: page ready ${first.readyMs.toFixed(0)} ms after navigation, ` +
  `first top-5 shown ${first.firstMs.toFixed(0)} ms after navigation`);
console.log(`target first prediction on the CPU fallback: ${(first.firstMs / 1000).toFixed(2)} s (goal ≤ 1.5 s) ${first.firstMs <= 1500 ? 'met' : 'not met'}`);
const poolSpeedup = oneWorker.msPerImage / pool.msPerImage;
console.log(`\nFashion-MNIST evaluation, 10 000 test images (original network, CPU executor): ` +
  `1 worker ${oneWorker.msPerImage.toFixed(3)} ms/image (accuracy ${oneWorker.accuracy}), ` +
  `${pool.workers} workers ${pool.msPerImage.toFixed(3)} ms/image (accuracy ${pool.accuracy})`);
console.log(`target worker pool on the Fashion-MNIST evaluation: ${poolSpeedup.toFixed(2)}× with ${pool.workers} workers (goal ≥ 1.8×) ${poolSpeedup >= 1.8 && oneWorker.accuracy === pool.accuracy ? 'met' : 'not met'}`);

console.log(`\nThe page's device report, CPU fallback, ${Math.min(runs, 100)} warm runs each (round-robin):`);
console.log('| variant | stored | held while running | cold | warm p50 | p95 | vs fp32 | ran |');
console.log('|---|---|---|---|---|---|---|---|');
for (const r of device) console.log(`| ${r.cells.slice(1).join(' | ')} |`);
const cell = (prefix, i) => parseFloat(device.find((r) => r.variant.startsWith(prefix)).cells[i]);
const p50 = (prefix) => cell(prefix, 5);
const int4Memory = cell('fp32', 3) / cell('int4', 3);
const int8Speedup = p50('fp32') / p50('int8');
const int4Speedup = p50('fp32') / p50('int4');
console.log(`target int8 W8A8 vs fp32 on the CPU fallback: ${int8Speedup.toFixed(2)}× (goal ≥ 1.5×) ${int8Speedup >= 1.5 ? 'met' : 'not met'}`);
console.log(`target int4 weight-only vs fp32 speed on the CPU fallback: ${int4Speedup.toFixed(2)}× (goal ≥ 1.0×) ${int4Speedup >= 1.0 ? 'met' : 'not met'}`);
console.log(`target int4 weight-only memory held while running on the CPU fallback: 1/${int4Memory.toFixed(1)} of fp32 (goal ≈ 1/7, ≥ 6×) ${int4Memory >= 6 ? 'met' : 'not met'}`);
