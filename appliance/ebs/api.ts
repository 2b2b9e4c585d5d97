/**
 * One small function per EBS direct API call, each with its retry policy, each returning plain
 * values. The transfer code (export.ts, import.ts) never touches the SDK directly.
 */
import {
  CompleteSnapshotCommand,
  GetSnapshotBlockCommand,
  ListChangedBlocksCommand,
  ListSnapshotBlocksCommand,
  PutSnapshotBlockCommand,
  StartSnapshotCommand,
  type EBSClient,
  type Tag,
} from '@aws-sdk/client-ebs';
import { TandemError } from '../../common/errors.js';
import { sha256 } from './checksum.js';
import { isExpiredToken } from './errors.js';
import { withRetry, type RetryOptions } from './retry.js';

/** The EBS direct API block size: fixed by AWS. */
export const EBS_BLOCK_SIZE = 524288;
/** The largest page List* calls return: one List call per 10,000 blocks (5 GiB). */
export const LIST_PAGE_SIZE = 10_000;
/** AWS refuses MaxResults below 100. */
export const MIN_LIST_PAGE_SIZE = 100;
export const GiB = 1024 ** 3;

export interface CallContext extends RetryOptions {
  readonly client: EBSClient;
}

export interface StartedSnapshot {
  readonly snapshotId: string;
  readonly status: string;
  readonly volumeSizeGiB: number;
  readonly parentSnapshotId: string | null;
}

export async function startSnapshot(ctx: CallContext, p: {
  volumeSizeGiB: number; parentSnapshotId: string | null; clientToken: string; timeoutMinutes: number;
  description?: string; kmsKeyArn?: string; tags: Record<string, string>;
}): Promise<StartedSnapshot> {
  const tags: Tag[] = Object.entries(p.tags).map(([Key, Value]) => ({ Key, Value }));
  const r = await withRetry('StartSnapshot', () => ctx.client.send(new StartSnapshotCommand({
    VolumeSize: p.volumeSizeGiB,
    ParentSnapshotId: p.parentSnapshotId ?? undefined,
    ClientToken: p.clientToken,
    Timeout: p.timeoutMinutes,
    Description: p.description,
    Tags: tags,
    ...(p.kmsKeyArn ? { Encrypted: true, KmsKeyArn: p.kmsKeyArn } : {}),
  }), { abortSignal: ctx.signal }), ctx);
  if (!r.SnapshotId) throw new TandemError('ERR_AWS_FAILED', 'StartSnapshot answered without a SnapshotId; rerun the export');
  return { snapshotId: r.SnapshotId, status: r.Status ?? 'pending', volumeSizeGiB: r.VolumeSize ?? p.volumeSizeGiB, parentSnapshotId: r.ParentSnapshotId ?? null };
}

/** Upload one 524288-byte block; checks the checksum the service echoes. Idempotent for the same data. */
export async function putSnapshotBlock(ctx: CallContext, snapshotId: string, index: number, data: Buffer, checksum: string, progress?: number): Promise<void> {
  if (data.length !== EBS_BLOCK_SIZE) throw new Error(`an EBS block has ${EBS_BLOCK_SIZE} bytes, not ${data.length}`);
  const r = await withRetry(`PutSnapshotBlock ${snapshotId} block ${index}`, () => ctx.client.send(new PutSnapshotBlockCommand({
    SnapshotId: snapshotId,
    BlockIndex: index,
    BlockData: data,
    DataLength: data.length,
    Checksum: checksum,
    ChecksumAlgorithm: 'SHA256',
    Progress: progress,
  }), { abortSignal: ctx.signal }), ctx);
  if (r.Checksum !== undefined && r.Checksum !== checksum) {
    throw new TandemError('ERR_EBS_CHECKSUM', `EBS acknowledged block ${index} of ${snapshotId} with checksum ${r.Checksum}, not ${checksum}; the upload was damaged: rerun the export (it resumes and the snapshot is not completed)`, { details: { snapshotId, blockIndex: index, expected: checksum, got: r.Checksum } });
  }
}

export async function completeSnapshot(ctx: CallContext, snapshotId: string, changedBlocks: number, aggregate: string): Promise<string> {
  const r = await withRetry(`CompleteSnapshot ${snapshotId}`, () => ctx.client.send(new CompleteSnapshotCommand({
    SnapshotId: snapshotId,
    ChangedBlocksCount: changedBlocks,
    Checksum: aggregate,
    ChecksumAlgorithm: 'SHA256',
    ChecksumAggregationMethod: 'LINEAR',
  }), { abortSignal: ctx.signal }), ctx);
  return r.Status ?? 'pending';
}

/** One listed block: its index and the token(s) to read it. `token` null: absent in the snapshot (reads as zeros). */
export interface ListedBlock {
  readonly index: number;
  readonly token: string | null;
}

export interface ListPage {
  readonly blocks: ListedBlock[];
  readonly nextToken: string | null;
  readonly volumeSizeGiB: number | null;
  readonly blockSize: number | null;
  readonly expiry: Date | null;
}

/**
 * One page of ListSnapshotBlocks (base null) or ListChangedBlocks(base, target). For changed
 * blocks the token is the target's (SecondBlockToken); a block present only in the base is
 * returned with token null (it is zeros in the target). An expired NextToken is rethrown
 * untouched so the caller can list again from its position.
 */
export async function listPage(ctx: CallContext, target: string, base: string | null, p: { nextToken?: string | null; startingBlockIndex?: number; maxResults?: number }): Promise<ListPage> {
  const maxResults = p.maxResults ?? LIST_PAGE_SIZE;
  const common = {
    NextToken: p.nextToken ?? undefined,
    MaxResults: maxResults,
    StartingBlockIndex: p.nextToken ? undefined : p.startingBlockIndex,
  };
  if (base === null) {
    const r = await withRetry(`ListSnapshotBlocks ${target}`, () => ctx.client.send(new ListSnapshotBlocksCommand({ SnapshotId: target, ...common }), { abortSignal: ctx.signal }), ctx, isExpiredToken);
    return {
      blocks: (r.Blocks ?? []).map((b) => ({ index: b.BlockIndex!, token: b.BlockToken ?? null })),
      nextToken: r.NextToken || null,
      volumeSizeGiB: r.VolumeSize ?? null,
      blockSize: r.BlockSize ?? null,
      expiry: r.ExpiryTime ?? null,
    };
  }
  const r = await withRetry(`ListChangedBlocks ${base} -> ${target}`, () => ctx.client.send(new ListChangedBlocksCommand({ FirstSnapshotId: base, SecondSnapshotId: target, ...common }), { abortSignal: ctx.signal }), ctx, isExpiredToken);
  return {
    blocks: (r.ChangedBlocks ?? []).map((b) => ({ index: b.BlockIndex!, token: b.SecondBlockToken ?? null })),
    nextToken: r.NextToken || null,
    volumeSizeGiB: r.VolumeSize ?? null,
    blockSize: r.BlockSize ?? null,
    expiry: r.ExpiryTime ?? null,
  };
}

/**
 * Read one block and check it against the SHA-256 the service sent with it (ERR_EBS_CHECKSUM
 * otherwise: never retried, a damaged block never enters the store). An expired block token
 * is rethrown untouched (the caller lists again for a fresh one).
 */
export async function getSnapshotBlock(ctx: CallContext, snapshotId: string, index: number, token: string): Promise<Buffer> {
  return withRetry(`GetSnapshotBlock ${snapshotId} block ${index}`, async () => {
    const r = await ctx.client.send(new GetSnapshotBlockCommand({ SnapshotId: snapshotId, BlockIndex: index, BlockToken: token }), { abortSignal: ctx.signal });
    if (!r.BlockData) throw new TandemError('ERR_AWS_FAILED', `GetSnapshotBlock ${snapshotId} block ${index} answered without data; rerun the import`);
    const data = Buffer.from(await r.BlockData.transformToByteArray());
    if (r.DataLength !== undefined && r.DataLength !== data.length) {
      throw Object.assign(new Error(`GetSnapshotBlock ${snapshotId} block ${index}: body has ${data.length} bytes, DataLength says ${r.DataLength}`), { name: 'TruncatedBody' });
    }
    const got = sha256(data).toString('base64');
    if (r.Checksum === undefined || r.ChecksumAlgorithm !== undefined && r.ChecksumAlgorithm !== 'SHA256' || got !== r.Checksum) {
      throw new TandemError('ERR_EBS_CHECKSUM', `block ${index} of ${snapshotId} does not match the checksum EBS sent (${r.Checksum ?? 'none'}, computed ${got}); nothing was stored: rerun the import, and if it persists the snapshot is damaged`, { details: { snapshotId, blockIndex: index, expected: r.Checksum ?? null, got } });
    }
    if (data.length !== EBS_BLOCK_SIZE) {
      throw new TandemError('ERR_AWS_FAILED', `block ${index} of ${snapshotId} has ${data.length} bytes, not ${EBS_BLOCK_SIZE}; the EBS direct API block size is fixed: check AWS_ENDPOINT_URL_EBS`, { details: { snapshotId, blockIndex: index } });
    }
    return data;
  }, ctx, isExpiredToken);
}
