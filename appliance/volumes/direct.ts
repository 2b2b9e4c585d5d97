/**
 * Direct writes (O_DIRECT) for restore targets: the data goes from our memory to the disk without
 * being copied into the page cache, in pieces of several blocks.
 *
 * Why: on the virtual machines we run on, the kernel's copy into the page cache is the bulk of a
 * buffered restore's CPU, and small direct writes leave the disk waiting. 4 GiB written 2 at a
 * time, then fdatasync (`node` script, same disk, alternated): buffered 512 KiB writes 11.3-12.1 s
 * and 6.6-11.5 s of kernel CPU; direct 512 KiB writes 9.0-13.9 s and 1.3-1.7 s; direct 4 MiB
 * writes 8.8-9.0 s and 0.7 s (`cp` + `sync` of the same image: 10.9-11.9 s, 6.5-8.1 s of kernel
 * CPU).
 *
 * How: {@link DirectWriter.write} copies the caller's bytes into a staging slot and returns; a
 * slot goes to the disk when it is full or the next write does not continue it, while the caller
 * fills the next slot. The slots are carved from a WebAssembly memory, which V8 maps on a page
 * boundary (Node's Buffers sit wherever malloc puts them, and direct I/O wants aligned memory);
 * the copy costs far less than the kernel's. Positions and lengths must be multiples of
 * {@link DIRECT_ALIGN}: a restore writes whole blocks at block boundaries, and only a volume's
 * short last block goes through the page cache. A filesystem that refuses direct I/O (EINVAL at
 * open, or at the first write) gets buffered writes, as before.
 *
 * A write that fails in the background (a full disk) is thrown by the next call. Mixing with
 * buffered writes and reads is safe: the kernel writes back and drops cached pages of a range
 * before writing it directly, fsync covers the file whichever descriptor wrote it, and
 * {@link DirectWriter.settle} (before any read or buffered write that overlaps staged data, and
 * before a sync or close) puts everything staged on the disk.
 */
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { fromSystemError } from '../../common/errors.js';
import { DIRECT_ALIGN, alignedSlots } from '../../common/io-buffers.js';
/** A staging slot: one write to the disk (8 blocks of 512 KiB). */
const SLOT_BYTES = 4 * 1024 * 1024;
/** Slots per writer (16 MiB): one being filled, the others on their way to the disk. */
const SLOTS = 4;

export interface DirectWriter {
  /**
   * Take what it can of `buf` for `position` (copied: the caller may reuse `buf` at once);
   * returns the bytes taken from the start of `buf`: `buf.length`, or less when the rest must go
   * through the page cache (an unaligned piece, or direct I/O refused, which turns it off for
   * good; staged data is then on the disk already). Throws a failure of an earlier write.
   */
  write(buf: Buffer, position: number): Promise<number>;
  /** Whether [position, position + length) overlaps data staged or being written. */
  overlaps(position: number, length: number): boolean;
  /** Put everything staged on the disk (not durably: fsync does that); throws a failed write. */
  settle(): Promise<void>;
  /** Settle, then close the descriptor. */
  close(): Promise<void>;
}

interface Slot {
  readonly buf: Buffer;
  /** Where in the file the slot's bytes go, and how many it holds. */
  start: number;
  length: number;
}

/** Open `path` for direct writes, or null when its filesystem does not take them. */
export async function openDirect(path: string): Promise<DirectWriter | null> {
  let fh: FileHandle;
  try {
    fh = await open(path, constants.O_WRONLY | constants.O_DIRECT);
  } catch {
    return null; // EINVAL on a filesystem without direct I/O; anything else shows on the buffered path
  }
  const free = alignedSlots(SLOTS, SLOT_BYTES);
  const waiting: Array<() => void> = [];
  /** The slot being filled. */
  let current: Slot | null = null;
  /** Slots being written. */
  const writing = new Set<Slot>();
  const busy = new Set<Promise<void>>();
  let enabled = true;
  /** Whether a write has reached the disk yet (the first one tells whether direct I/O works here). */
  let probed = false;
  let failure: unknown = null;

  const take = async (): Promise<Buffer> => {
    while (free.length === 0) await new Promise<void>((resolve) => waiting.push(resolve));
    return free.pop()!;
  };
  const give = (buf: Buffer) => {
    free.push(buf);
    waiting.shift()?.();
  };
  /** Write a slot to the disk in the background. */
  const submit = (slot: Slot) => {
    writing.add(slot);
    const p = (async () => {
      try {
        let done = 0;
        while (done < slot.length) {
          const { bytesWritten } = await fh.write(slot.buf, done, slot.length - done, slot.start + done);
          if (bytesWritten === 0) throw Object.assign(new Error('the disk took no bytes'), { code: 'EIO' });
          done += bytesWritten;
        }
      } catch (e) {
        failure ??= fromSystemError(e, `writing ${path} at byte ${slot.start}`);
      } finally {
        writing.delete(slot);
        give(slot.buf);
      }
    })();
    busy.add(p);
    void p.finally(() => busy.delete(p));
  };
  const throwFailure = () => {
    if (failure !== null) throw failure;
  };
  /** Submit the slot being filled and wait for every write (inside a write() call). */
  const settleNow = async (): Promise<void> => {
    if (current !== null) submit(current); // never empty: a slot is filled as soon as it is taken
    current = null;
    await Promise.all(busy);
    throwFailure();
  };
  /** write() calls run one at a time: each may wait for a free slot while holding the slot being filled. */
  let queue: Promise<unknown> = Promise.resolve();
  const write = async (buf: Buffer, position: number): Promise<number> => {
    throwFailure();
    if (!enabled || position % DIRECT_ALIGN !== 0) return 0;
    const aligned = buf.length - (buf.length % DIRECT_ALIGN);
    // The disk may complete writes in any order: a range written again waits for the write before.
    const end = position + aligned;
    if ([...writing].some((s) => s.start < end && position < s.start + s.length)) await Promise.all(busy);
    let done = 0;
    while (done < aligned) {
      if (current !== null && (current.start + current.length !== position + done || current.length === SLOT_BYTES)) {
        submit(current);
        current = null;
      }
      if (current === null) current = { buf: await take(), start: position + done, length: 0 };
      const n = Math.min(SLOT_BYTES - current.length, aligned - done);
      buf.copy(current.buf, current.length, done, done + n);
      current.length += n;
      done += n;
      if (current.length === SLOT_BYTES) {
        submit(current);
        current = null;
      }
    }
    // The first write to the disk tells whether this filesystem takes direct writes.
    if (!probed) {
      probed = true;
      await settleNow().catch((e: unknown) => {
        if (((e as { cause?: NodeJS.ErrnoException }).cause?.code ?? '') !== 'EINVAL') throw e;
        failure = null;
        enabled = false;
        done = 0; // nothing of it reached the disk: the caller writes it through the page cache
      });
    }
    return done;
  };

  /** Run `fn` after the write() and settle() calls before it. */
  const serial = <T>(fn: () => Promise<T>): Promise<T> => {
    const p = queue.then(fn);
    queue = p.catch(() => undefined);
    return p;
  };
  const settle = () => serial(settleNow);

  return {
    write: (buf, position) => serial(() => write(buf, position)),
    overlaps(position, length) {
      const end = position + length;
      const hit = (s: Slot) => s.start < end && position < s.start + s.length;
      return (current !== null && hit(current)) || [...writing].some(hit);
    },
    settle,
    async close() {
      try {
        await settle();
      } finally {
        await fh.close();
      }
    },
  };
}
