/**
 * Limits and helpers of the peer protocol shared by the engine, the server and the client.
 * sync/README.md documents every route; these numbers are part of the protocol.
 */
import { TandemError } from '../common/errors.js';
import type { Hash } from '../store/types.js';

export const PROTOCOL_VERSION = 1;
/**
 * Hashes per has/get request: 4096 hashes are ~270 KiB of JSON, a few ms to check, and a 4 GiB
 * volume's level-1 frontier fits in one request, so round trips stay at tree depth.
 */
export const MAX_HASHES_PER_REQUEST = 4096;
/** Nodes per nodes/get or nodes/put request: with FANOUT children in hex each, ~1-2 MiB of JSON. */
export const MAX_NODES_PER_REQUEST = 64;
/** Body limit of JSON requests (the largest is a nodes/put of MAX_NODES_PER_REQUEST full nodes). */
export const MAX_JSON_BODY = 8 * 1024 * 1024;
/** Most children a node may have on the wire (a store's FANOUT is far below). */
export const MAX_CHILDREN = 4096;
/** Deepest tree accepted (FANOUT^32 blocks is more than any volume). */
export const MAX_HEIGHT = 32;
/** Request header that carries a volume lease (see POST /v1/volumes/:vol/lock). */
export const LEASE_HEADER = 'x-tandem-lease';
/**
 * Response header in which a server names what it takes beyond protocol 1, comma-separated. A
 * client uses a feature only with a server that named it: an earlier release names none.
 * `block-delta`: block streams may carry delta frames (codec 2, sync/README.md "Framing").
 * `commit-nodes`: `snapshots/commit` takes the snapshot's last nodes too (`nodes`, as `nodes/put`).
 * `delta-deflate`: block streams may carry deflated delta frames (codec 3), and `blocks/get`
 * takes `deflateDeltas: true` to answer with them.
 */
export const FEATURES_HEADER = 'x-tandem-features';
export const FEATURE_BLOCK_DELTA = 'block-delta';
export const FEATURE_COMMIT_NODES = 'commit-nodes';
export const FEATURE_DELTA_DEFLATE = 'delta-deflate';
export const SERVER_FEATURES = [FEATURE_BLOCK_DELTA, FEATURE_COMMIT_NODES, FEATURE_DELTA_DEFLATE].join(',');
/**
 * On a push's lock request: when the pusher took the snapshot whose root it names (`ifRoot`). A
 * server that finds itself up to date records it (meta {@link CONFIRMED_NS}), which dates its
 * recovery point; a header, so that a server of an earlier release ignores it.
 */
export const POINT_AT_HEADER = 'x-tandem-point-at';
/** Meta namespace, by volume, on the receiving appliance: `{root, at, by}`, the last point a source confirmed it holds (its latest), when that push sent nothing. */
export const CONFIRMED_NS = 'volume-confirmed';

export const HEX_HASH_PATTERN = '^[0-9a-f]{64}$';
export const VOLUME_PATTERN = '^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$';
export const SNAPSHOT_ID_PATTERN = '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$';

export function toHex(h: Hash): string {
  return h.toString('hex');
}

/** The length of the block a frame carries: a delta frame's `data` holds its patches only. */
export function frameBlockLength(f: { readonly data: Buffer; readonly delta?: { readonly length: number } }): number {
  return f.delta?.length ?? f.data.length;
}

/**
 * The sizes of blocks a stream sent as deltas (or with a base to make one), for those the
 * receiver then names in `needWhole`: their resend whole must not count them twice. Every block
 * but a volume's short last one has the same size, so only the others are kept: memory stays
 * bounded however long the stream.
 */
export class DeltaSizes {
  private full = 0;
  private readonly short = new Map<string, number>();

  /** A frame handed to the stream; `length`: the block's size. */
  note(f: { readonly hash: Hash; readonly base?: unknown; readonly delta?: unknown }, length: number): void {
    if (!f.base && !f.delta) return;
    this.full = Math.max(this.full, length);
    if (length < this.full) this.short.set(toHex(f.hash), length);
  }

  /** The size of a block noted before. */
  sizeOf(hash: Hash): number {
    return this.short.get(toHex(hash)) ?? this.full;
  }
}

/** Parse a lowercase hex hash (callers validated the format; this re-checks as belt and braces). */
export function fromHex(s: string): Hash {
  if (!/^[0-9a-f]{64}$/.test(s)) throw new TandemError('ERR_BAD_REQUEST', `"${s.slice(0, 80)}" is not a 64-digit lowercase hex hash`);
  return Buffer.from(s, 'hex');
}

/** A node change's [index, child] pairs as they travel (nodes/put, nodes/get). */
export function changesToWire(changed: ReadonlyArray<readonly [number, Hash]>): Array<[number, string]> {
  return changed.map(([i, c]) => [i, toHex(c)]);
}

/** [index, child] pairs off the wire (hashes checked as fromHex does; indices by the store). */
export function changesFromWire(changed: ReadonlyArray<readonly [number, string]>): Array<readonly [number, Hash]> {
  return changed.map(([i, c]) => [i, fromHex(c)] as const);
}

/** Split `items` into consecutive batches of at most `size`. */
export function* batches<T>(items: readonly T[], size: number): Generator<T[]> {
  for (let i = 0; i < items.length; i += size) yield items.slice(i, i + size);
}
