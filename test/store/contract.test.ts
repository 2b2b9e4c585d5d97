import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Store } from '../../store/index.js';
import { blockStoreSuite } from './block-store-suite.js';

blockStoreSuite('Store', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-store-'));
  const store = await Store.open(join(dir, 'store'));
  return {
    store,
    close: async () => {
      await store.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
});
