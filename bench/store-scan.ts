/**
 * Store scan figures: first snapshot and unchanged re-snapshot of a random image, against `cp`
 * of the same file and against hashing it in this process alone; and a sparse volume. Each
 * scenario runs in its own child process so its peak RSS is its own.
 *
 *   node --import tsx bench/store-scan.ts [imageMiB=1024] [sparseGiB=64]
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, openSync, closeSync, writeSync, ftruncateSync, rmSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const self = __filename;

async function child(kind: string, storeDir: string, image: string): Promise<void> {
  const { Store } = await import('../store/index.js');
  const { openVolumeReader } = await import('../appliance/volumes/index.js');
  const store = await Store.open(storeDir);
  const reader = await openVolumeReader(image);
  const parent = kind === 'rescan' ? await store.latestSnapshot('bench') : null;
  const t = process.hrtime.bigint();
  let stored = 0;
  const snap = await store.scanVolume(reader, { volume: kind === 'sparse' ? 'sparse' : 'bench', blockSize: 524288, parent, onProgress: (p) => (stored = p.blocksStored) });
  const s = Number(process.hrtime.bigint() - t) / 1e9;
  await reader.close();
  await store.close();
  process.stdout.write(JSON.stringify({ s, stored, nonZero: snap.nonZeroBlocks, rssMiB: Math.round(process.resourceUsage().maxRSS / 1024) }));
}

function run(kind: string, storeDir: string, image: string): { s: number; stored: number; nonZero: number; rssMiB: number } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', self, '--child', kind, storeDir, image], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${kind} failed: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

function timeCmd(cmd: string, args: string[]): number {
  const t = process.hrtime.bigint();
  execFileSync(cmd, args);
  return Number(process.hrtime.bigint() - t) / 1e9;
}

async function main(): Promise<void> {
  const mib = Number(process.argv[2] ?? 1024);
  const sparseGiB = Number(process.argv[3] ?? 64);
  const dir = mkdtempSync(join(tmpdir(), 'tandem-bench-store-'));
  try {
    const image = join(dir, 'image');
    const fd = openSync(image, 'w');
    const buf = Buffer.alloc(16 * 1024 * 1024);
    for (let i = 0; i < mib / 16; i++) writeSync(fd, randomFillSync(buf));
    closeSync(fd);
    execFileSync('sync');
    const cp = timeCmd('sh', ['-c', `cp "${image}" "${dir}/copy" && sync "${dir}/copy"`]);
    rmSync(join(dir, 'copy'));
    const first = run('first', join(dir, 'store'), image);
    const rescan = run('rescan', join(dir, 'store'), image);
    const sparse = join(dir, 'sparse');
    const sfd = openSync(sparse, 'w');
    ftruncateSync(sfd, sparseGiB * 1024 ** 3);
    for (const [n, i] of [0, 1000, 100_000].entries()) writeSync(sfd, Buffer.alloc(524288, n + 1), 0, 524288, i * 524288);
    closeSync(sfd);
    const sp = run('sparse', join(dir, 'store'), sparse);
    const gb = (mib * 1024 * 1024) / 1e9;
    const rows = [
      ['cp + sync', cp, gb / cp, '-', '-'],
      ['first snapshot', first.s, gb / first.s, first.stored, first.rssMiB],
      ['re-snapshot (unchanged)', rescan.s, gb / rescan.s, rescan.stored, rescan.rssMiB],
      [`sparse ${sparseGiB} GiB, 3 data blocks`, sp.s, (sparseGiB * 1024 ** 3) / 1e9 / sp.s, sp.stored, sp.rssMiB],
    ];
    console.log(`image ${mib} MiB, block 512 KiB, ${process.env.UV_THREADPOOL_SIZE ?? 4} libuv threads`);
    console.log('scenario                          seconds    GB/s  stored  peak RSS MiB');
    for (const [name, s, rate, stored, rss] of rows) {
      console.log(`${String(name).padEnd(32)} ${Number(s).toFixed(2).padStart(8)} ${Number(rate).toFixed(2).padStart(7)} ${String(stored).padStart(7)} ${String(rss).padStart(13)}`);
    }
    console.log(`first snapshot / cp = ${(first.s / cp).toFixed(2)}x`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

(process.argv[2] === '--child' ? child(process.argv[3]!, process.argv[4]!, process.argv[5]!) : main()).catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
