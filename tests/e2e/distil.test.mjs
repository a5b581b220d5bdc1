// Distillation in the page, as a person would do it: on the Fashion-MNIST tab, compress
// (which costs accuracy), pick a labelled folder of images (one folder per class, written
// by scripts/setup.sh), fine-tune the compressed network from the original, pause and
// resume, watch the loss fall, and read the before/after panel. WebGPU (SwiftShader), and
// the CPU fallback with the site's own training sample, quantization-aware, and a cancel.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { existsSync } from 'node:fs';
import { serveSite, launch, waitReady, WEBGPU_FLAGS, NO_WEBGPU_FLAGS, OUT, ROOT, comparison } from './harness.mjs';

const FOLDER = path.join(ROOT, '.cache/fashion-folder');

let site;
before(async () => {
  assert.ok(existsSync(FOLDER), `${FOLDER} is missing: run scripts/setup.sh`);
  site = await serveSite();
});
after(() => site?.close());

const numbers = async (page, attr) =>
  (await page.getAttribute('#distil-loss', attr)).split(',').filter(Boolean).map(Number);

/** The before/after table as { metric: [teacher, compressed, fine-tuned] }. */
const result = (page) => page.locator('#distil-result tbody tr').evaluateAll((rows) => Object.fromEntries(
  rows.map((r) => [r.dataset.metric, [...r.querySelectorAll('td')].map((td) => td.innerText)])));

async function applyPreset(page, preset) {
  await page.click('#model-fashion');
  await page.click(`button[data-preset="${preset}"]`);
  await page.click('#lab-apply');
  await page.waitForSelector('#lab-state[data-state="done"], #lab-state[data-state="failed"]', { timeout: 600_000 });
  assert.equal(await page.getAttribute('#lab-state', 'data-state'), 'done');
}

async function waitForResult(page) {
  await page.waitForSelector('#distil-result, #distil-message', { timeout: 1_200_000 });
  if (await page.locator('#distil-message').count()) throw new Error(await page.innerText('#distil-message'));
}

test('distillation on WebGPU: a dropped labelled folder recovers a channel-pruned network', { timeout: 1_800_000 }, async () => {
  const { browser, page, logs } = await launch(WEBGPU_FLAGS);
  try {
    await page.goto(site.url);
    assert.equal(await waitReady(page), 'webgpu');
    await applyPreset(page, 'channels-50');

    await page.setInputFiles('#distil-folder', FOLDER);
    await page.waitForSelector('#distil-counts', { timeout: 120_000 });
    const counts = await page.locator('#distil-counts tbody tr').evaluateAll((rows) =>
      rows.map((r) => [r.cells[0].innerText, Number(r.cells[1].innerText), Number(r.cells[2].innerText)]));
    console.log('counts (class, training, held out):', JSON.stringify(counts));
    assert.equal(counts.length, 10, 'ten classes, no unlabelled images');
    for (const [, train, held] of counts) assert.deepEqual([train, held], [16, 4]);
    assert.equal(await page.locator('#distil-preview img, .distil-preview img').count(), 12);

    await page.fill('#distil-epochs', '2');
    await page.dispatchEvent('#distil-epochs', 'change');
    const started = Date.now();
    await page.click('#distil-start');
    // Pause after the first step: no step runs while paused; then resume.
    await page.waitForFunction(() => /step [1-9]/.test(document.querySelector('#distil-status')?.innerText ?? ''), null, { timeout: 600_000 });
    await page.click('#distil-pause');
    await page.waitForSelector('#distil-status:has-text("paused")', { timeout: 120_000 });
    const pausedAt = (await numbers(page, 'data-train')).length;
    await page.waitForTimeout(3000);
    assert.equal((await numbers(page, 'data-train')).length, pausedAt, 'no steps while paused');
    await page.click('#distil-pause');
    await waitForResult(page);
    console.log(`WebGPU fine-tune of 160 images × 2 epochs: ${Date.now() - started} ms; ${(await page.innerText('#distil-result')).split('\n').pop()}`);

    const heldout = await numbers(page, 'data-heldout');
    const train = await numbers(page, 'data-train');
    console.log('held-out loss per epoch:', heldout, 'training loss per step:', train);
    assert.equal(heldout.length, 3, 'before training and after each epoch');
    assert.ok(heldout[2] < heldout[0] * 0.7, `held-out loss ${heldout}`);
    assert.equal(train.length, 10);
    const r = await result(page);
    console.log('before/after:', JSON.stringify(r));
    const [, beforeAcc, afterAcc] = r['test-accuracy'].map(parseFloat);
    assert.ok(afterAcc > beforeAcc + 5, `test accuracy ${beforeAcc} → ${afterAcc}`);
    assert.ok(parseFloat(r['heldout-agreement'][2]) > parseFloat(r['heldout-agreement'][1]));
    assert.equal(r.size[1], r.size[2], 'the fine-tuned network keeps its compression');
    assert.match(await page.innerText('#distil-result'), /on WebGPU/);
    // The lab panel now shows the fine-tuned network.
    const c = await comparison(page);
    assert.equal(parseFloat(c.accuracy.after).toFixed(2), afterAcc.toFixed(2));
    await page.screenshot({ path: path.join(OUT, 'distil-webgpu.png'), fullPage: true });
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
});

test('distillation on the CPU fallback: quantization-aware int4 on the training sample, and cancel', { timeout: 1_800_000 }, async () => {
  const { browser, page, logs } = await launch(NO_WEBGPU_FLAGS);
  try {
    await page.goto(site.url);
    assert.equal(await waitReady(page), 'cpu');
    await page.click('#model-fashion');
    await page.selectOption('#weight-bits', '4');
    await page.selectOption('#weight-granularity', 'tensor');
    await page.click('#lab-apply');
    await page.waitForSelector('#lab-state[data-state="done"]', { timeout: 600_000 });

    await page.click('#distil-builtin');
    await page.waitForSelector('#distil-counts', { timeout: 120_000 });
    assert.match(await page.innerText('#distil-data'), /1000 Fashion-MNIST training images/);
    assert.ok(await page.isChecked('#distil-qat'));

    // Cancel leaves the compressed network as it was.
    await page.click('#distil-start');
    await page.waitForFunction(() => /step [2-9]/.test(document.querySelector('#distil-status')?.innerText ?? ''), null, { timeout: 600_000 });
    await page.click('#distil-cancel');
    await page.waitForSelector('#distil-message:has-text("Cancelled")', { timeout: 120_000 });

    const started = Date.now();
    await page.click('#distil-start');
    await waitForResult(page);
    console.log(`CPU fine-tune of 800 images × 3 epochs: ${Date.now() - started} ms; ${(await page.innerText('#distil-result')).split('\n').pop()}`);
    const r = await result(page);
    console.log('before/after:', JSON.stringify(r));
    const [teacher, beforeAcc, afterAcc] = r['test-accuracy'].map(parseFloat);
    assert.ok(afterAcc > beforeAcc + 1, `int4 per-tensor ${beforeAcc} → ${afterAcc} (teacher ${teacher})`);
    assert.match(await page.innerText('#distil-result'), /quantization-aware/);
    const heldout = await numbers(page, 'data-heldout');
    assert.ok(heldout.at(-1) < heldout[0], `held-out loss ${heldout}`);
    await page.screenshot({ path: path.join(OUT, 'distil-cpu.png'), fullPage: true });
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
});
