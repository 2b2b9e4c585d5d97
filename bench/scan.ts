/**
 * bench/scan: snapshot, re-snapshot and restore of a local image, side by side with b3sum and cp
 * on the same file in the same run, plus the CLI's peak RSS.
 *
 *   npm run build && node --import tsx bench/scan.ts [--size 4GiB] [--dir DIR] [--sparse 64GiB] [--huge 16TiB] [--only-sparse]
 *
 * Steps (each a real `appliance` process from dist/, timed wall-clock):
 * 1. a random image of --size (every 512 KiB block distinct), page cache warm for every tool;
 * 2. `b3sum --num-threads 2 IMG`; the same reading and hashing in Node alone (two worker
 *    threads, no store: the floor of a re-scan in Node); `cp IMG DIR/copy && sync copy`;
 * 3. first snapshot; then RESCANS (5) times: 1 % of the blocks changed by one 4 KiB write each,
 *    b3sum, and a re-snapshot (a full re-scan; the median ratio is reported); the same rounds
 *    again with `appliance serve` running on the home (the CLI forwards the snapshot to it, as
 *    when the appliance runs as a service), timed from the CLI and in the appliance; another
 *    1 % changed; snapshot with --changed-blocks listing them;
 * 4. restore to a new file on the same disk (fsync'd, like cp + sync). The disk may be shared
 *    and its speed changes from minute to minute, so the first snapshot and the restore are each
 *    compared with the mean of a cp timed right before and one right after them. That cp reads
 *    the image from the page cache, while the restore reads the store's packs from the disk
 *    (written past the cache), so the restore is also compared with a cp of the image dropped
 *    from the cache first (both read the disk); then a restore onto that file again, which
 *    holds the snapshot already: it only reads and hashes it (b3sum of it timed right before);
 * 5. a sparse volume of --sparse with a few non-zero blocks: snapshot and restore; then one of
 *    --huge (`truncate` + 4 MiB of data in 4 writes): first snapshot, and a re-snapshot after
 *    another 1 MiB written (on a file system whose files stop short of it, ext4's 16 TiB - 4 KiB,
 *    the image goes to /dev/shm, where a sparse file costs no memory either). --only-sparse runs
 *    step 5 alone (its figures in seconds, not the minutes of the rest);
 * 6. as root: the image as a block device (a read-only loop device with direct I/O, so it reads
 *    the disk as a real device does), snapshotted as a volume of its own: its blocks are all in
 *    the store, so this is a cold re-scan; the growth of the page cache during it (the kernel
 *    counts a device's cached pages as Buffers), next to `dd iflag=direct` of the device.
 * Peak RSS is VmHWM of the CLI process, read by /usr/bin/time -v, and of the running appliance
 * (/proc/PID/status).
 */
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, rmSync, openSync, writeSync, closeSync, writeFileSync, statSync, existsSync, ftruncateSync, fsyncSync, readFileSync, statfsSync, truncateSync } from 'node:fs';
import { randomFillSync, randomInt } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { BLAKE3_MODULE_PATH } from '../store/hash.js';
import { IO_SKEW } from '../common/io-buffers.js';
import { APPLIANCE, DIST_MAIN, childEnv, describeNodeStart, nodeStart } from './node-start.js';

const ROOT = resolve(__dirname, '..');
const BS = 512 * 1024;
/** Image writes go out in 64 MiB pieces: fast to fill, small next to the image. */
const FILL_CHUNK = 64 * 1024 * 1024;
/** Re-scans timed (each after its own 1 % change); the median is reported. */
const RESCANS = 5;

/** The targets of the issue (re-snapshot vs b3sum, first snapshot vs cp, restore vs cp, RSS). */
const TARGETS = { rescanVsB3sum: 1.5, firstVsCp: 1.3, restoreVsCp: 0.8, rssMB: 256 };

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : dflt;
}
function parseSize(s: string): number {
  const m = /^(\d+)(KiB|MiB|GiB|TiB)?$/.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  const mult: Record<string, number> = { '': 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4 };
  return Number(m[1]) * mult[m[2] ?? '']!;
}

interface Run {
  seconds: number;
  rssMB: number | null;
  /** Bytes the process read from the disk (not from the page cache), from time's "File system inputs". */
  diskReadMB: number | null;
  stdout: string;
}

/** Run a command under /usr/bin/time -v; wall time measured here, peak RSS from time's report. */
function timed(cmd: string, args: string[], env = childEnv()): Promise<Run> {
  const useTime = existsSync('/usr/bin/time');
  const started = process.hrtime.bigint();
  const child = spawn(useTime ? '/usr/bin/time' : cmd, useTime ? ['-v', cmd, ...args] : args, {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((res, rej) => {
    child.on('close', (code) => {
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      if (code !== 0) return rej(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${stderr}`));
      const m = /Maximum resident set size \(kbytes\): (\d+)/.exec(stderr);
      const inputs = /File system inputs: (\d+)/.exec(stderr); // 512-byte units
      res({ seconds, rssMB: m ? Number(m[1]) / 1024 : null, diskReadMB: inputs ? (Number(inputs[1]) * 512) / 1e6 : null, stdout });
    });
  });
}

/**
 * Remove a large file, and wait until the disk has done with it. Freeing 4 GiB is work for the
 * disk too (this machine's root filesystem is mounted with `discard`: the freed range is trimmed
 * at the next journal commit): without the sync, the next timed step paid for it.
 */
function removeSettled(path: string): void {
  rmSync(path);
  spawnSync('sync');
}

/** `cp` of the image onto the store's disk, made durable (sync FILE), then removed. */
async function copyImage(img: string, dir: string): Promise<Run> {
  const copy = join(dir, 'copy.img');
  const r = await timed('sh', ['-c', `cp "${img}" "${copy}" && sync "${copy}"`]);
  removeSettled(copy);
  return r;
}

/**
 * {@link copyImage} with the image's pages dropped from the page cache first (GNU dd's
 * `iflag=nocache`), so cp reads it from the disk as a restore reads the store's packs.
 */
async function copyImageUncached(img: string, dir: string): Promise<Run> {
  spawnSync('dd', [`if=${img}`, 'iflag=nocache', 'count=0', 'status=none']);
  return copyImage(img, dir);
}

const appliance = (args: string[]) => timed(APPLIANCE, args);

/**
 * What Node itself can do on this machine, with nothing of Tandem: two worker threads each read
 * half the image a 512 KiB block at a time (pread into a reused buffer) and BLAKE3 each block
 * right after its read, the same binding and the same work as a full re-scan without storing or
 * tree building. b3sum maps the file instead of copying it out of the page cache, which Node
 * cannot do. `skew` is where the buffer starts past a page boundary: 0 shows what the
 * page-aligned buffers cost that common/io-buffers.ts avoids.
 */
function nodeFloor(img: string, skew: number): Promise<Run> {
  const script = `
const { Worker } = require('node:worker_threads');
const { statSync } = require('node:fs');
const [img, mod] = process.argv.slice(1);
const size = statSync(img).size;
const src = \`
const { workerData, parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const native = require(workerData.mod);
const fd = fs.openSync(workerData.img, 'r');
const buf = Buffer.from(new ArrayBuffer(${BS} + ${skew}), ${skew}, ${BS});
for (let pos = workerData.start; pos < workerData.end; pos += buf.length) {
  const n = fs.readSync(fd, buf, 0, Math.min(buf.length, workerData.end - pos), pos);
  native.blake3(buf.subarray(0, n));
}
parentPort.postMessage('done');
\`;
const half = Math.ceil(size / 2 / ${BS}) * ${BS};
Promise.all([[0, half], [half, size]].map(([start, end]) => new Promise((res, rej) => {
  const w = new Worker(src, { eval: true, workerData: { img, mod, start, end } });
  w.on('message', res); w.on('error', rej);
}))).then(() => process.exit(0));
`;
  // Started as bin/appliance starts Node: without NODE_EXTRA_CA_CERTS (bench/node-start.ts).
  return timed(process.execPath, ['-e', script, img, BLAKE3_MODULE_PATH], childEnv(true));
}

/**
 * `appliance serve` on `home` (loopback, port 0) until stop(), which ends it and returns its
 * peak RSS in MB (VmHWM, read just before).
 */
async function serve(home: string): Promise<{ stop(): Promise<number> }> {
  const child = spawn(APPLIANCE, ['--home', home, '--json', 'serve', '--listen', '127.0.0.1:0'], { env: childEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const [line] = (await once(child.stdout, 'data')) as [Buffer];
  if (!/"url"/.test(line.toString())) throw new Error(`appliance serve printed ${line.toString()} ${stderr}`);
  return {
    async stop() {
      const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'));
      child.kill('SIGTERM');
      await once(child, 'close');
      return m ? Number(m[1]) / 1024 : 0;
    },
  };
}

function makeImage(path: string, size: number): void {
  const fd = openSync(path, 'w');
  const buf = Buffer.allocUnsafe(FILL_CHUNK);
  for (let pos = 0; pos < size; pos += FILL_CHUNK) {
    const n = Math.min(FILL_CHUNK, size - pos);
    randomFillSync(buf, 0, n);
    writeSync(fd, buf, 0, n, pos);
  }
  fsyncSync(fd);
  closeSync(fd);
}

/** Change `count` distinct random blocks with one 4 KiB write each; returns their indices. */
function changeBlocks(path: string, size: number, count: number): number[] {
  const blocks = Math.floor(size / BS);
  const chosen = new Set<number>();
  while (chosen.size < Math.min(count, blocks)) chosen.add(randomInt(0, blocks));
  const fd = openSync(path, 'r+');
  const w = Buffer.allocUnsafe(4096);
  for (const b of chosen) {
    randomFillSync(w);
    writeSync(fd, w, 0, w.length, b * BS + randomInt(0, BS / 4096) * 4096);
  }
  fsyncSync(fd);
  closeSync(fd);
  return [...chosen].sort((a, b) => a - b);
}

/** Read the file once so every tool starts with a warm page cache. */
function warm(path: string): void {
  spawnSync('cat', [path], { stdio: ['ignore', 'ignore', 'inherit'] });
}

const rows: Array<[string, string, string, string, string]> = [];
const fmt = (n: number, d = 2) => n.toFixed(d);
function row(what: string, r: Run, bytes: number, note = ''): void {
  rows.push([what, fmt(r.seconds), fmt(bytes / 1e6 / r.seconds, 0), r.rssMB === null ? '-' : fmt(r.rssMB, 0), note]);
}

/** The rows so far as a table. */
function printRows(): void {
  const header: [string, string, string, string, string] = ['step', 'seconds', 'MB/s', 'peak RSS MB', 'vs target'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) => r.map((c, i) => (i === 0 || i === 4 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  console.log(line(header));
  for (const r of rows) console.log(line(r));
}

/** The kernel's Buffers figure (a block device's page cache), in bytes. */
function buffersBytes(): number {
  const m = /^Buffers:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

/**
 * Step 6: `img` attached as a read-only loop device with direct I/O, added to `home` as a
 * volume and snapshotted (rows added); null when not root or no loop device can be made (a line
 * saying so is returned instead).
 */
async function deviceRescan(img: string, home: string, size: number): Promise<string | null> {
  if (process.getuid?.() !== 0) return 'block device step skipped: needs root for losetup';
  const made = spawnSync('losetup', ['--find', '--show', '--read-only', '--direct-io=on', img], { encoding: 'utf8' });
  if (made.status !== 0) return `block device step skipped: losetup failed (${made.stderr.trim()})`;
  const dev = made.stdout.trim();
  try {
    // The loop device is the image volume "vol" reads (a second volume of it is refused): that
    // volume goes first. Its blocks stay in the store until a gc, so the device's scan finds them stored.
    await appliance(['volume', 'remove', 'vol', '--force', '--home', home]);
    await appliance(['volume', 'add', 'dev', '--path', dev, '--home', home]);
    spawnSync('blockdev', ['--flushbufs', dev]);
    const dd = await timed('dd', [`if=${dev}`, 'of=/dev/null', `bs=${BS}`, 'iflag=direct', 'status=none']);
    row('dd iflag=direct of the image as a block device', dd, size, 'reads the disk (a loop device with direct I/O)');
    spawnSync('blockdev', ['--flushbufs', dev]);
    const before = buffersBytes();
    let grew = 0;
    const sampler = setInterval(() => (grew = Math.max(grew, buffersBytes() - before)), 20);
    const snap = await appliance(['snapshot', 'dev', '--home', home, '--json']).finally(() => clearInterval(sampler));
    const direct = (JSON.parse(snap.stdout) as { bytesReadDirect: number }).bytesReadDirect;
    row('snapshot of it (a cold re-scan: blocks all stored)', snap, size, `${fmt(snap.seconds / dd.seconds)}x dd; ${fmt(direct / 1024 ** 3, 1)} GiB read past the page cache, which grew by ${fmt(grew / 1024 ** 2, 0)} MiB during it`);
    return null;
  } finally {
    spawnSync('losetup', ['-d', dev]);
  }
}

/**
 * Step 5: a sparse image of `sparseSize` with a few non-zero blocks, snapshotted and restored;
 * then one of `hugeSize` with 4 MiB of data, a first snapshot and a re-snapshot after 1 MiB more
 * (rows added). Returns the runs, for the peak RSS.
 */
async function sparseSteps(dir: string, home: string, sparseSize: number, hugeSize: number): Promise<Run[]> {
  const sparse = join(dir, 'sparse.img');
  const fd = openSync(sparse, 'w');
  ftruncateSync(fd, sparseSize);
  const w = Buffer.allocUnsafe(4096);
  for (let i = 0; i < 4; i++) writeSync(fd, randomFillSync(w), 0, 4096, randomInt(0, Math.floor(sparseSize / 4096)) * 4096);
  closeSync(fd);
  await appliance(['volume', 'add', 'sparse', '--path', sparse, '--home', home]);
  const ss = await appliance(['snapshot', 'sparse', '--home', home]);
  row(`snapshot, ${sparseSize / 1024 ** 3} GiB sparse volume`, ss, sparseSize, 'MB/s of volume size');
  const sr = await appliance(['restore', 'sparse', '--to', join(dir, 'sparse-out.img'), '--home', home]);
  row(`restore, ${sparseSize / 1024 ** 3} GiB sparse volume`, sr, sparseSize, `allocated ${statSync(join(dir, 'sparse-out.img')).blocks * 512} bytes`);
  removeSettled(join(dir, 'sparse-out.img'));

  // A scan's cost in a hole is per hole (store/scan.ts fullScanJobs), not per chunk of it: 16 TiB took 20 s first and 34-44 s again.
  let hugeDir = dir;
  let huge = join(dir, 'huge.img');
  const hfd = openSync(huge, 'w');
  try {
    ftruncateSync(hfd, hugeSize);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EFBIG') throw e;
    rmSync(huge);
    hugeDir = mkdtempSync(join('/dev/shm', 'tandem-bench-'));
    huge = join(hugeDir, 'huge.img');
    writeFileSync(huge, '');
    truncateSync(huge, hugeSize);
  } finally {
    closeSync(hfd);
  }
  try {
    const mib = Buffer.allocUnsafe(1024 * 1024);
    const writeMiB = (count: number) => {
      const f = openSync(huge, 'r+');
      for (let i = 0; i < count; i++) writeSync(f, randomFillSync(mib), 0, mib.length, randomInt(0, Math.floor(hugeSize / mib.length)) * mib.length);
      closeSync(f);
    };
    writeMiB(4);
    const tib = `${fmt(hugeSize / 1024 ** 4, 0)} TiB`;
    await appliance(['volume', 'add', 'huge', '--path', huge, '--home', home]);
    const hf = await appliance(['snapshot', 'huge', '--home', home]);
    row(`first snapshot, ${tib} sparse volume (4 MiB of data)`, hf, hugeSize, `MB/s of volume size; image in ${hugeDir === dir ? 'the bench dir' : '/dev/shm (EFBIG here)'}`);
    writeMiB(1);
    const hr = await appliance(['snapshot', 'huge', '--home', home]);
    row(`re-snapshot, ${tib} sparse volume (1 MiB more)`, hr, hugeSize, 'MB/s of volume size');
    await appliance(['volume', 'remove', 'huge', '--force', '--home', home]);
    return [ss, sr, hf, hr];
  } finally {
    rmSync(hugeDir === dir ? huge : hugeDir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  if (!existsSync(DIST_MAIN)) throw new Error('run `npm run build` first');
  const size = parseSize(arg('size', '4GiB'));
  const sparseSize = parseSize(arg('sparse', '64GiB'));
  const hugeSize = parseSize(arg('huge', '16TiB'));
  const dir = mkdtempSync(join(arg('dir', tmpdir()), 'tandem-bench-'));
  const home = join(dir, 'home');
  let disk = '';
  const img = join(dir, 'vol.img');
  if (process.argv.includes('--only-sparse')) {
    try {
      await appliance(['init', '--home', home, '--name', 'bench']);
      const runs = await sparseSteps(dir, home, sparseSize, hugeSize);
      printRows();
      console.log(`peak RSS of the CLI: ${fmt(Math.max(...runs.map((r) => r.rssMB ?? 0)), 0)} MB (target <= ${TARGETS.rssMB})`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    return;
  }
  try {
    // The image, the store, a copy and a restored image: 4 images' worth at the peak.
    const { bavail, bfree, bsize, blocks: diskBlocks } = statfsSync(dir);
    // A nearly full disk writes far slower: the rows that compare with cp say which disk they had.
    disk = `disk ${fmt((bavail * bsize) / 1024 ** 3, 1)} GiB free of ${fmt((diskBlocks * bsize) / 1024 ** 3, 1)} GiB (${Math.round((100 * (diskBlocks - bfree)) / (diskBlocks - bfree + bavail))} % used, as df counts) at the start`;
    if (bavail * bsize < 4.5 * size) throw new Error(`bench/scan needs about ${fmt((4.5 * size) / 1024 ** 3, 1)} GiB free in ${dir}, and it has ${fmt((bavail * bsize) / 1024 ** 3, 1)} GiB: free space, or pass --dir DIR on a larger disk (or a smaller --size)`);
    console.error(`bench/scan: ${size} byte image in ${dir}`);
    makeImage(img, size);
    warm(img);
    const hasB3 = spawnSync('b3sum', ['--version']).status === 0;
    const b3 = hasB3 ? await timed('b3sum', ['--num-threads', '2', img]) : null;
    if (b3) row('b3sum --num-threads 2', b3, size);
    warm(img);
    const aligned = await nodeFloor(img, 0);
    row('node: read + BLAKE3, page-aligned buffer', aligned, size, b3 ? `${fmt(aligned.seconds / b3.seconds)}x b3sum: reads into page-aligned memory (avoided)` : '');
    const floor = await nodeFloor(img, IO_SKEW);
    row(`node: read + BLAKE3, buffer +${IO_SKEW} bytes`, floor, size, b3 ? `${fmt(floor.seconds / b3.seconds)}x b3sum: the floor of a re-scan in Node here` : '');
    const cp = await copyImage(img, dir);
    row('cp + sync (store disk)', cp, size);
    const start = nodeStart();

    await appliance(['init', '--home', home, '--name', 'bench']);
    await appliance(['volume', 'add', 'vol', '--path', img, '--home', home]);
    warm(img);
    const first = await appliance(['snapshot', 'vol', '--home', home]);
    // The disk's speed changes from minute to minute: cp is timed again right after, and the
    // snapshot is compared with the mean of the two copies around it.
    const cpAfter = await copyImage(img, dir);
    const cpAround = (cp.seconds + cpAfter.seconds) / 2;
    row('first snapshot', first, size, `${fmt(first.seconds / cpAround)}x cp (target <= ${TARGETS.firstVsCp}; the mean of the cp before and after)`);
    row('cp + sync, right after', cpAfter, size);

    // A re-scan takes 2-4 s, where a busy neighbour on the machine shows: the median of a few.
    const pct = Math.max(1, Math.round(size / BS / 100));
    // b3sum runs right before each re-snapshot, on the same warm file: each re-snapshot is
    // compared with its own b3sum (b3sum alone varied 0.8-1.4 s from run to run here).
    // The Node floor too: it moves with the machine as much as b3sum does.
    type Rescan = { snap: Run; b3: Run | null; floor: Run };
    const rescans: Rescan[] = [];
    const rescanRound = async (flags: string[] = []): Promise<Rescan> => {
      changeBlocks(img, size, pct);
      warm(img);
      const b3i = hasB3 ? await timed('b3sum', ['--num-threads', '2', img]) : null;
      const floorI = await nodeFloor(img, IO_SKEW);
      return { b3: b3i, floor: floorI, snap: await appliance(['snapshot', 'vol', '--home', home, ...flags]) };
    };
    for (let i = 0; i < RESCANS; i++) rescans.push(await rescanRound());
    const median = <T>(xs: T[], key: (x: T) => number): T => [...xs].sort((a, b) => key(a) - key(b))[Math.floor(xs.length / 2)]!;
    /** A row for these rounds; returns the median re-snapshot. */
    const rescanRow = (what: string, runs: Rescan[]): Run => {
      const mid = median(runs, (r) => r.snap.seconds).snap;
      const toFloor = (r: Rescan) => r.snap.seconds / r.floor.seconds;
      const vsFloor = `${fmt(toFloor(median(runs, toFloor)))}x the Node floor (median; floor ${runs.map((r) => fmt(r.floor.seconds)).join(', ')} s, each run right before)`;
      if (!hasB3) {
        row(what, mid, size, `b3sum not installed; median of ${runs.map((r) => fmt(r.snap.seconds)).join(', ')} s; ${vsFloor}`);
        return mid;
      }
      const ratio = (r: Rescan) => r.snap.seconds / r.b3!.seconds;
      const pairs = runs.map((r) => `${fmt(r.snap.seconds)}/${fmt(r.b3!.seconds)}`).join(', ');
      row(what, mid, size, `${fmt(ratio(median(runs, ratio)))}x b3sum (target <= ${TARGETS.rescanVsB3sum}): median of ${pairs} s (re-snapshot/b3sum right before it); ${vsFloor}`);
      return mid;
    };
    const rescan = rescanRow(`re-snapshot, full scan (${pct} blocks changed)`, rescans);

    // The same rounds with the appliance running (`appliance serve`, as the service runs): the
    // CLI forwards the command to it, which has its modules loaded, its store open and its hash
    // workers started. Scheduled snapshots run there too, with no CLI at all: the command's own
    // time (`seconds` in its JSON) is that figure.
    const server = await serve(home);
    const served: Rescan[] = [];
    const inAppliance: Rescan[] = [];
    for (let i = 0; i < RESCANS; i++) {
      const r = await rescanRound(['--json']);
      served.push(r);
      const seconds = (JSON.parse(r.snap.stdout) as { seconds: number }).seconds;
      inAppliance.push({ b3: r.b3, floor: r.floor, snap: { seconds, rssMB: null, diskReadMB: null, stdout: '' } });
    }
    const serverRss = await server.stop();
    rescanRow('re-snapshot in a running appliance, from the CLI', served);
    rescanRow('  of which in the appliance (a scheduled snapshot)', inAppliance);
    rows.push(['  peak RSS of the running appliance', '-', '-', fmt(serverRss, 0), `(target <= ${TARGETS.rssMB})`]);

    const changed = changeBlocks(img, size, pct);
    const cbFile = join(dir, 'changed.txt');
    writeFileSync(cbFile, changed.join('\n') + '\n');
    const inc = await appliance(['snapshot', 'vol', '--changed-blocks', cbFile, '--home', home]);
    row(`snapshot --changed-blocks (${changed.length} blocks)`, inc, changed.length * BS, 'MB/s of the listed blocks');

    // The disk may be shared: time cp again right before the restore, and compare with that.
    const coldBefore = await copyImageUncached(img, dir);
    const cp2 = await copyImage(img, dir);
    row('cp + sync, again', cp2, size);
    const out = join(dir, 'restored.img');
    const restore = await appliance(['restore', 'vol', '--to', out, '--home', home]);
    const same = spawnSync('cmp', [img, out]).status === 0;
    // Restore onto that file again: it exists and holds the snapshot, so the restore only reads
    // and hashes it (as failback does onto a volume with no pre-apply snapshot), beside b3sum.
    const b3out = hasB3 ? await timed('b3sum', ['--num-threads', '2', out]) : null;
    const compare = await appliance(['restore', 'vol', '--to', out, '--home', home, '--json']);
    const compared = JSON.parse(compare.stdout) as { blocksCompared: number; blocksWritten: number };
    row('restore onto that file again (compare only)', compare, size, `${b3out ? `${fmt(compare.seconds / b3out.seconds)}x b3sum of it (${fmt(b3out.seconds)} s right before); ` : ''}${compared.blocksCompared} blocks compared, ${compared.blocksWritten} written`);
    removeSettled(out);
    const cp3 = await copyImage(img, dir);
    // cp reads the image from the page cache; the restore reads the store's packs, from the disk
    // when they are no longer cached: the MB it read from the disk tell which.
    const diskRead = restore.diskReadMB === null ? '' : `; read ${fmt(restore.diskReadMB, 0)} MB from the disk (cp: ${fmt(cp2.diskReadMB ?? 0, 0)} MB)`;
    row('restore to a new file', restore, size, `${fmt((cp2.seconds + cp3.seconds) / 2 / restore.seconds)}x cp speed (target >= ${TARGETS.restoreVsCp}; the mean of the cp before and after)${diskRead}`);
    row('cp + sync, right after', cp3, size);
    const coldAfter = await copyImageUncached(img, dir);
    // The same comparison with both reading the disk: cp of the image dropped from the page cache.
    row('  restore vs cp of the image not in the page cache', restore, size, `${fmt((coldBefore.seconds + coldAfter.seconds) / 2 / restore.seconds)}x the speed of cp + sync reading the image from the disk (${fmt(coldBefore.seconds)} s before, ${fmt(coldAfter.seconds)} s after; read ${fmt(coldBefore.diskReadMB ?? 0, 0)} MB from the disk)`);

    const sparseRuns = await sparseSteps(dir, home, sparseSize, hugeSize);

    const device = await deviceRescan(img, home, size);

    console.log(`image ${fmt(size / 1024 ** 3, 1)} GiB, blocks of 512 KiB, page cache warm; restored image identical: ${same}; ${disk}`);
    printRows();
    console.log(`Node's own start, in every CLI figure above: ${describeNodeStart(start)}`);
    if (device) console.log(device);
    const peak = Math.max(...[first, rescan, inc, restore, ...sparseRuns].map((r) => r.rssMB ?? 0));
    console.log(`peak RSS of the CLI: ${fmt(peak, 0)} MB (target <= ${TARGETS.rssMB})`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
