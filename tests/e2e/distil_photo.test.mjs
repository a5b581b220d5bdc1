// Distillation of the photo model in the page, as a person would do it: on the photos tab,
// compress EfficientNet-Lite0 with int4 per-block weights, pick a folder of images sorted
// into classes of one's own (Bag, Sneaker, Trouser: Fashion-MNIST images written by
// scripts/setup.sh; no ImageNet class has these names), fine-tune quantization-aware, and
// read the before/after panel; then fine-tune label-free on the site's sample photos,
// matching two blocks' features too, which makes the result the lab's variant. The CPU
// fallback runs these (SwiftShader's WebGPU takes seconds per 224² image); a last, tiny
// run trains on WebGPU, on the int8 variant the WebGPU lab check builds.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { mkdtempSync, mkdirSync, copyFileSync, rmSync, readdirSync, existsSync } from 'node:fs';
import os from 'node:os';
import { serveSite, launch, waitReady, dropFiles, sample, resultFor, comparison, WEBGPU_FLAGS, NO_WEBGPU_FLAGS, OUT, ROOT } from './harness.mjs';

const FASHION = path.join(ROOT, '.cache/fashion-folder');
const CLASSES = ['Bag', 'Sneaker', 'Trouser'];
const PER_CLASS = 6;

let site;
let folder;
before(async () => {
  assert.ok(existsSync(FASHION), `${FASHION} is missing: run scripts/setup.sh`);
  site = await serveSite();
  folder = mkdtempSync(path.join(os.tmpdir(), 'own-classes-'));
  for (const name of CLASSES) {
    mkdirSync(path.join(folder, name));
    for (const f of readdirSync(path.join(FASHION, name)).sort().slice(0, PER_CLASS)) {
      copyFileSync(path.join(FASHION, name, f), path.join(folder, name, f));
    }
  }
});
after(() => {
  site?.close();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

const numbers = async (page, attr) =>
  (await page.getAttribute('#distil-loss', attr)).split(',').filter(Boolean).map(Number);

const result = (page) => page.locator('#distil-result tbody tr').evaluateAll((rows) => Object.fromEntries(
  rows.map((r) => [r.dataset.metric, [...r.querySelectorAll('td')].map((td) => td.innerText)])));

async function waitForResult(page) {
  await page.waitForSelector('#distil-result, #distil-message', { timeout: 1_200_000 });
  if (await page.locator('#distil-message').count()) throw new Error(await page.innerText('#distil-message'));
}

async function set(page, selector, value) {
  await page.fill(selector, String(value));
  await page.dispatchEvent(selector, 'change');
}

test('photo distillation on the CPU fallback: own classes with QAT, then label-free on the samples', { timeout: 1_800_000 }, async () => {
  const { browser, page, logs } = await launch(NO_WEBGPU_FLAGS);
  try {
    await page.goto(site.url);
    assert.equal(await waitReady(page), 'cpu');
    await page.click('button[data-preset="int4-block"]');
    await page.click('#lab-apply');
    await page.waitForSelector('#lab-state[data-state="done"], #lab-state[data-state="failed"]', { timeout: 600_000 });
    assert.equal(await page.getAttribute('#lab-state', 'data-state'), 'done');
    assert.equal(await page.getAttribute('#distil', 'data-target'), 'photos');

    // Own classes: two folders whose names are no ImageNet class.
    await page.setInputFiles('#distil-folder', folder);
    await page.waitForSelector('#distil-counts', { timeout: 120_000 });
    const counts = await page.locator('#distil-counts tbody tr').evaluateAll((rows) =>
      rows.map((r) => [r.cells[0].innerText, Number(r.cells[1].innerText), Number(r.cells[2].innerText)]));
    console.log('counts (class, training, held out):', JSON.stringify(counts));
    assert.deepEqual(counts, CLASSES.map((c) => [c, PER_CLASS - 1, 1]));
    assert.match(await page.innerText('#distil-mode'), /your own 3 classes \(Bag, Sneaker, Trouser\)/);
    assert.equal(await page.locator('.distil-preview img.photo').count(), 12);
    assert.ok(await page.isChecked('#distil-qat'), 'int4 weights: quantization-aware by default');

    await set(page, '#distil-epochs', 3);
    await set(page, '#distil-batch', 5);
    await page.click('#distil-start');
    await waitForResult(page);
    const train = await numbers(page, 'data-train');
    const heldout = await numbers(page, 'data-heldout');
    const own = await result(page);
    console.log('own classes: training losses', train.map((v) => v.toFixed(3)).join(' '),
      '| held-out', heldout.map((v) => v.toFixed(3)).join(' → '), '|', JSON.stringify(own));
    assert.equal(train.length, 9, '3 steps × 3 epochs');
    assert.equal(heldout.length, 4, 'before training and after each epoch');
    assert.ok(train.every(Number.isFinite));
    const mean = (v) => v.reduce((a, b) => a + b, 0) / v.length;
    assert.ok(mean(train.slice(6)) < mean(train.slice(0, 3)), `training loss ${train}`);
    assert.ok(heldout[3] < heldout[0], `held-out loss ${heldout[0]} → ${heldout[3]}`);
    assert.match(await page.innerText('#distil-label-mode'), /your own 3 classes/);
    assert.match(await page.innerText('#distil-result thead'), /original \+ fitted head/);
    assert.deepEqual(Object.keys(own), ['heldout-accuracy', 'heldout-agreement', 'latency', 'size']);
    assert.match(own['heldout-accuracy'][0], /%$/, 'the teacher with its fitted head');
    assert.ok(parseFloat(own['heldout-agreement'][2]) >= parseFloat(own['heldout-agreement'][1]),
      `agreement with the teacher: ${own['heldout-agreement']}`);
    assert.ok(parseFloat(own.size[2]) < parseFloat(own.size[0]) / 5, `int4 is smaller: ${own.size}`);
    assert.match(await page.innerText('#lab-recipe'), /^Applied/, 'own classes leave the lab variant alone');
    await page.screenshot({ path: path.join(OUT, 'distil-photo-own.png'), fullPage: true });

    // Label-free on the sample photos: the result becomes the lab's variant.
    await page.click('#distil-builtin');
    await page.waitForFunction(() => /sample photos/.test(document.querySelector('#distil-data')?.innerText ?? ''), null, { timeout: 120_000 });
    assert.match(await page.innerText('#distil-mode'), /label-free/);
    const freeCounts = await page.locator('#distil-counts tbody tr').evaluateAll((rows) =>
      rows.map((r) => [r.cells[0].innerText, Number(r.cells[1].innerText), Number(r.cells[2].innerText)]));
    assert.deepEqual(freeCounts, [['unlabelled', 6, 1]]);
    await set(page, '#distil-epochs', 1);
    await set(page, '#distil-batch', 3);
    await set(page, '#distil-features', '10, 15');
    await page.click('#distil-start');
    await waitForResult(page);
    await page.waitForFunction(() => /^Fine-tuned by distillation/.test(document.querySelector('#lab-recipe')?.innerText ?? ''), null, { timeout: 600_000 });
    const free = await result(page);
    assert.match(await page.innerText('#distil-result'), /features matched at blocks 10, 15/);
    console.log('label-free on the samples:', JSON.stringify(free));
    assert.equal(free['heldout-accuracy'][2], '– (no labels)');
    assert.match(free['heldout-agreement'][2], /%$/);
    // The lab's agreement with the fine-tuned variant leaves out the 6 photos it trained on.
    const lab = await comparison(page);
    console.log('lab agreement of the distilled variant:', lab.agreement.after);
    assert.match(lab.agreement.after, /^[01]\/1 held-out photos \(6 others trained on\)$/);
    await page.screenshot({ path: path.join(OUT, 'distil-photo.png'), fullPage: true });
    assert.deepEqual(logs.filter((l) => l.startsWith('pageerror')), []);
  } finally {
    await browser.close();
  }
});

// One WebGPU session for the lab and the photo fine-tune: SwiftShader takes seconds per 224²
// image, so the int8 variant the lab builds on WebGPU (and checks against the CPU) is the one
// that is then fine-tuned, rather than loading the page and compressing twice.
test('photo lab and fine-tune on WebGPU (SwiftShader): int8 per-channel checked against the CPU, then one quantization-aware step', { timeout: 1_800_000 }, async () => {
  const small = mkdtempSync(path.join(os.tmpdir(), 'own-classes-gpu-'));
  const { browser, page, logs } = await launch(WEBGPU_FLAGS);
  try {
    for (const name of ['Bag', 'Trouser']) {
      mkdirSync(path.join(small, name));
      for (const f of readdirSync(path.join(FASHION, name)).sort().slice(0, 3)) {
        copyFileSync(path.join(FASHION, name, f), path.join(small, name, f));
      }
    }
    await page.goto(site.url);
    assert.equal(await waitReady(page), 'webgpu');
    await dropFiles(page, [{ name: 'coffee.png', type: 'image/png', bytes: sample('coffee.png') }]);
    assert.ok(!(await resultFor(page, 'coffee.png')).error);
    await page.click('button[data-preset="int8-channel"]');
    await set(page, '#lab-runs', 1);
    await page.click('#lab-apply');
    await page.waitForSelector('#lab-state[data-state="done"], #lab-state[data-state="failed"]', { timeout: 1_500_000 });
    if (await page.getAttribute('#lab-state', 'data-state') === 'failed') throw new Error(await page.innerText('#lab-error'));
    const int8 = await comparison(page);
    console.log('WebGPU int8 per-channel:', JSON.stringify(int8));
    assert.match(int8.top1.after, /espresso/);
    assert.match(await page.innerText('#lab-report'), /WebGPU vs CPU for this variant: top-1 same true/);
    assert.equal(await page.locator('#lab-warning').count(), 0);
    // The int8 kernel runs only where the adapter offers dot4I8Packed, and the report says so.
    const wgsl = await page.textContent('#wgsl-features');
    const ran = await page.innerText('#lab-kernels');
    console.log(`${wgsl} | ${ran}`);
    if (/packed_4x8_integer_dot_product/.test(wgsl)) {
      assert.match(ran, /33 of 50 layers on the int8 kernel/);
      // GPU buffers: a 1×1 layer on the int8 kernel keeps no f32 copy of its weights.
      const [before, after] = [parseFloat(int8.held.before), parseFloat(int8.held.after)];
      assert.ok(after < before / 3, `WebGPU int8 holds ${after} MB of weights, fp32 ${before} MB`);
    } else {
      assert.match(ran, /0 of 50 layers on the int8 kernel.*lacks WGSL packed_4x8_integer_dot_product/);
    }
    await page.screenshot({ path: path.join(OUT, 'lab-webgpu.png'), fullPage: true });

    await page.setInputFiles('#distil-folder', small);
    await page.waitForSelector('#distil-counts', { timeout: 120_000 });
    await set(page, '#distil-epochs', 1);
    await set(page, '#distil-batch', 4);
    await page.selectOption('#distil-layers', 'last');
    await page.click('#distil-start');
    await waitForResult(page);
    const train = await numbers(page, 'data-train');
    const heldout = await numbers(page, 'data-heldout');
    const hint = await page.innerText('#distil-result');
    console.log('WebGPU: training losses', train, '| held-out', heldout, '|', hint.split('\n').pop());
    assert.equal(train.length, 1);
    assert.ok(train.every(Number.isFinite) && heldout.every(Number.isFinite));
    assert.match(hint, /on WebGPU/);
    assert.match(hint, /quantization-aware/);
    await page.screenshot({ path: path.join(OUT, 'distil-photo-webgpu.png'), fullPage: true });
    assert.deepEqual(logs.filter((l) => l.startsWith('pageerror')), []);
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
    rmSync(small, { recursive: true, force: true });
  }
});
