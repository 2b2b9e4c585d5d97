/**
 * Export a Tandem snapshot as an EBS snapshot, incrementally.
 *
 * 1. The parent is the newest earlier export of the volume whose Tandem snapshot is still in
 *    the store; the blocks to send are `store.diffSnapshots(parentTandem, snap)` (every non-zero
 *    block for a first export; with a parent, a block that became zero is written as zeros).
 * 2. StartSnapshot(VolumeSize = ceil(size / GiB), ParentSnapshotId, ClientToken, Timeout, tags,
 *    KMS key) → PutSnapshotBlock per block, ascending, a bounded adaptive window in flight →
 *    CompleteSnapshot(ChangedBlocksCount, LINEAR SHA-256 aggregate).
 * 3. The mapping is recorded in `ebs-exports`; the pending record is removed.
 *
 * Crash safety: the pending record (lineage.ts) is written before StartSnapshot (so a rerun
 * re-issues the same ClientToken and finds the same snapshot) and its low-water mark is
 * advanced as blocks are confirmed. A rerun for the same Tandem snapshot resumes into the
 * pending EBS snapshot while EBS keeps it (Timeout since the last write); otherwise it starts
 * a clean one. CompleteSnapshot is only ever called after every block was confirmed, so a
 * completed EBS snapshot is never partial.
 */
import { randomUUID } from 'node:crypto';
import { TandemError } from '../../common/errors.js';
import type { SnapshotRecord } from '../../store/types.js';
import { completeSnapshot, EBS_BLOCK_SIZE, GiB, putSnapshotBlock, startSnapshot, type CallContext } from './api.js';
import { LinearChecksum, sha256 } from './checksum.js';
import { checkClient, ebsClient } from './client.js';
import { AdaptiveLimiter } from './limiter.js';
import { clearPending, getPending, listExportRecords, pendingExpired, putPending, recordExport, type PendingExport } from './lineage.js';
import { NOT_FOUND_GRACE_MS } from './retry.js';
import { ZERO_HASH, type EbsExportOptions, type EbsExportResult, type EbsStore } from './types.js';

/**
 * Minutes EBS keeps a pending snapshot after its last write before cancelling it. Four hours
 * lets an export interrupted by a crash, a reboot or an upgrade resume; an abandoned one
 * disappears the same day. (AWS allows 10 to 4320.)
 */
export const EXPORT_TIMEOUT_MINUTES = 240;
/** The resume mark is saved at most this often: a crash re-sends at most this much work. */
const PENDING_SAVE_INTERVAL_MS = 500;

const ZERO_BLOCK = Buffer.alloc(EBS_BLOCK_SIZE);
const ZERO_DIGEST = sha256(ZERO_BLOCK);

/**
 * The tags of an export: the volume, the Tandem snapshot (its id, time-sortable, is the point in
 * time), its byte size (EBS knows whole GiB only) and the appliance that made it. From them a new
 * cloud appliance adopts the exports a lost one made (adopt.ts).
 */
export function ebsTags(snap: Pick<SnapshotRecord, 'volume' | 'id' | 'size'>, appliance?: string): Record<string, string> {
  return {
    'tandem:volume': snap.volume,
    'tandem:snapshot': snap.id,
    'tandem:size': String(snap.size),
    ...(appliance !== undefined ? { 'tandem:appliance': appliance } : {}),
    Name: `tandem ${snap.volume} ${snap.id}`,
  };
}

export async function exportSnapshot(store: EbsStore, snap: SnapshotRecord, opts: EbsExportOptions = {}): Promise<EbsExportResult> {
  const started = Date.now();
  if (snap.blockSize !== EBS_BLOCK_SIZE) {
    throw new TandemError('ERR_BLOCK_SIZE_INVALID', `volume "${snap.volume}" has ${snap.blockSize}-byte blocks; EBS snapshots need ${EBS_BLOCK_SIZE} (512KiB): register the volume again with --block-size 512KiB to export it`, { details: { volume: snap.volume, blockSize: snap.blockSize } });
  }
  const done = (await listExportRecords(store, snap.volume)).find((r) => r.tandemSnapshot === snap.id);
  if (done && opts.kmsKeyArn !== undefined && opts.kmsKeyArn !== done.kmsKeyArn) {
    throw new TandemError('ERR_USAGE', `${snap.volume}@${snap.id} is exported already as ${done.ebsSnapshotId}, ${done.kmsKeyArn ? `encrypted with ${done.kmsKeyArn}` : 'with the default encryption'}, not with --kms-key ${opts.kmsKeyArn}; nothing was done. Take a new snapshot and export that with the key, or copy the EBS snapshot with the key (aws ec2 copy-snapshot --kms-key-id)`, { details: { volume: snap.volume, snapshot: snap.id, ebsSnapshotId: done.ebsSnapshotId } });
  }
  if (done) {
    return { ebsSnapshotId: done.ebsSnapshotId, tandemSnapshot: snap.id, parentEbsSnapshotId: done.parentEbsSnapshotId, blocksUploaded: 0, bytesUploaded: 0, requests: 0, resumed: false, seconds: (Date.now() - started) / 1000 };
  }
  const client = opts.client ?? ebsClient();
  await checkClient(client);
  let requests = 0;
  const ctx: CallContext = { client, limiter: new AdaptiveLimiter(), signal: opts.signal, notFoundGraceMs: NOT_FOUND_GRACE_MS, onAttempt: () => void requests++ };

  // At most two rounds: a pending snapshot EBS no longer accepts (cancelled, expired) is dropped
  // and the export starts clean once.
  for (let round = 0; ; round++) {
    const plan = await planExport(store, ctx, snap, opts);
    try {
      // Completed already: an earlier run was stopped after CompleteSnapshot, before recording it.
      let blocksUploaded = 0;
      if (!plan.completed) {
        const up = await upload(store, ctx, snap, plan, opts);
        await completeSnapshot(ctx, plan.pending.ebsSnapshotId, up.changedBlocks, up.aggregate);
        blocksUploaded = up.blocksUploaded;
      }
      await recordExport(store, snap.volume, {
        ebsSnapshotId: plan.pending.ebsSnapshotId,
        tandemSnapshot: snap.id,
        created: new Date().toISOString(),
        parentEbsSnapshotId: plan.pending.parentEbsSnapshotId,
        size: snap.size,
        volumeSizeGiB: plan.pending.volumeSizeGiB,
        ...(plan.pending.kmsKeyArn ? { kmsKeyArn: plan.pending.kmsKeyArn } : {}),
      });
      await clearPending(store, snap.volume);
      return {
        ebsSnapshotId: plan.pending.ebsSnapshotId,
        tandemSnapshot: snap.id,
        parentEbsSnapshotId: plan.pending.parentEbsSnapshotId,
        blocksUploaded,
        bytesUploaded: blocksUploaded * EBS_BLOCK_SIZE,
        requests,
        resumed: plan.resumed,
        seconds: (Date.now() - started) / 1000,
      };
    } catch (e) {
      const gone = e instanceof TandemError && (e.code === 'ERR_AWS_VALIDATION' || e.code === 'ERR_AWS_NOT_FOUND');
      if (plan.resumed && gone && round === 0) {
        await clearPending(store, snap.volume);
        continue;
      }
      throw e;
    }
  }
}

interface Plan {
  readonly pending: PendingExport & { ebsSnapshotId: string };
  readonly base: SnapshotRecord | null;
  readonly resumed: boolean;
  /** EBS completed the pending snapshot already (a run stopped after CompleteSnapshot): it is only to be recorded. */
  readonly completed?: true;
}

function startParams(snap: SnapshotRecord, p: PendingExport, appliance?: string) {
  return {
    volumeSizeGiB: p.volumeSizeGiB,
    parentSnapshotId: p.parentEbsSnapshotId,
    clientToken: p.clientToken,
    timeoutMinutes: p.timeoutMinutes,
    description: p.description,
    kmsKeyArn: p.kmsKeyArn,
    tags: ebsTags(snap, appliance),
  };
}

/** Resume the pending export of this snapshot if EBS still holds it, else start a new EBS snapshot. */
async function planExport(store: EbsStore, ctx: CallContext, snap: SnapshotRecord, opts: EbsExportOptions): Promise<Plan> {
  const pending = await getPending(store, snap.volume);
  if (pending && pending.tandemSnapshot === snap.id && opts.kmsKeyArn !== undefined && opts.kmsKeyArn !== pending.kmsKeyArn) {
    throw new TandemError('ERR_USAGE', `the export of ${snap.volume}@${snap.id} in progress (${pending.ebsSnapshotId || 'starting'}) uses ${pending.kmsKeyArn ? `the key ${pending.kmsKeyArn}` : 'the default encryption'}, not --kms-key ${opts.kmsKeyArn}; nothing was done. Rerun it without --kms-key (or with that key) to finish it, or take a new snapshot and export that with the key`, { details: { volume: snap.volume, snapshot: snap.id } });
  }
  if (pending && pending.tandemSnapshot === snap.id && !pendingExpired(pending)) {
    const base = pending.baseTandemSnapshot === null ? null : await store.getSnapshot(snap.volume, pending.baseTandemSnapshot);
    if (pending.baseTandemSnapshot === null || base) {
      // Re-issuing StartSnapshot with the same ClientToken and parameters returns the same
      // snapshot and its status (idempotency): the one way the EBS API tells "still pending".
      const again = await startSnapshot(ctx, startParams(snap, pending, opts.appliance)).catch((e: unknown) => {
        if (e instanceof TandemError && (e.code === 'ERR_AWS_VALIDATION' || e.code === 'ERR_AWS_NOT_FOUND')) return null;
        throw e;
      });
      if (again && again.status === 'pending' && (pending.ebsSnapshotId === '' || again.snapshotId === pending.ebsSnapshotId)) {
        const p = { ...pending, ebsSnapshotId: again.snapshotId, lastProgress: new Date().toISOString() };
        await putPending(store, snap.volume, p);
        return { pending: p, base, resumed: true };
      }
      // Completed: only this export completes it, after every block went up (EBS checks their
      // count and aggregate checksum). A run stopped before recording it is finished by recording
      // it; starting anew would leave it billed and untracked, and upload the volume again.
      if (again && again.status === 'completed' && pending.ebsSnapshotId !== '' && again.snapshotId === pending.ebsSnapshotId) {
        return { pending: { ...pending, ebsSnapshotId: again.snapshotId }, base, resumed: true, completed: true };
      }
    }
  }
  // Another snapshot's pending export, an expired one, or nothing: start clean. An abandoned
  // pending EBS snapshot is never completed; EBS cancels it after its Timeout.
  if (pending) await clearPending(store, snap.volume);

  let base: SnapshotRecord | null = null;
  let parentEbs: string | null = null;
  const exports = await listExportRecords(store, snap.volume);
  for (let i = exports.length - 1; i >= 0; i--) {
    const s = await store.getSnapshot(snap.volume, exports[i]!.tandemSnapshot);
    if (s) {
      base = s;
      parentEbs = exports[i]!.ebsSnapshotId;
      break;
    }
  }
  const volumeSizeGiB = Math.max(1, Math.ceil(snap.size / GiB));
  if (base && (Math.ceil(base.size / GiB) > volumeSizeGiB || base.size > snap.size)) {
    // EBS refuses a child smaller than its parent; and a child of a larger volume would keep the
    // parent's data past the new end, which the tree diff does not name: export in full, as a
    // new lineage.
    base = null;
    parentEbs = null;
  }
  const now = new Date().toISOString();
  const draft: PendingExport = {
    ebsSnapshotId: '',
    tandemSnapshot: snap.id,
    baseTandemSnapshot: base?.id ?? null,
    parentEbsSnapshotId: parentEbs,
    clientToken: randomUUID(),
    started: now,
    lastProgress: now,
    timeoutMinutes: EXPORT_TIMEOUT_MINUTES,
    volumeSizeGiB,
    uploadedUpTo: 0,
    ...(opts.kmsKeyArn ? { kmsKeyArn: opts.kmsKeyArn } : {}),
    description: opts.description ?? `Tandem export of volume ${snap.volume}, snapshot ${snap.id}`,
  };
  await putPending(store, snap.volume, draft);
  const started = await startSnapshot(ctx, startParams(snap, draft, opts.appliance));
  const p = { ...draft, ebsSnapshotId: started.snapshotId };
  await putPending(store, snap.volume, p);
  return { pending: p, base, resumed: false };
}

/** The block at `index` of `snap` as the 524288 bytes EBS wants (the last short block zero-padded). */
async function blockData(store: EbsStore, snap: SnapshotRecord, index: number, hash: Buffer): Promise<Buffer> {
  const length = Math.min(EBS_BLOCK_SIZE, snap.size - index * EBS_BLOCK_SIZE);
  const data = await store.getBlock(hash, length);
  if (data.length === EBS_BLOCK_SIZE) return data;
  const padded = Buffer.alloc(EBS_BLOCK_SIZE);
  data.copy(padded);
  return padded;
}

/**
 * Send every block of the diff not yet confirmed, ascending, with the limiter's window in
 * flight. Digests enter the aggregate in index order as blocks are read (confirmed or not);
 * a failed block stops production, lets the window drain, saves the mark and throws.
 */
async function upload(store: EbsStore, ctx: CallContext, snap: SnapshotRecord, plan: Plan, opts: EbsExportOptions): Promise<{ changedBlocks: number; aggregate: string; blocksUploaded: number }> {
  const { base } = plan;
  let pending: PendingExport = plan.pending;
  const snapshotId = plan.pending.ebsSnapshotId;
  const wanted = (hash: Buffer) => base !== null || !hash.equals(ZERO_HASH);

  let total = 0;
  for await (const c of store.diffSnapshots(base, snap)) if (wanted(c.hash)) total++;

  const agg = new LinearChecksum();
  /** Indices read and not yet confirmed, ascending; the first is the resume mark. */
  const outstanding: Array<{ index: number; done: boolean }> = [];
  const inFlight = new Set<Promise<void>>();
  let nextIndex = pending.uploadedUpTo;
  let failure: unknown = null;
  let uploaded = 0;
  let confirmed = 0;
  let lastSave = Date.now();
  let saving: Promise<void> = Promise.resolve();

  const mark = () => (outstanding.length > 0 ? outstanding[0]!.index : nextIndex);
  const save = (force: boolean) => {
    if (!force && Date.now() - lastSave < PENDING_SAVE_INTERVAL_MS) return saving;
    lastSave = Date.now();
    const upTo = mark();
    if (upTo <= pending.uploadedUpTo && !force) return saving;
    pending = { ...pending, uploadedUpTo: Math.max(pending.uploadedUpTo, upTo), lastProgress: new Date().toISOString() };
    const p = pending;
    saving = saving.then(() => putPending(store, snap.volume, p));
    return saving;
  };

  for await (const { index, hash } of store.diffSnapshots(base, snap)) {
    if (failure) break;
    if (!wanted(hash)) continue;
    const zero = hash.equals(ZERO_HASH);
    if (index < plan.pending.uploadedUpTo) {
      // Confirmed by an earlier run: only its digest is needed, for the aggregate.
      agg.add(index, zero ? ZERO_DIGEST : sha256(await blockData(store, snap, index, hash)));
      confirmed++;
      continue;
    }
    while (inFlight.size >= ctx.limiter.limit && !failure) await Promise.race(inFlight);
    if (failure) break;
    const data = zero ? ZERO_BLOCK : await blockData(store, snap, index, hash);
    const digest = zero ? ZERO_DIGEST : sha256(data);
    agg.add(index, digest);
    const slot = { index, done: false };
    outstanding.push(slot);
    nextIndex = index + 1;
    const task: Promise<void> = putSnapshotBlock(ctx, snapshotId, index, data, digest.toString('base64'), Math.floor(((confirmed + 1) / Math.max(1, total)) * 100))
      .then(() => {
        slot.done = true;
        uploaded++;
        confirmed++;
        while (outstanding.length > 0 && outstanding[0]!.done) outstanding.shift();
        opts.onProgress?.(confirmed, total);
        void save(false).catch(() => {});
      })
      .catch((e: unknown) => { failure ??= e; })
      .finally(() => inFlight.delete(task));
    inFlight.add(task);
  }
  await Promise.all(inFlight);
  if (failure) {
    await save(true).catch(() => {});
    throw failure;
  }
  nextIndex = Number.MAX_SAFE_INTEGER;
  await save(true);
  opts.onProgress?.(confirmed, total);
  if (agg.count !== total) throw new TandemError('ERR_INTERNAL', `export of ${snap.volume}@${snap.id}: ${agg.count} of ${total} blocks accounted for; rerun the export`);
  return { changedBlocks: agg.count, aggregate: agg.digest(), blocksUploaded: uploaded };
}
