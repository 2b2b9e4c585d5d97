/**
 * Two real local stores in a fresh temp directory, closed and removed after the test: a source
 * and a target for the sync engine and early sending, in-process.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Store } from '../../store/index.js';

export async function twoStores(t: { after(fn: () => Promise<void> | void): void }, prefix = 'tandem-stores-'): Promise<[Store, Store]> {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const a = await Store.open(join(dir, 'a'));
  const b = await Store.open(join(dir, 'b'));
  t.after(async () => {
    await a.close();
    await b.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return [a, b];
}
