/**
 * kill -9 of either appliance at random moments during a sync: the rerun completes, both stores
 * stay consistent, and nothing the receiver stored is sent again.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes, randomInt } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { cli, diagnose, pairedWithVolume, peerClient, startCli, startServe, type TestHome } from '../helpers/appliance.js';



async function restoredOnB(b: TestHome, dir: string, name: string): Promise<Buffer> {
  const r = await cli(b, 'restore', 'vol', '--to', join(dir, name));
  assert.equal(r.code, 0, r.stderr);
  return readFileSync(join(dir, name));
}

test('kill -9 of the client at random moments: the rerun completes, resends nothing stored, both stores verify', async (t) => {
  const blocks = 64;
  const { a, b, sb, dir, img } = await pairedWithVolume(t, blocks);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  for (let trial = 0; trial < 5; trial++) {
    const run = startCli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '2MiB');
    await delay(randomInt(200, 2000));
    run.child.kill('SIGKILL');
    await run.done;
  }
  const last = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  // ERR_PEER_NOT_FOUND was seen here once under a loaded full run, never alone: keep the home.
  if (last.code !== 0) assert.fail(`${last.stderr}\n${await diagnose(a)}`);
  const s = await peerB.stats();
  assert.equal(s.blocksReceived, blocks, 'over all runs every block arrived exactly once: none the receiver had stored was sent again');
  assert.equal((await cli(a, 'verify')).code, 0);
  assert.equal((await cli(b, 'verify')).code, 0);
  assert.ok((await restoredOnB(b, dir, 'r.img')).equals(readFileSync(img)));
});

test('kill -9 of the server at random moments: the rerun completes and the store verifies', async (t) => {
  const blocks = 64;
  const { a, b, sb: first, dir, img } = await pairedWithVolume(t, blocks);
  const port = new URL(first.url).port;
  let sb = first;
  for (let trial = 0; trial < 3; trial++) {
    const run = startCli(a, 'sync', 'vol', '--peer', 'cloud', '--bwlimit', '2MiB');
    await delay(randomInt(300, 2000));
    await sb.kill('SIGKILL');
    const r = await run.done;
    if (r.code !== 0) assert.match(r.json?.error?.code ?? '', /^ERR_PEER_(UNREACHABLE|PROTOCOL)$|^ERR_BLOCK_CORRUPT$/, r.stderr);
    sb = await startServe(t, b, `127.0.0.1:${port}`);
  }
  const last = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(last.code, 0, last.stderr);
  assert.equal((await cli(b, 'verify')).code, 0);
  assert.ok((await restoredOnB(b, dir, 'r.img')).equals(readFileSync(img)));
});


test("kill -9 of the client during first syncs of 96 MiB (the scan's new blocks past 64 MiB written and sent with O_DIRECT): each image's blocks arrive exactly once over the killed run and its rerun", async (t) => {
  const bs = 512 * 1024;
  const blocks = 192;
  const { a, b, sb, dir, img } = await pairedWithVolume(t, blocks, bs);
  const peerB = peerClient(b, sb);
  t.after(() => peerB.close());
  const started = Date.now();
  const first = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(first.code, 0, first.stderr);
  const fullMs = Date.now() - started;
  let killed = 0;
  let to = fullMs; // crash points before this; a run that ends sooner brings it earlier
  for (let trial = 0; trial < 4; trial++) {
    writeFileSync(img, randomBytes(blocks * bs)); // every block new again
    const before = (await peerB.stats()).blocksReceived;
    const run = startCli(a, 'sync', 'vol', '--peer', 'cloud');
    const t0 = Date.now();
    await delay(randomInt(Math.floor(to * 0.3), Math.max(Math.floor(to * 0.3) + 1, to))); // the random crash point is the experiment
    run.child.kill('SIGKILL');
    if ((await run.done).signal === 'SIGKILL') killed++;
    else to = Math.max(1, Math.floor(Math.min(to, Date.now() - t0) * 0.9));
    const rerun = await cli(a, 'sync', 'vol', '--peer', 'cloud');
    assert.equal(rerun.code, 0, rerun.stderr);
    assert.equal((await peerB.stats()).blocksReceived - before, blocks, 'the killed run and its rerun together sent each block once');
    assert.ok((await restoredOnB(b, dir, `r${trial}.img`)).equals(readFileSync(img)), `trial ${trial}: the peer's copy equals the image`);
  }
  assert.ok(killed >= 1, `at least one sync was killed while running (a full one took ${fullMs} ms)`);
  assert.equal((await cli(a, 'verify')).code, 0);
  assert.equal((await cli(b, 'verify')).code, 0);
});
