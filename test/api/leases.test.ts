/**
 * A sync's lease on a peer's volume over real HTTPS: a block stream that keeps moving keeps the
 * lease alive past the idle time (a long upload under --bwlimit), and an idle lease expires.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { Home } from '../../appliance/home.js';
import { RemotePeer, startServer } from '../../api/index.js';
import { Store, hashBlock, makeNode, type SnapshotRecord } from '../../store/index.js';

const IDLE_MS = 600;

test('a moving block stream keeps its lease past the idle time; an idle lease expires', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-lease-'));
  const home = await Home.init(join(dir, 'home'), 'leases');
  const store = await Store.open(home.paths.store);
  const server = await startServer({ home, store, logger: false, listen: '127.0.0.1:0', leaseIdleMs: IDLE_MS });
  const connect = () => new RemotePeer({ url: server.url, token: home.token(), fingerprint: home.fingerprint(), name: 'peer' });
  const a = connect();
  const b = connect();
  t.after(async () => {
    await a.close();
    await b.close();
    await server.close();
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });

  const taken = await a.lockVolume('vol', 'site-a', );
  assert.ok(taken.lease);
  // Eight blocks, one every IDLE_MS / 3: the upload lasts over twice the idle time.
  const blocks = Array.from({ length: 8 }, () => randomBytes(64 * 1024));
  const upload = a.putBlocks((async function* () {
    for (const data of blocks) {
      await sleep(IDLE_MS / 3);
      yield { hash: hashBlock(data), data };
    }
  })());
  await sleep(IDLE_MS * 1.75);
  await assert.rejects(b.lockVolume('vol', 'site-b', ), (e: { code?: string }) => e.code === 'ERR_VOLUME_LOCKED', 'the upload still holds the volume');
  const put = await upload;
  assert.equal(put.stored, 8);
  await assert.rejects(b.lockVolume('vol', 'site-b', ), (e: { code?: string }) => e.code === 'ERR_VOLUME_LOCKED', 'right after the upload the lease is still fresh');
  await sleep(IDLE_MS * 1.5);
  const after = await b.lockVolume('vol', 'site-b', );
  assert.ok(after.lease, 'idle past the limit: the lease expired and another sync may take the volume');
});

test('a refused commit keeps its lease (the sync sends what was missing and commits with it); a commit without a held lease of a volume an appliance pushes is refused: ERR_VOLUME_NAME_TAKEN', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-lease-'));
  const home = await Home.init(join(dir, 'home'), 'leases');
  const store = await Store.open(home.paths.store);
  const server = await startServer({ home, store, logger: false, listen: '127.0.0.1:0' });
  const connect = () => new RemotePeer({ url: server.url, token: home.token(), fingerprint: home.fingerprint(), name: 'peer' });
  const [a, b, c] = [connect(), connect(), connect()];
  t.after(async () => {
    for (const p of [a, b, c]) await p.close();
    await server.close();
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });
  const BS = 64 * 1024;
  /** A one-block volume's snapshot: its block is put, its root node is not. */
  const snapshotOf = async (p: RemotePeer, n: number) => {
    const data = randomBytes(BS);
    const hash = hashBlock(data);
    await p.putBlocks((async function* () {
      yield { hash, data };
    })());
    const node = makeNode(1, [hash]);
    const record: SnapshotRecord = { id: `20260101T000000.00${n}Z-00000${n}`, volume: 'vol', size: BS, blockSize: BS, root: node.hash.toString('hex'), height: 1, created: '2026-01-01T00:00:00.000Z', parent: null, origin: 'scan', nonZeroBlocks: 1 };
    return { node, record };
  };

  assert.ok((await a.lockVolume('vol', 'site-a')).lease);
  const first = await snapshotOf(a, 1);
  await assert.rejects(a.commitSnapshot(first.record), (e: { code?: string }) => e.code === 'ERR_SNAPSHOT_INCOMPLETE', 'the root node was not sent');
  await assert.rejects(b.lockVolume('vol', 'site-b'), (e: { code?: string }) => e.code === 'ERR_VOLUME_LOCKED', 'the refused commit left the lease with its sync');
  await a.putNodes([first.node]);
  await a.commitSnapshot(first.record);
  assert.equal((await store.latestSnapshot('vol'))!.id, first.record.id);
  await a.releaseVolume();

  // site-a pushes the volume now. A commit without a lease, or with one no longer held, cannot show it comes from there.
  const second = await snapshotOf(c, 2);
  await c.putNodes([second.node]);
  await assert.rejects(c.commitSnapshot(second.record), (e: { code?: string; message?: string }) => e.code === 'ERR_VOLUME_NAME_TAKEN' && /carries no lease/.test(e.message ?? ''));
  assert.ok((await a.lockVolume('vol', 'site-a')).lease);
  const held = (a as unknown as { lease: string }).lease;
  await a.releaseVolume();
  Object.assign(c, { lease: held, leaseVolume: 'vol' }); // the released lease, sent again
  await assert.rejects(c.commitSnapshot(second.record), (e: { code?: string; message?: string }) => e.code === 'ERR_VOLUME_NAME_TAKEN' && /no longer held/.test(e.message ?? ''));
  assert.equal((await store.latestSnapshot('vol'))!.id, first.record.id, 'nothing was committed');
  // With its lease, site-a's next push commits.
  assert.ok((await a.lockVolume('vol', 'site-a', { ifRoot: second.record.root })).lease);
  await a.commitSnapshot(second.record);
  assert.equal((await store.latestSnapshot('vol'))!.id, second.record.id);
});
