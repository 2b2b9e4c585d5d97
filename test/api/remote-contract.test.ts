/**
 * The shared ReplicaStore contract suite (test/store/block-store-suite.ts) run against a peer:
 * RemotePeer over real HTTPS on 127.0.0.1 to a server holding a real Store.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Home } from '../../appliance/home.js';
import { RemotePeer, startServer } from '../../api/index.js';
import { Store } from '../../store/index.js';
import { blockStoreSuite } from '../store/block-store-suite.js';

blockStoreSuite('RemotePeer', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-remote-'));
  const home = await Home.init(join(dir, 'home'), 'peer');
  const store = await Store.open(home.paths.store);
  const server = await startServer({ home, store, listen: '127.0.0.1:0', logger: false });
  const peer = new RemotePeer({ url: server.url, token: home.token(), fingerprint: home.fingerprint(), name: 'peer' });
  return {
    store: peer,
    close: async () => {
      await peer.close();
      await server.close();
      await store.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
});
