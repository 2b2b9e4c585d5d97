/**
 * Two real appliances on 127.0.0.1 (processes, port 0): push, incremental push, no-op sync,
 * dedup across volumes, dry run, reverse + apply (failback). Every count is read on the
 * receiving side (GET /v1/stats), not from the client's claim.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { openSync, writeSync, closeSync, readFileSync, writeFileSync, rmSync, copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { RemotePeer } from '../../api/client.js';
import { cli, initHome, pair, startServe, tempDir, type Served, type TestHome } from '../helpers/appliance.js';

const BS = 64 * 1024;
const BLOCKS = 64;

/** Overwrite 4 KiB inside each listed block (a small write, as a database would). */
function scribble(path: string, blocks: number[]): void {
  const fd = openSync(path, 'r+');
  try {
    for (const b of blocks) writeSync(fd, randomBytes(4096), 0, 4096, b * BS + 1000);
  } finally {
    closeSync(fd);
  }
}

interface Pair {
  dir: string;
  a: TestHome;
  b: TestHome;
  sb: Served;
  peerB: RemotePeer;
  img: string;
}

async function setup(t: Parameters<typeof tempDir>[0]): Promise<Pair> {
  const [a, b] = await Promise.all([initHome(t, 'onprem'), initHome(t, 'cloud')]);
  const sb = await startServe(t, b);
  await pair(a, 'cloud', b, sb);
  const peerB = new RemotePeer({ url: sb.url, token: b.token, fingerprint: b.fingerprint, name: 'cloud' });
  t.after(() => peerB.close());
  const dir = tempDir(t, 'tandem-sync-data-');
  const img = join(dir, 'disk.img');
  const data = randomBytes(BLOCKS * BS);
  data.fill(0, 8 * BS, 16 * BS); // 8 zero blocks: never sent
  writeFileSync(img, data);
  const add = await cli(a, 'volume', 'add', 'vol', '--path', img, '--block-size', '64KiB');
  assert.equal(add.code, 0, add.stderr);
  return { dir, a, b, sb, peerB, img };
}

async function restoredOnB(p: Pair, name: string, vol = 'vol'): Promise<Buffer> {
  const out = join(p.dir, name);
  const r = await cli(p.b, 'restore', vol, '--to', out);
  assert.equal(r.code, 0, r.stderr);
  return readFileSync(out);
}

test('push is byte-exact; an incremental push sends only the changed blocks; a no-op sync is one request; dry run sends nothing; shared blocks of two volumes are sent once', async (t) => {
  const p = await setup(t);
  const s0 = await p.peerB.stats();
  const first = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(first.code, 0, first.stderr);
  assert.equal(first.json.blocksSent, BLOCKS - 8);
  const s1 = await p.peerB.stats();
  assert.equal(s1.blocksReceived - s0.blocksReceived, BLOCKS - 8, 'the receiver got every non-zero block once');
  assert.ok((await restoredOnB(p, 'r1.img')).equals(readFileSync(p.img)), 'the replica is byte-exact');

  scribble(p.img, [3, 20, 63]);
  const s2 = await p.peerB.stats();
  const inc = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(inc.code, 0, inc.stderr);
  const s3 = await p.peerB.stats();
  assert.equal(s3.blocksReceived - s2.blocksReceived, 3, 'only the 3 changed blocks travel');
  assert.equal(inc.json.blocksSent, 3);
  assert.ok((await restoredOnB(p, 'r2.img')).equals(readFileSync(p.img)));

  const before = await p.peerB.stats();
  const noop = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(noop.code, 0, noop.stderr);
  const s4 = await p.peerB.stats();
  assert.equal(noop.json.upToDate, true);
  assert.equal(s4.requests - before.requests, 1, 'a no-op sync is one request (GET /v1/stats is not counted)');
  assert.equal(s4.blocksReceived, s3.blocksReceived);

  scribble(p.img, [30, 31]);
  const dry = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--dry-run');
  assert.equal(dry.code, 0, dry.stderr);
  assert.equal(dry.json.blocksSent, 2);
  assert.equal(dry.json.dryRun, true);
  const s5 = await p.peerB.stats();
  assert.equal(s5.blocksReceived, s4.blocksReceived, 'a dry run sends no block');
  assert.equal(s5.snapshotsCommitted, s4.snapshotsCommitted, 'a dry run commits nothing');

  // Another volume sharing all but one block with the first: only that block travels.
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const img2 = join(p.dir, 'clone.img');
  copyFileSync(p.img, img2);
  scribble(img2, [40]);
  assert.equal((await cli(p.a, 'volume', 'add', 'clone', '--path', img2, '--block-size', '64KiB')).code, 0);
  const s6 = await p.peerB.stats();
  const clone = await cli(p.a, 'sync', 'clone', '--peer', 'cloud');
  assert.equal(clone.code, 0, clone.stderr);
  const s7 = await p.peerB.stats();
  assert.equal(s7.blocksReceived - s6.blocksReceived, 1, 'blocks shared with another volume are not sent again');
  assert.ok((await restoredOnB(p, 'clone-r.img', 'clone')).equals(readFileSync(img2)));
});

test('reverse + apply is byte-exact after the local copy diverged or was replaced; the next push is incremental again', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const replica = readFileSync(p.img);

  scribble(p.img, [1, 2, 50, 51, 52]);
  const back = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(back.code, 0, back.stderr);
  assert.equal(back.json.direction, 'pull');
  assert.equal(back.json.applied.verified, true);
  assert.equal(back.json.applied.blocksWritten, 5, 'only the diverged blocks are written');
  assert.ok(readFileSync(p.img).equals(replica), 'the local volume is the replica again, byte for byte');

  rmSync(p.img);
  const again = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(again.code, 0, again.stderr);
  assert.ok(readFileSync(p.img).equals(replica), 'a replaced (missing) volume is recreated exactly');

  const vols = await cli(p.a, 'volume', 'list');
  assert.equal(vols.code, 0, vols.stderr);
  assert.ok(!JSON.stringify(vols.json).includes('materializing'), 'the materializing mark is cleared');

  const s0 = await p.peerB.stats();
  const fwd = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(fwd.code, 0, fwd.stderr);
  assert.equal(fwd.json.upToDate, true);
  const s1 = await p.peerB.stats();
  assert.equal(s1.requests - s0.requests, 1, 'after failback the forward sync finds the common base at once');
});
