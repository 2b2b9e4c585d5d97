/**
 * Two real appliances on 127.0.0.1 (processes, port 0): push, incremental push, no-op sync,
 * dedup across volumes, dry run, reverse + apply (failback). Every count is read on the
 * receiving side (GET /v1/stats), not from the client's claim.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { deflateRawSync } from 'node:zlib';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { openSync, writeSync, closeSync, readdirSync, readFileSync, writeFileSync, rmSync, copyFileSync, truncateSync, statSync } from 'node:fs';
import { sameBytes, writeRandom } from '../helpers/files.js';
import { join } from 'node:path';
import { RemotePeer } from '../../api/client.js';
import { Store, diffBlock, hashBlock, ZERO_HASH } from '../../store/index.js';
import { snapshotPins } from '../../appliance/policy/apply.js';
import { from } from '../store/helpers.js';
import { cli, damageBlock, initHome, pair, startServe, tempDir, type Served, type TestHome } from '../helpers/appliance.js';
import { cli as cliText, loopDevice, smallTmpfs } from '../helpers/cli.js';

const BS = 64 * 1024;
const BLOCKS = 64;

/** Bytes in the pack files of a home's store. */
function packBytes(home: TestHome): number {
  const dir = join(home.dir, 'store', 'packs');
  return readdirSync(dir).reduce((n, f) => n + statSync(join(dir, f)).size, 0);
}

/** Overwrite 4 KiB inside each listed block (a small write, as a database would). */
function scribble(path: string, blocks: number[]): void {
  const fd = openSync(path, 'r+');
  try {
    for (const b of blocks) writeSync(fd, randomBytes(4096), 0, 4096, b * BS + 1000);
  } finally {
    closeSync(fd);
  }
}

interface Pair {
  dir: string;
  a: TestHome;
  b: TestHome;
  sb: Served;
  peerB: RemotePeer;
  img: string;
}

async function setup(t: Parameters<typeof tempDir>[0]): Promise<Pair> {
  const [a, b] = await Promise.all([initHome(t, 'onprem'), initHome(t, 'cloud')]);
  const sb = await startServe(t, b);
  await pair(a, 'cloud', b, sb);
  const peerB = new RemotePeer({ url: sb.url, token: b.token, fingerprint: b.fingerprint, name: 'cloud' });
  t.after(() => peerB.close());
  const dir = tempDir(t, 'tandem-sync-data-');
  const img = join(dir, 'disk.img');
  const data = randomBytes(BLOCKS * BS);
  data.fill(0, 8 * BS, 16 * BS); // 8 zero blocks: never sent
  writeFileSync(img, data);
  const add = await cli(a, 'volume', 'add', 'vol', '--path', img, '--block-size', '64KiB');
  assert.equal(add.code, 0, add.stderr);
  return { dir, a, b, sb, peerB, img };
}

async function restoredOnB(p: Pair, name: string, vol = 'vol'): Promise<Buffer> {
  const out = join(p.dir, name);
  const r = await cli(p.b, 'restore', vol, '--to', out);
  assert.equal(r.code, 0, r.stderr);
  return readFileSync(out);
}

test('push is byte-exact; an incremental push sends only the changed blocks; a no-op sync is one request; dry run sends nothing; shared blocks of two volumes are sent once', async (t) => {
  const p = await setup(t);
  const s0 = await p.peerB.stats();
  const first = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(first.code, 0, first.stderr);
  assert.equal(first.json.blocksSent, BLOCKS - 8);
  const s1 = await p.peerB.stats();
  assert.equal(s1.blocksReceived - s0.blocksReceived, BLOCKS - 8, 'the receiver got every non-zero block once');
  assert.ok((await restoredOnB(p, 'r1.img')).equals(readFileSync(p.img)), 'the replica is byte-exact');

  scribble(p.img, [3, 20, 63]);
  const s2 = await p.peerB.stats();
  const inc = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(inc.code, 0, inc.stderr);
  const s3 = await p.peerB.stats();
  assert.equal(s3.blocksReceived - s2.blocksReceived, 3, 'only the 3 changed blocks travel');
  assert.equal(inc.json.blocksSent, 3);
  // Each as the bytes that differ from the block it replaced, which the receiver holds: a 4 KiB
  // write at an offset of 1000 is 9 units of 512 bytes (4.5 KiB), not the 64 KiB block.
  assert.equal(s3.deltasReceived - s2.deltasReceived, 3, 'the 3 blocks came as deltas');
  assert.ok(inc.json.wireBytes < 3 * 6 * 1024, `block streams carried ${inc.json.wireBytes} bytes for 3 writes of 4 KiB`);
  assert.equal(s3.bytesReceived - s2.bytesReceived, 3 * BS, 'the receiver counts whole blocks built');
  // The lock, early sending's question and upload, and the commit with the nodes. The engine
  // asks nothing about the snapshot (taken just now), its nodes (those that differ from the
  // peer's latest go) or the blocks early sending saw stored: on a 50 ms link each would be 50 ms.
  assert.equal(s3.requests - s2.requests, 4, 'lock, blocks/has, blocks/put, commit with the nodes');
  assert.ok((await restoredOnB(p, 'r2.img')).equals(readFileSync(p.img)));

  const before = await p.peerB.stats();
  const noop = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(noop.code, 0, noop.stderr);
  const s4 = await p.peerB.stats();
  assert.equal(noop.json.upToDate, true);
  assert.equal(s4.requests - before.requests, 1, 'a no-op sync is one request (GET /v1/stats is not counted)');
  assert.equal(s4.blocksReceived, s3.blocksReceived);
  // The peer holds the volume as the no-op sync's own snapshot found it (the same tree as the
  // peer's latest, taken later): that is the recovery point status reports, not the peer's older one.
  assert.notEqual(noop.json.snapshot, inc.json.snapshot);
  const status = await cli(p.a, 'status', 'vol');
  assert.equal(status.code, 0, status.stderr);
  const point = status.json.volumes[0].lastReplicated;
  assert.equal(point.snapshot, noop.json.snapshot, 'the recovery point is the no-op sync\'s snapshot');
  assert.equal(point.at, (await cli(p.a, 'snapshots', 'vol')).json.find((x: { id: string }) => x.id === noop.json.snapshot).created);

  scribble(p.img, [30, 31]);
  const dry = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--dry-run');
  assert.equal(dry.code, 0, dry.stderr);
  assert.equal(dry.json.blocksSent, 2);
  assert.equal(dry.json.dryRun, true);
  // No rate for a dry run (it sends nothing), but how long its blocks would take: no replication
  // of the volume was measured here (a sync by hand records none), so at the default rate.
  assert.equal(dry.json.estimate.bytesPerSec, 20 * 1024 * 1024);
  assert.equal(dry.json.estimate.seconds, dry.json.bytesSent / (20 * 1024 * 1024));
  assert.match(dry.json.estimate.basis, /default rate/);
  const capped = await cliText(['--home', p.a.dir, 'sync', 'vol', '--peer', 'cloud', '--dry-run', '--bwlimit', '64KiB']);
  assert.match(capped.stdout, /no block sent; the blocks would take about \d+s at 64\.0 KiB\/s \(--bwlimit\)/, capped.stdout);
  const s5 = await p.peerB.stats();
  assert.equal(s5.blocksReceived, s4.blocksReceived, 'a dry run sends no block');
  assert.equal(s5.snapshotsCommitted, s4.snapshotsCommitted, 'a dry run commits nothing');

  // The no-op sync and the dry run put nothing on the peer: the push after them asks no more.
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const s5b = await p.peerB.stats();
  assert.equal(s5b.requests - s5.requests, 4, 'lock, blocks/has, blocks/put, commit with the nodes');
  assert.equal(s5b.blocksReceived - s5.blocksReceived, 2);

  // Another volume sharing all but one block with the first: only that block travels.
  const img2 = join(p.dir, 'clone.img');
  copyFileSync(p.img, img2);
  scribble(img2, [40]);
  assert.equal((await cli(p.a, 'volume', 'add', 'clone', '--path', img2, '--block-size', '64KiB')).code, 0);
  const s6 = await p.peerB.stats();
  const clone = await cli(p.a, 'sync', 'clone', '--peer', 'cloud');
  assert.equal(clone.code, 0, clone.stderr);
  const s7 = await p.peerB.stats();
  assert.equal(s7.blocksReceived - s6.blocksReceived, 1, 'blocks shared with another volume are not sent again');
  assert.ok((await restoredOnB(p, 'clone-r.img', 'clone')).equals(readFileSync(img2)));

  // The clone wiped: its tree is the zero root, with no node to send; it commits all the same.
  writeFileSync(img2, Buffer.alloc(BLOCKS * BS));
  const wiped = await cli(p.a, 'sync', 'clone', '--peer', 'cloud');
  assert.equal(wiped.code, 0, wiped.stderr);
  assert.equal(wiped.json.nodesSent, 0);
  assert.equal((await p.peerB.latestSnapshot('clone'))?.root, ZERO_HASH.toString('hex'));
  assert.ok((await restoredOnB(p, 'clone-z.img', 'clone')).equals(readFileSync(img2)));

  // The peer removed: what this appliance recorded of its copies goes with it. Status counts no
  // replica there, and the snapshots its sync bases kept are left to retention.
  const BASE = 'the common base of the next incremental sync with a peer';
  const reasons = async (): Promise<string[]> => {
    const store = await Store.open(join(p.a.dir, 'store'));
    try {
      return [...(await snapshotPins(store, 'vol')).values()].flat();
    } finally {
      await store.close();
    }
  };
  assert.ok((await reasons()).includes(BASE));
  assert.equal((await cli(p.a, 'peer', 'remove', 'cloud')).code, 0);
  const after = await cli(p.a, 'status');
  assert.deepEqual(after.json.volumes.map((v: { volume: string; lastReplicated: unknown }) => [v.volume, v.lastReplicated]), [['clone', null], ['vol', null]]);
  assert.ok(!(await reasons()).includes(BASE), 'no snapshot is kept for the removed peer');
});

test('reverse + apply is byte-exact after the local copy diverged or was replaced; the next push is incremental again', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const replica = readFileSync(p.img);

  scribble(p.img, [1, 2, 50, 51, 52]);
  const diverged = readFileSync(p.img);
  const back = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(back.code, 0, back.stderr);
  assert.equal(back.json.direction, 'pull');
  assert.equal(back.json.applied.verified, true);
  assert.equal(back.json.applied.blocksWritten, 5, 'only the diverged blocks are written');
  assert.ok(sameBytes(p.img, replica), 'the local volume is the replica again, byte for byte');
  // What the apply overwrote is kept: the volume as it was, restorable.
  const kept = back.json.applied.keptAs as string;
  assert.match(kept, /^\d{8}T/);
  const keptOut = join(p.dir, 'kept.img');
  const restored = await cli(p.a, 'restore', `vol@${kept}`, '--to', keptOut);
  assert.equal(restored.code, 0, restored.stderr);
  assert.ok(sameBytes(keptOut, diverged), 'the pre-apply snapshot holds the diverged volume, byte for byte');
  const snaps = await cli(p.a, 'snapshots', 'vol');
  assert.equal((snaps.json as Array<{ id: string; origin: string }>).find((x) => x.id === kept)?.origin, 'pre-apply');

  rmSync(p.img);
  const again = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(again.code, 0, again.stderr);
  assert.ok(sameBytes(p.img, replica), 'a replaced (missing) volume is recreated exactly');
  assert.equal(again.json.applied.keptAs, null, 'a missing volume had nothing to keep');

  const vols = await cli(p.a, 'volume', 'list');
  assert.equal(vols.code, 0, vols.stderr);
  assert.ok(!JSON.stringify(vols.json).includes('materializing'), 'the materializing mark is cleared');

  const s0 = await p.peerB.stats();
  const fwd = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(fwd.code, 0, fwd.stderr);
  assert.equal(fwd.json.upToDate, true);
  const s1 = await p.peerB.stats();
  assert.equal(s1.requests - s0.requests, 1, 'after failback the forward sync finds the common base at once');
});

/**
 * A program that writes the image through a shared mapping (mmap'd, its file descriptor closed:
 * no open file shows it in /proc, so the apply's in-use check passes) keeps writing random bytes
 * into block `block` until `seconds` have passed or it is killed. Python (ctypes): Node cannot map files.
 */
function startMappedWriter(t: Parameters<typeof tempDir>[0], path: string, block: number, seconds: number): ChildProcess {
  const script = [
    // libc's mmap through ctypes: Python's mmap module keeps a duplicate of the descriptor open.
    'import ctypes, os, time',
    'libc = ctypes.CDLL(None, use_errno=True)',
    'libc.mmap.restype = ctypes.c_void_p',
    'libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]',
    `fd = os.open(${JSON.stringify(path)}, os.O_RDWR)`,
    `size = ${(block + 1) * BS}`,
    'addr = libc.mmap(None, size, 3, 1, fd, 0)  # PROT_READ | PROT_WRITE, MAP_SHARED',
    'assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())',
    'os.close(fd)',
    'print("mapped", flush=True)',
    `end = time.time() + ${seconds}`,
    'while time.time() < end:',
    `    ctypes.memmove(addr + ${block * BS}, os.urandom(4096), 4096)`,
  ].join('\n');
  const child = spawn('python3', ['-c', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.after(() => void child.kill('SIGKILL'));
  return child;
}

test('reverse + apply whose read-back differs (a program writes the image meanwhile): ERR_VERIFY_FAILED (or ERR_IO naming the writer, when Linux reports the collision at the fsync), the read-back is not kept as a snapshot and the volume stays marked; a rerun once it stopped completes', { skip: spawnSync('python3', ['-c', 'import ctypes']).status !== 0 ? 'needs python3 (ctypes) for the writer' : false }, async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const replica = readFileSync(p.img);
  const snapsOf = async () => ((await cli(p.a, 'snapshots', 'vol')).json as Array<{ id: string; origin: string }>);
  let before: Awaited<ReturnType<typeof snapsOf>> = [];
  let failed: Awaited<ReturnType<typeof cli>> | undefined;
  // Up to 3 tries: on a loaded machine the writer may not run at all between the apply's write of
  // block 3 and its read-back, and the apply then verifies (CI saw it once); it is tried again.
  for (let attempt = 0; attempt < 3 && (failed === undefined || failed.code === 0); attempt++) {
    scribble(p.img, [3, 40]);
    before = await snapsOf();
    const writer = startMappedWriter(t, p.img, 3, 60);
    await once(writer.stdout!, 'data'); // mapped: writing from now on
    failed = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
    writer.kill('SIGKILL');
    await once(writer, 'close');
  }
  assert.ok(failed);
  assert.equal(failed.code, 1, failed.stderr);
  if (failed.json.error.code === 'ERR_IO') {
    // The other way Linux reports the writer: the page it dirtied collided with the apply's
    // direct write of block 3, and the apply's fsync got EIO (dmesg: "Page cache invalidation
    // failure on direct I/O"). Seen once in a full run; the error has to say so.
    assert.match(failed.json.error.message, /EIO: the disk failed a write, or a program wrote the image while it was being written/, failed.stderr);
  } else {
    assert.equal(failed.json.error.code, 'ERR_VERIFY_FAILED', failed.stderr);
  }
  const after = await snapsOf();
  assert.equal(after.filter((s) => s.origin === 'apply-verify').length, 0, 'the read-back is no point of the volume: not kept');
  assert.deepEqual(after.filter((s) => s.origin !== 'pre-apply').map((s) => s.id), before.map((s) => s.id), 'the latest snapshot is still the last real one');
  assert.ok((await localVolume(p)).materializing, 'the volume stays marked: no snapshot or push takes what it holds');
  const push = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.notEqual(push.code, 0, 'a push of a volume marked materializing is refused');

  const rerun = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(rerun.code, 0, rerun.stderr);
  assert.equal(rerun.json.applied.verified, true);
  assert.ok(sameBytes(p.img, replica), 'the rerun writes the replica, byte for byte');
  assert.equal((await localVolume(p)).materializing, undefined, 'and clears the mark');
});

/** The local volume's record as `volume list` shows it. */
async function localVolume(p: Pair, name = 'vol'): Promise<Record<string, unknown>> {
  const list = await cli(p.a, 'volume', 'list');
  assert.equal(list.code, 0, list.stderr);
  return (list.json as Array<Record<string, unknown>>).find((v) => v.name === name)!;
}

test('reverse + apply onto a volume of another size is refused before anything is written; --force resizes the image', async (t) => {
  const p = await setup(t);
  // The replica grows (the disk was enlarged where it ran): 16 more blocks, 4 of them written.
  truncateSync(p.img, (BLOCKS + 16) * BS);
  scribble(p.img, [BLOCKS + 2, BLOCKS + 3, BLOCKS + 9, BLOCKS + 15]);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const replica = readFileSync(p.img);
  // Here the volume is back at its old size, with other data.
  truncateSync(p.img, BLOCKS * BS);
  scribble(p.img, [5]);
  const local = readFileSync(p.img);

  const refused = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(refused.code, 1, refused.stderr);
  assert.equal(refused.json.error.code, 'ERR_VOLUME_SIZE_MISMATCH');
  assert.match(refused.json.error.message, /nothing was written.*--force/);
  assert.ok(sameBytes(p.img, local), 'the volume is untouched');
  assert.equal((await localVolume(p)).materializing, undefined, 'a refused apply leaves no materializing mark');
  const usage = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--force');
  assert.equal(usage.code, 2, usage.stderr);
  assert.equal(usage.json.error.code, 'ERR_USAGE');

  const forced = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply', '--force');
  assert.equal(forced.code, 0, forced.stderr);
  assert.equal(forced.json.applied.verified, true);
  assert.ok(sameBytes(p.img, replica), 'the image is resized and holds the replica, byte for byte');
  const keptOut = join(p.dir, 'kept.img');
  assert.equal((await cli(p.a, 'restore', `vol@${forced.json.applied.keptAs}`, '--to', keptOut)).code, 0);
  assert.ok(sameBytes(keptOut, local), 'the volume as it was before the resize is kept');
  const vol = await localVolume(p);
  assert.equal(vol.size, replica.length, 'the volume is registered with its new size');
  assert.equal(vol.materializing, undefined);
  const fwd = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(fwd.code, 0, fwd.stderr);
  assert.equal(fwd.json.upToDate, true, 'replication resumes from the applied snapshot');
});

test('reverse + apply onto a block device larger than the snapshot: refused, then with --force written onto its first bytes and verified there', { skip: process.getuid?.() !== 0 ? 'needs root for losetup' : false }, async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const replica = readFileSync(p.img);
  // A replacement disk, larger than the old one, holding something else.
  const backing = join(p.dir, 'new-disk.img');
  const other = randomBytes(BLOCKS * BS + 8 * BS);
  writeFileSync(backing, other);
  const dev = loopDevice(t, backing);
  if (dev === null) return;
  // The volume now names the new disk.
  assert.equal((await cli(p.a, 'volume', 'remove', 'vol')).code, 0);
  const add = await cli(p.a, 'volume', 'add', 'vol', '--path', dev, '--block-size', '64KiB');
  assert.equal(add.code, 0, add.stderr);

  const refused = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(refused.code, 1, refused.stderr);
  assert.equal(refused.json.error.code, 'ERR_VOLUME_SIZE_MISMATCH');
  assert.ok(sameBytes(dev, other), 'the device is untouched');
  assert.equal((await localVolume(p)).materializing, undefined);

  const forced = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply', '--force');
  assert.equal(forced.code, 0, forced.stderr);
  assert.equal(forced.json.applied.verified, true);
  const now = readFileSync(dev);
  assert.ok(now.subarray(0, replica.length).equals(replica), 'the snapshot is on the first bytes of the device');
  assert.ok(now.subarray(replica.length).equals(other.subarray(replica.length)), 'the bytes past it are untouched');
  assert.equal(statSync(backing).size, other.length);
});

test('failback to a rebuilt appliance: pull the replica, attach a new image to it with volume add, apply creates it byte for byte; replication resumes incrementally', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const replica = readFileSync(p.img);
  const c = await initHome(t, 'rebuilt');
  await pair(c, 'cloud', p.b, p.sb);

  const early = await cli(c, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(early.code, 1, early.stderr);
  assert.equal(early.json.error.code, 'ERR_VOLUME_NOT_FOUND');
  assert.match(early.json.error.message, /appliance sync vol --peer cloud --reverse`.*volume add vol --path/);
  const pulled = await cli(c, 'sync', 'vol', '--peer', 'cloud', '--reverse');
  assert.equal(pulled.code, 0, pulled.stderr);

  const img = join(p.dir, 'rebuilt-disk.img'); // a new image: does not exist yet
  const wrongBs = await cli(c, 'volume', 'add', 'vol', '--path', img, '--block-size', '4KiB');
  assert.equal(wrongBs.code, 2, wrongBs.stderr);
  assert.equal(wrongBs.json.error.code, 'ERR_USAGE');
  const noDir = await cli(c, 'volume', 'add', 'vol', '--path', join(p.dir, 'no-such-dir', 'x.img'));
  assert.equal(noDir.json.error.code, 'ERR_VOLUME_UNREADABLE');
  const adopt = await cli(c, 'volume', 'add', 'vol', '--path', img);
  assert.equal(adopt.code, 0, adopt.stderr);
  assert.equal(adopt.json.snapshotsKept, 1);
  assert.equal(adopt.json.blockSize, BS, 'the replica keeps its block size');
  const twice = await cli(c, 'volume', 'add', 'vol', '--path', p.img);
  assert.equal(twice.json.error.code, 'ERR_VOLUME_EXISTS', 'a volume with a path is not adopted again');

  const applied = await cli(c, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(applied.code, 0, applied.stderr);
  assert.equal(applied.json.applied.verified, true);
  assert.ok(sameBytes(img, replica), 'the new image holds the replica, byte for byte');

  const noop = await cli(c, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(noop.code, 0, noop.stderr);
  assert.equal(noop.json.upToDate, true);
  scribble(img, [4, 40]);
  const s0 = await p.peerB.stats();
  const inc = await cli(c, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(inc.code, 0, inc.stderr);
  const s1 = await p.peerB.stats();
  assert.equal(s1.blocksReceived - s0.blocksReceived, 2, 'replication from the rebuilt appliance is incremental');
  const old = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(old.json?.error?.code, 'ERR_VOLUME_NAME_TAKEN', 'the rebuilt appliance is the source now: the old one may not push over it');
});

test('a pull (failback) of a small change brings each changed block as the bytes that differ from the one the puller holds', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const c = await initHome(t, 'dr-copy');
  await pair(c, 'cloud', p.b, p.sb);
  const first = await cli(c, 'sync', 'vol', '--peer', 'cloud', '--reverse');
  assert.equal(first.code, 0, first.stderr);
  assert.ok(first.json.wireBytes > (BLOCKS - 8) * BS, 'nothing held yet: whole blocks');

  const was33 = Buffer.from(readFileSync(p.img).subarray(33 * BS, 34 * BS));
  scribble(p.img, [5, 33, 60]);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const s0 = await p.peerB.stats();
  const packs0 = packBytes(c);
  const pulled = await cli(c, 'sync', 'vol', '--peer', 'cloud', '--reverse');
  assert.equal(pulled.code, 0, pulled.stderr);
  const s1 = await p.peerB.stats();
  assert.equal(pulled.json.blocksSent, 3);
  assert.equal(s1.blocksSent - s0.blocksSent, 3, 'the peer served the 3 changed blocks');
  assert.ok(pulled.json.wireBytes < 3 * 6 * 1024, `the block stream carried ${pulled.json.wireBytes} bytes for 3 writes of 4 KiB`);
  // Stored as deltas too (store/README.md, "Delta records"): the puller's packs grew by about
  // the writes and a snapshot's worth of records, not by 3 blocks.
  const grew = packBytes(c) - packs0;
  assert.ok(grew < 3 * 8 * 1024, `the puller's packs grew by ${grew} bytes for 3 writes of 4 KiB`);
  const rootA = (await cli(p.a, 'snapshots', 'vol')).json.at(-1).root;
  assert.equal((await cli(c, 'snapshots', 'vol')).json.at(-1).root, rootA, 'the pulled snapshot is the pushed one');
  assert.equal((await cli(c, 'verify')).code, 0, 'every block built from a delta verifies');
  const out = join(p.dir, 'pulled.img');
  assert.equal((await cli(c, 'restore', 'vol', '--to', out)).code, 0);
  assert.ok(sameBytes(out, p.img), 'byte for byte');

  // A base the puller holds damaged (disk corruption here): the block it would build from it is
  // refused where it enters the store and fetched again whole. The puller holds block 33 as a
  // delta of what it was before: that earlier block, stored whole, is damaged.
  damageBlock(c, was33);
  scribble(p.img, [33, 61]);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const s2 = await p.peerB.stats();
  const again = await cli(c, 'sync', 'vol', '--peer', 'cloud', '--reverse');
  assert.equal(again.code, 0, again.stderr);
  const s3 = await p.peerB.stats();
  assert.equal(again.json.blocksSent, 2, 'the block fetched again counts once');
  assert.equal(again.json.bytesSent, 2 * BS);
  assert.equal(s3.blocksSent - s2.blocksSent, 3, 'the peer served 2 blocks, then the refused one again');
  assert.ok(again.json.wireBytes > BS, 'the block whose base is damaged came whole');
  const out2 = join(p.dir, 'pulled2.img');
  assert.equal((await cli(c, 'restore', 'vol', '--to', out2)).code, 0);
  assert.ok(sameBytes(out2, p.img), 'byte for byte');
});

test('writes of compressible data travel as deflated deltas both ways: a push and a pull (failback) carry about the deflated writes, not the patches', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const c = await initHome(t, 'dr-copy');
  await pair(c, 'cloud', p.b, p.sb);
  assert.equal((await cli(c, 'sync', 'vol', '--peer', 'cloud', '--reverse')).code, 0);

  // A database's rows: a page of text written into each of 3 blocks (whole units of 512 bytes:
  // the patches hold the rows only).
  const rows = (b: number) => Buffer.from(Array.from({ length: 200 }, (_, i) => `${b * 1000 + i},pending,${(i * 3.25).toFixed(2)},2026-12-06\n`).join('')).subarray(0, 4096);
  const fd = openSync(p.img, 'r+');
  for (const b of [5, 33, 60]) writeSync(fd, rows(b), 0, 4096, b * BS + 8192);
  closeSync(fd);
  const deflated = [5, 33, 60].reduce((n, b) => n + deflateRawSync(rows(b), { level: 1 }).length, 0);
  const patches = 3 * (32 + 4 + 8 + 4096); // what the plain delta frames' payloads would be
  assert.ok(deflated * 2 < patches, `the rows deflate to ${deflated} bytes`);

  const s0 = await p.peerB.stats();
  const push = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(push.code, 0, push.stderr);
  const s1 = await p.peerB.stats();
  assert.equal(s1.deltasReceived - s0.deltasReceived, 3);
  assert.ok(push.json.wireBytes < deflated + 3 * 200, `the push carried ${push.json.wireBytes} bytes (deflated rows ${deflated}, patches ${patches})`);
  const pull = await cli(c, 'sync', 'vol', '--peer', 'cloud', '--reverse');
  assert.equal(pull.code, 0, pull.stderr);
  assert.equal(pull.json.blocksSent, 3);
  assert.ok(pull.json.wireBytes < deflated + 3 * 200, `the pull carried ${pull.json.wireBytes} bytes (deflated rows ${deflated}, patches ${patches})`);
  for (const [home, name] of [[p.b, 'b.img'], [c, 'c.img']] as const) {
    const out = join(p.dir, name);
    assert.equal((await cli(home, 'restore', 'vol', '--to', out)).code, 0);
    assert.ok(sameBytes(out, p.img), `${name}: byte for byte`);
  }
});

test('blocks sent as deltas of a block the receiver lacks (a local snapshot never synced) are named in needWhole and sent again: the replica is exact', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  scribble(p.img, [2, 30]);
  assert.equal((await cli(p.a, 'snapshot', 'vol')).code, 0, 'a local snapshot: its blocks never reach the peer');
  scribble(p.img, [2, 30]);
  const s0 = await p.peerB.stats();
  const r = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(r.code, 0, r.stderr);
  const s1 = await p.peerB.stats();
  assert.equal(s1.blocksStored - s0.blocksStored, 2);
  // Sent during the scan as deltas of the local snapshot's blocks (which the peer lacks), then by
  // the engine as deltas of the last synced snapshot's (which it holds).
  assert.equal(s1.deltasReceived - s0.deltasReceived, 4, 'twice each: against the base the peer lacked, then the one it holds');
  assert.equal(r.json.blocksSent, 2, 'a block refused for its base and sent again counts once');
  assert.equal(r.json.bytesSent, 2 * BS);
  assert.ok((await restoredOnB(p, 'r.img')).equals(readFileSync(p.img)), 'byte-exact');
  assert.equal((await cli(p.b, 'verify')).code, 0);

  // A base the peer holds damaged (disk corruption there) is no base: the block goes whole.
  const img = readFileSync(p.img);
  damageBlock(p.b, img.subarray(40 * BS, 41 * BS));
  scribble(p.img, [40]);
  const s2 = await p.peerB.stats();
  const again = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(again.code, 0, again.stderr);
  const s3 = await p.peerB.stats();
  assert.equal(s3.blocksStored - s2.blocksStored, 1);
  assert.equal(s3.deltasReceived - s2.deltasReceived, 2, 'refused as a delta during the scan and by the engine; then sent whole');
  assert.ok(again.json.wireBytes > BS, 'the block went whole');
  assert.equal(again.json.blocksSent, 1, 'refused twice, sent whole: counted once');
  assert.equal(again.json.bytesSent, BS);
  const out = join(p.dir, 'r2.img');
  assert.equal((await cli(p.b, 'restore', 'vol', '--to', out)).code, 0);
  assert.ok(sameBytes(out, p.img), 'byte-exact');
});

test('sync --changed-blocks reads only the listed blocks: from the CLI and in a running appliance, the changed ones travel as deltas and the replica is exact', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const list = join(p.dir, 'changed.txt');
  const step = async (blocks: number[], listed: number[]) => {
    scribble(p.img, blocks);
    writeFileSync(list, listed.join('\n') + '\n');
    const s0 = await p.peerB.stats();
    const r = await cli(p.a, 'sync', 'vol', '--peer', 'cloud', '--changed-blocks', list);
    assert.equal(r.code, 0, r.stderr);
    const s1 = await p.peerB.stats();
    assert.equal(r.json.blocksSent, blocks.length);
    assert.equal(s1.blocksStored - s0.blocksStored, blocks.length, 'the changed blocks, not the listed one that did not change');
    assert.equal(s1.deltasReceived - s0.deltasReceived, blocks.length);
    assert.ok((await restoredOnB(p, `r${blocks[0]}.img`)).equals(readFileSync(p.img)), 'byte-exact');
  };
  await step([3, 20, 40], [3, 20, 40, 50]);
  // A running appliance runs it (the CLI forwards the command): its warm hash workers read the
  // listed blocks, and early sending sends them from the scan's buffers.
  await startServe(t, p.a);
  await step([5, 6, 63], [5, 6, 50, 63]);
  await step([7, 30], [7, 30]);
  assert.equal((await cli(p.b, 'verify')).code, 0);
  assert.equal((await cli(p.a, 'verify')).code, 0);
});

test('a push sends a block the sender holds as a delta of the block the peer holds as that delta, without reading the base: a damaged base there does not stop it', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const was20 = Buffer.from(readFileSync(p.img).subarray(20 * BS, 21 * BS));
  scribble(p.img, [20]);
  const snap = await cli(p.a, 'snapshot', 'vol');
  assert.equal(snap.code, 0, snap.stderr);
  assert.equal(snap.json.blocksStoredAsDeltas, 1, 'block 20 is held as a delta of what it was');
  // The base, stored whole on the sender, is damaged: a block read whole from it would be refused.
  damageBlock(p.a, was20);
  const s0 = await p.peerB.stats();
  const r = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(r.code, 0, r.stderr);
  const s1 = await p.peerB.stats();
  assert.equal(r.json.blocksSent, 1);
  assert.equal(s1.deltasReceived - s0.deltasReceived, 1, 'it went as the delta the sender holds');
  assert.ok(r.json.wireBytes < 16 * 1024, `${r.json.wireBytes} bytes on the wire for a 4 KiB write`);
  assert.ok((await restoredOnB(p, 'r20.img')).equals(readFileSync(p.img)), 'the peer built it from its own copy of the base: byte-exact');
  const v = await cli(p.a, 'verify');
  assert.notEqual(v.code, 0, 'the sender\'s damage is still found where it is');
});

test('a write into a zero block is stored as patches of zeros on both sides and travels as them', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const [a0, b0] = [packBytes(p.a), packBytes(p.b)];
  scribble(p.img, [9, 12]); // blocks 8 to 15 were zeros
  const r = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.json.blocksSent, 2);
  assert.ok(r.json.wireBytes < 2 * 8 * 1024 + 16 * 1024, `${r.json.wireBytes} bytes on the wire for two 4 KiB writes`);
  // Each side keeps ~4 KiB a block and a snapshot's worth of records, not 2 x 64 KiB.
  for (const [who, grew] of [['sender', packBytes(p.a) - a0], ['receiver', packBytes(p.b) - b0]] as const) {
    assert.ok(grew < 2 * 8 * 1024, `the ${who}'s packs grew by ${grew} bytes for two 4 KiB writes into zero blocks`);
  }
  assert.ok((await restoredOnB(p, 'sparse.img')).equals(readFileSync(p.img)), 'byte-exact');
  assert.equal((await cli(p.b, 'verify')).code, 0);
  assert.equal((await cli(p.a, 'verify')).code, 0);
});

test('a mostly empty volume: its first snapshot stores blocks of little data as patches of zeros; its first sync sends them deflated, and the receiver stores them as patches of zeros too', async (t) => {
  const p = await setup(t);
  // A freshly formatted disk: a few blocks of data throughout, most blocks zero, and blocks with
  // only a little data in them (bitmaps, directories, a superblock copy).
  const img = join(p.dir, 'thin.img');
  const data = Buffer.alloc(BLOCKS * BS);
  randomBytes(4 * BS).copy(data, 0);
  const little = [8, 9, 20, 33, 34, 47, 60, 63];
  for (const b of little) randomBytes(1024 + b * 16).copy(data, b * BS + (b % 4) * 4096);
  writeFileSync(img, data);
  assert.equal((await cli(p.a, 'volume', 'add', 'thin', '--path', img, '--block-size', '64KiB')).code, 0);
  const [a0, b0] = [packBytes(p.a), packBytes(p.b)];
  const snap = await cli(p.a, 'snapshot', 'thin');
  assert.equal(snap.code, 0, snap.stderr);
  assert.equal(snap.json.blocksStored, 4 + little.length);
  assert.equal(snap.json.blocksStoredAsDeltas, little.length, 'the blocks of little data are stored as patches of zeros');
  assert.ok(packBytes(p.a) - a0 < 4 * BS + little.length * 4 * 1024, `the packs grew by ${packBytes(p.a) - a0} bytes`);
  assert.equal((await cli(p.a, 'verify', 'thin')).code, 0);

  const s0 = await p.peerB.stats();
  const r = await cli(p.a, 'sync', 'thin', '--peer', 'cloud');
  assert.equal(r.code, 0, r.stderr);
  const s1 = await p.peerB.stats();
  assert.equal(s1.blocksReceived - s0.blocksReceived, 4 + little.length);
  assert.equal(s1.deltasReceived - s0.deltasReceived, 0, 'whole blocks, deflated');
  assert.ok(r.json.wireBytes < 4 * BS + little.length * 3 * 1024, `block streams carried ${r.json.wireBytes} bytes`);
  assert.ok(packBytes(p.b) - b0 < 4 * BS + little.length * 4 * 1024, `the receiver's packs grew by ${packBytes(p.b) - b0} bytes`);
  assert.ok((await restoredOnB(p, 'thin.img', 'thin')).equals(data), 'byte-exact');
  assert.equal((await cli(p.b, 'verify')).code, 0);
});

test('a peer not known to take delta frames (no answer yet, or an older release) gets a block with a base whole, and a stored delta is refused before it is sent: ERR_PEER_PROTOCOL', async (t) => {
  const p = await setup(t);
  // A client that has had no answer yet does not know what the peer takes: as after an answer
  // of a release without block deltas.
  const fresh = () => {
    const c = new RemotePeer({ url: p.sb.url, token: p.b.token, fingerprint: p.b.fingerprint, name: 'cloud' });
    t.after(() => c.close());
    return c;
  };
  const base = randomBytes(BS);
  const block = Buffer.from(base);
  randomBytes(100).copy(block, 5000);
  const s0 = await p.peerB.stats();
  const r = await fresh().putBlocks(from([{ hash: hashBlock(block), data: block, base: { hash: hashBlock(base), data: base } }]));
  assert.equal(r.stored, 1);
  const s1 = await p.peerB.stats();
  assert.equal(s1.blocksReceived - s0.blocksReceived, 1);
  assert.equal(s1.deltasReceived - s0.deltasReceived, 0, 'sent whole: the peer may not build it');

  const other = Buffer.from(base);
  randomBytes(100).copy(other, 9000);
  const patches = diffBlock(other, hashBlock(base), base)!.subarray(32);
  const stored = { hash: hashBlock(other), data: patches, delta: { base: hashBlock(base), length: BS } };
  await assert.rejects(fresh().putBlocks(from([stored])), { code: 'ERR_PEER_PROTOCOL', message: /stopped taking delta frames/ });
  const s2 = await p.peerB.stats();
  assert.equal(s2.blocksReceived - s1.blocksReceived, 0, 'nothing of it stored');
  assert.equal((await fresh().hasBlocks([hashBlock(other)]))[0], false);
});

test('two appliances with volumes of the same name: the second one\'s push is refused before anything is committed; volume remove on the receiver frees the name', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const site2 = await initHome(t, 'site2');
  await pair(site2, 'cloud', p.b, p.sb);
  const img2 = join(p.dir, 'site2.img');
  writeRandom(img2, BLOCKS * BS);
  assert.equal((await cli(site2, 'volume', 'add', 'vol', '--path', img2, '--block-size', '64KiB')).code, 0);
  const before = await cli(p.b, 'snapshots', 'vol');
  const taken = await cli(site2, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(taken.code, 1, taken.stderr);
  assert.equal(taken.json.error.code, 'ERR_VOLUME_NAME_TAKEN');
  assert.match(taken.json.error.message, /another name/);
  assert.deepEqual((await cli(p.b, 'snapshots', 'vol')).json, before.json, 'nothing was committed');
  assert.ok((await restoredOnB(p, 'still-a.img')).equals(readFileSync(p.img)), "the receiver's volume is still the first appliance's");
  // The first appliance goes on as before.
  scribble(p.img, [9]);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);

  assert.equal((await cli(p.b, 'volume', 'remove', 'vol')).code, 0);
  const now = await cli(site2, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(now.code, 0, now.stderr);
  assert.ok((await restoredOnB(p, 'site2-r.img')).equals(readFileSync(img2)));
});

test('failback onto a disk of unrelated data with no room to keep it: refused with ERR_DISK_FULL before anything is written; --no-keep overwrites it', async (t) => {
  const mnt = smallTmpfs(t, '12m');
  if (!mnt) return;
  const b = await initHome(t, 'cloud');
  const sb = await startServe(t, b);
  const init = await cli(join(mnt, 'home'), 'init', '--name', 'onprem');
  assert.equal(init.code, 0, init.stderr);
  const a: TestHome = { dir: join(mnt, 'home'), name: 'onprem', token: init.json.token, fingerprint: init.json.fingerprint };
  await pair(a, 'cloud', b, sb);
  const img = join(tempDir(t, 'tandem-keep-'), 'disk.img');
  const replica = randomBytes(128 * BS); // 8 MiB: the on-prem store on 12 MiB holds it once, not twice
  writeFileSync(img, replica);
  assert.equal((await cli(a, 'volume', 'add', 'vol', '--path', img, '--block-size', '64KiB')).code, 0);
  const first = await cli(a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(first.code, 0, first.stderr);
  const other = randomBytes(replica.length); // the disk now holds something else entirely
  writeFileSync(img, other);

  const full = await cli(a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply');
  assert.equal(full.code, 1, full.stderr);
  assert.equal(full.json.error.code, 'ERR_DISK_FULL');
  assert.match(full.json.error.message, /nothing was written.*--no-keep/);
  assert.ok(sameBytes(img, other), 'the volume is untouched');
  const list = await cli(a, 'volume', 'list');
  assert.equal(list.code, 0, `${list.stderr} ${list.stdout}`);
  assert.equal((list.json as Array<{ materializing?: unknown }>)[0]!.materializing, undefined);
  assert.equal((await cli(a, 'verify')).code, 0, 'the store is intact');

  const noKeep = await cli(a, 'sync', 'vol', '--peer', 'cloud', '--reverse', '--apply', '--no-keep');
  assert.equal(noKeep.code, 0, noKeep.stderr);
  assert.equal(noKeep.json.applied.keptAs, null);
  assert.ok(sameBytes(img, replica), 'the replica is written over it, byte for byte');
  const misuse = await cli(a, 'sync', 'vol', '--peer', 'cloud', '--no-keep');
  assert.equal(misuse.json.error.code, 'ERR_USAGE');
});

test('a push that finds the peer up to date dates the recovery point there: the receiver\'s status counts from the snapshot the source took, not from the last change; a date ahead of the receiver or before its snapshot is ignored', async (t) => {
  const p = await setup(t);
  assert.equal((await cli(p.a, 'sync', 'vol', '--peer', 'cloud')).code, 0);
  const first = ((await cli(p.b, 'status', 'vol')).json.volumes as Array<{ lastReplicated: { at: string } }>)[0]!.lastReplicated.at;
  await new Promise((r) => setTimeout(r, 1100));
  const again = await cli(p.a, 'sync', 'vol', '--peer', 'cloud');
  assert.equal(again.code, 0, again.stderr);
  assert.equal(again.json.upToDate, true);
  const taken = ((await cli(p.a, 'snapshots', 'vol')).json as Array<{ created: string }>).at(-1)!.created;
  const st = ((await cli(p.b, 'status', 'vol')).json.volumes as Array<{ lastReplicated: { at: string }; rpoAgeMs: number | null }>)[0]!;
  assert.equal(st.lastReplicated.at, taken, 'dated by the no-op push\'s snapshot');
  assert.ok(st.lastReplicated.at > first);
  // A date past the receiver's clock (by more than a minute) or before the snapshot it has is ignored.
  const latest = (await p.peerB.latestSnapshot('vol'))!;
  const aId = (JSON.parse(readFileSync(join(p.a.dir, 'appliance.json'), 'utf8')) as { id: string }).id;
  for (const pointAt of [new Date(Date.now() + 3_600_000).toISOString(), new Date(Date.parse(latest.created) - 1000).toISOString(), 'yesterday']) {
    const lock = await p.peerB.lockVolume('vol', aId, { ifRoot: latest.root, pointAt });
    assert.equal(lock.upToDate, true);
  }
  const unchanged = ((await cli(p.b, 'status', 'vol')).json.volumes as Array<{ lastReplicated: { at: string } }>)[0]!.lastReplicated.at;
  assert.equal(unchanged, taken);
});
