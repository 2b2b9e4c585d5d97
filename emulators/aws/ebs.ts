/**
 * The EBS direct API (service "ebs", REST-JSON, API version 2019-11-02), as
 * @aws-sdk/client-ebs sends and expects it. Routes, headers and query names follow the
 * service model; the rules enforced are listed in emulators/README.md.
 */
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { EBS_BLOCK_SIZE, sha256 } from './blobs.js';
import type { EmulatorContext } from './context.js';
import { EbsError, ebsNotFound, ebsValidation } from './errors.js';
import { newId, OWNER_ID } from './ids.js';
import type { SnapshotRec, Tag } from './state.js';
import { decodeBlockToken, decodePageToken, encodeBlockToken, encodePageToken } from './tokens.js';
import { markOperation } from './pipeline.js';

/** 1 GiB holds this many 512 KiB blocks: a volume of N GiB has block indices 0 .. N*2048-1. */
const BLOCKS_PER_GIB = 2048;
/** EBS volumes are 1 GiB to 64 TiB. */
const MAX_VOLUME_GIB = 65536;
/** StartSnapshot's Timeout bounds and default, in minutes (service model). */
const MIN_TIMEOUT_MINUTES = 10;
const MAX_TIMEOUT_MINUTES = 4320;
/** MaxResults bounds of the listings (service model); the default is the maximum. */
const MIN_RESULTS = 100;
const MAX_RESULTS = 10000;
/**
 * Block indices a listing page scans at most. A page whose range holds no written block is
 * empty yet carries a NextToken, as real pages can be: clients must loop on NextToken, not on
 * an empty page. 16384 indices = 8 GiB of volume per page: more than MAX_RESULTS, so a dense
 * volume still fills whole pages of 10,000 blocks.
 */
export const PAGE_SCAN_SPAN = 16384;
/** Checksum text limits of the service model. */
const CHECKSUM_PATTERN = /^[A-Za-z0-9+/=]{1,64}$/;

/** Sorted own block indices of completed (immutable) snapshots, computed once. */
const sortedCache = new WeakMap<SnapshotRec, number[]>();

function sortedIndices(s: SnapshotRec): number[] {
  const cached = sortedCache.get(s);
  if (cached) return cached;
  const sorted = [...s.blocks.keys()].sort((a, b) => a - b);
  if (s.status === 'completed') sortedCache.set(s, sorted);
  return sorted;
}

function lowerBound(a: number[], x: number): number {
  let lo = 0;
  let hi = a.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (a[mid]! < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Indices written in any of `snaps` within [from, to), ascending, deduplicated. */
function indicesIn(snaps: SnapshotRec[], from: number, to: number): number[] {
  const set = new Set<number>();
  for (const s of snaps) {
    const a = sortedIndices(s);
    for (let i = lowerBound(a, from); i < a.length && a[i]! < to; i++) set.add(a[i]!);
  }
  return [...set].sort((x, y) => x - y);
}

/** Whether any of `snaps` has a block at an index >= from. */
function anyFrom(snaps: SnapshotRec[], from: number): boolean {
  return snaps.some((s) => {
    const a = sortedIndices(s);
    return lowerBound(a, from) < a.length;
  });
}

function parseIntParam(v: unknown, name: string, min: number, max: number): number {
  const n = typeof v === 'number' ? v : typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n) || n < min || n > max) throw ebsValidation(`${name} must be an integer from ${min} to ${max}`);
  return n;
}

function header(req: FastifyRequest, name: string): string | undefined {
  const v = req.headers[name.toLowerCase()];
  return Array.isArray(v) ? v[0] : v;
}

function toEpochSeconds(ms: number): number {
  return ms / 1000;
}

export function registerEbs(app: FastifyInstance, ctx: EmulatorContext): void {
  const { state } = ctx;

  function getSnapshot(id: string): SnapshotRec {
    const s = state.snapshot(id);
    if (!s) throw ebsNotFound(id);
    return s;
  }

  function readable(id: string): SnapshotRec {
    const s = getSnapshot(id);
    if (s.status !== 'completed') {
      throw ebsValidation(`The snapshot '${id}' is ${s.status}; only completed snapshots can be read`, 'INVALID_SNAPSHOT_ID');
    }
    return s;
  }

  function describe(s: SnapshotRec): Record<string, unknown> {
    return {
      SnapshotId: s.id,
      OwnerId: OWNER_ID,
      Status: s.status,
      StartTime: toEpochSeconds(s.startTime),
      VolumeSize: s.volumeSizeGiB,
      BlockSize: EBS_BLOCK_SIZE,
      Tags: s.tags,
      ParentSnapshotId: s.parentId ?? undefined,
      KmsKeyArn: s.kmsKeyArn ?? undefined,
      Description: s.description || undefined,
      SseType: s.encrypted ? (s.kmsKeyArn ? 'sse-kms' : 'sse-ebs') : 'none',
    };
  }

  // StartSnapshot ---------------------------------------------------------------------------
  app.post('/snapshots', { preHandler: markOperation(ctx, 'ebs', 'StartSnapshot') }, async (req, reply) => {
    const body = (req.body ?? {}) as Record<string, unknown>;
    const volumeSize = parseIntParam(body.VolumeSize, 'VolumeSize', 1, MAX_VOLUME_GIB);
    const timeoutMinutes = body.Timeout === undefined ? ctx.pendingTimeoutMinutes : parseIntParam(body.Timeout, 'Timeout', MIN_TIMEOUT_MINUTES, MAX_TIMEOUT_MINUTES);
    const tags = parseTags(body.Tags);
    const description = body.Description === undefined ? '' : String(body.Description);
    if (description.length > 255) throw ebsValidation('Description must be at most 255 characters');
    const encrypted = body.Encrypted === true;
    const kmsKeyArn = typeof body.KmsKeyArn === 'string' ? body.KmsKeyArn : null;
    if (kmsKeyArn && !encrypted) throw ebsValidation('KmsKeyArn requires Encrypted=true');
    const parentId = typeof body.ParentSnapshotId === 'string' ? body.ParentSnapshotId : null;
    const clientToken = typeof body.ClientToken === 'string' ? body.ClientToken : null;
    const requestKey = JSON.stringify([volumeSize, parentId, tags, description, encrypted, kmsKeyArn, body.Timeout ?? null]);

    if (clientToken) {
      const prior = state.clientTokens.get(clientToken);
      const s = prior ? state.snapshot(prior) : undefined;
      if (s) {
        if (s.requestKey !== requestKey) {
          throw new EbsError('ConflictException', 409, `ClientToken '${clientToken}' was used by a different StartSnapshot request; use a new token for new parameters`);
        }
        return reply.code(201).send(describe(s));
      }
    }
    if (parentId !== null) {
      const parent = state.snapshot(parentId);
      if (!parent) throw ebsNotFound(parentId);
      if (parent.status !== 'completed') {
        throw ebsValidation(`The parent snapshot '${parentId}' is ${parent.status}; a parent must be completed`, 'INVALID_SNAPSHOT_ID');
      }
      if (volumeSize < parent.volumeSizeGiB) {
        throw ebsValidation(`VolumeSize ${volumeSize} GiB is smaller than the parent's ${parent.volumeSizeGiB} GiB`, 'INVALID_VOLUME_SIZE');
      }
    }
    const s: SnapshotRec = {
      id: newId('snap'),
      status: 'pending',
      statusMessage: '',
      startTime: Date.now(),
      completionTime: null,
      volumeSizeGiB: volumeSize,
      parentId,
      tags,
      description,
      encrypted,
      kmsKeyArn,
      clientToken,
      requestKey,
      timeoutMinutes,
      volumeId: null,
      blocks: new Map(),
    };
    state.snapshots.set(s.id, s);
    if (clientToken) state.clientTokens.set(clientToken, s.id);
    state.changed();
    return reply.code(201).send(describe(s));
  });

  // PutSnapshotBlock ------------------------------------------------------------------------
  app.put<{ Params: { SnapshotId: string; BlockIndex: string } }>(
    '/snapshots/:SnapshotId/blocks/:BlockIndex',
    { preHandler: markOperation(ctx, 'ebs', 'PutSnapshotBlock'), bodyLimit: 2 * EBS_BLOCK_SIZE },
    async (req, reply) => {
      const s = getSnapshot(req.params.SnapshotId);
      if (s.status !== 'pending') {
        throw ebsValidation(`The snapshot '${s.id}' is ${s.status}; blocks can only be written to a pending snapshot`, 'INVALID_SNAPSHOT_ID');
      }
      const index = parseIntParam(req.params.BlockIndex, 'BlockIndex', 0, Number.MAX_SAFE_INTEGER);
      if (index >= s.volumeSizeGiB * BLOCKS_PER_GIB) {
        throw ebsValidation(`BlockIndex ${index} is beyond the end of a ${s.volumeSizeGiB} GiB volume (last index ${s.volumeSizeGiB * BLOCKS_PER_GIB - 1})`, 'INVALID_BLOCK');
      }
      const data = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
      const declared = header(req, 'x-amz-Data-Length');
      if (declared === undefined || Number(declared) !== EBS_BLOCK_SIZE) {
        throw ebsValidation(`x-amz-Data-Length must be ${EBS_BLOCK_SIZE} (got ${declared ?? 'none'})`);
      }
      if (data.length !== EBS_BLOCK_SIZE) {
        throw ebsValidation(`The block data is ${data.length} bytes; it must be exactly ${EBS_BLOCK_SIZE}`, 'INVALID_BLOCK');
      }
      const algorithm = header(req, 'x-amz-Checksum-Algorithm');
      if (algorithm !== 'SHA256') throw ebsValidation(`x-amz-Checksum-Algorithm must be SHA256 (got ${algorithm ?? 'none'})`);
      const checksum = header(req, 'x-amz-Checksum');
      if (!checksum || !CHECKSUM_PATTERN.test(checksum)) throw ebsValidation('x-amz-Checksum must be the base64 SHA256 of the block data');
      const digest = sha256(data);
      const actual = digest.toString('base64');
      if (checksum !== actual) {
        throw ebsValidation(`The checksum of block ${index} does not match its data (sent ${checksum}, computed ${actual}); resend the block`);
      }
      const progress = header(req, 'x-amz-Progress');
      if (progress !== undefined) parseIntParam(progress, 'x-amz-Progress', 0, 100);
      const hex = digest.toString('hex');
      await state.blobs.put(hex, data);
      // The snapshot may have timed out or completed while the block was being stored.
      if (s.status !== 'pending') {
        throw ebsValidation(`The snapshot '${s.id}' is ${s.status}; blocks can only be written to a pending snapshot`, 'INVALID_SNAPSHOT_ID');
      }
      s.blocks.set(index, hex);
      ctx.stats.blockBytesIn += data.length;
      state.changed();
      return reply.code(201).header('x-amz-Checksum', actual).header('x-amz-Checksum-Algorithm', 'SHA256').send({});
    },
  );

  // CompleteSnapshot ------------------------------------------------------------------------
  app.post<{ Params: { SnapshotId: string } }>(
    '/snapshots/completion/:SnapshotId',
    { preHandler: markOperation(ctx, 'ebs', 'CompleteSnapshot') },
    async (req, reply) => {
      const s = getSnapshot(req.params.SnapshotId);
      if (s.status === 'completed') return reply.code(202).send({ Status: 'completed' });
      if (s.status === 'error') {
        throw ebsValidation(`The snapshot '${s.id}' is in state error (${s.statusMessage}); start a new snapshot`, 'INVALID_SNAPSHOT_ID');
      }
      const count = parseIntParam(header(req, 'x-amz-ChangedBlocksCount'), 'x-amz-ChangedBlocksCount', 0, Number.MAX_SAFE_INTEGER);
      const checksum = header(req, 'x-amz-Checksum');
      const algorithm = header(req, 'x-amz-Checksum-Algorithm');
      const method = header(req, 'x-amz-Checksum-Aggregation-Method');
      if (algorithm !== undefined && algorithm !== 'SHA256') throw ebsValidation(`x-amz-Checksum-Algorithm must be SHA256 (got ${algorithm})`);
      if (method !== undefined && method !== 'LINEAR') throw ebsValidation(`x-amz-Checksum-Aggregation-Method must be LINEAR (got ${method})`);
      if (checksum !== undefined && !CHECKSUM_PATTERN.test(checksum)) throw ebsValidation('x-amz-Checksum must be a base64 SHA256');
      const fail = (message: string): never => {
        s.status = 'error';
        s.statusMessage = message;
        state.changed();
        throw ebsValidation(`${message}; the snapshot is now in state error, start a new one`);
      };
      if (count !== s.blocks.size) fail(`ChangedBlocksCount is ${count} but ${s.blocks.size} blocks were written`);
      if (checksum !== undefined) {
        const aggregate = linearAggregate(s);
        if (aggregate !== checksum) fail(`The aggregated checksum ${checksum} does not match the written blocks (${aggregate})`);
      }
      s.status = 'completed';
      s.completionTime = Date.now();
      state.changed();
      return reply.code(202).send({ Status: 'completed' });
    },
  );

  // ListSnapshotBlocks ----------------------------------------------------------------------
  app.get<{ Params: { SnapshotId: string }; Querystring: Record<string, string> }>(
    '/snapshots/:SnapshotId/blocks',
    { preHandler: markOperation(ctx, 'ebs', 'ListSnapshotBlocks') },
    async (req, reply) => {
      const s = readable(req.params.SnapshotId);
      const listing = `blocks:${s.id}`;
      const { start, max } = pageStart(req.query, listing);
      const lineage = state.lineage(s);
      const total = s.volumeSizeGiB * BLOCKS_PER_GIB;
      const page = listPage(lineage, start, max, total, () => true);
      const expiresAt = Date.now() + ctx.blockTokenTtlMs;
      const Blocks = page.indices.map((i) => ({ BlockIndex: i, BlockToken: encodeBlockToken(state.tokenKey, i, state.blockDigest(s, i)!, expiresAt) }));
      return reply.send({
        Blocks,
        ExpiryTime: toEpochSeconds(expiresAt),
        VolumeSize: s.volumeSizeGiB,
        BlockSize: EBS_BLOCK_SIZE,
        NextToken: page.next === null ? undefined : encodePageToken(state.tokenKey, { listing, next: page.next }, Date.now() + ctx.nextTokenTtlMs),
      });
    },
  );

  // ListChangedBlocks -----------------------------------------------------------------------
  app.get<{ Params: { SecondSnapshotId: string }; Querystring: Record<string, string> }>(
    '/snapshots/:SecondSnapshotId/changedblocks',
    { preHandler: markOperation(ctx, 'ebs', 'ListChangedBlocks') },
    async (req, reply) => {
      const second = readable(req.params.SecondSnapshotId);
      const firstId = req.query.firstSnapshotId;
      const first = firstId === undefined ? null : readable(firstId);
      const lineage = state.lineage(second);
      let scanned = lineage;
      if (first) {
        const at = lineage.indexOf(first);
        if (at < 0) {
          throw ebsValidation(`The snapshot '${first.id}' is not an ancestor of '${second.id}': changed blocks exist only within one snapshot lineage`, 'UNRELATED_SNAPSHOTS');
        }
        scanned = lineage.slice(0, at);
      }
      const listing = `changed:${first?.id ?? ''}:${second.id}`;
      const { start, max } = pageStart(req.query, listing);
      const total = second.volumeSizeGiB * BLOCKS_PER_GIB;
      const differs = (i: number): boolean => !first || state.blockDigest(first, i) !== state.blockDigest(second, i);
      const page = listPage(scanned, start, max, total, differs);
      const expiresAt = Date.now() + ctx.blockTokenTtlMs;
      const ChangedBlocks = page.indices.map((i) => {
        const a = first ? state.blockDigest(first, i) : null;
        const b = state.blockDigest(second, i);
        return {
          BlockIndex: i,
          FirstBlockToken: a === null ? undefined : encodeBlockToken(state.tokenKey, i, a, expiresAt),
          SecondBlockToken: b === null ? undefined : encodeBlockToken(state.tokenKey, i, b, expiresAt),
        };
      });
      return reply.send({
        ChangedBlocks,
        ExpiryTime: toEpochSeconds(expiresAt),
        VolumeSize: second.volumeSizeGiB,
        BlockSize: EBS_BLOCK_SIZE,
        NextToken: page.next === null ? undefined : encodePageToken(state.tokenKey, { listing, next: page.next }, Date.now() + ctx.nextTokenTtlMs),
      });
    },
  );

  // GetSnapshotBlock ------------------------------------------------------------------------
  app.get<{ Params: { SnapshotId: string; BlockIndex: string }; Querystring: Record<string, string> }>(
    '/snapshots/:SnapshotId/blocks/:BlockIndex',
    { preHandler: markOperation(ctx, 'ebs', 'GetSnapshotBlock') },
    async (req, reply) => {
      const s = readable(req.params.SnapshotId);
      const index = parseIntParam(req.params.BlockIndex, 'BlockIndex', 0, s.volumeSizeGiB * BLOCKS_PER_GIB - 1);
      const token = req.query.blockToken;
      if (!token) throw ebsValidation('blockToken is required; get it from ListSnapshotBlocks or ListChangedBlocks', 'INVALID_BLOCK_TOKEN');
      const t = decodeBlockToken(state.tokenKey, token);
      if (!t.ok) {
        throw ebsValidation(t.expired ? 'The block token has expired; list the blocks again for fresh tokens' : 'The block token is not valid', 'INVALID_BLOCK_TOKEN');
      }
      if (t.value.index !== index || state.blockDigest(s, index) !== t.value.digestHex) {
        throw ebsValidation(`The block token does not name block ${index} of snapshot '${s.id}'`, 'INVALID_BLOCK_TOKEN');
      }
      const data = await state.blobs.get(t.value.digestHex);
      ctx.stats.blockBytesOut += data.length;
      return reply
        .code(200)
        .header('content-type', 'application/octet-stream')
        .header('x-amz-Data-Length', String(data.length))
        .header('x-amz-Checksum', Buffer.from(t.value.digestHex, 'hex').toString('base64'))
        .header('x-amz-Checksum-Algorithm', 'SHA256')
        .send(data);
    },
  );

  function pageStart(q: Record<string, string>, listing: string): { start: number; max: number } {
    const max = q.maxResults === undefined ? MAX_RESULTS : parseIntParam(q.maxResults, 'MaxResults', MIN_RESULTS, MAX_RESULTS);
    if (q.pageToken !== undefined) {
      const t = decodePageToken(state.tokenKey, q.pageToken, listing);
      if (!t.ok) {
        throw ebsValidation(t.expired ? 'The NextToken has expired; start the listing again' : 'The NextToken is not valid for this listing', 'INVALID_PAGE_TOKEN');
      }
      return { start: t.value.next, max };
    }
    const start = q.startingBlockIndex === undefined ? 0 : parseIntParam(q.startingBlockIndex, 'StartingBlockIndex', 0, Number.MAX_SAFE_INTEGER);
    return { start, max };
  }
}

/**
 * One page: the indices in [start, start + PAGE_SCAN_SPAN) written in `snaps` and accepted by
 * `keep`, at most `max`; `next` is where the following page starts, null when nothing is left.
 */
function listPage(snaps: SnapshotRec[], start: number, max: number, total: number, keep: (i: number) => boolean): { indices: number[]; next: number | null } {
  const end = Math.min(start + PAGE_SCAN_SPAN, total);
  const indices: number[] = [];
  let next = end;
  for (const i of indicesIn(snaps, start, end)) {
    if (!keep(i)) continue;
    if (indices.length === max) {
      next = i;
      break;
    }
    indices.push(i);
  }
  return { indices, next: next < total && anyFrom(snaps, next) ? next : null };
}

/**
 * The LINEAR aggregate of CompleteSnapshot: base64(SHA256(d0 || d1 || ...)) where dN are the
 * raw 32-byte SHA256 digests of the written blocks in ascending block index order.
 */
export function linearAggregate(s: SnapshotRec): string {
  const digests = [...s.blocks.entries()].sort((a, b) => a[0] - b[0]).map(([, hex]) => Buffer.from(hex, 'hex'));
  return sha256(Buffer.concat(digests)).toString('base64');
}

function parseTags(v: unknown): Tag[] {
  if (v === undefined) return [];
  if (!Array.isArray(v)) throw ebsValidation('Tags must be a list of {Key, Value}', 'INVALID_TAG');
  return v.map((t) => {
    const { Key, Value } = (t ?? {}) as Record<string, unknown>;
    if (typeof Key !== 'string' || Key.length === 0 || Key.length > 127) throw ebsValidation('Every tag needs a Key of 1 to 127 characters', 'INVALID_TAG');
    return { Key, Value: typeof Value === 'string' ? Value : '' };
  });
}
