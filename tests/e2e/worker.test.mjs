// The model worker's jobs as a person meets them. One long job at a time: a second is
// answered "busy", and Cancel stops the running one within a second on the CPU fallback.
// When the worker stops, the page replaces it for the right reason and brings its own
// state in line with the new worker. A panic (a bug or an input the engine did not turn into
// an error) is not the GPU's fault: the page stays on WebGPU. A lost WebGPU device moves the
// page to the CPU fallback. A trap (an uncaught error) restarts the worker on the same
// backend, and the lab no longer offers to export a variant the new worker does not hold.
//
// The panic and GPU cases post the message the worker's panic hook sends (worker/src/worker.rs)
// from inside the real worker; the trap is a real uncaught error thrown in the worker.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { serveSite, launch, dropFiles, sample, waitReady, resultFor, WEBGPU_FLAGS, NO_WEBGPU_FLAGS } from './harness.mjs';

let site;
before(async () => { site = await serveSite(); });
after(() => site?.close());

/** The model worker (not a batch helper of the pool). */
async function modelWorker(page) {
  for (let attempt = 0; attempt < 100; attempt += 1) {
    for (const w of page.workers()) {
      const name = await w.evaluate(() => self.name).catch(() => null);
      if (name !== null && name !== 'compresslab-helper') return w;
    }
    await page.waitForTimeout(100);
  }
  throw new Error('no model worker');
}

/** Makes the worker stop with `how`, waits for the page's notice, then for the new worker. */
async function crash(page, how) {
  const before = await page.evaluate(() => document.querySelector('#notice')?.innerText ?? '');
  const worker = await modelWorker(page);
  // The page may terminate the worker before the evaluation answers.
  await worker.evaluate(how).catch(() => {});
  await page.waitForFunction((old) => {
    const n = document.querySelector('#notice');
    return n && n.innerText !== old;
  }, before, { timeout: 30_000 });
  const notice = await page.innerText('#notice');
  return { notice, backend: await waitReady(page) };
}

async function classify(page, name) {
  await dropFiles(page, [{ name, type: 'image/png', bytes: sample(name) }]);
  return resultFor(page, name);
}

test('a panic keeps WebGPU, a lost device moves to the CPU, a trap resets the lab', { timeout: 900_000 }, async () => {
  const { browser, page, logs } = await launch(WEBGPU_FLAGS);
  try {
    await page.goto(site.url);
    assert.equal(await waitReady(page), 'webgpu', logs.join('\n'));
    assert.match((await classify(page, 'coffee.png')).labels[0], /espresso/);

    // A panic in our code: restarted on WebGPU, and it classifies again there.
    const panic = await crash(page, () => self.postMessage({
      type: 'Crashed', message: 'panicked at src/exec/cpu.rs:1:1: test panic', cause: 'Panic',
    }));
    assert.match(panic.notice, /the model worker panicked: .*test panic\. It was restarted on the same backend/);
    assert.equal(panic.backend, 'webgpu', 'a panic must not demote the page to the CPU');
    const again = await classify(page, 'chelsea.png');
    assert.ok(!again.error, again.error);
    assert.equal(await page.getAttribute('#status', 'data-backend'), 'webgpu');

    // The GPU stack failing: the page goes on on the CPU fallback and says why.
    const lost = await crash(page, () => self.postMessage({
      type: 'Crashed', message: 'Device lost (test)', cause: 'Gpu',
    }));
    assert.match(lost.notice, /the WebGPU device was lost or failed: Device lost \(test\)\. The page goes on on the CPU fallback/);
    assert.equal(lost.backend, 'cpu');

    // A variant in the lab, then a real uncaught error in the worker.
    assert.ok(!(await classify(page, 'coffee.png')).error);
    await page.click('button[data-preset="int8-channel"]');
    await page.fill('#lab-runs', '2');
    await page.dispatchEvent('#lab-runs', 'change');
    await page.click('#lab-apply');
    await page.waitForSelector('#lab-state[data-state="done"], #lab-state[data-state="failed"]', { timeout: 600_000 });
    assert.equal(await page.getAttribute('#lab-state', 'data-state'), 'done');
    assert.equal(await page.isDisabled('#lab-export'), false);

    const trap = await crash(page, () => { setTimeout(() => { throw new Error('test trap'); }, 0); });
    assert.match(trap.notice, /the model worker stopped .*test trap\. It was restarted on the same backend/);
    assert.equal(trap.backend, 'cpu');
    assert.equal(await page.getAttribute('#lab-state', 'data-state'), 'failed');
    assert.match(await page.innerText('#lab-error'), /The variant it held is gone: apply or load it again/);
    assert.equal(await page.isDisabled('#lab-export'), true, 'no Export of a variant the worker no longer has');
    const after = await classify(page, 'chelsea.png');
    assert.ok(!after.error, after.error);
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
});

/** Clicks `button` inside the page; milliseconds until `target`'s data-state is `state`. */
/** Clicks `button`, then ms until `target`'s state is `state` or `done` (the job ended anyway). */
async function msUntil(page, button, target, state) {
  return page.evaluate(([button, target, state]) => new Promise((resolve) => {
    const finished = () => [state, 'done'].includes(document.querySelector(target)?.dataset.state);
    const start = performance.now();
    const observer = new MutationObserver(() => {
      if (finished()) { observer.disconnect(); resolve(performance.now() - start); }
    });
    observer.observe(document.body, { subtree: true, childList: true, attributes: true, characterData: true });
    document.querySelector(button).click();
  }), [button, target, state]);
}

test('one long job at a time, and Cancel stops it within a second on the CPU', { timeout: 900_000 }, async () => {
  const { browser, page, logs } = await launch(NO_WEBGPU_FLAGS);
  try {
    await page.goto(site.url);
    assert.equal(await waitReady(page), 'cpu', logs.join('\n'));
    assert.equal(await page.evaluate(() => crossOriginIsolated), true, 'the page shares its cancel counter');
    assert.ok(!(await classify(page, 'coffee.png')).error);

    // The device report is running: Apply is answered "busy", in the lab's own panel.
    await page.fill('#bench-runs', '100');
    await page.dispatchEvent('#bench-runs', 'change');
    await page.click('#device-report-run');
    await page.waitForSelector('#bench-result[data-state="running"]');
    await page.click('button[data-preset="int8-channel"]');
    await page.click('#lab-apply');
    await page.waitForSelector('#lab-state[data-state="failed"]', { timeout: 60_000 });
    assert.match(await page.innerText('#lab-error'), /busy with the device report: wait for it to finish, or cancel it/);
    assert.equal(await page.getAttribute('#bench-result', 'data-state'), 'running', 'the report goes on');

    // Cancel the report.
    const reportMs = await msUntil(page, '#bench-cancel', '#bench-result', 'failed');
    assert.match(await page.innerText('#bench-result'), /Cancelled\./);

    // Cancel an Apply while it compresses (synchronous engine code in the worker).
    await page.fill('#lab-runs', '200');
    await page.dispatchEvent('#lab-runs', 'change');
    await page.click('#lab-apply');
    await page.waitForSelector('#lab-cancel', { timeout: 60_000 });
    // Past the start: inside compression (calibration, layer by layer) or the timing runs.
    await page.waitForFunction(() => /Compressing|Timing/.test(document.querySelector('#lab-state')?.innerText ?? ''),
      null, { timeout: 60_000, polling: 10 });
    const applyStage = await page.innerText('#lab-state');
    const applyMs = await msUntil(page, '#lab-cancel', '#lab-state', 'failed');
    assert.match(await page.innerText('#lab-error'), /^Cancelled\.$/);
    console.log(`cancel took ${reportMs.toFixed(0)} ms (device report) and ${applyMs.toFixed(0)} ms (Apply at "${applyStage.trim()}")`);
    assert.ok(reportMs < 1000 && applyMs < 1000, `cancel took ${reportMs} and ${applyMs} ms`);

    // The worker is free again: the same Apply, with few runs, completes.
    await page.fill('#lab-runs', '2');
    await page.dispatchEvent('#lab-runs', 'change');
    await page.click('#lab-apply');
    await page.waitForSelector('#lab-state[data-state="done"], #lab-state[data-state="failed"]', { timeout: 600_000 });
    assert.equal(await page.getAttribute('#lab-state', 'data-state'), 'done',
      await page.innerText('#lab-state'));
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
});

test('without cross-origin isolation (a plain static host), Cancel still stops timing within a second on the CPU', { timeout: 900_000 }, async () => {
  // No shared counter: the page's Cancel is a message, read when the job yields.
  const plain = await serveSite({ isolated: false });
  const { browser, page, logs } = await launch(NO_WEBGPU_FLAGS);
  try {
    await page.goto(plain.url);
    assert.equal(await waitReady(page), 'cpu', logs.join('\n'));
    assert.equal(await page.evaluate(() => crossOriginIsolated), false);
    assert.ok(!(await classify(page, 'coffee.png')).error);

    await page.fill('#bench-runs', '100');
    await page.dispatchEvent('#bench-runs', 'change');
    await page.click('#device-report-run');
    await page.waitForFunction(() => /Timing/.test(document.querySelector('#bench-result')?.innerText ?? ''),
      null, { timeout: 120_000, polling: 10 });
    const reportMs = await msUntil(page, '#bench-cancel', '#bench-result', 'failed');
    assert.match(await page.innerText('#bench-result'), /Cancelled\./);

    // An Apply cancelled in its timing runs (compression itself is synchronous engine code:
    // without the shared counter a cancel there waits for its end).
    await page.fill('#lab-runs', '200');
    await page.dispatchEvent('#lab-runs', 'change');
    await page.click('button[data-preset="int8-channel"]');
    await page.click('#lab-apply');
    await page.waitForFunction(() => /Timing/.test(document.querySelector('#lab-state')?.innerText ?? ''),
      null, { timeout: 300_000, polling: 10 });
    const applyMs = await msUntil(page, '#lab-cancel', '#lab-state', 'failed');
    assert.match(await page.innerText('#lab-error'), /^Cancelled\.$/);
    console.log(`without isolation, cancel took ${reportMs.toFixed(0)} ms (device report) and ${applyMs.toFixed(0)} ms (Apply, timing)`);
    assert.ok(reportMs < 1000 && applyMs < 1000, `cancel took ${reportMs} and ${applyMs} ms`);

    // The worker is free again.
    await page.fill('#lab-runs', '2');
    await page.dispatchEvent('#lab-runs', 'change');
    await page.click('#lab-apply');
    await page.waitForSelector('#lab-state[data-state="done"], #lab-state[data-state="failed"]', { timeout: 600_000 });
    assert.equal(await page.getAttribute('#lab-state', 'data-state'), 'done', await page.innerText('#lab-state'));
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
    plain.close();
  }
});
