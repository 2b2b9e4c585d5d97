/**
 * Keys and binary values of the index (classic-level, binary keys and values).
 * Every key starts with a one-byte namespace; store/README.md lists them. Integers are big-endian.
 */
import { CODEC_DELTA } from './pack.js';
import type { Hash } from './types.js';

export const NS = {
  /** 'b' + block hash (32) -> {@link BlockLocation} (17 bytes). */
  block: 0x62,
  /** 'n' + node hash (32) -> level (1) + children (32 each). */
  node: 0x6e,
  /** 's' + volume + 0x00 + snapshot id -> SnapshotRecord JSON. */
  snapshot: 0x73,
  /** 'v' + volume name -> VolumeRecord JSON. */
  volume: 0x76,
  /** 'm' + namespace + 0x00 + key -> JSON of other modules' small state. */
  meta: 0x6d,
  /** 'p' + pack id (u32) -> durable length (u64). */
  pack: 0x70,
  /** 'f' -> store format JSON ({ format: 1 }). */
  format: 0x66,
} as const;

export interface BlockLocation {
  readonly pack: number;
  /** Offset of the record (its header) in the pack file. */
  readonly offset: number;
  /** Payload length as stored (after the codec). */
  readonly length: number;
  readonly codec: number;
  /** For a delta record (CODEC_DELTA): the raw block it patches, so gc keeps it without reading the record. */
  readonly base?: Hash;
}

export const LOCATION_LENGTH = 17;
/** A delta record's location: the 17 bytes, then its base's hash. */
export const DELTA_LOCATION_LENGTH = LOCATION_LENGTH + 32;

function prefixed(ns: number, rest: Buffer): Buffer {
  const k = Buffer.allocUnsafe(1 + rest.length);
  k[0] = ns;
  rest.copy(k, 1);
  return k;
}

export function blockKey(h: Hash): Buffer {
  return prefixed(NS.block, h);
}

export function nodeKey(h: Hash): Buffer {
  return prefixed(NS.node, h);
}

export function packKey(id: number): Buffer {
  const k = Buffer.allocUnsafe(5);
  k[0] = NS.pack;
  k.writeUInt32BE(id, 1);
  return k;
}

export function snapshotKey(volume: string, id: string): Buffer {
  return Buffer.concat([Buffer.from([NS.snapshot]), Buffer.from(volume, 'utf8'), Buffer.from([0]), Buffer.from(id, 'utf8')]);
}

/** Range bounds that select every snapshot key of one volume. */
export function snapshotRange(volume: string): { gte: Buffer; lt: Buffer } {
  const base = Buffer.concat([Buffer.from([NS.snapshot]), Buffer.from(volume, 'utf8')]);
  return { gte: Buffer.concat([base, Buffer.from([0])]), lt: Buffer.concat([base, Buffer.from([1])]) };
}

export function volumeKey(name: string): Buffer {
  return prefixed(NS.volume, Buffer.from(name, 'utf8'));
}

export function metaKey(ns: string, key: string): Buffer {
  return Buffer.concat([Buffer.from([NS.meta]), Buffer.from(ns, 'utf8'), Buffer.from([0]), Buffer.from(key, 'utf8')]);
}

export function metaRange(ns: string): { gte: Buffer; lt: Buffer } {
  const base = Buffer.concat([Buffer.from([NS.meta]), Buffer.from(ns, 'utf8')]);
  return { gte: Buffer.concat([base, Buffer.from([0])]), lt: Buffer.concat([base, Buffer.from([1])]) };
}

/** Range bounds selecting every key of one single-byte namespace. */
export function namespaceRange(ns: number): { gte: Buffer; lt: Buffer } {
  return { gte: Buffer.from([ns]), lt: Buffer.from([ns + 1]) };
}

export function encodeLocation(loc: BlockLocation): Buffer {
  const delta = loc.codec === CODEC_DELTA;
  if (delta !== (loc.base !== undefined)) throw new Error(`a block location has a base exactly when its codec is ${CODEC_DELTA}`);
  const b = Buffer.allocUnsafe(delta ? DELTA_LOCATION_LENGTH : LOCATION_LENGTH);
  b.writeUInt32BE(loc.pack, 0);
  b.writeBigUInt64BE(BigInt(loc.offset), 4);
  b.writeUInt32BE(loc.length, 12);
  b[16] = loc.codec;
  if (delta) loc.base!.copy(b, LOCATION_LENGTH);
  return b;
}

export function decodeLocation(b: Buffer): BlockLocation {
  const delta = b[16] === CODEC_DELTA;
  if (b.length !== (delta ? DELTA_LOCATION_LENGTH : LOCATION_LENGTH)) throw new Error(`block location has ${b.length} bytes, expected ${LOCATION_LENGTH} (${DELTA_LOCATION_LENGTH} for a delta)`);
  const loc = { pack: b.readUInt32BE(0), offset: Number(b.readBigUInt64BE(4)), length: b.readUInt32BE(12), codec: b[16]! };
  return delta ? { ...loc, base: Buffer.from(b.subarray(LOCATION_LENGTH)) } : loc;
}

export function encodeU64(n: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
}

export function decodeU64(b: Buffer): number {
  return Number(b.readBigUInt64BE(0));
}
