/**
 * The shared ReplicaStore contract suite (test/store/block-store-suite.ts) run against a peer:
 * RemotePeer over real HTTPS on 127.0.0.1 to a server holding a real Store. Then what only a
 * peer offers: commitWithNodes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Home } from '../../appliance/home.js';
import { RemotePeer, startServer } from '../../api/index.js';
import { Store, hashBlock, makeNode, newSnapshotId, type SnapshotRecord, type TreeNode } from '../../store/index.js';
import { blockStoreSuite } from '../store/block-store-suite.js';

/** A server on a fresh home and store, and `clients` RemotePeers of it; `close` ends them all. */
async function served(clients = 1): Promise<{ peers: RemotePeer[]; close(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-remote-'));
  const home = await Home.init(join(dir, 'home'), 'peer');
  const store = await Store.open(home.paths.store);
  const server = await startServer({ home, store, listen: '127.0.0.1:0', logger: false });
  const peers = Array.from({ length: clients }, () => new RemotePeer({ url: server.url, token: home.token(), fingerprint: home.fingerprint(), name: 'peer' }));
  return {
    peers,
    close: async () => {
      for (const p of peers) await p.close();
      await server.close();
      await store.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

blockStoreSuite('RemotePeer', async () => {
  const s = await served();
  return { store: s.peers[0]!, close: s.close };
});

test('commitWithNodes to a peer is one request (commit-nodes); a node with a missing child stores and commits nothing, and the sync keeps its lease', async (t) => {
  const s = await served(2);
  t.after(s.close);
  const [peer, other] = s.peers as [RemotePeer, RemotePeer];
  const blocks = [1, 2].map((seed) => Buffer.alloc(BS, seed)).map((data) => ({ hash: hashBlock(data), data }));
  await peer.putBlocks((async function* () { yield* blocks; })());
  const lock = await peer.lockVolume('vol', 'holder-a');
  assert.ok(lock.lease, 'the sync holds a lease');

  const lacking = makeNode(1, [blocks[0]!.hash, hashBlock(Buffer.alloc(BS, 9))]);
  const before = peer.requests;
  await assert.rejects(peer.commitWithNodes(snapshotOf(lacking), [lacking]), (e: Error & { code?: string }) => e.code === 'ERR_SNAPSHOT_INCOMPLETE');
  assert.equal(peer.requests - before, 2, 'the commit with the node, then the node on its own: both refused');
  assert.deepEqual(await peer.hasNodes([lacking.hash]), [false], 'nothing stored');
  assert.equal(await peer.latestSnapshot('vol'), null, 'nothing committed');
  await assert.rejects(other.lockVolume('vol', 'holder-b'), (e: Error & { code?: string }) => e.code === 'ERR_VOLUME_LOCKED', 'the lease is still held');

  const root = makeNode(1, blocks.map((b) => b.hash));
  const snap = snapshotOf(root);
  const at = peer.requests;
  await peer.commitWithNodes(snap, [root]);
  assert.equal(peer.requests - at, 1, 'one request: the node and the commit');
  assert.deepEqual(await peer.latestSnapshot('vol'), snap);
  assert.ok((await other.lockVolume('vol', 'holder-b')).lease, 'the commit released the lease');
});

const BS = 4096;
function snapshotOf(root: TreeNode): SnapshotRecord {
  return {
    id: newSnapshotId(), volume: 'vol', size: root.children.length * BS, blockSize: BS, root: root.hash.toString('hex'),
    height: 1, created: new Date().toISOString(), parent: null, origin: 'test', nonZeroBlocks: root.children.length,
  };
}
