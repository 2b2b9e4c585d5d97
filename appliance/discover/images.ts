/**
 * Image files and non-zero estimates: find disk images under directories, tell raw from
 * formats Tandem cannot read as a block device (qcow2, VMDK: they need converting to raw), and
 * estimate how much of a volume holds data by sampling.
 */
import { open, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';

export type ImageFormat = 'raw' | 'qcow2' | 'vmdk';

/** qcow2 files start with "QFI\xfb"; VMDK sparse extents with "KDMV". */
const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);
const VMDK_MAGIC = Buffer.from('KDMV', 'latin1');
/** Files smaller than this are not disk images worth protecting (configs, logs, ISOs' siblings). */
export const MIN_IMAGE_BYTES = 1024 * 1024;
/** Extensions taken for raw images; any file with a qcow2/VMDK magic is found whatever its name. */
const RAW_EXTENSIONS = /\.(img|raw|disk|bin)$/i;
/** Directory levels searched under each configured path (images sit in a folder per VM at most). */
const MAX_DEPTH = 2;
/** Samples read per volume for the non-zero estimate: bounded I/O (256 × 64 KiB = 16 MiB) whatever the size. */
export const SAMPLE_COUNT = 256;
export const SAMPLE_BYTES = 64 * 1024;

export async function imageFormat(path: string): Promise<ImageFormat> {
  const fh = await open(path, 'r');
  try {
    const head = Buffer.alloc(4);
    await fh.read(head, 0, 4, 0);
    if (head.equals(QCOW2_MAGIC)) return 'qcow2';
    if (head.equals(VMDK_MAGIC)) return 'vmdk';
    return 'raw';
  } finally {
    await fh.close();
  }
}

/**
 * Each of `dirs` (config `discovery.paths`) that cannot be searched, with why: missing, not a
 * directory, or unreadable. discover and doctor name them: a typo in the path would otherwise
 * look like a directory holding no images.
 */
export async function discoveryPathProblems(dirs: readonly string[]): Promise<Array<{ path: string; problem: string }>> {
  const out: Array<{ path: string; problem: string }> = [];
  for (const path of dirs) {
    const st = await stat(path).catch((e: NodeJS.ErrnoException) => e);
    if (st instanceof Error) {
      out.push({ path, problem: st.code === 'ENOENT' ? 'does not exist' : `cannot be read (${st.code ?? st.message})` });
    } else if (!st.isDirectory()) {
      out.push({ path, problem: 'is not a directory' });
    } else {
      const e = await readdir(path).then(() => null, (err: NodeJS.ErrnoException) => err);
      if (e) out.push({ path, problem: `cannot be read (${e.code ?? e.message})` });
    }
  }
  return out;
}

/** Image files under `dirs` (depth-limited, unreadable directories skipped: see {@link discoveryPathProblems}). */
export async function findImages(dirs: readonly string[]): Promise<Array<{ path: string; size: number; allocated: number; format: ImageFormat }>> {
  const out: Array<{ path: string; size: number; allocated: number; format: ImageFormat }> = [];
  const walk = async (dir: string, depth: number) => {
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries.sort((a, b) => a.name.localeCompare(b.name))) {
      const p = join(dir, e.name);
      if (e.isDirectory() && depth < MAX_DEPTH) await walk(p, depth + 1);
      if (!e.isFile()) continue;
      const st = await stat(p).catch(() => null);
      if (!st || st.size < MIN_IMAGE_BYTES) continue;
      const format = await imageFormat(p).catch(() => null);
      if (format === null || (format === 'raw' && !RAW_EXTENSIONS.test(e.name))) continue;
      out.push({ path: p, size: st.size, allocated: st.blocks * 512, format });
    }
  };
  for (const d of dirs) await walk(d, 0);
  return out;
}

/**
 * Estimate the bytes of non-zero data in a raw volume by reading {@link SAMPLE_COUNT} evenly
 * spaced samples; null when it cannot be read (permissions). Exact for volumes small enough to
 * be covered entirely.
 */
export async function estimateNonZero(path: string, size: number): Promise<number | null> {
  if (size <= 0) return 0;
  let fh;
  try {
    fh = await open(path, 'r');
  } catch {
    return null;
  }
  try {
    const buf = Buffer.alloc(SAMPLE_BYTES);
    const count = Math.min(SAMPLE_COUNT, Math.ceil(size / SAMPLE_BYTES));
    const stride = size / count;
    let nonZero = 0;
    let sampled = 0;
    for (let i = 0; i < count; i++) {
      const pos = Math.floor((i * stride) / 512) * 512;
      const { bytesRead } = await fh.read(buf, 0, Math.min(SAMPLE_BYTES, size - pos), pos);
      if (bytesRead === 0) continue;
      sampled += bytesRead;
      const view = buf.subarray(0, bytesRead);
      // Count non-zero 4 KiB pages: a page with any data counts whole.
      for (let off = 0; off < bytesRead; off += 4096) {
        const page = view.subarray(off, Math.min(off + 4096, bytesRead));
        if (page.some((b) => b !== 0)) nonZero += page.length;
      }
    }
    return sampled === 0 ? 0 : Math.round((nonZero / sampled) * size);
  } catch {
    return null;
  } finally {
    await fh.close();
  }
}
