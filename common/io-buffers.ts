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
