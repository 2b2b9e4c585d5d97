/** Helpers of the store tests: temp dirs, image files and a plain file VolumeReader. */
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { constants } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import type { TestContext } from 'node:test';
import { Store, type VolumeReader } from '../../store/index.js';

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
