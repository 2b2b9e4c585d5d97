/**
 * Import an EBS snapshot as a Tandem snapshot, reading only what changed when possible.
 *
 * 1. Base: `--base` if given, else the newest export or import of the volume (its Tandem
 *    snapshot still in the store) that EBS can diff against the target: ListChangedBlocks
 *    works only within one lineage (UNRELATED_SNAPSHOTS otherwise), so candidates are tried
 *    newest first and the first that answers wins. No base: ListSnapshotBlocks (every block).
 * 2. Pages of up to 10,000 blocks (NextToken loop; an empty page may still carry a token).
 *    The blocks of a page are fetched with an adaptive window in flight, each checked against
 *    the SHA-256 EBS sends, hashed, put into the store; the store is flushed per page and the
 *    page's (index, hash) pairs feed `store.buildSnapshot` in ascending order. Memory is one
 *    page of hashes plus the window of blocks, whatever the volume size.
 * 3. Expired tokens: an expired NextToken is answered by listing again from the next block
 *    index; an expired block token by listing again at that block for a fresh one.
 * 4. The snapshot is committed by buildSnapshot only after every block is durable; the mapping
 *    goes to `ebs-imports`. A failed import commits nothing (blocks already stored are reused
 *    by the rerun).
 *
 * Size: EBS knows only whole GiB. When the lineage knows the Tandem volume's byte size (the
 * export recorded it) and EBS holds no block past it, that size is used, so a failback restores
 * exactly the original byte count; otherwise VolumeSize GiB.
 */
import { TandemError } from '../../common/errors.js';
import { hashBlock, isZeroBlock } from '../../store/index.js';
import type { Hash, SnapshotRecord } from '../../store/types.js';
import { EBS_BLOCK_SIZE, GiB, getSnapshotBlock, listPage, MIN_LIST_PAGE_SIZE, type CallContext, type ListPage, type ListedBlock } from './api.js';
import { checkClient, ebsClient } from './client.js';
import { isExpiredToken } from './errors.js';
import { AdaptiveLimiter } from './limiter.js';
import { listExportRecords, listImportRecords, recordImport } from './lineage.js';
import { NOT_FOUND_GRACE_MS } from './retry.js';
import { ZERO_HASH, type EbsImportOptions, type EbsImportResult, type EbsStore } from './types.js';

/** Lineage candidates tried with ListChangedBlocks before falling back to a full read: each costs one call. */
const MAX_BASE_CANDIDATES = 3;
/** Fresh-token retries for one block: tokens live for hours, so more than a few means something else is wrong. */
const MAX_TOKEN_REFRESHES = 3;

interface Lineage {
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  readonly created: string;
  readonly size: number;
}

export async function importSnapshot(store: EbsStore, ebsSnapshotId: string, volume: string, opts: EbsImportOptions = {}): Promise<EbsImportResult> {
  const started = Date.now();
  if (!/^snap-[0-9a-zA-Z]+$/.test(ebsSnapshotId)) {
    throw new TandemError('ERR_BAD_REQUEST', `"${ebsSnapshotId}" is not an EBS snapshot id; ids look like snap-0123456789abcdef0`, { details: { ebsSnapshotId } });
  }
  const blockSize = opts.blockSize ?? EBS_BLOCK_SIZE;
  const vol = await store.getVolume(volume);
  if (blockSize !== EBS_BLOCK_SIZE || (vol && vol.blockSize !== EBS_BLOCK_SIZE)) {
    throw new TandemError('ERR_BLOCK_SIZE_INVALID', `EBS snapshots have ${EBS_BLOCK_SIZE}-byte blocks, volume "${volume}" has ${vol?.blockSize ?? blockSize}; import into a volume with 512KiB blocks (a new volume name creates one)`, { details: { volume, blockSize: vol?.blockSize ?? blockSize } });
  }

  const exports = await listExportRecords(store, volume);
  const imports = await listImportRecords(store, volume);
  const lineage: Lineage[] = [...exports, ...imports].sort((a, b) => a.created.localeCompare(b.created));
  // Already here (imported before, or our own export of this volume): nothing to read.
  for (const rec of lineage.filter((r) => r.ebsSnapshotId === ebsSnapshotId).reverse()) {
    const snap = await store.getSnapshot(volume, rec.tandemSnapshot);
    if (snap) return { snapshot: snap, ebsSnapshotId, baseEbsSnapshotId: null, blocksFetched: 0, bytesFetched: 0, requests: 0, seconds: (Date.now() - started) / 1000 };
  }

  const client = opts.client ?? ebsClient();
  await checkClient(client);
  let requests = 0;
  const ownExport = exports.find((r) => r.ebsSnapshotId === ebsSnapshotId);
  const ctx: CallContext = {
    client,
    limiter: new AdaptiveLimiter(),
    signal: opts.signal,
    // A snapshot we just completed may take a moment to become readable; an unknown id is reported at once.
    notFoundGraceMs: ownExport ? NOT_FOUND_GRACE_MS : 0,
    onAttempt: () => void requests++,
  };

  const { base, first } = await chooseBase(store, ctx, ebsSnapshotId, volume, lineage, opts.baseEbsSnapshotId);
  if (first.blockSize !== null && first.blockSize !== EBS_BLOCK_SIZE) {
    throw new TandemError('ERR_AWS_FAILED', `EBS reports ${first.blockSize}-byte blocks for ${ebsSnapshotId}, not ${EBS_BLOCK_SIZE}; check AWS_ENDPOINT_URL_EBS`);
  }
  if (first.volumeSizeGiB === null) throw new TandemError('ERR_AWS_FAILED', `EBS did not report the volume size of ${ebsSnapshotId}; rerun the import`);
  const size = await chooseSize(ctx, ebsSnapshotId, first.volumeSizeGiB, opts.as?.size ?? ownExport?.size ?? base?.snap.size ?? null);

  let fetched = 0;
  let listed = 0;
  const changes = async function* (): AsyncGenerator<{ index: number; hash: Hash }> {
    for await (const page of pages(ctx, ebsSnapshotId, base?.ebsSnapshotId ?? null, first)) {
      listed += page.length;
      const hashes = await fetchPage(store, ctx, ebsSnapshotId, base?.ebsSnapshotId ?? null, page, size, () => {
        fetched++;
        opts.onProgress?.(fetched, listed);
      });
      await store.flush();
      for (let i = 0; i < page.length; i++) yield { index: page[i]!.index, hash: hashes[i]! };
    }
  };
  const snapshot = await store.buildSnapshot({
    volume,
    size,
    blockSize: EBS_BLOCK_SIZE,
    parent: base?.snap ?? null,
    changes: changes(),
    origin: `ebs:${ebsSnapshotId}`,
    labels: { 'ebs-snapshot': ebsSnapshotId },
    ...(opts.as ? { id: opts.as.id, created: opts.as.created } : {}),
  });
  await recordImport(store, volume, { ebsSnapshotId, tandemSnapshot: snapshot.id, created: new Date().toISOString(), baseEbsSnapshotId: base?.ebsSnapshotId ?? null, size });
  return {
    snapshot,
    ebsSnapshotId,
    baseEbsSnapshotId: base?.ebsSnapshotId ?? null,
    blocksFetched: fetched,
    bytesFetched: fetched * EBS_BLOCK_SIZE,
    requests,
    seconds: (Date.now() - started) / 1000,
  };
}

interface Base {
  readonly ebsSnapshotId: string;
  readonly snap: SnapshotRecord;
}

/**
 * Find the newest lineage member EBS can diff against the target and return the first page of
 * that listing (so it is not requested twice). An explicit base must work or it is an error.
 */
async function chooseBase(store: EbsStore, ctx: CallContext, target: string, volume: string, lineage: Lineage[], explicit: string | undefined): Promise<{ base: Base | null; first: ListPage }> {
  if (explicit !== undefined) {
    const rec = [...lineage].reverse().find((r) => r.ebsSnapshotId === explicit);
    const snap = rec ? await store.getSnapshot(volume, rec.tandemSnapshot) : null;
    if (!rec || !snap) {
      throw new TandemError('ERR_EBS_NOT_EXPORTED', `EBS snapshot ${explicit} is not an export or import of volume "${volume}" whose Tandem snapshot is still in the store; see \`appliance ebs list ${volume}\`, or import without --base (reads every block)`, { details: { volume, base: explicit } });
    }
    const first = await listPage(ctx, target, explicit, {});
    return { base: { ebsSnapshotId: explicit, snap }, first };
  }
  const tried = new Set<string>();
  for (const rec of [...lineage].reverse()) {
    if (tried.size >= MAX_BASE_CANDIDATES) break;
    if (rec.ebsSnapshotId === target || tried.has(rec.ebsSnapshotId)) continue;
    const snap = await store.getSnapshot(volume, rec.tandemSnapshot);
    if (!snap) continue;
    tried.add(rec.ebsSnapshotId);
    try {
      const first = await listPage(ctx, target, rec.ebsSnapshotId, {});
      return { base: { ebsSnapshotId: rec.ebsSnapshotId, snap }, first };
    } catch (e) {
      // Another lineage (UNRELATED_SNAPSHOTS), or the base was deleted in EBS: try the next one.
      if (e instanceof TandemError && (e.code === 'ERR_AWS_VALIDATION' || e.code === 'ERR_AWS_NOT_FOUND')) continue;
      throw e;
    }
  }
  return { base: null, first: await listPage(ctx, target, null, {}) };
}

/**
 * The byte size of the imported snapshot: the lineage's known size when EBS holds no block
 * wholly past it (one small probe), else the whole EBS volume.
 */
async function chooseSize(ctx: CallContext, target: string, volumeSizeGiB: number, known: number | null): Promise<number> {
  const full = volumeSizeGiB * GiB;
  if (known === null || known >= full || Math.ceil(known / GiB) !== volumeSizeGiB) return full;
  const probe = await listPage(ctx, target, null, { startingBlockIndex: Math.ceil(known / EBS_BLOCK_SIZE), maxResults: MIN_LIST_PAGE_SIZE });
  const beyond = probe.blocks.some((b) => b.index * EBS_BLOCK_SIZE >= known);
  return beyond ? full : known;
}

/** Every listed block, a page at a time, following NextToken; an expired token re-lists from the next index. */
async function* pages(ctx: CallContext, target: string, base: string | null, first: ListPage): AsyncGenerator<ListedBlock[]> {
  let page: ListPage = first;
  // Each page, even an empty one, covers at least one more block index, so the number of pages
  // is bounded by the number of blocks; this cap only stops a server that repeats itself.
  const maxPages = Math.ceil(((first.volumeSizeGiB ?? 1) * GiB) / EBS_BLOCK_SIZE) + 16;
  let lastIndex = -1;
  for (let n = 0; ; n++) {
    if (n > maxPages) throw new TandemError('ERR_AWS_FAILED', `listing ${target} did not end after ${maxPages} pages; rerun the import`);
    const blocks = page.blocks.filter((b) => b.index > lastIndex).sort((a, b) => a.index - b.index);
    if (blocks.length > 0) {
      lastIndex = blocks[blocks.length - 1]!.index;
      yield blocks;
    }
    if (!page.nextToken) return;
    try {
      page = await listPage(ctx, target, base, { nextToken: page.nextToken });
    } catch (e) {
      if (!isExpiredToken(e)) throw e;
      page = await listPage(ctx, target, base, { startingBlockIndex: lastIndex + 1 });
    }
  }
}

/**
 * Fetch, verify, hash and store the blocks of one page; returns their hashes in page order.
 * A block listed without a token (only in the base) and an all-zero block get ZERO_HASH.
 */
async function fetchPage(store: EbsStore, ctx: CallContext, target: string, base: string | null, page: ListedBlock[], size: number, onBlock: () => void): Promise<Hash[]> {
  const hashes: Hash[] = new Array(page.length);
  const inFlight = new Set<Promise<void>>();
  let failure: unknown = null;
  for (let i = 0; i < page.length && !failure; i++) {
    while (inFlight.size >= ctx.limiter.limit && !failure) await Promise.race(inFlight);
    if (failure) break;
    const { index, token } = page[i]!;
    const start = index * EBS_BLOCK_SIZE;
    if (start >= size) {
      failure = new TandemError('ERR_AWS_FAILED', `EBS listed block ${index} of ${target}, past the end of the ${size}-byte volume; rerun the import`);
      break;
    }
    if (token === null) {
      hashes[i] = ZERO_HASH;
      continue;
    }
    const slot = i;
    const task: Promise<void> = fetchOne(ctx, target, base, index, token)
      .then(async (full) => {
        const data = start + EBS_BLOCK_SIZE > size ? full.subarray(0, size - start) : full;
        if (data !== full && !isZeroBlock(full.subarray(data.length))) {
          throw new TandemError('ERR_VOLUME_SIZE_MISMATCH', `block ${index} of ${target} holds data past the volume's ${size} bytes; import into a new volume name to keep the whole ${Math.ceil(size / GiB)} GiB`, { details: { blockIndex: index, size } });
        }
        if (isZeroBlock(data)) {
          hashes[slot] = ZERO_HASH;
        } else {
          const hash = hashBlock(data);
          await store.putBlock(hash, data);
          hashes[slot] = hash;
        }
        onBlock();
      })
      .catch((e: unknown) => { failure ??= e; })
      .finally(() => inFlight.delete(task));
    inFlight.add(task);
  }
  await Promise.all(inFlight);
  if (failure) throw failure;
  return hashes;
}

/** GetSnapshotBlock, listing again for a fresh token when the one we hold expired. */
async function fetchOne(ctx: CallContext, target: string, base: string | null, index: number, token: string): Promise<Buffer> {
  let current = token;
  for (let refresh = 0; ; refresh++) {
    try {
      return await getSnapshotBlock(ctx, target, index, current);
    } catch (e) {
      if (!isExpiredToken(e) || refresh >= MAX_TOKEN_REFRESHES) {
        if (isExpiredToken(e)) throw new TandemError('ERR_AWS_FAILED', `block ${index} of ${target}: EBS refused ${MAX_TOKEN_REFRESHES + 1} fresh block tokens; rerun the import`, { cause: e });
        throw e;
      }
      const again = await listPage(ctx, target, base, { startingBlockIndex: index, maxResults: MIN_LIST_PAGE_SIZE });
      const hit = again.blocks.find((b) => b.index === index);
      if (!hit?.token) throw new TandemError('ERR_AWS_FAILED', `EBS no longer lists block ${index} of ${target}; rerun the import`);
      current = hit.token;
    }
  }
}
