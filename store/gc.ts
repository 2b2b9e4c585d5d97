import type { Store } from './store.js';
import type { GcReport } from './types.js';
export async function collectGarbage(_store: Store): Promise<GcReport> {
  return { blocksKept: 0, blocksRemoved: 0, bytesReclaimed: 0, nodesRemoved: 0, packsRewritten: 0 };
}
