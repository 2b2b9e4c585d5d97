/**
 * Reads and writes of emulated EC2 volumes (the disks of recovered instances). A write here
 * stands for a change made by a workload in EC2; CreateSnapshot then captures it incrementally.
 * Blocks are read-modified-written one 512 KiB block at a time, so memory stays bounded.
 */
import { EBS_BLOCK_SIZE, sha256, ZERO_BLOCK } from './blobs.js';
import type { EmulatorState, VolumeRec } from './state.js';

const GIB = 1024 * 1024 * 1024;
/** Largest read or write through the control routes: they are for checks, not bulk transfer. */
export const MAX_IO_BYTES = 64 * 1024 * 1024;

function checkRange(v: VolumeRec, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new RangeError('offset and length must be non-negative integers');
  }
  if (length > MAX_IO_BYTES) throw new RangeError(`at most ${MAX_IO_BYTES} bytes per request`);
  if (offset + length > v.sizeGiB * GIB) throw new RangeError(`range ${offset}+${length} is beyond the end of ${v.id} (${v.sizeGiB} GiB)`);
}

async function readBlock(state: EmulatorState, v: VolumeRec, index: number): Promise<Buffer> {
  const d = v.blocks.get(index);
  return d === undefined ? ZERO_BLOCK : state.blobs.get(d);
}

export async function readVolume(state: EmulatorState, v: VolumeRec, offset: number, length: number): Promise<Buffer> {
  checkRange(v, offset, length);
  const out = Buffer.alloc(length);
  let pos = offset;
  while (pos < offset + length) {
    const index = Math.floor(pos / EBS_BLOCK_SIZE);
    const within = pos - index * EBS_BLOCK_SIZE;
    const n = Math.min(EBS_BLOCK_SIZE - within, offset + length - pos);
    (await readBlock(state, v, index)).copy(out, pos - offset, within, within + n);
    pos += n;
  }
  return out;
}

const ZERO_DIGEST = sha256(ZERO_BLOCK).toString('hex');

/**
 * The SHA-256 (hex) of each 512 KiB block of `count` blocks from block `first`: the digests the
 * volume already keeps its blocks under, so no byte is read or copied. For checks of a whole
 * volume, which a byte read (64 MiB at most, 1-2 s per 64 MiB through HTTP) makes slow.
 */
export function volumeDigests(v: VolumeRec, first: number, count: number): string[] {
  if (!Number.isSafeInteger(first) || first < 0 || !Number.isSafeInteger(count) || count < 0) {
    throw new RangeError('first and count must be non-negative integers');
  }
  if ((first + count) * EBS_BLOCK_SIZE > v.sizeGiB * GIB) throw new RangeError(`blocks ${first}+${count} are beyond the end of ${v.id} (${v.sizeGiB} GiB)`);
  const out: string[] = [];
  for (let i = first; i < first + count; i++) out.push(v.blocks.get(i) ?? ZERO_DIGEST);
  return out;
}

export async function writeVolume(state: EmulatorState, v: VolumeRec, offset: number, data: Buffer): Promise<{ blocksChanged: number }> {
  checkRange(v, offset, data.length);
  if (v.state === 'deleted') throw new RangeError(`${v.id} is deleted`);
  let pos = offset;
  let blocksChanged = 0;
  while (pos < offset + data.length) {
    const index = Math.floor(pos / EBS_BLOCK_SIZE);
    const within = pos - index * EBS_BLOCK_SIZE;
    const n = Math.min(EBS_BLOCK_SIZE - within, offset + data.length - pos);
    const block = Buffer.from(await readBlock(state, v, index));
    data.copy(block, within, pos - offset, pos - offset + n);
    const hex = sha256(block).toString('hex');
    const unchangedZeros = !v.blocks.has(index) && block.equals(ZERO_BLOCK);
    if (!unchangedZeros && v.blocks.get(index) !== hex) {
      await state.blobs.put(hex, block);
      v.blocks.set(index, hex);
      blocksChanged++;
    }
    pos += n;
  }
  state.changed();
  return { blocksChanged };
}
