/**
 * Faults through the real CLI: kill -9 at random moments, flipped bytes in a pack, a held
 * volume lock, a full disk. After each, the store opens, verify passes (or names the damage),
 * no snapshot is half-present and a rerun succeeds.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, readFileSync, openSync, writeSync, closeSync, existsSync, readdirSync, statSync } from 'node:fs';
import { sameBytes, writeRandom } from '../helpers/files.js';
import { join } from 'node:path';
import { randomBytes, randomInt } from 'node:crypto';
import { execFileSync, spawnSync } from 'node:child_process';
import { ROOT, cli, cliJson, collect, smallTmpfs, spawnCli, tempDir } from '../helpers/cli.js';
import { hashBlock } from '../../store/index.js';
import { acquireVolumeLock } from '../../appliance/locks.js';
import { Home } from '../../appliance/home.js';
import { addVolume, removeVolume, snapshotVolume } from '../../appliance/ops.js';
import type { Store } from '../../store/index.js';
import { trials } from '../helpers/soak.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 512 * KiB;
/** Trials per kill -9 loop: enough to land in different phases, cheap enough for CI. */
const TRIALS = trials(6);

function scribble(path: string, pos: number, len: number): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, randomBytes(len), 0, len, pos);
  } finally {
    closeSync(fd);
  }
}

async function initHome(t: { after(fn: () => void): void }) {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  const r = await cli(['init', '--home', home]);
  assert.equal(r.code, 0, r.stderr);
  return { dir, home };
}

/**
 * The store opens, verifies without a problem (so every snapshot present is whole), and lists
 * `volume`'s snapshots: checked in this process, between CLI runs, to keep the loops quick.
 */
async function assertConsistent(homeDir: string, volume: string): Promise<number> {
  return withStore(homeDir, async (store) => {
    const report = await store.verify();
    assert.deepEqual(report.problems, [], 'verify after a crash');
    return (await store.listSnapshots(volume)).length;
  });
}

async function withStore<T>(homeDir: string, fn: (store: Store, home: Home) => Promise<T>): Promise<T> {
  const home = Home.load(homeDir);
  const store = await home.openStore();
  try {
    return await fn(store, home);
  } finally {
    await store.close();
  }
}

/**
 * Run `args` and SIGKILL it at a random moment between `fromMs` (about when the process has
 * started and opened the store) and `toMs` (about when it would finish). Returns whether it was
 * killed, and how long it ran.
 */
async function killAtRandom(args: string[], fromMs: number, toMs: number): Promise<{ killed: boolean; ms: number }> {
  const started = Date.now();
  const child = spawnCli(args);
  const done = collect(child);
  // The delay is the experiment (a random crash point), not a synchronization.
  const timer = setTimeout(() => child.kill('SIGKILL'), randomInt(Math.floor(fromMs), Math.max(Math.floor(fromMs) + 1, Math.ceil(toMs))));
  const r = await done;
  clearTimeout(timer);
  return { killed: r.signal === 'SIGKILL', ms: Date.now() - started };
}

/**
 * Crash points for a loop of trials: uniform between start-up and the end of the operation;
 * when a run finished before its kill, later kills come earlier (so most trials hit work).
 */
function crashWindow(startup: number, full: number) {
  let to = full;
  return {
    from: () => Math.min(startup * 0.8, to * 0.5),
    to: () => to,
    finished(ms: number) {
      to = Math.max(1, Math.min(to, ms) * 0.9);
    },
  };
}

/** Wall time of a CLI command that opens the store and does almost nothing. */
async function startupMs(home: string): Promise<number> {
  const started = Date.now();
  assert.equal((await cli(['volume', 'list', '--home', home])).code, 0);
  return Date.now() - started;
}

/**
 * Snapshots of an image of `size` bytes killed at random moments, TRIALS times: `change` gives
 * each trial new blocks to write; `late` puts the crash points in the second half of the run.
 * After each kill the store verifies, no snapshot is half-present and a rerun succeeds; the
 * last snapshot restores byte-exact.
 */
async function killDuringSnapshots(t: { after(fn: () => void): void }, size: number, change: (img: string) => void, late = false): Promise<void> {
  const { dir, home } = await initHome(t);
  const img = join(dir, 'vol.img');
  writeRandom(img, size);
  assert.equal((await cli(['volume', 'add', 'vol', '--path', img, '--home', home])).code, 0);
  const started = Date.now();
  assert.equal((await cli(['snapshot', 'vol', '--home', home])).code, 0);
  const fullMs = Date.now() - started;
  const startup = await startupMs(home);
  const win = crashWindow(startup, fullMs);
  let killed = 0;
  for (let i = 0; i < TRIALS; i++) {
    change(img);
    // Start-up is measured once: inflated by a moment of load, it could put every late crash
    // point past the end of the run (no trial killed); it never counts for more than 80 % of it.
    const early = Math.min(startup, win.to() * 0.8);
    const from = late ? early + (win.to() - early) * 0.5 : win.from();
    const k = await killAtRandom(['snapshot', 'vol', '--home', home], from, win.to());
    if (k.killed) killed++;
    else win.finished(k.ms);
    const before = await assertConsistent(home, 'vol');
    const rerun = await cliJson(['snapshot', 'vol', '--home', home]);
    assert.equal(rerun.code, 0, `rerun after a kill: ${rerun.stderr}`);
    assert.equal(await assertConsistent(home, 'vol'), before + 1);
  }
  assert.ok(killed >= 1, 'at least one trial killed a running snapshot');
  const out = join(dir, 'out.img');
  assert.equal((await cli(['restore', 'vol', '--to', out, '--home', home])).code, 0);
  assert.ok(sameBytes(out, img));
}

test('kill -9 during snapshot, many times: the store stays consistent and a rerun succeeds', async (t) => {
  // A few new blocks each trial, so the killed snapshot has blocks to write.
  await killDuringSnapshots(t, 32 * MiB, (img) => {
    for (let k = 0; k < 8; k++) scribble(img, randomInt(0, 32 * MiB - 4096), 4096);
  });
});

test('kill -9 late in a snapshot of 96 MiB of new blocks (all written past the page cache): the store stays consistent and a rerun succeeds', async (t) => {
  // Every block new each trial, each written with O_DIRECT; the crash points are in the second
  // half of the run, where most of them have been written.
  await killDuringSnapshots(t, 96 * MiB, (img) => writeRandom(img, 96 * MiB), true);
});

test('kill -9 during gc, many times: retained snapshots stay whole and a rerun succeeds', async (t) => {
  const { dir, home } = await initHome(t);
  const img = join(dir, 'keep.img');
  writeRandom(img, 16 * MiB);
  assert.equal((await cli(['volume', 'add', 'keep', '--path', img, '--home', home])).code, 0);
  assert.equal((await cli(['snapshot', 'keep', '--home', home])).code, 0);
  const want = readFileSync(img);
  const junk = join(dir, 'junk.img');
  // A gc with garbage, to time one: the first window ends there.
  const startup = await startupMs(home);
  writeRandom(junk, 32 * MiB);
  await withStore(home, async (store, h) => {
    await addVolume(store, { name: 'junk', path: junk });
    await snapshotVolume(h, store, 'junk');
    await removeVolume(h, store, 'junk');
  });
  const started = Date.now();
  assert.equal((await cli(['gc', '--home', home])).code, 0);
  const win = crashWindow(startup, Date.now() - started);
  let killed = 0;
  for (let i = 0; i < TRIALS; i++) {
    // Garbage interleaved with retained blocks in the packs: a removed volume's snapshot.
    writeRandom(junk, 32 * MiB);
    scribble(img, randomInt(0, 16 * MiB - 4096), 4096);
    await withStore(home, async (store, h) => {
      await addVolume(store, { name: 'junk', path: junk });
      await snapshotVolume(h, store, 'junk');
      await snapshotVolume(h, store, 'keep');
      await removeVolume(h, store, 'junk');
    });
    const k = await killAtRandom(['gc', '--home', home], win.from(), win.to());
    if (k.killed) killed++;
    else win.finished(k.ms);
    await assertConsistent(home, 'keep');
    const rerun = await cliJson(['gc', '--home', home]);
    assert.equal(rerun.code, 0, `gc rerun: ${rerun.stderr}`);
  }
  await assertConsistent(home, 'keep');
  assert.ok(killed >= 1, 'at least one trial killed a running gc');
  const snaps = (await cliJson(['snapshots', 'keep', '--home', home])).json as Array<{ id: string }>;
  const out = join(dir, 'first.img');
  assert.equal((await cli(['restore', `keep@${snaps[0]!.id}`, '--to', out, '--home', home])).code, 0);
  assert.ok(sameBytes(out, want), 'the first snapshot survives every gc');
});

/** Pack files under the store, largest first. */
function packFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const name of readdirSync(d)) {
      const p = join(d, name);
      if (statSync(p).isDirectory()) walk(p);
      else if (name.endsWith('.pack')) out.push(p);
    }
  };
  walk(dir);
  return out;
}

test('an I/O error from a pack\'s background writeback (fdatasync) or its flush (fsync) fails the snapshot with ERR_IO and commits nothing; the rerun takes it', async (t) => {
  // strace injects the error into the first such call on the first pack, once. Linux reports a
  // writeback error once per open file: the fsync that followed on the same handle returned 0,
  // and the snapshot was committed over pages that may never have reached the disk.
  if (spawnSyncStatus('strace', ['-V']) !== 0) return t.skip('strace is not installed (apt-get install -y strace)');
  const img = join(tempDir(t), 'v.img');
  writeRandom(img, 112 * MiB);
  for (const call of ['fdatasync', 'fsync']) {
    const { dir, home } = await initHome(t);
    // Blocks of 16 MiB are appended through the page cache (past the direct-write slots), with a
    // writeback every 64 MiB.
    assert.equal((await cli(['volume', 'add', 'v', '--path', img, '--block-size', '16MiB', '--home', home])).code, 0);
    const pack = join(home, 'store', 'packs', '00000001.pack');
    const run = execFileSyncStatus('strace', ['-f', '-o', '/dev/null', '-P', pack, '-e', `trace=${call}`, '-e', `inject=${call}:error=EIO:when=1`, process.execPath, join(ROOT, 'dist', 'appliance', 'cli', 'bin.cjs'), 'snapshot', 'v', '--home', home, '--json']);
    assert.equal(run.status, 1, `${call}: ${run.stdout} ${run.stderr}`);
    assert.equal(JSON.parse(run.stdout).error.code, 'ERR_IO', run.stdout);
    assert.match(JSON.parse(run.stdout).error.message, /pack .*00000001\.pack/);
    assert.equal(await assertConsistent(home, 'v'), 0, `${call}: nothing committed`);
    const again = await cli(['snapshot', 'v', '--home', home, '--json']);
    assert.equal(again.code, 0, again.stderr);
    assert.equal(await assertConsistent(home, 'v'), 1);
    const out = join(dir, 'out.img');
    assert.equal((await cli(['restore', 'v', '--to', out, '--home', home])).code, 0);
    assert.ok(sameBytes(out, img), `${call}: the snapshot taken on the rerun restores byte for byte`);
  }
});

function spawnSyncStatus(cmd: string, args: string[]): number | null {
  return execFileSyncStatus(cmd, args).status;
}

function execFileSyncStatus(cmd: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const { NODE_EXTRA_CA_CERTS: _slow, ...env } = process.env; // parsed at every Node start (bin/appliance drops it too)
  const r = spawnSync(cmd, args, { encoding: 'utf8', env });
  return { status: r.error ? null : r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
}

test('bytes flipped in a pack: verify names the block and exits 1; restore refuses to write it', async (t) => {
  const { dir, home } = await initHome(t);
  const img = join(dir, 'vol.img');
  const data = randomBytes(6 * BS);
  writeFileSync(img, data);
  assert.equal((await cli(['volume', 'add', 'vol', '--path', img, '--home', home])).code, 0);
  const snap = await cliJson(['snapshot', 'vol', '--home', home]);
  assert.equal(snap.code, 0, snap.stderr);
  const victim = 3;
  const hash = hashBlock(data.subarray(victim * BS, (victim + 1) * BS));
  let flipped = false;
  for (const pack of packFiles(join(home, 'store'))) {
    const buf = readFileSync(pack);
    const at = buf.indexOf(hash);
    if (at < 0) continue;
    const fd = openSync(pack, 'r+');
    const pos = at + 32 + 1000; // inside the payload that follows the hash
    writeSync(fd, Buffer.from([buf[pos]! ^ 0xff]), 0, 1, pos);
    closeSync(fd);
    flipped = true;
    break;
  }
  assert.ok(flipped, 'found the block in a pack');

  const v = await cliJson(['verify', '--home', home]);
  assert.equal(v.code, 1);
  assert.equal(v.json.ok, false);
  assert.deepEqual(v.json.problems.map((p: any) => [p.code, p.hash, p.blockIndex, p.volume]), [['ERR_BLOCK_CORRUPT', hash.toString('hex'), victim, 'vol']]);
  const vt = await cli(['verify', 'vol', '--home', home]);
  assert.equal(vt.code, 1);
  assert.ok(vt.stdout.includes(hash.toString('hex')) && /block index 3/.test(vt.stdout), vt.stdout);

  // A new file: refused, and nothing left under the final name (nor a partial file).
  const out = join(dir, 'out.img');
  const r = await cliJson(['restore', 'vol', '--to', out, '--home', home]);
  assert.equal(r.code, 1);
  assert.equal(r.json.error.code, 'ERR_BLOCK_CORRUPT');
  assert.equal(r.json.error.details.index, victim);
  assert.match(r.json.error.message, /nothing was written to/);
  assert.equal(existsSync(out), false);
  assert.deepEqual(readdirSync(dir).filter((n) => n.includes('partial')), []);
  // An existing file that differs in the corrupt block: that block is never overwritten with bad data.
  const existing = join(dir, 'existing.img');
  const old = Buffer.alloc(6 * BS, 7);
  writeFileSync(existing, old);
  const r2 = await cliJson(['restore', 'vol', '--to', existing, '--home', home]);
  assert.equal(r2.json.error.code, 'ERR_BLOCK_CORRUPT');
  assert.match(r2.json.error.message, /partly restored: the blocks before block 3 hold the snapshot, the rest are as they were/);
  const after = readFileSync(existing);
  const block = (b: Buffer, i: number) => b.subarray(i * BS, (i + 1) * BS);
  assert.ok(block(after, victim).equals(block(old, victim)), 'the corrupt block is left as it was');
  for (let i = 0; i < 6; i++) {
    const want = i < victim ? block(data, i) : block(old, i);
    assert.ok(block(after, i).equals(want), `block ${i} is ${i < victim ? 'restored' : 'as it was'}, as the message says`);
  }
});

test('a second snapshot of a locked volume fails with ERR_VOLUME_LOCKED and changes nothing', async (t) => {
  const { dir, home } = await initHome(t);
  const img = join(dir, 'vol.img');
  writeRandom(img, 2 * BS);
  assert.equal((await cli(['volume', 'add', 'vol', '--path', img, '--home', home])).code, 0);
  // This test process stands for the first, still running snapshot: it holds the real lock.
  const release = acquireVolumeLock(join(home, 'locks'), 'vol', 'snapshot');
  try {
    const r = await cliJson(['snapshot', 'vol', '--home', home]);
    assert.equal(r.code, 1);
    assert.equal(r.json.error.code, 'ERR_VOLUME_LOCKED');
    assert.match(r.json.error.message, new RegExp(`pid ${process.pid}`));
    const rr = await cliJson(['restore', 'vol', '--to', join(dir, 'x.img'), '--home', home]);
    assert.equal(rr.json.error.code, 'ERR_VOLUME_LOCKED');
  } finally {
    release();
  }
  assert.equal((await cliJson(['snapshots', 'vol', '--home', home])).json.length, 0);
  assert.equal((await cli(['snapshot', 'vol', '--home', home])).code, 0, 'free again once released');

  // Two real CLI processes at once: exactly one snapshot wins, the other gets a clear error.
  writeRandom(img, 2 * BS);
  const [a, b] = await Promise.all([cliJson(['snapshot', 'vol', '--home', home]), cliJson(['snapshot', 'vol', '--home', home])]);
  const codes = [a, b].map((r) => (r.code === 0 ? 'ok' : r.json.error.code)).sort();
  assert.ok(codes.includes('ok') || codes.every((c) => c === 'ERR_VOLUME_LOCKED' || c === 'ERR_STORE_BUSY'), codes.join());
  for (const c of codes) assert.ok(['ok', 'ERR_VOLUME_LOCKED', 'ERR_STORE_BUSY'].includes(c), c);
  await assertConsistent(home, 'vol');
});

test('a command that finds the store held by another command waits for it and says so; held by a server, it is told to run again', async (t) => {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const img = join(dir, 'disk.img');
  writeRandom(img, 2 * BS);
  assert.equal((await cli(['volume', 'add', 'vol', '--path', img, '--home', home])).code, 0);
  assert.equal((await cli(['snapshot', 'vol', '--home', home])).code, 0);
  // This test process stands for a long command (a gc, a snapshot of another volume): it holds the store.
  const { Store } = await import('../../store/index.js');
  let held = await Store.open(join(home, 'store'));
  const child = spawnCli(['snapshots', 'vol', '--home', home, '--json']);
  const done = collect(child);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => void (stderr += d.toString()));
  for (let i = 0; i < 100 && !stderr.includes('waiting'); i++) await new Promise((r) => setTimeout(r, 100));
  assert.match(stderr, new RegExp(`note: the store is in use by pid ${process.pid}\\b.*waiting for it to finish`));
  assert.equal(child.exitCode, null, 'still waiting');
  await held.close();
  const r = await done;
  assert.equal(r.code, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).length, 1, 'it ran once the store was free');

  // A server of the home (run/server.json) holds the store, started after the command looked for
  // one to forward to (here: its listener is gone, so the command runs locally): a server does not
  // let go, so the command does not wait for it.
  held = await Store.open(join(home, 'store'));
  t.after(() => held.close());
  writeFileSync(join(home, 'run', 'server.json'), JSON.stringify({ pid: process.pid, url: 'https://127.0.0.1:1' }));
  const started = Date.now();
  const busy = await cliJson(['snapshots', 'vol', '--home', home]);
  assert.equal(busy.code, 1);
  assert.equal(busy.json.error.code, 'ERR_STORE_BUSY');
  assert.match(busy.json.error.message, /held by this home's server .*run the command again/);
  assert.ok(Date.now() - started < 5000, 'no wait');
});

/** Fill the filesystem at `mnt` with one file, until ENOSPC; returns the file (truncate it for space). */
function fillDisk(mnt: string): string {
  const filler = join(mnt, 'filler');
  const fd = openSync(filler, 'w');
  try {
    for (;;) writeSync(fd, Buffer.alloc(64 * KiB));
  } catch (e) {
    assert.equal((e as NodeJS.ErrnoException).code, 'ENOSPC');
  } finally {
    closeSync(fd);
  }
  return filler;
}

test('a volume lock on a full disk: ERR_DISK_FULL, no empty lock file left behind, and the lock is taken once there is space', (t) => {
  const mnt = smallTmpfs(t, '1m');
  if (!mnt) return;
  const locks = join(mnt, 'locks');
  const filler = fillDisk(mnt);
  assert.throws(() => acquireVolumeLock(locks, 'vol', 'sync'), (e: { code?: string; message?: string }) => e.code === 'ERR_DISK_FULL' && /lock of volume "vol"/.test(e.message ?? ''));
  assert.deepEqual(existsSync(locks) ? readdirSync(locks) : [], [], 'no lock file without its holder');
  execFileSync('truncate', ['-s', '0', filler]);
  const release = acquireVolumeLock(locks, 'vol', 'sync');
  assert.deepEqual(readdirSync(locks), ['vol.lock']);
  release();
});

test('init on a full disk: ERR_DISK_FULL, no temporary file left behind, and init succeeds once there is space', async (t) => {
  const mnt = smallTmpfs(t, '1m');
  if (!mnt) return;
  const filler = fillDisk(mnt);
  const home = join(mnt, 'home');
  const full = await cliJson(['init', '--home', home]);
  assert.equal(full.code, 1, full.stderr);
  assert.equal(full.json.error.code, 'ERR_DISK_FULL');
  const leftovers = (dir: string): string[] => readdirSync(dir, { recursive: true }).map(String).filter((f) => f.includes('.tmp-'));
  assert.deepEqual(leftovers(home), [], 'no half-written file');
  execFileSync('truncate', ['-s', '0', filler]);
  const again = await cliJson(['init', '--home', home]);
  assert.equal(again.code, 0, again.stderr);
  assert.deepEqual(leftovers(home), []);
});

test('a full disk: ERR_DISK_FULL, an intact store, and a rerun succeeds once there is space', async (t) => {
  const dir = tempDir(t);
  const mnt = smallTmpfs(t, '8m');
  if (!mnt) return;
  const home = join(mnt, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const img = join(dir, 'vol.img');
  writeRandom(img, 24 * MiB);
  assert.equal((await cli(['volume', 'add', 'vol', '--path', img, '--home', home])).code, 0);
  const r = await cliJson(['snapshot', 'vol', '--home', home]);
  assert.equal(r.code, 1, r.stdout);
  assert.equal(r.json.error.code, 'ERR_DISK_FULL');
  assert.match(r.json.error.message, /free space/);
  execFileSync('mount', ['-o', 'remount,size=64m', mnt]);
  assert.equal(await assertConsistent(home, 'vol'), 0, 'no snapshot half-present');
  const again = await cliJson(['snapshot', 'vol', '--home', home]);
  assert.equal(again.code, 0, again.stderr);
  const out = join(dir, 'out.img');
  assert.equal((await cli(['restore', 'vol', '--to', out, '--home', home])).code, 0);
  assert.ok(sameBytes(out, img));

  // A restore target on a full disk: a clear error, and no file left behind under any name.
  const targetDir = smallTmpfs(t, '4m')!;
  const full = await cliJson(['restore', 'vol', '--to', join(targetDir, 'out.img'), '--home', home]);
  assert.equal(full.code, 1, full.stdout);
  assert.equal(full.json.error.code, 'ERR_DISK_FULL');
  assert.match(full.json.error.message, /nothing was left at/);
  assert.deepEqual(readdirSync(targetDir), []);
});

test('a command whose awaited operation is dropped (its promise never settles) exits 1 with ERR_INTERNAL, not 0 in silence', async (t) => {
  const { home } = await initHome(t);
  const preload = join(ROOT, 'test', 'fixtures', 'drop-readdir.cjs');
  const r = await cli(['volume', 'list', '--home', home, '--json'], { env: { NODE_OPTIONS: `--require ${preload}` } });
  assert.equal(r.code, 1, `stdout=${r.stdout} stderr=${r.stderr}`);
  assert.equal(JSON.parse(r.stdout).error.code, 'ERR_INTERNAL');
  assert.match(r.stderr, /error ERR_INTERNAL: the command stopped before it finished/);
  // Unharmed, the same command succeeds.
  assert.equal((await cli(['volume', 'list', '--home', home])).code, 0);
});
