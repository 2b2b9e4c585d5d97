/**
 * Block data of the emulator, addressed by the SHA-256 (hex) of its bytes.
 *
 * Snapshots and EC2 volumes refer to block data by digest, so a block shared by a snapshot,
 * its children and the volumes created from them is kept once. In memory by default (tests
 * use a few MiB); with a data directory every block is its own file `blocks/ab/<hex>`,
 * written to a temporary name and renamed, so a killed emulator never leaves a torn block.
 * Nothing is ever deleted: the emulator is for tests and demos, not for long-lived volumes.
 */
import { createHash } from 'node:crypto';
import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';

/** The EBS direct API block size: every block is exactly this long. */
export const EBS_BLOCK_SIZE = 524288;

/** A block of zeros: what an unwritten block of a volume reads as. */
export const ZERO_BLOCK: Buffer = Buffer.alloc(EBS_BLOCK_SIZE);

export function sha256(data: Buffer): Buffer {
  return createHash('sha256').update(data).digest();
}

export interface BlobStore {
  /** Store `data` under its digest (hex); idempotent. */
  put(digestHex: string, data: Buffer): Promise<void>;
  /** The bytes stored under `digestHex`; throws when absent (a bug in the emulator). */
  get(digestHex: string): Promise<Buffer>;
}

export class MemoryBlobStore implements BlobStore {
  readonly #blobs = new Map<string, Buffer>();
  async put(digestHex: string, data: Buffer): Promise<void> {
    if (!this.#blobs.has(digestHex)) this.#blobs.set(digestHex, Buffer.from(data));
  }
  async get(digestHex: string): Promise<Buffer> {
    const b = this.#blobs.get(digestHex);
    if (!b) throw new Error(`emulator block ${digestHex} is missing`);
    return b;
  }
}

export class DirBlobStore implements BlobStore {
  readonly #dir: string;
  readonly #known = new Set<string>();
  #seq = 0;
  constructor(dir: string) {
    this.#dir = dir;
  }
  #path(digestHex: string): string {
    return join(this.#dir, digestHex.slice(0, 2), digestHex);
  }
  async put(digestHex: string, data: Buffer): Promise<void> {
    if (this.#known.has(digestHex)) return;
    const path = this.#path(digestHex);
    await mkdir(join(this.#dir, digestHex.slice(0, 2)), { recursive: true });
    const tmp = `${path}.${process.pid}.${this.#seq++}.tmp`;
    await writeFile(tmp, data);
    await rename(tmp, path);
    this.#known.add(digestHex);
  }
  async get(digestHex: string): Promise<Buffer> {
    return readFile(this.#path(digestHex));
  }
}
