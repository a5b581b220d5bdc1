// 1 000 consecutive classifications on the CPU fallback, in drops of 50 with the finished
// cards cleared in between, as a person working through a photo collection of mixed sizes
// would: the worker's memory (its wasm linear memory, which only grows, so a leak shows)
// ends within 5 % of where it was after the first ten. The live heap (bytes allocated and
// not freed) tells a leak from a heap that grew once: once the lab's set of 32 remembered
// photos is full (after the first drop of 50) it must not grow at all.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { serveSite, launch, dropFiles, sample, waitReady, NO_WEBGPU_FLAGS } from './harness.mjs';

let site;
before(async () => { site = await serveSite(); });
after(() => site?.close());

/** The model worker's wasm memory and live heap bytes (the pool's batch helpers run the same binary). */
async function workerMemory(page) {
  for (const w of page.workers()) {
    const bytes = await w.evaluate(() => (self.name === 'compresslab-helper' || typeof wasm_bindgen === 'undefined'
      ? null : [wasm_bindgen.worker_memory_bytes(), wasm_bindgen.worker_heap_live_bytes()])).catch(() => null);
    if (bytes !== null) return bytes;
  }
  throw new Error('no model worker reports its memory');
}

const mib = (bytes) => (bytes / 2 ** 20).toFixed(1);

// Photos of different sizes and formats (PNG and JPEG, 0.3 to 0.7 megapixels), so that
// decoding leaves buffers of many sizes behind, as a real collection does.
const PHOTOS = ['coffee.png', 'chelsea.png', 'rocket.jpg', 'astronaut.png', 'motorcycle_left.png', 'china.jpg', 'flower.jpg']
  .map((name) => ({ name, type: name.endsWith('.png') ? 'image/png' : 'image/jpeg', bytes: sample(name) }));

async function classifyBatch(page, count) {
  const files = Array.from({ length: count }, (_, i) => {
    const photo = PHOTOS[i % PHOTOS.length];
    return { ...photo, name: `photo-${i}-${photo.name}` };
  });
  await dropFiles(page, files);
  await page.waitForFunction((n) => {
    const cards = document.querySelectorAll('article.result');
    return cards.length === n
      && [...cards].every((c) => c.dataset.state === 'done' || c.dataset.state === 'error');
  }, count, { timeout: 600_000 });
  const errors = await page.locator('article.result[data-state="error"] .error').allInnerTexts();
  assert.deepEqual(errors, [], 'every photo is classified');
  await page.click('#clear-results');
  await page.waitForFunction(() => document.querySelectorAll('article.result').length === 0);
}

test('1 000 classifications leave the worker memory within 5 % of the first ten', { timeout: 1_200_000 }, async () => {
  const { browser, page, logs } = await launch(NO_WEBGPU_FLAGS);
  try {
    await page.goto(site.url);
    assert.equal(await waitReady(page), 'cpu', logs.join('\n'));
    await classifyBatch(page, 10);
    const [first] = await workerMemory(page);
    const started = Date.now();
    const trail = [];
    let liveAfterFirstDrop = null;
    for (let done = 10; done < 1000; done += 50) {
      await classifyBatch(page, Math.min(50, 1000 - done));
      const [memory, live] = await workerMemory(page);
      trail.push(`${mib(memory)}/${mib(live)}`);
      liveAfterFirstDrop ??= live;
    }
    console.log(`worker memory / live heap (MiB) after each drop of 50: ${trail.join(' ')}`);
    const [last, lastLive] = await workerMemory(page);
    const seconds = (Date.now() - started) / 1000;
    console.log(`worker memory after 10 classifications: ${(first / 2 ** 20).toFixed(1)} MiB; after 1 000: ${(last / 2 ** 20).toFixed(1)} MiB (${((last / first - 1) * 100).toFixed(1)} %); 990 in ${seconds.toFixed(0)} s`);
    assert.ok(last <= first * 1.05, `worker memory grew from ${first} to ${last} bytes`);
    assert.ok(lastLive <= liveAfterFirstDrop * 1.01, `live heap grew from ${liveAfterFirstDrop} to ${lastLive} bytes`);
  } catch (e) {
    console.log(logs.join('\n'));
    throw e;
  } finally {
    await browser.close();
  }
});
