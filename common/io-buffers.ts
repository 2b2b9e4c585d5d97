/**
 * Where large file-I/O buffers start: {@link IO_SKEW} bytes past a page boundary.
 *
 * Large ArrayBuffers come page-aligned, and so do the page-cache pages that a read copies from
 * or a write copies into at a file position that is a multiple of 4 KiB (every volume block, every
 * restore write). On the AMD EPYC virtual machines we run on, the kernel's copy between a source
 * and a destination at the same offset within their pages runs at about a third of its speed.
 * Measured with two threads reading a warm 2 GiB image in 512 KiB calls: 0.84-0.88 s into
 * page-aligned buffers, 0.29-0.30 s into buffers 64 bytes past the boundary (16 bytes were as
 * fast, 8 bytes as slow as 0). bench/scan prints both next to b3sum.
 */
export const IO_SKEW = 64;

/**
 * An uninitialized buffer of `length` bytes for reading or writing files, starting
 * {@link IO_SKEW} bytes into its memory. Not zero-filled: `new ArrayBuffer` clears its memory,
 * which cost a 4 GiB restore 0.6 s of its main thread.
 */
export function ioBuffer(length: number): Buffer {
  return Buffer.allocUnsafeSlow(length + IO_SKEW).subarray(IO_SKEW);
}

/** Direct (O_DIRECT) writes start and end on multiples of this, from memory aligned to it (4 KiB sectors as well as 512-byte ones). */
export const DIRECT_ALIGN = 4096;

/** WebAssembly memory grows in pages of this size. */
const WASM_PAGE = 64 * 1024;

/**
 * `count` staging slots of `bytes` each for direct writes, page-aligned: carved from one
 * WebAssembly memory, which V8 maps on a page boundary (Node's Buffers sit wherever malloc puts
 * them: a direct write from `Buffer.allocUnsafeSlow` got EINVAL on ext4). `bytes` must be a
 * multiple of {@link DIRECT_ALIGN}.
 */
export function alignedSlots(count: number, bytes: number): Buffer[] {
  const memory = new WebAssembly.Memory({ initial: Math.ceil((count * bytes) / WASM_PAGE) });
  return Array.from({ length: count }, (_, i) => Buffer.from(memory.buffer, i * bytes, bytes));
}

/**
 * Page-aligned buffers kept for reuse by the whole process, by size (rounded up to the 64 KiB
 * pages WebAssembly memory comes in): the buffers of block reads with O_DIRECT
 * (store/pack-files.ts) and of early sending's copies of new blocks (sync/early.ts). Both kinds
 * come and go by the hundred in a sync; one pool lets the blocks the engine reads reuse the copies
 * early sending made while the scan ran, rather than allocating more while those wait for a
 * garbage collection (a daemon replicating two 512 MiB volumes at once held ~25 MB of them,
 * collected seconds after early sending ended: bench/daemon-rss.ts).
 */
export class AlignedBuffers {
  private readonly free = new Map<number, Buffer[]>();

  /**
   * @param kept free buffers kept per size at most (more given back are left to the collector)
   * @param sizes sizes kept at most (a buffer of another size is neither kept nor reused)
   */
  constructor(
    private readonly kept: number,
    private readonly sizes: number,
  ) {}

  /** Free buffers kept now, of every size (tests). */
  get idle(): number {
    let n = 0;
    for (const f of this.free.values()) n += f.length;
    return n;
  }

  /**
   * A page-aligned buffer of `bytes` bytes (a view of a larger one when `bytes` is not a multiple
   * of 64 KiB), reused or new, and the function that gives it back once nothing refers to its bytes
   * any more (called more than once, it gives it back once; never called, the buffer is collected).
   */
  take(bytes: number): { buf: Buffer; release: () => void } {
    const size = Math.ceil(bytes / WASM_PAGE) * WASM_PAGE;
    let free = this.free.get(size);
    if (!free && this.free.size < this.sizes) this.free.set(size, (free = []));
    const whole = free?.pop() ?? alignedSlots(1, size)[0]!;
    let released = false;
    return {
      buf: whole.subarray(0, bytes),
      release: () => {
        if (released) return;
        released = true;
        if (free && free.length < this.kept) free.push(whole);
      },
    };
  }
}

/**
 * The process's {@link AlignedBuffers}: 64 of a size (36 MiB of 576 KiB buffers, those of 512 KiB
 * blocks), as many as early sending lends at most (32 MiB of copies) and more than a sync's block
 * streams hold at once (store/ahead-budget.ts), for 4 sizes.
 */
export const alignedBuffers = new AlignedBuffers(64, 4);
