/** Helpers of the store tests: temp dirs, image files and a plain file VolumeReader. */
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { constants } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import type { TestContext } from 'node:test';
import { Store, type SnapshotRecord, type VolumeReader } from '../../store/index.js';

export async function tempDir(t: TestContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'tandem-store-test-'));
  t.after(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** An image of `blocks` blocks of `blockSize` (+ `tail` bytes): every `zeroEvery`-th block zero, others random. */
export function makeImage(blocks: number, blockSize: number, opts: { zeroEvery?: number; tail?: number } = {}): Buffer {
  const img = Buffer.alloc(blocks * blockSize + (opts.tail ?? 0));
  for (let i = 0; i < blocks; i++) {
    if (opts.zeroEvery && i % opts.zeroEvery === 0) continue;
    randomBytes(blockSize).copy(img, i * blockSize);
  }
  if (opts.tail) randomBytes(opts.tail).copy(img, blocks * blockSize);
  return img;
}

/**
 * A VolumeReader over a file. Aligned reads use O_DIRECT: reading the holes of a sparse file
 * through the page cache fills the cache with zero pages (~0.4 GB/s here), while O_DIRECT has
 * the kernel zero the buffer directly (>10 GB/s). Unaligned reads (a short tail) and file
 * systems without O_DIRECT (tmpfs) use a buffered descriptor.
 */
export async function fileReader(path: string): Promise<VolumeReader> {
  const fh = await open(path, 'r');
  const direct = await open(path, constants.O_RDONLY | constants.O_DIRECT).catch(() => undefined);
  const size = (await fh.stat()).size;
  const DIRECT_ALIGN = 4096;
  return {
    size,
    read: async (buf, position) => {
      if (direct && position % DIRECT_ALIGN === 0 && buf.length % DIRECT_ALIGN === 0 && buf.byteOffset % DIRECT_ALIGN === 0) {
        try {
          return (await direct.read(buf, 0, buf.length, position)).bytesRead;
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
        }
      }
      return (await fh.read(buf, 0, buf.length, position)).bytesRead;
    },
    close: async () => {
      await direct?.close();
      await fh.close();
    },
  };
}

export async function writeImage(path: string, img: Buffer): Promise<void> {
  await writeFile(path, img);
}

/** A temp dir holding `img` as the file `path` and an open store (closed after the test). */
export async function storeWithImage(t: TestContext, img: Buffer): Promise<{ dir: string; path: string; store: Store }> {
  const dir = await tempDir(t);
  const path = join(dir, 'img');
  await writeImage(path, img);
  const store = await Store.open(join(dir, 'store'));
  t.after(() => store.close());
  return { dir, path, store };
}

/** Spawn a fixture script under test/store/fixtures with tsx; resolves once it printed `word`. */
export async function spawnFixture(script: string, args: string[], word: string): Promise<{ child: ChildProcess; output: () => string }> {
  const child = spawn(process.execPath, ['--import', 'tsx', join('test', 'store', 'fixtures', script), ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  child.stderr!.on('data', (d) => (out += d));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (d) => {
      out += d;
      if (out.includes(word)) resolve();
    });
    child.once('exit', (code) => reject(new Error(`fixture ${script} exited with ${code} before "${word}": ${out}`)));
  });
  return { child, output: () => out };
}

export async function waitExit(child: ChildProcess): Promise<number | null> {
  if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
  const [code] = await once(child, 'exit');
  return code as number | null;
}

/** {@link fileReader} naming its path as a local file: the store's hash workers read it themselves. */
export async function localFileReader(path: string): Promise<VolumeReader> {
  return { ...(await fileReader(path)), path, kind: 'file' };
}

/** An async iterable of `xs` (a block stream for putBlocks). */
export async function* from<T>(xs: readonly T[]): AsyncGenerator<T> {
  for (const x of xs) yield x;
}

export async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

/** A copy of `base` with `writes` ([offset, bytes]) applied (cut at its end). */
export function written(base: Buffer, writes: Array<[number, Buffer]>): Buffer {
  const b = Buffer.from(base);
  for (const [off, bytes] of writes) bytes.copy(b, off, 0, Math.min(bytes.length, b.length - off));
  return b;
}

/** Snapshot the image file at `path` as `volume`, in blocks of `blockSize`. */
export async function scanFile(store: Store, path: string, volume: string, blockSize: number): Promise<SnapshotRecord> {
  const r = await fileReader(path);
  try {
    return await store.scanVolume(r, { volume, blockSize });
  } finally {
    await r.close();
  }
}

/** A snapshot's bytes, read back block by block from the store (blocks of `blockSize`). */
export async function readBack(store: Store, snap: SnapshotRecord, blockSize: number): Promise<Buffer> {
  const out = Buffer.alloc(snap.size);
  for await (const { index, hash } of store.blockHashes(snap)) (await store.getBlock(hash, blockSize)).copy(out, index * blockSize);
  return out;
}

/** Skip `t` when strace cannot trace here (missing, or ptrace refused), saying what strace was for; true when skipped. */
export function skipWithoutStrace(t: TestContext, forWhat: string): boolean {
  try {
    execFileSync('strace', ['-f', '-qq', '-o', '/dev/null', 'true'], { stdio: 'pipe' });
    return false;
  } catch (e) {
    t.skip(`strace cannot trace here (${(e as Error).message.split('\n')[0]}): ${forWhat}`);
    return true;
  }
}

/**
 * Run gc on the store in `storeDir` in a child (fixtures/gc-child.ts) under strace, which kills
 * it (SIGKILL) at the entry of its `k`-th unlink of one of `oldPacks`; returns the child's output
 * ('ready' once gc starts, 'done' if it finished). One pack a group (TANDEM_GC_GROUP_BYTES), and
 * one libuv thread: strace counts per thread, and that one makes every unlink.
 */
export async function gcKilledAtUnlink(storeDir: string, oldPacks: readonly string[], k: number): Promise<string> {
  const child = spawn('strace', ['-f', '-qq', '-o', '/dev/null', ...oldPacks.flatMap((p) => ['-P', p]), '-e', 'trace=unlink,unlinkat', '-e', `inject=unlink,unlinkat:signal=KILL:when=${k}`,
    process.execPath, '--import', 'tsx', join('test', 'store', 'fixtures', 'gc-child.ts'), storeDir], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, TANDEM_GC_GROUP_BYTES: '1', UV_THREADPOOL_SIZE: '1' } });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (out += d));
  await waitExit(child);
  return out;
}

/** Start a new pack for the store's next appends, as one that reached its target size does (tests that need several packs). */
export async function startNewPack(store: Store): Promise<void> {
  await store.writeLock.run(() => store.packs.rollover());
}
