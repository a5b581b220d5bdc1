// "Your model", end to end in headless Chromium, as a developer would use it: drop a real
// third-party ONNX CNN (rapidocr's text-direction classifier) on the page, add its class
// names, set its preprocessing, classify rendered text lines (upright and rotated 180°),
// compress it to int8 W8A8 (agreement on lines that did not calibrate it), fine-tune the
// compressed model briefly, export it and run that file in ONNX Runtime (Python). Once on
// the CPU fallback and once on WebGPU (SwiftShader).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { serveSite, launch, dropFiles, waitReady, NO_WEBGPU_FLAGS, WEBGPU_FLAGS, OUT, ROOT, readNpy, onnxRuntime, downloadFrom } from './harness.mjs';

const MODELS = path.join(ROOT, '.cache/onnx-models');

let site;
before(async () => { site = await serveSite(); });
after(() => site?.close());

// Opens "Your model", drops the text-direction model with its class names and sets
// rapidocr's preprocessing: the file leaves height and width open; rapidocr feeds 48×192
// text lines scaled to the height and padded right, in [−1, 1].
async function openTextDirection(page) {
  await page.goto(site.url);
  await waitReady(page);
  await page.click('#model-yours');
  await dropFiles(page, [
    { name: 'textdir.onnx', type: 'application/octet-stream', bytes: readFileSync(path.join(MODELS, 'textdir.onnx')) },
    { name: 'labels.txt', type: 'text/plain', bytes: Buffer.from('upright 0°\nrotated 180°\n') },
  ]);
  await page.waitForSelector('#user-summary', { timeout: 60_000 });
  await page.waitForSelector('#user-labels');
  await page.fill('#user-height', '48');
  await page.dispatchEvent('#user-height', 'change');
  await page.fill('#user-width', '192');
  await page.dispatchEvent('#user-width', 'change');
  await page.selectOption('#user-resize', 'pad');
  await page.selectOption('#user-normalization', 'unit');
}

// Compresses the loaded model with one of the panel's recipes and waits for the report (or
// for `report`, a selector that tells the new one from the one before).
async function compressWith(page, recipe, report = '#user-report') {
  await page.selectOption('#user-recipe', recipe);
  await page.click('#user-compress');
  await page.waitForSelector(`${report}, #user-error`, { timeout: 300_000 });
  if (await page.$('#user-error')) throw new Error(await page.innerText('#user-error'));
}

// Lines of textdir.input.npy an exported two-class model reads right in ONNX Runtime, and
// how many lines there are; `classOf(direction)` is the output that stands for a direction.
function linesRightInOnnxRuntime(file, out, classOf) {
  const { shape, data } = onnxRuntime(file, path.join(MODELS, 'textdir.input.npy'), out);
  const directions = readNpy(path.join(MODELS, 'textdir.labels.npy')).data;
  let right = 0;
  for (let i = 0; i < shape[0]; i++) {
    const predicted = data[2 * i + 1] > data[2 * i] ? 1 : 0;
    if (predicted === classOf(directions[i])) right += 1;
  }
  return { right, lines: shape[0] };
}

// Runs the sweep and reads its table (the setting, top-1 same, held-out images and every
// cell's text).
async function runSweep(page) {
  const start = Date.now();
  await page.click('#user-sweep');
  await page.waitForFunction(() => !document.querySelector('#user-busy') && (document.querySelectorAll('#user-sweep-table tbody tr').length > 0 || document.querySelector('#user-error')), null, { timeout: 300_000 });
  if (await page.$('#user-error')) throw new Error(await page.innerText('#user-error'));
  const sweep = await page.locator('#user-sweep-table tbody tr').evaluateAll((rows) => rows.map((r) => ({
    setting: r.cells[0].innerText, same: Number(r.dataset.same), images: Number(r.dataset.images), cells: [...r.cells].map((c) => c.innerText),
  })));
  console.log(`sweep of ${sweep.length} settings: ${Date.now() - start} ms`, JSON.stringify(sweep));
  return sweep;
}

async function yourModel(flags, backend) {
  const { browser, page, logs } = await launch(flags);
  try {
    await openTextDirection(page);
    const summary = await page.innerText('#user-summary');
    console.log(summary);
    assert.match(summary, /133628 parameters/);
    assert.match(await page.innerText('#user-ops'), /HardSwish ×18/);
    assert.match(await page.innerText('#user-labels'), /2 class names from labels\.txt/);

    const all = readdirSync(path.join(MODELS, 'lines')).filter((f) => f.endsWith('.png')).sort();
    assert.equal(all.length, 12);
    // SwiftShader runs the model in seconds, not milliseconds: two texts there (the first
    // calibrates and trains, the second measures), all six on the CPU.
    const lines = backend === 'webgpu' ? all.filter((f) => /^line-[01]-/.test(f)) : all;
    const half = lines.length / 2;
    await dropFiles(page, lines.map((name) => ({ name, type: 'image/png', bytes: readFileSync(path.join(MODELS, 'lines', name)) })));
    await page.waitForFunction((n) => document.querySelectorAll('#user-results .user-card .top5, #user-results .user-card .error').length === n, lines.length, { timeout: 120_000 });
    let right = 0;
    for (const name of lines) {
      const card = page.locator(`#user-results .user-card[data-name="${name}"]`);
      const top = await card.locator('.prediction .label').first().innerText();
      const expected = name.endsWith('-180.png') ? 'rotated 180°' : 'upright 0°';
      if (top === expected) right += 1;
      else console.log(`${name}: ${top}`);
    }
    const timing = await page.locator('#user-results .user-card .timing').last().innerText();
    console.log(`text direction in the page (${timing}): ${right}/${lines.length} lines right`);
    assert.match(timing, backend === 'webgpu' ? /on WebGPU/ : /on CPU interpreter/);
    // ONNX Runtime gets 12/12 on the same lines (tests/models/make_models.py); the page
    // resizes with its own bicubic filter, so allow one line of difference.
    assert.ok(right >= lines.length - 1, `${right}/${lines.length}`);

    // int8 W8A8: the first half of the lines calibrates, the other half measures agreement
    // (measured 6/6 on the CPU, 2/2 on WebGPU; one miss in six allowed).
    const enough = Math.ceil((half * 5) / 6);
    await compressWith(page, 'w8a8');
    const agreement = page.locator('#user-agreement');
    const same = Number(await agreement.getAttribute('data-same'));
    const heldOut = Number(await agreement.getAttribute('data-held-out'));
    console.log(await agreement.innerText());
    assert.equal(heldOut, half);
    assert.ok(same >= enough, `int8 top-1 unchanged on ${same}/${heldOut}`);
    const bytesAfter = parseFloat(await page.innerText('#user-bytes-after'));
    const rows = await page.locator('#user-layers tbody tr').count();
    assert.equal(rows, 54, 'one row per conv / Gemm');
    // Per-layer histograms: the first quantized layer is shown; clicking another shows its
    // narrowest channel on its int8 grid (per channel: well over 100 levels inside its range).
    const caption = () => page.innerText('#user-narrowest-caption');
    assert.match(await caption(), /quantization levels fall inside its range/);
    await page.locator('#user-layers tbody tr').nth(5).click();
    await page.waitForSelector('#user-layers tbody tr:nth-child(6).selected');
    const title = await page.innerText('#user-layer-detail h4');
    const levels = Number((await caption()).match(/(\d+) quantization levels/)[1]);
    console.log(`${title}: ${await caption()}`);
    assert.equal(title.split(' ')[0], await page.locator('#user-layers tbody tr').nth(5).getAttribute('data-layer'));
    assert.ok(levels >= 100, `${levels} levels`);
    assert.equal(await page.locator('#user-layer-detail svg').count(), 2);
    assert.ok(bytesAfter < 0.2, `${bytesAfter} MB of int8 weights`);
    const executor = await page.innerText('#user-report .executor');
    console.log(executor);
    const held = (await page.locator('#user-report tr', { hasText: 'Weights held while running' }).innerText()).match(/([0-9.]+) MB\s+([0-9.]+) MB/);
    assert.ok(held, 'the held-memory row shows both sides');
    const [heldBefore, heldAfter] = [Number(held[1]), Number(held[2])];
    console.log(`weights held while running: ${heldBefore} → ${heldAfter} MB`);
    if (backend === 'webgpu') {
      // The 42 1×1 layers on the WGSL int8 kernel (as the engine's lavapipe test counts
      // them); the stem, depthwise and strided layers in float. The kernels hold packed
      // int8 words: 0.49 → 0.22 MB natively.
      assert.match(executor, /WebGPU .* through the burn interpreter: 42 layers on the int8 kernel .*; 12 layers quantized but without an integer kernel/);
      assert.ok(heldAfter < heldBefore * 0.6, `${heldBefore} → ${heldAfter} MB held`);
    } else {
      // All 54 layers on the int8 kernels, the 11 depthwise ones included (as the engine test
      // counts them). They keep centred i16 weights: 0.53 → 0.33 MB.
      assert.match(executor, /CPU interpreter: 54 layers on the int8 kernel \(/);
      assert.doesNotMatch(executor, /without an integer kernel/);
      assert.ok(heldAfter < heldBefore * 0.7, `${heldBefore} → ${heldAfter} MB held`);
    }

    // Fine-tune the int8 variant toward the original on the 6 lines that calibrated it;
    // agreement is measured again on the other 6.
    if (backend === 'cpu') {
      // A long run stops at the next step when asked, and leaves the variant as it was.
      await page.fill('#user-epochs', '50');
      await page.dispatchEvent('#user-epochs', 'change');
      await page.click('#user-finetune');
      await page.waitForFunction(() => /step \d+ of/.test(document.querySelector('#user-busy')?.textContent ?? ''), null, { timeout: 120_000 });
      await page.click('#user-tune-stop');
      await page.waitForSelector('#user-error', { timeout: 60_000 });
      const stopped = await page.innerText('#user-error');
      console.log(stopped);
      assert.match(stopped, /fine-tuning stopped after \d+ of 150 steps; the compressed variant is unchanged/);
      assert.equal(await page.$('#user-fine-tuned'), null);
    }
    await page.fill('#user-epochs', '3');
    await page.dispatchEvent('#user-epochs', 'change');
    await page.click('#user-finetune');
    await page.waitForSelector('#user-fine-tuned, #user-error', { timeout: 300_000 });
    const guarded = await page.$('#user-error');
    if (guarded) {
      // W8A8 on two lines is already within rounding noise of the original (training loss
      // ~1e-4): a step can land on either side, and the page must keep the variant and say
      // so. Measured on SwiftShader: 1.27e-4 → 2.1e-3 at lr 1e-4. (On the CPU, with six
      // lines, the loss goes down and that branch must not be taken.)
      const message = await page.innerText('#user-error');
      console.log(message);
      assert.equal(backend, 'webgpu', message);
      assert.match(message, /did not lower the distillation loss on the training images \(.* → .*\); the compressed variant is unchanged/);
    } else {
      const tuned = await page.innerText('#user-fine-tuned');
      console.log(tuned);
      // Each line and its 3 flipped copies, in batches of 8.
      const steps = 3 * Math.ceil((4 * half) / 8);
      assert.match(tuned, new RegExp(`3 epochs \\(${steps} steps\\) on ${half} images \\(those that calibrated it\\)`));
      // The worker keeps the variant unchanged (and says so) unless the loss went down.
      const loss = tuned.match(/loss on those images ([0-9.e+-]+) → ([0-9.e+-]+)/);
      assert.ok(loss && Number(loss[2]) < Number(loss[1]), tuned);
    }
    const tunedSame = Number(await page.locator('#user-agreement').getAttribute('data-same'));
    console.log(`after fine-tuning: ${await page.innerText('#user-agreement')}`);
    assert.equal(Number(await page.locator('#user-agreement').getAttribute('data-held-out')), half);
    assert.ok(tunedSame >= enough, `fine-tuned int8 top-1 unchanged on ${tunedSame}/${half}`);
    await page.screenshot({ path: path.join(OUT, `your-model-${backend}.png`), fullPage: true });

    // The export is an ONNX file ONNX Runtime runs, and it still reads the text lines.
    const download = await downloadFrom(page, '#user-export', '.onnx', `textdir.compressed.${backend}.onnx`);
    assert.equal(download.name, 'textdir.compressed.onnx');
    const exported = download.file;
    const ort = linesRightInOnnxRuntime(exported, path.join(OUT, `textdir.compressed.${backend}.out.npy`), (d) => d);
    console.log(`ONNX Runtime on the page's int8 export: ${ort.right}/${ort.lines} lines right, ${readFileSync(exported).length} bytes`);
    assert.ok(ort.right >= ort.lines - 1, `${ort.right}/${ort.lines}`);

    // The finished cards can be cleared; the model and its compressed variant stay.
    await page.click('#user-clear');
    assert.equal(await page.locator('#user-results .user-card').count(), 0);
    assert.ok(await page.$('#user-report'));
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
}

test('your model on the CPU fallback: import a third-party ONNX CNN, classify, compress to int8, fine-tune, export and run it in ONNX Runtime', { timeout: 900_000 }, async () => {
  await yourModel(NO_WEBGPU_FLAGS, 'cpu');
});

test('your model on WebGPU (SwiftShader): the same, run and fine-tuned by the burn interpreter', { timeout: 900_000 }, async () => {
  await yourModel(WEBGPU_FLAGS, 'webgpu');
});

test('your model with folder labels (CPU fallback): accuracy on held-out labelled lines, fine-tuned toward the labels', { timeout: 600_000 }, async () => {
  // A folder per class, named as the labels file names them, one folder that names no
  // class and a stray text file (neither is a label).
  const root = mkdtempSync(path.join(os.tmpdir(), 'textdir-folders-'));
  const folder = path.join(root, 'lines');
  const lines = readdirSync(path.join(MODELS, 'lines')).filter((f) => f.endsWith('.png')).sort();
  for (const [dir, suffix] of [['upright 0°', '-0.png'], ['Rotated_180', '-180.png']]) {
    mkdirSync(path.join(folder, dir), { recursive: true });
    for (const f of lines.filter((l) => l.endsWith(suffix))) copyFileSync(path.join(MODELS, 'lines', f), path.join(folder, dir, f));
  }
  mkdirSync(path.join(folder, 'unsorted'));
  copyFileSync(path.join(MODELS, 'lines', lines[0]), path.join(folder, 'unsorted', 'extra.png'));
  writeFileSync(path.join(folder, 'notes.txt'), 'not class names\n');
  const { browser, page, logs } = await launch(NO_WEBGPU_FLAGS);
  try {
    await openTextDirection(page);
    await page.setInputFiles('#user-folder-input', folder);
    await page.waitForFunction(() => document.querySelectorAll('#user-results .user-card .top5, #user-results .user-card .error').length === 13, null, { timeout: 120_000 });
    assert.match(await page.innerText('#user-notice'), /1 file is not an image/);
    assert.match(await page.innerText('#user-labels'), /2 class names from labels\.txt/, 'a text file inside the folder is not taken for class names');
    const truths = await page.locator('#user-results .truth').allInnerTexts();
    console.log(truths.join('\n'));
    assert.equal(truths.length, 13);
    assert.equal(truths.filter((t) => /names no class of this model/.test(t)).length, 1);
    const rightCards = await page.locator('#user-results .truth[data-right="true"]').count();
    assert.ok(rightCards >= 11, `${rightCards}/12 labelled lines right`);

    // Half of each class calibrates (3 + 3, and 1 of the unsorted line's group of one); the
    // other 3 + 3 lines are held out and measure accuracy.
    await compressWith(page, 'w8a8');
    const accuracy = page.locator('#user-accuracy');
    console.log(await accuracy.innerText());
    assert.equal(await accuracy.getAttribute('data-images'), '6');
    assert.match(await accuracy.innerText(), /Too few images for a percentage/);
    // ONNX Runtime gets every line right; the page's own resize allows one miss.
    assert.ok(Number(await accuracy.getAttribute('data-original')) >= 5);
    assert.ok(Number(await accuracy.getAttribute('data-variant')) >= 5);
    assert.equal(await page.locator('#user-agreement').getAttribute('data-held-out'), '6');

    await page.fill('#user-epochs', '3');
    await page.dispatchEvent('#user-epochs', 'change');
    await page.click('#user-finetune');
    await page.waitForSelector('#user-fine-tuned, #user-error', { timeout: 300_000 });
    if (await page.$('#user-error')) throw new Error(await page.innerText('#user-error'));
    const tuned = await page.innerText('#user-fine-tuned');
    console.log(tuned);
    assert.match(tuned, /on 7 images \(those that calibrated it\) .* and, for the 6 whose folder names a class, that class \(half the loss\)/);
    assert.match(tuned, /loss \(distillation \+ cross-entropy\) on those images/);
    console.log(`after fine-tuning: ${await page.innerText('#user-accuracy')}`);
    assert.ok(Number(await page.locator('#user-accuracy').getAttribute('data-variant')) >= 5);

    // Feature matching on a channel-pruned variant (30 % of the channels removed, so the
    // layers read narrower inputs than the original's: compared on the channels it kept), at
    // two layers named in the per-layer table; a name that is not a layer is refused with the
    // reason and leaves the variant as it was.
    await compressWith(page, 'channels30', '#user-report:not(:has(#user-fine-tuned))');
    const layerNames = await page.locator('#user-layers tbody tr td:first-child').allInnerTexts();
    const matched = [layerNames[Math.floor(layerNames.length / 3)], layerNames[Math.floor((2 * layerNames.length) / 3)]];
    await page.fill('#user-features', 'no such layer');
    await page.dispatchEvent('#user-features', 'change');
    await page.click('#user-finetune');
    await page.waitForSelector('#user-error', { timeout: 60_000 });
    assert.match(await page.innerText('#user-error'), /no layer with weights named `no such layer`/);
    await page.fill('#user-features', matched.join(', '));
    await page.dispatchEvent('#user-features', 'change');
    await page.click('#user-finetune');
    await page.waitForSelector('#user-fine-tuned, #user-error', { timeout: 300_000 });
    if (await page.$('#user-error')) throw new Error(await page.innerText('#user-error'));
    const featured = await page.innerText('#user-fine-tuned');
    console.log(featured);
    assert.ok(featured.includes(`to read what the original reads at ${matched.join(', ')} (weight 1)`), featured);
    const featureLoss = featured.match(/loss \(distillation \+ cross-entropy \+ feature matching\) on those images ([0-9.e+-]+) → ([0-9.e+-]+)/);
    assert.ok(featureLoss && Number(featureLoss[2]) < Number(featureLoss[1]), featured);

    // The sweep: every setting on the held-out lines (the other half calibrates W8A8), the
    // fine-tuned variant left as it is.
    const sweep = await runSweep(page);
    assert.equal(sweep.length, 31, '12 sparsities, 12 channel ratios, 6 weight schemes and W8A8');
    for (const p of sweep) assert.equal(p.images, 6);
    const row = (setting) => sweep.find((p) => p.setting === setting);
    assert.equal(row('0 % zero weights').same, 6);
    assert.equal(row('0 % channels removed').same, 6);
    assert.equal(row('int8 per-channel').same, 6);
    assert.match(row('W8A8 per-channel').cells[2], /^[56]\/6$/, 'the "Right (labelled)" column');
    assert.match(await page.innerText('#user-sweep-caption'), /^31 of 31 settings measured on 6 held-out images \(6 labelled by their folders.*Too few for charts/);
    assert.equal(await page.locator('#user-sweep-pruning').count(), 0, 'no percentages on 6 images');
    await page.screenshot({ path: path.join(OUT, 'your-model-folders.png'), fullPage: true });
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
    rmSync(root, { recursive: true, force: true });
  }
});

test('your model learns your own classes (CPU fallback): a new head on folders of lines, measured on held-out lines, compressed and exported', { timeout: 600_000 }, async () => {
  // The 48 sweep lines in two folders of the user's own names, which the model does not
  // have; sorted, "backwards" (the turned lines) comes first where the model has 0° first.
  const root = mkdtempSync(path.join(os.tmpdir(), 'textdir-own-classes-'));
  const folder = path.join(root, 'directions');
  const dir = path.join(MODELS, 'sweep-lines');
  const sweepLines = readdirSync(dir).filter((f) => f.endsWith('.png')).sort();
  for (const [name, suffix] of [['forwards', '-0.png'], ['backwards', '-180.png']]) {
    mkdirSync(path.join(folder, name), { recursive: true });
    for (const f of sweepLines.filter((l) => l.endsWith(suffix))) copyFileSync(path.join(dir, f), path.join(folder, name, f));
  }
  const { browser, page, logs } = await launch(NO_WEBGPU_FLAGS);
  try {
    await openTextDirection(page);
    assert.ok(await page.isDisabled('#user-new-head'), 'no folders yet');
    await page.setInputFiles('#user-folder-input', folder);
    await page.waitForFunction(() => document.querySelectorAll('#user-results .user-card .top5, #user-results .user-card .error').length === 48, null, { timeout: 180_000 });
    const truths = await page.locator('#user-results .truth').allInnerTexts();
    assert.equal(truths.filter((t) => /names no class of this model/.test(t)).length, 48);
    assert.match(await page.innerText('.user-new-head'), /Your images come from 2 folders/);

    await page.click('#user-new-head');
    await page.waitForSelector('#user-new-head-report, #user-error', { timeout: 300_000 });
    if (await page.$('#user-error')) throw new Error(await page.innerText('#user-error'));
    const report = await page.innerText('#user-new-head-report');
    console.log(report);
    assert.match(report, /New head in place of `[^`]+`: 2 classes \(backwards, forwards\), fitted on 24 images \((\d+) right\)/);
    const held = (await page.innerText('#user-new-head-held-out')).match(/On the (\d+) images that did not train it: (\d+) right \(([\d.]+) %\)/);
    assert.ok(held, report);
    assert.equal(Number(held[1]), 24);
    // Measured 24/24 (the original reads every line right, and its features separate them).
    assert.ok(Number(held[2]) >= 23, report);
    assert.match(await page.innerText('#user-labels'), /2 class names from your folders \(the new head\)/);
    assert.match(await page.innerText('#user-notice'), /The 48 earlier result cards were cleared/);
    assert.equal(await page.locator('#user-results .user-card').count(), 0);

    // Lines the head never saw, dropped without folders: its classes, in its order.
    const lines = readdirSync(path.join(MODELS, 'lines')).filter((f) => f.endsWith('.png')).sort();
    await dropFiles(page, lines.map((name) => ({ name, type: 'image/png', bytes: readFileSync(path.join(MODELS, 'lines', name)) })));
    await page.waitForFunction((n) => document.querySelectorAll('#user-results .user-card .top5, #user-results .user-card .error').length === n, lines.length, { timeout: 120_000 });
    let right = 0;
    for (const name of lines) {
      const top = await page.locator(`#user-results .user-card[data-name="${name}"] .prediction .label`).first().innerText();
      if (top === (name.endsWith('-180.png') ? 'backwards' : 'forwards')) right += 1;
      else console.log(`${name}: ${top}`);
    }
    console.log(`the new head on 12 other lines: ${right}/12`);
    assert.ok(right >= 11, `${right}/12`);

    // Compressed as any model: int8 W8A8, accuracy on the folders' held-out half in the new
    // classes (the first half trained the head and calibrates).
    await compressWith(page, 'w8a8');
    const accuracy = page.locator('#user-accuracy');
    console.log(await accuracy.innerText());
    assert.equal(await accuracy.getAttribute('data-images'), '24');
    assert.ok(Number(await accuracy.getAttribute('data-variant')) >= 23);

    // The export carries the new head and its class names; ONNX Runtime reads the lines in
    // the new order (backwards = 0).
    const download = await downloadFrom(page, '#user-export', '.onnx', 'textdir.own-classes.onnx');
    const bytes = readFileSync(download.file);
    assert.ok(bytes.includes('["backwards","forwards"]'), 'class names in the metadata');
    const ort = linesRightInOnnxRuntime(download.file, path.join(OUT, 'textdir.own-classes.out.npy'), (d) => 1 - d);
    console.log(`ONNX Runtime on the new-head W8A8 export: ${ort.right}/${ort.lines}`);
    assert.ok(ort.right >= ort.lines - 1, `${ort.right}/${ort.lines}`);
    await page.screenshot({ path: path.join(OUT, 'your-model-own-classes.png'), fullPage: true });
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
    rmSync(root, { recursive: true, force: true });
  }
});

test('your model sweep with charts (CPU fallback): 48 unlabelled lines, 24 held out, charts that match the table', { timeout: 600_000 }, async () => {
  // Other lines than the tests above (rendered by the set-up): half calibrate W8A8, and the
  // other 24 are enough for the sweep to chart percentages.
  const dir = path.join(MODELS, 'sweep-lines');
  const lines = readdirSync(dir).filter((f) => f.endsWith('.png')).sort();
  assert.equal(lines.length, 48);
  const { browser, page, logs } = await launch(NO_WEBGPU_FLAGS);
  try {
    await openTextDirection(page);
    await dropFiles(page, lines.map((name) => ({ name, type: 'image/png', bytes: readFileSync(path.join(dir, name)) })));
    await page.waitForFunction((n) => document.querySelectorAll('#user-results .user-card .top5, #user-results .user-card .error').length === n, lines.length, { timeout: 120_000 });
    const sweep = await runSweep(page);
    assert.equal(sweep.length, 31, '12 sparsities, 12 channel ratios, 6 weight schemes and W8A8');
    for (const p of sweep) assert.equal(p.images, 24);
    const caption = await page.innerText('#user-sweep-caption');
    console.log(caption);
    assert.match(caption, /^31 of 31 settings measured on 24 held-out images \(no folder labels them, so there is no accuracy\), against the original's top-1\.$/);
    const row = (setting) => sweep.find((p) => p.setting === setting);
    assert.equal(row('0 % zero weights').same, 24);
    assert.equal(row('0 % channels removed').same, 24);
    // Measured 24/24 (int8 per channel, W8A8) and 22/24 (int4 per block of 32), one and two
    // images of margin.
    assert.ok(row('int8 per-channel').same >= 23, JSON.stringify(row('int8 per-channel')));
    assert.ok(row('W8A8 per-channel').same >= 23, JSON.stringify(row('W8A8 per-channel')));
    assert.ok(row('int4 per-block 32').same >= 20, JSON.stringify(row('int4 per-block 32')));

    // The charts show the table's counts as percentages: a dot per pruning setting, a bar
    // per weight scheme and W8A8, each titled with its share of the held-out images, and
    // the dots higher where more images agree.
    const percent = (p) => `${p.setting}: ${(100 * p.same / p.images).toFixed(2)} %`;
    const titles = (selector) => page.locator(selector).evaluateAll((ts) => ts.map((t) => t.textContent));
    const pruned = sweep.filter((p) => /zero weights|channels removed/.test(p.setting));
    assert.equal(pruned.length, 24);
    assert.deepEqual(await titles('#user-sweep-pruning circle title'), pruned.map(percent));
    const heights = await page.locator('#user-sweep-pruning circle').evaluateAll((cs) => cs.map((c) => Number(c.getAttribute('cy'))));
    for (let i = 0; i < pruned.length; i++) {
      for (let j = 0; j < pruned.length; j++) {
        if (pruned[i].same > pruned[j].same) assert.ok(heights[i] < heights[j], `${pruned[i].setting} is drawn above ${pruned[j].setting}`);
      }
    }
    const bars = await titles('#user-sweep-quant rect title');
    console.log(bars.join('\n'));
    const quantized = sweep.filter((p) => /^(int|W8A8)/.test(p.setting));
    assert.equal(bars.length, 7);
    assert.deepEqual(bars, quantized.map(percent));
    await page.locator('#user-sweep-result').screenshot({ path: path.join(OUT, 'your-model-sweep.png') });
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
});
