/**
 * The binary framing of block streams (POST /v1/blocks/get answers, POST /v1/blocks/put bodies).
 *
 * A stream is a sequence of frames, each with a 42-byte header:
 *
 * ```
 * offset size field
 *  0     1    type     0x42 'B' block, 0x45 'E' end, 0x58 'X' error
 *  1     1    codec    0 raw, 1 deflate (raw deflate, RFC 1951), 2 delta (patches of a base block)
 *  2     32   hash     BLAKE3-256 of the uncompressed block (end/error frames: zeros)
 * 34     4    rawLen   uncompressed length, u32 big-endian (end frame: number of block frames)
 * 38     4    payLen   payload length, u32 big-endian
 * 42     payLen payload
 * ```
 *
 * Every stream ends with exactly one end frame whose rawLen is the number of block frames sent,
 * so a stream cut short (a dropped connection, a proxy that truncates) is detected and refused.
 * An error frame (payload: UTF-8 JSON `{code, message}`) lets a sender that fails mid-stream say
 * why; the receiver raises it as that error. Nothing is trusted: sizes are bounded, inflated
 * lengths must equal rawLen, and hashes are checked where the caller asks (a store's putBlock
 * checks them anyway).
 */
import { promisify } from 'node:util';
import { createInflateRaw, deflateRaw, inflateRaw, constants as zc } from 'node:zlib';
import { TandemError, isErrorCode } from '../common/errors.js';
import { diffBlock, hashBlock } from '../store/index.js';
import type { AheadBudget } from '../store/ahead-budget.js';
import type { BlockFrame, Hash } from '../store/types.js';

export const FRAME_BLOCK = 0x42;
export const FRAME_END = 0x45;
export const FRAME_ERROR = 0x58;
export const CODEC_RAW = 0;
export const CODEC_DEFLATE = 1;
/**
 * A block sent as the byte ranges where it differs from a block the receiver holds (its base).
 * Payload: the base's BLAKE3-256 (32 bytes), then patches, each `offset u32 BE, length u32 BE,
 * bytes`, in increasing offset order, not overlapping, inside rawLen; the base has rawLen bytes.
 * The receiver builds the block from its copy of the base and verifies it against the frame's
 * hash. Only in streams that asked for deltas (sync/README.md).
 */
export const CODEC_DELTA = 2;
/**
 * A delta frame whose payload (the base's hash, then the patches, as {@link CODEC_DELTA}) is
 * raw DEFLATE: the patches of compressible writes (text, database pages, filesystem metadata).
 * Only to a receiver that takes it (`delta-deflate`, sync/protocol.ts), when it saves 1/8.
 */
export const CODEC_DELTA_DEFLATE = 3;

export const HEADER_BYTES = 42;
/** The largest block any volume may use (block sizes are validated far below this); bounds memory per frame. */
export const MAX_BLOCK_BYTES = 16 * 1024 * 1024;
/** Error frames carry a short JSON message, never data. */
const MAX_ERROR_PAYLOAD = 64 * 1024;
/**
 * Compression is judged on samples first: deflating an incompressible 512 KiB block costs
 * milliseconds for nothing. A byte histogram of {@link SAMPLE_COUNT} spread samples (cheap: no
 * allocation, no thread hop) rules out random or encrypted data at once; only a block whose
 * samples look compressible is deflated.
 */
const SAMPLE_BYTES = 1024;
const SAMPLE_COUNT = 4;
/** Samples whose byte entropy is above this many bits per byte (8 is random) are not worth deflating. */
const MAX_ENTROPY_BITS = 7.2;
/** A block is sent compressed only when that saves at least 1/8 of its bytes (else CPU is wasted on both sides). */
const MIN_SAVING_DIVISOR = 8;
/** Level 1: most of deflate's gain on disk images (runs, text) at a fraction of the CPU of higher levels. */
const DEFLATE_LEVEL = 1;

const histogram = new Uint32Array(256);

/** Shannon entropy, in bits per byte, of SAMPLE_COUNT samples spread over `data`. */
export function sampleEntropy(data: Buffer): number {
  histogram.fill(0);
  let n = 0;
  const count = data.length <= SAMPLE_BYTES * SAMPLE_COUNT ? 1 : SAMPLE_COUNT;
  const len = count === 1 ? data.length : SAMPLE_BYTES;
  const stride = count === 1 ? 0 : Math.floor((data.length - SAMPLE_BYTES) / (SAMPLE_COUNT - 1));
  for (let s = 0; s < count; s++) {
    const start = s * stride;
    for (let i = start; i < start + len; i++) histogram[data[i]!]!++;
    n += len;
  }
  let bits = 0;
  for (let b = 0; b < 256; b++) {
    const c = histogram[b]!;
    if (c > 0) {
      const p = c / n;
      bits -= p * Math.log2(p);
    }
  }
  return bits;
}

const deflateAsync = promisify(deflateRaw);
const inflateAsync = promisify(inflateRaw);

/** A frame's header (the layout in sync/README.md); tests build hostile frames with it. */
export function frameHeader(type: number, codec: number, hash: Hash | null, rawLen: number, payLen: number): Buffer {
  const h = Buffer.alloc(HEADER_BYTES);
  h[0] = type;
  h[1] = codec;
  if (hash) hash.copy(h, 2);
  h.writeUInt32BE(rawLen, 34);
  h.writeUInt32BE(payLen, 38);
  return h;
}

/** Deflate `data` when it pays (see {@link MIN_SAVING_DIVISOR}); else null. */
async function maybeCompress(data: Buffer): Promise<Buffer | null> {
  if (sampleEntropy(data) > MAX_ENTROPY_BITS) return null;
  const out = await deflateAsync(data, { level: DEFLATE_LEVEL, strategy: zc.Z_DEFAULT_STRATEGY });
  return out.length <= data.length - Math.floor(data.length / MIN_SAVING_DIVISOR) ? out : null;
}

/** A delta payload (`parts`: the base's hash and the patches) deflated, when the receiver takes that and it pays; else null. */
async function deflatedDelta(parts: readonly Buffer[], opts: EncodeOptions): Promise<Buffer | null> {
  if (opts.compress === false || opts.deflateDeltas?.() !== true) return null;
  return maybeCompress(parts.length === 1 ? parts[0]! : Buffer.concat(parts));
}

export interface EncodeOptions {
  /** Try deflate on each block (default true). */
  readonly compress?: boolean;
  /** Whether the receiver takes deflated delta frames ({@link CODEC_DELTA_DEFLATE}), asked frame by frame (default: no). */
  readonly deflateDeltas?: () => boolean;
  /** Turn a failure of the source into an error frame instead of throwing (server side). */
  readonly errorFrames?: boolean;
  /** Called with the uncompressed size of each block as it is framed. */
  readonly onBlock?: (rawBytes: number) => void;
}

/**
 * The release function of a payload chunk that encodeFrames yielded (the frame's own buffer,
 * BlockFrame.release). The consumer that writes the chunk out calls it once the bytes are
 * consumed (api/client.ts: when the socket has taken them); else the buffer is simply collected.
 */
const payloadRelease = new WeakMap<Buffer, () => void>();

/** Take the release function of a chunk encodeFrames yielded, if it has one (at most once). */
export function takeRelease(chunk: Buffer): (() => void) | undefined {
  const r = payloadRelease.get(chunk);
  if (r) payloadRelease.delete(chunk);
  return r;
}

/** Encode block frames into the wire framing (header and payload as separate chunks). */
export async function* encodeFrames(frames: AsyncIterable<BlockFrame>, opts: EncodeOptions = {}): AsyncGenerator<Buffer> {
  let count = 0;
  try {
    for await (const f of frames) {
      if (f.data.length > MAX_BLOCK_BYTES) throw new TandemError('ERR_BAD_REQUEST', `block of ${f.data.length} bytes exceeds the ${MAX_BLOCK_BYTES}-byte frame limit`);
      if (f.delta) {
        // A delta the store holds (GetBlocksOptions.storedDeltas): its base's hash, then its patches.
        f.base?.release?.();
        const packed = await deflatedDelta([f.delta.base, f.data], opts);
        if (packed) {
          f.release?.(); // the compressed copy is sent
          yield frameHeader(FRAME_BLOCK, CODEC_DELTA_DEFLATE, f.hash, f.delta.length, packed.length);
          yield packed;
        } else {
          if (f.release) payloadRelease.set(f.data, f.release);
          yield frameHeader(FRAME_BLOCK, CODEC_DELTA, f.hash, f.delta.length, 32 + f.data.length);
          yield f.delta.base;
          yield f.data;
        }
        count++;
        opts.onBlock?.(f.delta.length);
        continue;
      }
      if (f.base) {
        const delta = diffBlock(f.data, f.base.hash, f.base.data);
        f.base.release?.();
        if (delta) {
          f.release?.(); // the patches are a copy
          const packed = await deflatedDelta([delta], opts);
          yield frameHeader(FRAME_BLOCK, packed ? CODEC_DELTA_DEFLATE : CODEC_DELTA, f.hash, f.data.length, (packed ?? delta).length);
          yield packed ?? delta;
          count++;
          opts.onBlock?.(f.data.length);
          continue;
        }
      }
      const packed = opts.compress === false ? null : await maybeCompress(f.data);
      const payload = packed ?? f.data;
      if (packed) f.release?.(); // the compressed copy is sent
      else if (f.release) payloadRelease.set(payload, f.release);
      yield frameHeader(FRAME_BLOCK, packed ? CODEC_DEFLATE : CODEC_RAW, f.hash, f.data.length, payload.length);
      yield payload;
      count++;
      opts.onBlock?.(f.data.length);
    }
  } catch (e) {
    if (!opts.errorFrames) throw e;
    const err = e instanceof TandemError ? e : new TandemError('ERR_INTERNAL', `sending blocks failed: ${(e as Error)?.message ?? String(e)}`);
    const body = Buffer.from(JSON.stringify({ code: err.code, message: err.message }).slice(0, MAX_ERROR_PAYLOAD));
    yield frameHeader(FRAME_ERROR, CODEC_RAW, null, body.length, body.length);
    yield body;
    return;
  }
  yield frameHeader(FRAME_END, CODEC_RAW, null, count, 0);
}

/**
 * Reusable payload buffers for a decoder whose consumer releases each frame's data when done
 * (BlockFrame.release; Store.putBlocks does, after the write). Receiving a volume otherwise
 * allocates one fresh block-sized buffer per frame: gigabytes of short-lived external memory
 * that trigger a full garbage collection every few dozen blocks and fresh page faults for each.
 * Raw payloads are read into them and deflated ones inflated into them. Buffers of every size are
 * kept, up to `keep` buffers of the common block size (`size`) in bytes: a receiver of 16 MiB
 * blocks, or of a flood of deflated 16 MiB blocks of zeros, reuses them too. Fresh buffers left
 * to the garbage collector took a server's peak RSS up by 394-423 MiB under such a flood while
 * the frames it held were bounded to 128 MiB; 212-229 MiB with these (test/sync/hostile-upload.test.ts).
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private freeBytes = 0;
  private readonly keepBytes: number;
  constructor(
    readonly size: number,
    keep = 32,
  ) {
    this.keepBytes = keep * size;
  }

  /** A buffer of exactly `n` bytes and its release function (once; the buffer is kept for reuse while the pool has room; none for 0 bytes). */
  take(n: number): { buf: Buffer; release: (() => void) | undefined } {
    if (n === 0) return { buf: Buffer.alloc(0), release: undefined };
    const list = this.free.get(n);
    let buf = list?.pop();
    if (buf) {
      this.freeBytes -= n;
      if (list!.length === 0) this.free.delete(n);
    } else buf = Buffer.allocUnsafeSlow(n);
    let released = false;
    return {
      buf,
      release: () => {
        if (released) return;
        released = true;
        if (this.freeBytes + n > this.keepBytes) return;
        this.freeBytes += n;
        const l = this.free.get(n);
        if (l) l.push(buf);
        else this.free.set(n, [buf]);
      },
    };
  }
}

/** Output pieces of an inflate (copied into the frame's buffer as they come; zlib's default is 16 KiB). */
const INFLATE_PIECE_BYTES = 64 * 1024;

/**
 * Inflate raw-DEFLATE `payload` into `out`; resolves with the bytes written. Fails when the data
 * is not DEFLATE or would inflate past `out` (stopped there: nothing past it is produced).
 */
function inflateInto(payload: Buffer, out: Buffer): Promise<number> {
  return new Promise((resolve, reject) => {
    const z = createInflateRaw({ chunkSize: INFLATE_PIECE_BYTES });
    let n = 0;
    z.on('data', (piece: Buffer) => {
      if (n + piece.length > out.length) {
        z.destroy();
        reject(new RangeError(`inflates past ${out.length} bytes`));
        return;
      }
      piece.copy(out, n);
      n += piece.length;
    });
    z.on('error', reject);
    z.on('end', () => resolve(n));
    z.end(payload);
  });
}

/** Reads exact byte counts out of a chunk stream without copying more than it must. */
class ByteReader {
  private chunks: Buffer[] = [];
  private have = 0;
  private readonly it: AsyncIterator<Buffer | Uint8Array | string>;
  private done = false;
  /** Chunks taken from the source so far (a stall watchdog compares it between its ticks). */
  arrived = 0;
  /** Set by the decoder between a frame's header and the end of its payload. */
  inFrame = false;

  /** Waiting for the source's next chunk (not for the consumer). */
  waiting = false;

  /** Bytes taken from the source and not yet read. */
  get buffered(): boolean {
    return this.have > 0;
  }

  /** Waiting for the rest of a frame the sender began: the sender owes it. */
  get owed(): boolean {
    return this.waiting && (this.inFrame || this.have > 0);
  }

  constructor(source: AsyncIterable<Buffer | Uint8Array | string>) {
    this.it = source[Symbol.asyncIterator]();
  }

  /**
   * Exactly n bytes, or null when the stream ends first. With `into` (n bytes long), bytes that
   * span chunks are copied there instead of into a fresh buffer; the result is `into` or a view
   * of one chunk.
   */
  async read(n: number, into?: Buffer): Promise<Buffer | null> {
    while (this.have < n && !this.done) {
      this.waiting = true;
      let r: IteratorResult<Buffer | Uint8Array | string>;
      try {
        r = await this.it.next();
      } finally {
        this.waiting = false;
      }
      if (r.done) {
        this.done = true;
        break;
      }
      const c = typeof r.value === 'string' ? Buffer.from(r.value) : Buffer.isBuffer(r.value) ? r.value : Buffer.from(r.value);
      this.arrived++;
      if (c.length > 0) {
        this.chunks.push(c);
        this.have += c.length;
      }
    }
    if (this.have < n) return null;
    let out: Buffer;
    if (this.chunks[0]!.length >= n) {
      out = this.chunks[0]!.subarray(0, n);
      if (this.chunks[0]!.length === n) this.chunks.shift();
      else this.chunks[0] = this.chunks[0]!.subarray(n);
    } else {
      out = into ?? Buffer.allocUnsafe(n);
      let off = 0;
      while (off < n) {
        const c = this.chunks[0]!;
        const take = Math.min(c.length, n - off);
        c.copy(out, off, 0, take);
        off += take;
        if (take === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(take);
      }
    }
    this.have -= n;
    return out;
  }

  /** True when no byte is left (drains the source to find out). */
  async atEnd(): Promise<boolean> {
    return (await this.read(1)) === null;
  }

  async cancel(): Promise<void> {
    if (!this.done) {
      this.done = true;
      await this.it.return?.();
    }
  }
}

function corrupt(msg: string, details: Record<string, unknown> = {}): TandemError {
  return new TandemError('ERR_BLOCK_CORRUPT', `${msg}; nothing was committed, rerun the sync (blocks already verified are kept)`, { details });
}

export interface DecodeOptions {
  /** Check BLAKE3(data) against each frame's hash here (a store's putBlock checks it anyway). */
  readonly verify?: boolean;
  /** When set, the frames must carry exactly these hashes in this order (answers to blocks/get). */
  readonly expect?: readonly Hash[];
  /** Read raw payloads into buffers of this pool; each frame then carries `release`. */
  readonly pool?: BufferPool;
  /**
   * Take delta frames, deflated or not (the stream asked for them): each is yielded with `delta`
   * set and its patches as `data`, for the consumer's store to resolve (Store.putBlocks).
   * Otherwise a delta frame is refused as an unknown codec.
   */
  readonly deltas?: boolean;
  /**
   * A frame begun must go on arriving: when no byte came for `ms` (checked every `ms`, so
   * between `ms` and twice that) while a frame is incomplete, `onStall` is called (it should end
   * the source: destroy the request) and the stream fails with ERR_BLOCK_CORRUPT
   * (`details.stalled`). Between frames a stream may wait as long as it likes (early sending
   * keeps its streams open while the scan looks for new blocks). A receiver so holds no
   * incomplete frame (up to 16 MiB) of a sender that went silent.
   */
  readonly stall?: { readonly ms: number; readonly onStall: () => void };
  /**
   * Held while a frame is being received: taken when a frame's first bytes arrive, given back
   * when the stream is idle between frames (nothing of the next one buffered). A receiver so
   * bounds how many incomplete frames all its streams hold at once, without counting streams that
   * wait for their sender (early sending's, between a scan's batches). `take` may wait, and
   * throws to refuse the stream.
   */
  readonly slot?: { take(): Promise<void>; give(): void };
  /**
   * A byte budget shared by the streams a receiver decodes (store/budget.ts ByteBudget): each
   * block frame takes the bytes it will hold decoded before its payload is read or inflated (its
   * length; a delta frame's patches, inflated), and every frame yielded carries `release`, which
   * gives them back. The consumer calls it once done with the frame, dropped frames included. A
   * frame that inflates a thousandfold (a block of zeros deflated) so costs its block's bytes
   * before they exist, and frames decoded ahead of their consumer (readAhead) count as well.
   * `take` may wait: the consumer must not wait for it holding frames it could let go of
   * (Store.putBlocks' `budget`).
   */
  readonly budget?: { readonly limit: number; take(n: number): Promise<void>; give(n: number): void };
  /**
   * The stream is an upload this appliance receives: an error frame is the sender's own failure,
   * answered as ERR_BAD_REQUEST naming it, not taken as this appliance's (a sender's
   * ERR_DISK_FULL was answered 507 "free space here" by a server whose disk was fine).
   */
  readonly upload?: boolean;
}

/**
 * Decode a framed block stream. Throws ERR_BLOCK_CORRUPT for a malformed, corrupt or truncated
 * stream (no end frame, wrong count, bad deflate data, wrong length, wrong hash) and the sender's
 * error for an error frame. Memory: one frame at a time, and the frames yielded until released
 * (bounded across streams by {@link DecodeOptions.budget}).
 */
export async function* decodeFrames(source: AsyncIterable<Buffer | Uint8Array | string>, opts: DecodeOptions = {}): AsyncGenerator<BlockFrame> {
  const r = new ByteReader(source);
  let index = 0;
  let stalled = false;
  let watchdog: ReturnType<typeof setInterval> | undefined;
  if (opts.stall) {
    const { ms, onStall } = opts.stall;
    let seen = -1;
    watchdog = setInterval(() => {
      if (r.owed && r.arrived === seen && !stalled) {
        stalled = true;
        clearInterval(watchdog);
        onStall();
      }
      seen = r.owed ? r.arrived : -1;
    }, ms);
    watchdog.unref();
  }
  /** The stream's failure when the watchdog ended it (the reader then finds the source ended or failed). */
  const stallError = (): TandemError => corrupt(`block stream stalled: no byte for ${((opts.stall?.ms ?? 0) / 1000).toFixed(0)} s or more in the middle of frame ${index}`, { index, stalled: true });
  /** What a read that failed or found the stream ended means: a stall, or `e`. */
  const failed = (e: unknown): unknown => (stalled ? stallError() : e);
  let holding = false;
  /** Bytes of opts.budget the frame being decoded holds; its release owns them once it is yielded. */
  let held = 0;
  /** The frame's release: its pooled buffer (`poolRelease`) and the bytes it holds go back, once. */
  const releaseOf = (poolRelease: (() => void) | undefined): (() => void) | undefined => {
    const charged = held;
    held = 0;
    if (charged === 0) return poolRelease;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      poolRelease?.();
      opts.budget!.give(charged);
    };
  };
  try {
    for (;;) {
      r.inFrame = false;
      if (holding && !r.buffered) {
        opts.slot!.give();
        holding = false;
      }
      const h = await r.read(HEADER_BYTES).catch((e: unknown) => {
        throw failed(e);
      });
      if (!h) throw failed(corrupt(`block stream truncated after ${index} blocks (no end frame)`, { blocks: index }));
      if (!holding && opts.slot && h[0] !== FRAME_END) {
        await opts.slot.take();
        holding = true;
      }
      r.inFrame = true;
      const type = h[0]!;
      const codec = h[1]!;
      const rawLen = h.readUInt32BE(34);
      const payLen = h.readUInt32BE(38);
      if (type === FRAME_END) {
        if (codec !== CODEC_RAW || h.subarray(2, 34).some((b) => b !== 0)) throw corrupt('malformed end frame in block stream');
        if (rawLen !== index || payLen !== 0) throw corrupt(`block stream end frame says ${rawLen} blocks but ${index} arrived`, { blocks: index, claimed: rawLen });
        if (opts.expect && opts.expect.length !== index) throw corrupt(`block stream ended after ${index} of ${opts.expect.length} blocks asked`);
        if (!(await r.atEnd())) throw corrupt('bytes after the end frame of a block stream');
        return;
      }
      if (type === FRAME_ERROR) {
        if (payLen > MAX_ERROR_PAYLOAD) throw corrupt('oversized error frame in block stream');
        const body = await r.read(payLen);
        let parsed: { code?: unknown; message?: unknown } = {};
        try {
          parsed = JSON.parse(body?.toString('utf8') ?? '{}') as typeof parsed;
        } catch {
          /* reported below as a generic failure */
        }
        const code = isErrorCode(parsed.code) ? parsed.code : 'ERR_PEER_PROTOCOL';
        const why = typeof parsed.message === 'string' ? parsed.message.slice(0, MAX_ERROR_PAYLOAD) : 'no reason given';
        if (opts.upload) throw new TandemError('ERR_BAD_REQUEST', `the sender ended its block stream with its own error (${code}: ${why}); the frames before it were stored`, { details: { senderCode: code } });
        throw new TandemError(code, `sender failed mid-stream: ${why}`);
      }
      if (type !== FRAME_BLOCK) throw corrupt(`unknown frame type 0x${type.toString(16)} at block ${index}`, { index });
      if (rawLen > MAX_BLOCK_BYTES || payLen > MAX_BLOCK_BYTES + 1024) throw corrupt(`frame ${index} claims ${rawLen} bytes, over the ${MAX_BLOCK_BYTES}-byte limit`, { index });
      if (codec === CODEC_RAW && payLen !== rawLen) throw corrupt(`raw frame ${index} has payload ${payLen} != length ${rawLen}`, { index });
      const isDelta = codec === CODEC_DELTA || codec === CODEC_DELTA_DEFLATE;
      if (isDelta && (!opts.deltas || rawLen === 0)) {
        throw corrupt(opts.deltas ? `delta frame ${index} is too short` : `unknown codec ${codec} in frame ${index} (a delta, not asked for)`, { index });
      }
      const hash = Buffer.from(h.subarray(2, 34));
      if (opts.expect && !(index < opts.expect.length && opts.expect[index]!.equals(hash))) {
        throw corrupt(`block ${index} of the stream is not the block asked for`, { index, hash: hash.toString('hex') });
      }
      if (opts.budget) {
        // A deflated delta is charged all it may inflate to, and given back the rest once inflated.
        held = Math.min(codec === CODEC_DELTA ? payLen : codec === CODEC_DELTA_DEFLATE ? rawLen + 36 : rawLen, opts.budget.limit);
        await opts.budget.take(held);
      }
      const pooled = codec === CODEC_RAW && opts.pool ? opts.pool.take(payLen) : undefined;
      const payload = await r.read(payLen, pooled?.buf).catch((e: unknown) => {
        pooled?.release?.();
        throw failed(e);
      });
      if (!payload) {
        pooled?.release?.();
        throw failed(corrupt(`block stream truncated inside block ${index}`, { index, hash: hash.toString('hex') }));
      }
      r.inFrame = false;
      let data: Buffer;
      let release: (() => void) | undefined;
      if (pooled) {
        if (payload === pooled.buf) release = pooled.release;
        else pooled.release?.(); // the payload came as a view of one chunk: the buffer went unused
      }
      if (isDelta) {
        let delta = payload;
        if (codec === CODEC_DELTA_DEFLATE) {
          try {
            // A delta is at most half its block (a stored one a quarter): more is not one.
            delta = await inflateAsync(payload, { maxOutputLength: rawLen + 36 });
          } catch (e) {
            throw corrupt(`delta frame ${index} does not inflate (${(e as Error).message})`, { index, hash: hash.toString('hex') });
          }
        }
        if (delta.length < 36) throw corrupt(`delta frame ${index} is too short`, { index }); // the base's hash and a patch count at least
        if (held > delta.length) {
          opts.budget!.give(held - delta.length);
          held = delta.length;
        }
        index++;
        const deltaRelease = releaseOf(undefined);
        const frame = { hash, data: delta.subarray(32), delta: { base: Buffer.from(delta.subarray(0, 32)), length: rawLen } };
        yield deltaRelease ? { ...frame, release: deltaRelease } : frame;
        continue;
      }
      if (codec === CODEC_RAW) data = payload;
      else if (codec === CODEC_DEFLATE) {
        const out = opts.pool ? opts.pool.take(rawLen) : { buf: Buffer.allocUnsafe(rawLen), release: undefined };
        let n: number;
        try {
          n = await inflateInto(payload, out.buf);
        } catch (e) {
          out.release?.();
          throw corrupt(`block ${index} does not inflate (${(e as Error).message})`, { index, hash: hash.toString('hex') });
        }
        if (n !== rawLen) {
          out.release?.();
          throw corrupt(`block ${index} inflates to ${n} bytes, not ${rawLen}`, { index });
        }
        data = out.buf;
        release = out.release;
      } else throw corrupt(`unknown codec ${codec} in frame ${index}`, { index });
      if (opts.verify && !hashBlock(data).equals(hash)) {
        throw new TandemError('ERR_BLOCK_CORRUPT', `block ${hash.toString('hex')} (frame ${index}) does not match its hash; nothing was committed, rerun the sync`, { details: { index, hash: hash.toString('hex') } });
      }
      index++;
      release = releaseOf(release);
      yield release ? { hash, data, release } : { hash, data };
    }
  } finally {
    clearInterval(watchdog);
    if (held > 0) opts.budget!.give(held); // a frame that failed before it was yielded
    if (holding) opts.slot!.give();
    await r.cancel();
  }
}

/** Chunks below this many bytes are sent together with the ones next to them ({@link coalesce}). */
const SMALL_CHUNK = 16 * 1024;
/** A run of small chunks is sent once it reaches this many bytes. */
const COALESCED_MAX = 64 * 1024;
const NOT_YET = Symbol('not yet');

/**
 * The chunks of `source` with runs of small ones joined into one, so that a stream of small
 * frames (delta patches, frame headers: 2-3 chunks a frame) reaches the socket as a few writes,
 * not one each. Each write to a TLS socket is a record encrypted and a system call, and on
 * loopback the receiver's side of TCP runs in that call too. Joined are only chunks that are
 * ready at once: when the next one is not (the sender waits for a scan), what is held goes out
 * after one turn of the event loop (setImmediate), so nothing waits on the next job's chunks.
 * Chunks of {@link SMALL_CHUNK} bytes or more pass through as they are (no copy); a small chunk
 * copied into a joined one is released at once (its pooled buffer, takeRelease).
 */
export async function* coalesce(source: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  const it = source[Symbol.asyncIterator]();
  const parts: Buffer[] = [];
  let bytes = 0;
  const joined = (): Buffer => {
    const out = parts.length === 1 ? parts[0]! : Buffer.concat(parts, bytes);
    if (parts.length > 1) for (const p of parts) takeRelease(p)?.();
    parts.length = 0;
    bytes = 0;
    return out;
  };
  const turn = (): Promise<typeof NOT_YET> => new Promise((resolve) => setImmediate(resolve, NOT_YET));
  let lastBig = false;
  try {
    let next = it.next();
    for (;;) {
      const r = parts.length === 0 ? await next : await Promise.race([next, turn()]);
      if (r === NOT_YET) {
        yield joined(); // `next` is still on its way
        continue;
      }
      if (r.done) break;
      next = it.next();
      next.catch(() => undefined); // observed above, in order
      const chunk = r.value;
      if (chunk.length >= SMALL_CHUNK) {
        if (parts.length > 0) yield joined();
        yield chunk;
        lastBig = true;
        continue;
      }
      // A small chunk after a large one (a whole block's frame header): whole blocks go one write
      // each anyway, so it is not held (no wait on the event loop per block).
      if (lastBig) {
        lastBig = false;
        yield chunk;
        continue;
      }
      parts.push(chunk);
      bytes += chunk.length;
      if (bytes >= COALESCED_MAX) yield joined();
    }
    if (parts.length > 0) yield joined();
  } finally {
    await it.return?.(undefined).catch(() => {});
  }
}

/**
 * Pull up to `depth` items of `source` ahead of the consumer, so producing (reading a socket,
 * inflating, reading packs) overlaps with consuming (writing a store, a socket). Memory: `depth`
 * items; with an {@link AheadBudget} instead of a number, this stream's share of it (fewer while
 * many streams of the process run: store/ahead-budget.ts). Errors surface in order; items left
 * when the consumer stops are dropped, each passed to `drop` (to release it) as it comes, before
 * the source is stopped: a source that waits for a budget those items hold is not waited for with
 * them held.
 */
export async function* readAhead<T>(source: AsyncIterable<T>, depth: number | AheadBudget, drop?: (item: T) => void): AsyncGenerator<T> {
  const it = source[Symbol.asyncIterator]();
  const queue: Array<Promise<IteratorResult<T>>> = [];
  const share = typeof depth === 'number' ? null : depth.join();
  const room = share ? () => share.tryTake() : () => queue.length < (depth as number);
  let ended = false;
  try {
    for (;;) {
      while (!ended && room()) {
        const p = it.next();
        p.then((r) => void (r.done && (ended = true)), () => void (ended = true)); // also marks the rejection handled
        queue.push(p);
      }
      const r = await queue.shift()!;
      share?.give();
      if (r.done) return;
      yield r.value;
    }
  } finally {
    share?.leave();
    if (drop) for (const p of queue.splice(0)) p.then((r) => void (!r.done && drop(r.value)), () => undefined);
    await it.return?.(undefined as never).catch(() => {});
  }
}
