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
import { Store, hashBlock } from '../../store/index.js';

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
