/**
 * Shared pieces of the EBS tests: the AWS emulator on loopback with the SDK's standard
 * environment pointed at it, deterministic volume images, and byte-level comparison of a
 * snapshot in a store with an image.
 */
import { mkdtempSync, rmSync, writeFileSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startAwsEmulator } from '../../emulators/aws/index.js';
import { Store, ZERO_HASH, type SnapshotRecord } from '../../store/index.js';
import { openVolumeReader } from '../../appliance/volumes/index.js';

export const BS = 524288;

export interface Emulator {
  readonly url: string;
  close(): Promise<void>;
  stats(): Promise<Record<string, any>>;
  resetStats(): Promise<void>;
  faults(f: { throttlePercent?: number; latencyMs?: number; errorPercent?: number; seed?: number; actions?: string[]; holdAfter?: number }): Promise<void>;
}

/** Start the emulator and point this process's AWS environment at it (the SDK's standard chain). */
export async function emulator(): Promise<Emulator> {
  const emu = await startAwsEmulator({ port: 0 });
  Object.assign(process.env, awsEnv(emu.url));
  const post = async (path: string, body?: unknown) => {
    const r = await fetch(emu.url + path, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body ?? {}) });
    if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  };
  return {
    url: emu.url,
    close: () => emu.close(),
    stats: async () => (await fetch(emu.url + '/_emulator/stats')).json() as Promise<Record<string, any>>,
    resetStats: () => post('/_emulator/stats/reset'),
    faults: (f) => post('/_emulator/faults', f),
  };
}

export function awsEnv(url: string): Record<string, string> {
  return { AWS_ENDPOINT_URL_EBS: url, AWS_REGION: 'us-east-1', AWS_ACCESS_KEY_ID: 'test', AWS_SECRET_ACCESS_KEY: 'test', AWS_EC2_METADATA_DISABLED: 'true', AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true' };
}

export function tmp(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'tandem-ebs-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * A volume image of `blocks` blocks plus `tail` bytes: block i holds a pattern derived from
 * (seed, i), except every block with i % zeroEvery === zeroEvery - 1, which is all zeros.
 */
export function makeImage(blocks: number, opts: { tail?: number; seed?: number; zeroEvery?: number } = {}): Buffer {
  const img = Buffer.alloc(blocks * BS + (opts.tail ?? 0));
  const zeroEvery = opts.zeroEvery ?? 4;
  for (let i = 0; i * BS < img.length; i++) {
    if (i % zeroEvery === zeroEvery - 1) continue;
    fillBlock(img, i, opts.seed ?? 1);
  }
  return img;
}

/** Overwrite block i of an image with a pattern of (seed, i) (the tail block is filled only as far as it goes). */
export function fillBlock(img: Buffer, i: number, seed: number): void {
  const end = Math.min(img.length, (i + 1) * BS);
  for (let off = i * BS; off < end; off += 4096) img.writeUInt32LE((seed * 2654435761 + i * 40503 + off) >>> 0, off);
  img.fill(seed & 0xff, i * BS + 8, Math.min(end, i * BS + 64));
}

export function nonZeroBlocks(img: Buffer): number {
  let n = 0;
  for (let off = 0; off < img.length; off += BS) if (img.subarray(off, off + BS).some((b) => b !== 0)) n++;
  return n;
}

/** Write the image to a file and snapshot it into the store. */
export async function snapshotImage(store: Store, dir: string, volume: string, img: Buffer): Promise<SnapshotRecord> {
  const path = join(dir, `${volume}.img`);
  writeFileSync(path, img);
  const reader = await openVolumeReader(path);
  try {
    return await store.scanVolume(reader, { volume, blockSize: BS });
  } finally {
    await reader.close();
  }
}

/** The bytes of a snapshot, read back block by block from the store (verified by the store). */
export async function readSnapshot(store: Store, snap: SnapshotRecord): Promise<Buffer> {
  const out = Buffer.alloc(snap.size);
  for await (const { index, hash } of store.blockHashes(snap)) {
    const len = Math.min(BS, snap.size - index * BS);
    (await store.getBlock(hash, len)).copy(out, index * BS);
  }
  return out;
}

/** Compare `img` with a snapshot that may be longer (EBS sizes are whole GiB): the rest must be zeros. */
export async function assertSnapshotBytes(store: Store, snap: SnapshotRecord, img: Buffer): Promise<void> {
  if (snap.size < img.length) throw new Error(`snapshot has ${snap.size} bytes, image ${img.length}`);
  for await (const { index, hash } of store.blockHashes(snap)) {
    const len = Math.min(BS, snap.size - index * BS);
    if (hash.equals(ZERO_HASH)) {
      if (index * BS < img.length && img.subarray(index * BS, Math.min(img.length, index * BS + len)).some((b) => b !== 0)) throw new Error(`block ${index} is zero in the snapshot, not in the image`);
      continue;
    }
    const got = await store.getBlock(hash, len);
    const want = Buffer.alloc(len);
    if (index * BS < img.length) img.copy(want, 0, index * BS, Math.min(img.length, index * BS + len));
    if (!got.equals(want)) throw new Error(`block ${index} differs`);
  }
}

export { readFileSync };
