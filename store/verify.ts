import type { Store } from './store.js';
import type { VerifyReport } from './types.js';
export async function verifyStore(_store: Store, _filter?: { volume?: string; snapshot?: string }): Promise<VerifyReport> {
  return { snapshots: 0, nodes: 0, blocks: 0, bytes: 0, problems: [] };
}
