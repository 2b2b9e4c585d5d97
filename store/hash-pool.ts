/**
 * A pool of worker threads that hash blocks held in a SharedArrayBuffer, so reading (main
 * thread, libuv), hashing (workers) and writing packs (main thread) overlap and every core works.
 *
 * Work items name a region of the shared buffer; the answer is 32 bytes per block: the block's
 * BLAKE3 hash, or ZERO_HASH for an all-zero block (detected by memcmp against a zero buffer,
 * which costs far less than hashing). The workers are started from inline code so the pool works
 * the same from TypeScript sources and from the compiled dist/.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { TandemError } from '../common/errors.js';
import { BLAKE3_MODULE_PATH, HASH_LENGTH } from './hash.js';

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const native = require(workerData.modulePath);
const sab = workerData.sab;
const zeros = Buffer.alloc(workerData.maxBlock);
parentPort.on('message', (m) => {
  const n = Math.ceil(m.length / m.blockSize);
  const out = Buffer.alloc(n * ${HASH_LENGTH});
  try {
    for (let i = 0; i < n; i++) {
      const off = m.offset + i * m.blockSize;
      const len = Math.min(m.blockSize, m.offset + m.length - off);
      const v = Buffer.from(sab, off, len);
      if (v.equals(zeros.subarray(0, len))) continue;
      native.blake3(v).copy(out, i * ${HASH_LENGTH});
    }
    parentPort.postMessage({ id: m.id, hashes: out });
  } catch (e) {
    parentPort.postMessage({ id: m.id, error: String(e && e.stack || e) });
  }
});
`;

interface Pending {
  resolve(b: Buffer): void;
  reject(e: Error): void;
}

interface Slot {
  readonly worker: Worker;
  outstanding: number;
}

export class HashPool {
  private readonly slots: Slot[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private failure: Error | undefined;

  /**
   * @param sab the shared buffer blocks are read into
   * @param maxBlock largest block size that will be asked (size of the zero buffer)
   * @param threads number of workers; default one per core the process may use
   */
  constructor(readonly sab: SharedArrayBuffer, maxBlock: number, threads = availableParallelism()) {
    for (let i = 0; i < Math.max(1, threads); i++) {
      const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { sab, maxBlock, modulePath: BLAKE3_MODULE_PATH } });
      const slot: Slot = { worker, outstanding: 0 };
      worker.on('message', (m: { id: number; hashes?: Uint8Array; error?: string }) => {
        slot.outstanding--;
        const p = this.pending.get(m.id);
        if (!p) return;
        this.pending.delete(m.id);
        if (m.error !== undefined || !m.hashes) p.reject(new TandemError('ERR_INTERNAL', `a hash worker failed: ${m.error}`));
        else p.resolve(Buffer.from(m.hashes.buffer, m.hashes.byteOffset, m.hashes.byteLength));
      });
      worker.on('error', (e) => this.fail(e));
      worker.on('exit', (code) => {
        if (code !== 0 && !this.closing) this.fail(new Error(`hash worker exited with code ${code}`));
      });
      this.slots.push(slot);
    }
  }

  private closing = false;

  private fail(e: Error): void {
    this.failure ??= new TandemError('ERR_INTERNAL', `a hash worker failed: ${e.message}`, { cause: e });
    for (const p of this.pending.values()) p.reject(this.failure);
    this.pending.clear();
  }

  /** Hashes of the blocks in sab[offset, offset+length), 32 bytes each (ZERO_HASH for zeros). */
  hash(offset: number, length: number, blockSize: number): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    const slot = this.slots.reduce((a, b) => (b.outstanding < a.outstanding ? b : a));
    const id = this.nextId++;
    slot.outstanding++;
    return new Promise<Buffer>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      slot.worker.postMessage({ id, offset, length, blockSize });
    });
  }

  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }
}
