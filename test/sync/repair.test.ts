/**
 * `appliance repair --peer NAME` between two real appliances: a damaged block, a block whose
 * index entry is gone and a missing tree node in one store are healed with the peer's copies
 * (a sync could not: the store still names those hashes, so nothing would be sent); a block the
 * peer holds damaged too is left, named, and the command exits 1.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { sameBytes } from '../helpers/files.js';
import { join } from 'node:path';
import { Store } from '../../store/index.js';
import { blockKey, nodeKey } from '../../store/keys.js';
import { hashBlock } from '../../store/hash.js';
import { cli, damageBlock as damage, pairedWithVolume, peerClient, startCli, startServe } from '../helpers/appliance.js';
import type { BlockFrame } from '../../store/types.js';
import { cli as cliText } from '../helpers/cli.js';
import { randomInt } from 'node:crypto';
import { setTimeout as delay } from 'node:timers/promises';
import { trials } from '../helpers/soak.js';

const BS = 64 * 1024;

test('repair heals a damaged block, a lost block entry and a missing tree node with the peer\'s copies; what the peer holds damaged too is named and exits 1', async (t) => {
  const { a, b, img } = await pairedWithVolume(t, 600);
  const sync = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(sync.code, 0, sync.stderr);
  const data = readFileSync(img);
  const bytes = (i: number) => data.subarray(i * BS, (i + 1) * BS);
  const block = (i: number) => hashBlock(bytes(i));

  // On-prem: block 10 damaged on disk, block 550's index entry gone, level-1 node 1 (blocks
  // 256-511) gone from the index.
  damage(a, bytes(10));
  const store = await Store.open(join(a.dir, 'store'));
  const snap = (await store.latestSnapshot('vol'))!;
  const root = await store.getNode(Buffer.from(snap.root, 'hex'));
  await store.db.del(blockKey(block(550)));
  await store.db.del(nodeKey(root.children[1]!));
  await store.close();
  const broken = await cli(a, 'verify');
  assert.equal(broken.code, 1);
  assert.deepEqual(
    broken.json.problems.map((p: { kind: string; code: string; blockIndex: number }) => [p.kind, p.code, p.blockIndex]),
    [['block', 'ERR_BLOCK_CORRUPT', 10], ['node', 'ERR_NODE_MISSING', 256], ['block', 'ERR_BLOCK_MISSING', 550]],
  );
  // A sync from the peer cannot heal it: the store still names these hashes.
  const resync = await cli(a, 'sync', 'vol', '--peer', 'cloud', '--reverse');
  assert.equal(resync.code, 0, resync.stderr);
  assert.equal((await cli(a, 'verify')).code, 1);

  const r = await cli(a, 'repair', '--peer', 'cloud');
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.json.ok, true);
  assert.equal(r.json.before.problems.length, 3);
  assert.equal(r.json.blocksRepaired, 2);
  assert.equal(r.json.nodesRepaired, 1);
  assert.deepEqual(r.json.unrepaired, []);
  assert.deepEqual(r.json.after.problems, []);
  assert.equal((await cli(a, 'verify')).code, 0);
  const out = join(a.dir, 'restored.img');
  assert.equal((await cli(a, 'restore', 'vol', '--to', out)).code, 0);
  assert.ok(sameBytes(out, data), 'restored byte-exact');

  // Block 20 damaged on both sides: nothing is written for it; it is named; exit 1.
  damage(a, bytes(20));
  damage(b, bytes(20));
  const left = await cli(a, 'repair', 'vol', '--peer', 'cloud');
  assert.equal(left.code, 1);
  assert.equal(left.json.blocksRepaired, 0);
  assert.deepEqual(left.json.unrepaired.map((u: { kind: string; hash: string; code: string }) => [u.kind, u.hash, u.code]), [['block', block(20).toString('hex'), 'ERR_BLOCK_CORRUPT']]);
  assert.deepEqual(left.json.after.problems.map((p: { blockIndex: number }) => p.blockIndex), [20]);
  assert.match(left.stderr + JSON.stringify(left.json), /ERR_BLOCK_CORRUPT/);

  // An unknown peer is refused before anything is read or written.
  const unknown = await cli(a, 'repair', '--peer', 'nowhere');
  assert.equal(unknown.code, 1);
  assert.equal(unknown.json.error.code, 'ERR_PEER_NOT_FOUND');
});

test('repair --push heals the peer\'s store with this store\'s copies of what the peer\'s last verify found; a block damaged on both sides is named and exits 1', async (t) => {
  const { a, b, img } = await pairedWithVolume(t, 100);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  // The cloud never verified: it knows of nothing to heal, and says so (not "nothing left" of a verify in 1970).
  const early = await cli(a, 'repair', '--peer', 'cloud', '--push');
  assert.equal(early.code, 1, early.stderr);
  assert.equal(early.json.neverVerified, true);
  assert.match((await cliText(['--home', a.dir, 'repair', '--peer', 'cloud', '--push'])).stdout, /has not verified its store yet/);
  const data = readFileSync(img);
  const bytes = (i: number) => data.subarray(i * BS, (i + 1) * BS);
  // The cloud's store (its server runs) has blocks 30 and 70 damaged; ours has 70 damaged too.
  damage(b, bytes(30));
  damage(b, bytes(70));
  damage(a, bytes(70));
  const found = await cli(b, 'verify'); // forwarded to b's server; records what it found
  assert.equal(found.code, 1);
  assert.equal(found.json.problems.length, 2);

  const r = await cli(a, 'repair', '--peer', 'cloud', '--push');
  assert.equal(r.code, 1, r.stderr);
  assert.deepEqual([r.json.peerDamagedBlocks, r.json.blocksSent, r.json.blocksRepaired], [2, 1, 1]);
  assert.deepEqual(r.json.damagedHere, [hashBlock(bytes(70)).toString('hex')]);
  const after = await cli(b, 'verify');
  assert.deepEqual(after.json.problems.map((p: { blockIndex: number }) => p.blockIndex), [70]);

  // Nothing left that either side can heal: a second push sends nothing and still names block 70.
  const again = await cli(a, 'repair', '--peer', 'cloud', '--push');
  assert.equal(again.code, 1);
  assert.deepEqual([again.json.peerDamagedBlocks, again.json.blocksSent], [1, 0]);
});

test('blocks/repair writes a block only when the store lacks it or holds it damaged, once a stream: a peer repeating a good block adds nothing to the packs', async (t) => {
  const { a, b, sb, img } = await pairedWithVolume(t, 8);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const data = readFileSync(img);
  const bytes = (i: number) => data.subarray(i * BS, (i + 1) * BS);
  const packsSize = () => readdirSync(join(b.dir, 'store', 'packs')).reduce((n, f) => n + statSync(join(b.dir, 'store', 'packs', f)).size, 0);
  const peer = peerClient(b, sb);
  t.after(() => peer.close());
  const copies = (i: number, n: number) => Array.from({ length: n }, () => ({ hash: hashBlock(bytes(i)), data: Buffer.from(bytes(i)) }));
  const before = packsSize();
  assert.deepEqual(await peer.repairBlocks(from(copies(2, 32))), { repaired: 0 });
  assert.equal(packsSize(), before, 'a good block sent 32 times: nothing appended');
  damage(b, bytes(5));
  assert.deepEqual(await peer.repairBlocks(from(copies(5, 3))), { repaired: 1 });
  assert.ok(packsSize() <= before + BS + 4096, 'the damaged block written once');
  assert.deepEqual((await cli(b, 'verify')).json.problems, []);
});

test("repair --push puts back the tree nodes the peer's verify found damaged or missing, after what the peer lacks under them", async (t) => {
  const { a, b, sb, img } = await pairedWithVolume(t, 600);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const data = readFileSync(img);
  // The cloud's store, damaged while its server is down: level-1 node 0 (blocks 0-255) corrupt
  // in the index, node 2 (blocks 512-599) gone, and block 550 under it gone too (a verify cannot
  // see under a missing node). Then served again on the same port.
  const port = new URL(sb.url).port;
  assert.equal(await sb.stop(), 0);
  const store = await Store.open(join(b.dir, 'store'));
  const snap = (await store.latestSnapshot('vol'))!;
  const root = await store.getNode(Buffer.from(snap.root, 'hex'));
  const raw = Buffer.from((await store.db.get(nodeKey(root.children[0]!)))!);
  raw[5]! ^= 0xff;
  await store.db.put(nodeKey(root.children[0]!), raw);
  await store.db.del(nodeKey(root.children[2]!));
  await store.db.del(blockKey(hashBlock(data.subarray(550 * BS, 551 * BS))));
  await store.close();
  await startServe(t, b, `127.0.0.1:${port}`);
  const found = await cli(b, 'verify'); // forwarded to b's server; records what it found
  assert.equal(found.code, 1);
  assert.deepEqual(found.json.problems.map((p: { kind: string; code: string }) => [p.kind, p.code]), [['node', 'ERR_NODE_CORRUPT'], ['node', 'ERR_NODE_MISSING']]);

  const r = await cli(a, 'repair', '--peer', 'cloud', '--push');
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.deepEqual([r.json.peerDamagedNodes, r.json.nodesRepaired, r.json.blocksRepaired, r.json.nodesNotRepaired.length], [2, 2, 1, 0]);
  const after = await cli(b, 'verify');
  assert.equal(after.code, 0, after.stdout);
  const out = join(b.dir, 'restored.img');
  assert.equal((await cli(b, 'restore', 'vol', '--to', out)).code, 0);
  assert.ok(sameBytes(out, data), 'the cloud restores byte-exact');
  // The damage list is empty: a second push has nothing to do.
  const again = await cli(a, 'repair', '--peer', 'cloud', '--push');
  assert.deepEqual([again.code, again.json.peerDamagedNodes, again.json.nodesRepaired], [0, 0, 0]);
});

test('kill -9 of repair at random moments: the store opens, verify finds nothing new, and the rerun heals everything', async (t) => {
  const bs = 512 * 1024;
  const { a, img, dir } = await pairedWithVolume(t, 160, bs);
  assert.equal((await cli(a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const data = readFileSync(img);
  // 100 of the 160 blocks damaged (50 MiB to heal: two batches of good copies).
  const damaged = Array.from({ length: 160 }, (_, i) => i).filter((i) => i % 8 < 5);
  damage(a, ...damaged.map((i) => data.subarray(i * bs, (i + 1) * bs)));
  let left = damaged.length;
  for (let trial = 0; trial < trials(4); trial++) {
    const run = startCli(a, 'repair', '--peer', 'cloud');
    await delay(randomInt(50, 700));
    run.child.kill('SIGKILL');
    await run.done;
    const v = await cli(a, 'verify');
    const indices = (v.json.problems as Array<{ blockIndex: number }>).map((p) => p.blockIndex);
    assert.ok(indices.every((i) => damaged.includes(i)), `only blocks that were damaged may be reported: ${indices}`);
    assert.ok(indices.length <= left);
    left = indices.length;
  }
  const r = await cli(a, 'repair', '--peer', 'cloud');
  assert.equal(r.code, 0, r.stderr);
  assert.equal((await cli(a, 'verify')).code, 0);
  const out = join(dir, 'restored.img');
  assert.equal((await cli(a, 'restore', 'vol', '--to', out)).code, 0);
  assert.ok(sameBytes(out, data));
  // The damaged records' bytes are no longer referenced: gc reclaims them.
  const gc = await cli(a, 'gc');
  assert.equal(gc.code, 0, gc.stderr);
  assert.ok(gc.json.bytesReclaimed >= damaged.length * bs, `reclaimed ${gc.json.bytesReclaimed}`);
  assert.equal((await cli(a, 'verify')).code, 0);
});

async function* from(frames: BlockFrame[]): AsyncIterable<BlockFrame> {
  yield* frames;
}
