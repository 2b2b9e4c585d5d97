/** Snapshot and restore through the real CLI: byte-exact, sparse, incremental in both directions. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, readFileSync, openSync, writeSync, closeSync, statSync, existsSync, truncateSync, readSync, readdirSync, lstatSync, symlinkSync, linkSync, mkdirSync, chmodSync } from 'node:fs';
import { readFull, sameBytes, writeRandom } from '../helpers/files.js';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { execFileSync, spawn } from 'node:child_process';
import { cli, cliJson, collect, loopDevice, spawnCli, tempDir, untilWritten } from '../helpers/cli.js';
import { damageBlock } from '../helpers/appliance.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 512 * KiB;

function readdirSafe(path: string): string[] {
  try {
    return readdirSync(path);
  } catch {
    return [];
  }
}

/**
 * Change `len` bytes at `pos` in a file: each is inverted, so every one of them differs (random
 * bytes would leave a 1-byte change the same one time in 256).
 */
function scribble(path: string, pos: number, len: number): void {
  const fd = openSync(path, 'r+');
  try {
    const old = Buffer.alloc(len);
    readSync(fd, old, 0, len, pos);
    writeSync(fd, old.map((b) => ~b & 0xff), 0, len, pos);
  } finally {
    closeSync(fd);
  }
}

async function setup(t: { after(fn: () => void): void }, size: number) {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const img = join(dir, 'vol.img');
  const data = randomBytes(size);
  // A zero region in the middle: zero blocks are never stored and restore as holes.
  data.fill(0, 2 * BS, 4 * BS);
  writeFileSync(img, data);
  const add = await cli(['volume', 'add', 'vol', '--path', img, '--home', home]);
  assert.equal(add.code, 0, add.stderr);
  return { dir, home, img };
}

test('snapshot then restore is byte-exact (size not a multiple of the block size); old snapshots restore exactly after newer ones and after gc', async (t) => {
  const { dir, home, img } = await setup(t, 6 * BS + 12345);
  const s1 = await cliJson(['snapshot', 'vol', '--home', home]);
  assert.equal(s1.code, 0, s1.stderr);
  assert.equal(s1.json.snapshot.size, 6 * BS + 12345);
  assert.equal(s1.json.blocksStored, 5, '7 blocks, 2 of them zero');
  const v1 = readFileSync(img);

  scribble(img, BS + 100, 4096);
  scribble(img, 6 * BS + 10, 100); // the short last block
  const s2 = await cliJson(['snapshot', 'vol', '--home', home]);
  assert.equal(s2.code, 0, s2.stderr);
  assert.equal(s2.json.snapshot.parent, s1.json.snapshot.id);
  assert.equal(s2.json.blocksStored, 2);
  const v2 = readFileSync(img);

  // A text snapshot prints just the id on stdout.
  scribble(img, 0, 10);
  const s3 = await cli(['snapshot', 'vol', '--home', home]);
  assert.equal(s3.code, 0, s3.stderr);
  const id3 = s3.stdout.trim();
  assert.match(id3, /^\S+$/);
  const v3 = readFileSync(img);

  const list = await cliJson(['snapshots', 'vol', '--home', home]);
  assert.deepEqual(list.json.map((s: any) => s.id), [s1.json.snapshot.id, s2.json.snapshot.id, id3]);

  // Garbage from another volume, then gc: the retained snapshots must not lose a block.
  const other = join(dir, 'other.img');
  writeRandom(other, 3 * BS);
  assert.equal((await cli(['volume', 'add', 'other', '--path', other, '--home', home])).code, 0);
  assert.equal((await cli(['snapshot', 'other', '--home', home])).code, 0);
  assert.equal((await cli(['volume', 'remove', 'other', '--home', home])).code, 0);
  const gc = await cliJson(['gc', '--home', home]);
  assert.equal(gc.code, 0, gc.stderr);
  assert.equal(gc.json.blocksRemoved, 3);

  for (const [spec, want] of [[`vol@${s1.json.snapshot.id}`, v1], [`vol@${s2.json.snapshot.id}`, v2], ['vol', v3]] as const) {
    const out = join(dir, `out-${spec.replace('@', '-')}.img`);
    const r = await cliJson(['restore', spec, '--to', out, '--home', home]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.json.blocksCompared, 0, 'a new file is not read');
    assert.ok(sameBytes(out, want), `${spec} restores byte-exact`);
    assert.ok(statSync(out).blocks * 512 <= want.length - 2 * BS + 64 * KiB, 'zero blocks are holes');
  }
  const verify = await cliJson(['verify', '--home', home]);
  assert.equal(verify.code, 0, verify.stdout);
  assert.equal(verify.json.problems.length, 0);
  // The same at a quarter of what it read a second: it takes about four seconds, not less.
  const rate = Math.ceil(verify.json.bytes / 4);
  const t0 = Date.now();
  const slow = await cliJson(['verify', '--bwlimit', String(rate), '--home', home]);
  assert.equal(slow.code, 0, slow.stderr);
  assert.equal(slow.json.bytes, verify.json.bytes);
  assert.ok(Date.now() - t0 >= 3900, `verify --bwlimit took ${Date.now() - t0} ms for ${slow.json.bytes} bytes at ${rate} B/s`);
});

test('restore onto an existing file writes only the differing blocks; other sizes need --force', async (t) => {
  const { dir, home, img } = await setup(t, 8 * BS);
  assert.equal((await cli(['snapshot', 'vol', '--home', home])).code, 0);
  const want = readFileSync(img);
  const out = join(dir, 'copy.img');
  writeFileSync(out, want);
  scribble(out, 0, 1);
  scribble(out, 5 * BS + 7, 4096);
  scribble(out, 2 * BS + 1, 10); // a block that must be zero again
  const r = await cliJson(['restore', 'vol', '--to', out, '--home', home]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.json.blocksCompared, 8);
  assert.equal(r.json.blocksWritten, 2);
  assert.equal(r.json.blocksZeroed, 1);
  assert.ok(sameBytes(out, want));
  const again = await cliJson(['restore', 'vol', '--to', out, '--home', home]);
  assert.equal(again.json.blocksWritten + again.json.blocksZeroed, 0, 'nothing differs any more');

  truncateSync(out, 3 * BS);
  const refused = await cliJson(['restore', 'vol', '--to', out, '--home', home]);
  assert.equal(refused.code, 1);
  assert.equal(refused.json.error.code, 'ERR_VOLUME_SIZE_MISMATCH');
  assert.equal(statSync(out).size, 3 * BS, 'a refused restore changes nothing');
  const forced = await cliJson(['restore', 'vol', '--to', out, '--force', '--home', home]);
  assert.equal(forced.code, 0, forced.stderr);
  assert.ok(sameBytes(out, want));

  const missingDir = await cliJson(['restore', 'vol', '--to', join(dir, 'nope', 'x.img'), '--home', home]);
  assert.equal(missingDir.json.error.code, 'ERR_VOLUME_UNREADABLE');
  const ontoDir = await cliJson(['restore', 'vol', '--to', dir, '--home', home]);
  assert.equal(ontoDir.json.error.code, 'ERR_VOLUME_UNREADABLE');
  assert.match(ontoDir.json.error.message, /cannot write a volume to .*not a regular file or a block device/);
  const badSnap = await cliJson(['restore', 'vol@nope', '--to', join(dir, 'y.img'), '--home', home]);
  assert.equal(badSnap.json.error.code, 'ERR_SNAPSHOT_NOT_FOUND');
  assert.equal(existsSync(join(dir, 'y.img')), false);
});

test("another volume's image is not overwritten by a restore, nor registered twice: under any name it has, unless --force", async (t) => {
  const { dir, home, img } = await setup(t, 4 * BS);
  assert.equal((await cli(['snapshot', 'vol', '--home', home])).code, 0);
  const other = join(dir, 'other.img');
  const otherData = randomBytes(4 * BS);
  writeFileSync(other, otherData);
  assert.equal((await cli(['volume', 'add', 'other', '--path', other, '--home', home])).code, 0);
  const s = await cliJson(['snapshot', 'other', '--home', home]);
  assert.equal(s.code, 0, s.stderr);
  const link = join(dir, 'by-id-other');
  symlinkSync(other, link);
  const hard = join(dir, 'other-hardlink.img');
  linkSync(other, hard);

  for (const to of [other, link, hard]) {
    const refused = await cliJson(['restore', 'vol', '--to', to, '--home', home]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.equal(refused.json.error.code, 'ERR_VOLUME_IN_USE');
    assert.match(refused.json.error.message, /of volume "other": restoring vol@\S+ onto it would replace other's data; nothing was written.*--force/);
    assert.ok(sameBytes(other, otherData), `a restore to ${to} wrote nothing`);
  }
  for (const path of [other, link, img]) {
    const twice = await cliJson(['volume', 'add', 'again', '--path', path, '--home', home]);
    assert.equal(twice.code, 1, twice.stderr);
    assert.equal(twice.json.error.code, 'ERR_VOLUME_EXISTS');
    assert.match(twice.json.error.message, /is already protected as volume "(other|vol)"/);
  }
  assert.deepEqual((await cliJson(['volume', 'list', '--home', home])).json.map((v: { name: string }) => v.name).sort(), ['other', 'vol']);

  // With --force the operator means it: written, and marked while it is, under other's lock.
  const forced = await cliJson(['restore', 'vol', '--to', link, '--force', '--home', home]);
  assert.equal(forced.code, 0, forced.stderr);
  assert.ok(sameBytes(other, img));
  const vols = (await cliJson(['volume', 'list', '--home', home])).json as { name: string; materializing?: unknown; snapshots: number }[];
  assert.equal(vols.find((v) => v.name === 'other')?.materializing, undefined, 'the mark is cleared');
  assert.equal(vols.find((v) => v.name === 'other')?.snapshots, 1, "other's snapshots are kept");
  const back = await cliJson(['restore', `other@${s.json.snapshot.id}`, '--to', other, '--home', home]);
  assert.equal(back.code, 0, back.stderr);
  assert.ok(sameBytes(other, otherData));
});

test('--changed-blocks reads only the listed blocks; a malformed file changes nothing', async (t) => {
  const { dir, home, img } = await setup(t, 10 * BS);
  const cb = join(dir, 'changed.txt');
  writeFileSync(cb, '1\n');
  const first = await cliJson(['snapshot', 'vol', '--changed-blocks', cb, '--home', home]);
  assert.equal(first.code, 0, first.stderr);
  assert.equal(first.json.snapshot.origin, 'scan', 'no parent: a full scan');
  assert.match(first.stderr, /reading it all/);

  scribble(img, 7 * BS + 3, 4096);
  scribble(img, 9 * BS - 2, 4); // straddles blocks 8 and 9
  writeFileSync(cb, `# from the tracker\n7\nbytes ${9 * BS - 2}+4\n`);
  const inc = await cliJson(['snapshot', 'vol', '--changed-blocks', cb, '--home', home]);
  assert.equal(inc.code, 0, inc.stderr);
  assert.equal(inc.json.snapshot.origin, 'changed-blocks');
  assert.equal(inc.json.bytesRead, 3 * BS, 'only blocks 7, 8 and 9 were read');
  const out = join(dir, 'out.img');
  assert.equal((await cli(['restore', 'vol', '--to', out, '--home', home])).code, 0);
  assert.ok(sameBytes(out, img));

  writeFileSync(cb, '3\n10\n');
  const bad = await cliJson(['snapshot', 'vol', '--changed-blocks', cb, '--home', home]);
  assert.equal(bad.code, 2);
  assert.equal(bad.json.error.code, 'ERR_CHANGED_BLOCKS_INVALID');
  assert.match(bad.json.error.message, /line 2/);
  assert.equal((await cliJson(['snapshots', 'vol', '--home', home])).json.length, 2, 'no snapshot was added');
});

test('a sparse image\'s hole map (a perl or python3 start) is made only for a snapshot that reads the volume whole: not for volume add, a change list, or doctor', async (t) => {
  const programs = ['perl', 'python3'].map((p) => [p, execFileSync('sh', ['-c', `command -v ${p} || true`], { encoding: 'utf8' }).trim()] as const).filter(([, real]) => real !== '');
  if (programs.length === 0) return t.skip('neither perl nor python3: no hole map is made here');
  const dir = tempDir(t);
  // A perl and a python3 first on PATH that note each start, then run the real one.
  const bin = join(dir, 'bin');
  const log = join(dir, 'starts.log');
  mkdirSync(bin);
  for (const [name, real] of programs) {
    writeFileSync(join(bin, name), `#!/bin/sh\necho ${name} >> "${log}"\nexec "${real}" "$@"\n`);
    chmodSync(join(bin, name), 0o755);
  }
  const env = { PATH: `${bin}:${process.env.PATH}` };
  const starts = () => (existsSync(log) ? readFileSync(log, 'utf8').split('\n').filter(Boolean).length : 0);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const img = join(dir, 'sparse.img');
  writeFileSync(img, '');
  // 256 MiB with a few bytes written: a hole map is made past 64 MiB of unallocated bytes
  // (SPARSE_SLACK, appliance/volumes/file.ts), so this is four times that.
  truncateSync(img, 256 * MiB);
  scribble(img, 3 * BS, 100);
  assert.equal((await cli(['volume', 'add', 'v', '--path', img, '--home', home], { env })).code, 0);
  assert.equal(starts(), 0, 'volume add reads the size only');
  const first = await cliJson(['snapshot', 'v', '--home', home], { env });
  assert.equal(first.code, 0, first.stderr);
  assert.equal(starts(), 1, 'a full scan maps the holes');
  const cb = join(dir, 'changed.txt');
  scribble(img, 5 * BS, 100);
  writeFileSync(cb, '5\n');
  const listed = await cliJson(['snapshot', 'v', '--changed-blocks', cb, '--home', home], { env });
  assert.equal(listed.code, 0, listed.stderr);
  assert.equal(listed.json.bytesRead, BS);
  assert.equal(starts(), 1, 'a change list reads its blocks only');
  assert.equal((await cli(['doctor', '--home', home], { env })).code === 2, false);
  assert.equal(starts(), 1, 'doctor reads the size only');
  const out = join(dir, 'out.img');
  assert.equal((await cli(['restore', 'v', '--to', out, '--home', home])).code, 0);
  assert.ok(sameBytes(out, img));
});

test('a 64 GiB sparse volume with a few non-zero blocks snapshots fast, stores only those blocks and restores sparse', async (t) => {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const img = join(dir, 'big.img');
  const size = 64 * 1024 * MiB;
  writeFileSync(img, '');
  truncateSync(img, size);
  const spots = [0, 1234 * BS + 17, size - 100];
  for (const p of spots) scribble(img, p, 50);
  assert.equal((await cli(['volume', 'add', 'big', '--path', img, '--home', home])).code, 0);
  const started = Date.now();
  const s = await cliJson(['snapshot', 'big', '--home', home]);
  const secs = (Date.now() - started) / 1000;
  assert.equal(s.code, 0, s.stderr);
  assert.equal(s.json.blocksStored, 3);
  assert.equal(s.json.snapshot.nonZeroBlocks, 3);
  assert.ok(secs < 120, `64 GiB sparse snapshot took ${secs}s`);
  assert.ok(s.json.bytesRead <= 6 * 8 * MiB, `read ${s.json.bytesRead} bytes: the chunks with data, not the holes`);
  const storeBytes = duBytes(join(home, 'store'));
  assert.ok(storeBytes < 32 * MiB, `store holds ${storeBytes} bytes for 3 blocks`);

  // Rescan after a block got data and another became a hole again (punched, when the tool exists).
  const moreSpots = [...spots, 40_000 * BS + 3];
  scribble(img, moreSpots[3]!, 50);
  let punched = false;
  try {
    execFileSync('fallocate', ['--punch-hole', '--offset', String(1234 * BS), '--length', String(BS), img]);
    punched = true;
  } catch {
    /* no fallocate here: the rescan still has one new block to find */
  }
  const s2 = await cliJson(['snapshot', 'big', '--home', home]);
  assert.equal(s2.code, 0, s2.stderr);
  assert.equal(s2.json.snapshot.nonZeroBlocks, punched ? 3 : 4);
  assert.equal(s2.json.snapshot.parent, s.json.snapshot.id);

  const out = join(dir, 'out.img');
  const r = await cliJson(['restore', 'big', '--to', out, '--home', home]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.json.blocksWritten, punched ? 3 : 4);
  assert.equal(statSync(out).size, size);
  assert.ok(statSync(out).blocks * 512 <= 3 * BS + 64 * KiB, 'restored as a sparse file');
  const a = openSync(out, 'r');
  const b = openSync(img, 'r');
  try {
    for (const p of moreSpots) {
      const start = Math.floor(p / BS) * BS;
      const x = Buffer.alloc(Math.min(BS, size - start));
      const y = Buffer.alloc(x.length);
      readFull(a, x, start);
      readFull(b, y, start);
      assert.ok(x.equals(y), `block at ${start}`);
    }
  } finally {
    closeSync(a);
    closeSync(b);
  }

  // Restored onto that sparse image after one more change: only the chunks of the target that
  // hold data are read (its holes are not: reading all 64 GiB took minutes for 1 TiB), one block written.
  const changed = 50_000 * BS + 9;
  scribble(img, changed, 50);
  assert.equal((await cliJson(['snapshot', 'big', '--home', home])).code, 0);
  const onto = await cliJson(['restore', 'big', '--to', out, '--home', home]);
  assert.equal(onto.code, 0, onto.stderr);
  assert.equal(onto.json.blocksCompared, size / BS);
  assert.equal(onto.json.blocksWritten, 1);
  assert.ok(onto.json.bytesRead <= 6 * 8 * MiB, `read ${onto.json.bytesRead} bytes of the target, in its chunks with data`);
  const x = Buffer.alloc(BS);
  const y = Buffer.alloc(BS);
  const fa = openSync(out, 'r');
  const fb = openSync(img, 'r');
  try {
    readFull(fa, x, 50_000 * BS);
    readFull(fb, y, 50_000 * BS);
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
  assert.ok(x.equals(y), 'the changed block was written');
});

/** Bytes allocated under a directory (like du). */
function duBytes(dir: string): number {
  let total = 0;
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    const st = lstatSync(p);
    total += st.isDirectory() ? duBytes(p) : st.blocks * 512;
  }
  return total;
}

test('a block device: snapshot reads it read-only with its real size, past the page cache; restore writes back only the changed blocks', { skip: process.getuid?.() !== 0 ? 'needs root for losetup' : false }, async (t) => {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const backing = join(dir, 'backing.img');
  const data = randomBytes(6 * BS + 8192); // a short last block, read directly too
  writeFileSync(backing, data);
  const dev = loopDevice(t, backing);
  if (dev === null) return;
  const add = await cliJson(['volume', 'add', 'disk', '--path', dev, '--home', home]);
  assert.equal(add.code, 0, add.stderr);
  assert.equal(add.json.size, data.length);
  const s = await cliJson(['snapshot', 'disk', '--home', home]);
  assert.equal(s.code, 0, s.stderr);
  assert.equal(s.json.bytesReadDirect, data.length, 'every byte of the device was read with O_DIRECT');
  assert.match(s.stderr, /past the page cache/);
  const out = join(dir, 'out.img');
  assert.equal((await cli(['restore', 'disk', '--to', out, '--home', home])).code, 0);
  assert.ok(sameBytes(out, data));

  // A re-snapshot (compared with the parent's hashes as it reads) reads the device directly too.
  const changed = randomBytes(4096);
  changed.copy(data, 2 * BS + 4096);
  const wfd = openSync(dev, 'r+');
  writeSync(wfd, changed, 0, 4096, 2 * BS + 4096);
  closeSync(wfd);
  const again = await cliJson(['snapshot', 'disk', '--home', home]);
  assert.equal(again.code, 0, again.stderr);
  assert.equal(again.json.bytesReadDirect, data.length);
  assert.equal(again.json.blocksStored, 1);
  const out2 = join(dir, 'out2.img');
  assert.equal((await cli(['restore', 'disk', '--to', out2, '--home', home])).code, 0);
  assert.ok(sameBytes(out2, data));

  // A change list (read on the calling thread: too short to start the hash workers for) is read
  // past the page cache too, the short last block included.
  const more = randomBytes(4096);
  more.copy(data, 6 * BS + 4096);
  more.copy(data, 5 * BS);
  const mfd = openSync(dev, 'r+');
  writeSync(mfd, more, 0, 4096, 6 * BS + 4096);
  writeSync(mfd, more, 0, 4096, 5 * BS);
  closeSync(mfd);
  const listFile = join(dir, 'changed.txt');
  writeFileSync(listFile, '5\n6\n');
  const listed = await cliJson(['snapshot', 'disk', '--changed-blocks', listFile, '--home', home]);
  assert.equal(listed.code, 0, listed.stderr);
  assert.equal(listed.json.bytesReadDirect, BS + 8192, 'both listed blocks were read with O_DIRECT');
  assert.equal(listed.json.blocksStored, 2);
  const full = await cliJson(['snapshot', 'disk', '--home', home]);
  assert.match(listed.json.snapshot.root, /^[0-9a-f]{64}$/);
  assert.equal(full.json.snapshot.root, listed.json.snapshot.root, 'a full re-scan agrees with the change list');

  // Damage two blocks on the device, then restore the snapshot onto the device itself.
  const fd = openSync(dev, 'r+');
  writeSync(fd, randomBytes(4096), 0, 4096, BS);
  writeSync(fd, randomBytes(4096), 0, 4096, 4 * BS);
  closeSync(fd);
  const r = await cliJson(['restore', 'disk', '--to', dev, '--home', home]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.json.blocksCompared, 7);
  assert.equal(r.json.blocksWritten, 2);
  assert.ok(sameBytes(dev, data));
  const list = await cliJson(['volume', 'list', '--home', home]);
  assert.equal(list.json[0].materializing, undefined, 'the device is a sync source again');
});

test('kill -9 during a restore onto the volume itself: the half-written volume stays marked and is not snapshotted; the rerun completes it and clears the mark', async (t) => {
  const { home, img } = await setup(t, 256 * BS); // 128 MiB: the restore writes for a few hundred ms
  const s1 = await cliJson(['snapshot', 'vol', '--home', home]);
  assert.equal(s1.code, 0, s1.stderr);
  assert.equal(s1.json.bytesReadDirect, 0, 'an image file is read through the page cache');
  const want = readFileSync(img);
  let landed = false;
  for (let trial = 0; trial < 5 && !landed; trial++) {
    writeRandom(img, want.length); // changed everywhere since s1: the restore rolls it back
    const child = spawnCli(['restore', `vol@${s1.json.snapshot.id}`, '--to', img, '--home', home, '--json']);
    const done = collect(child);
    await untilWritten(img, want.subarray(0, BS), done); // the restore has begun
    child.kill('SIGKILL');
    const r = await done;
    if (r.signal !== 'SIGKILL') {
      assert.equal(r.code, 0, r.stderr); // finished before the kill: try again
      continue;
    }
    if (sameBytes(img, want)) continue; // killed after its last write
    landed = true;
    const vols = await cliJson(['volume', 'list', '--home', home]);
    assert.ok(vols.json.find((v: { name: string }) => v.name === 'vol').materializing, 'the half-written volume is marked');
    const snap = await cliJson(['snapshot', 'vol', '--home', home]);
    assert.equal(snap.code, 1, 'a half-written volume is not snapshotted');
    assert.equal(snap.json.error.code, 'ERR_VOLUME_MATERIALIZING');
  }
  assert.ok(landed, 'one of the restores was killed while the volume was half-written');
  const rerun = await cliJson(['restore', `vol@${s1.json.snapshot.id}`, '--to', img, '--home', home]);
  assert.equal(rerun.code, 0, rerun.stderr);
  assert.ok(sameBytes(img, want), 'the rerun wrote the snapshot, byte for byte');
  const vols = await cliJson(['volume', 'list', '--home', home]);
  assert.equal(vols.json.find((v: { name: string }) => v.name === 'vol').materializing, undefined, 'the mark is cleared');
  const again = await cliJson(['snapshot', 'vol', '--home', home]);
  assert.equal(again.code, 0, again.stderr);
  assert.equal(again.json.snapshot.root, s1.json.snapshot.root, 'the volume is s1 again');
  assert.equal((await cli(['verify', '--home', home])).code, 0);
});

test('kill -9 during a restore in place onto an image that is no volume\'s: doctor names the partly written image and volume add refuses it; a completed restore onto it clears both', async (t) => {
  const { home, img } = await setup(t, 256 * BS);
  const s1 = await cliJson(['snapshot', 'vol', '--home', home]);
  assert.equal(s1.code, 0, s1.stderr);
  const want = readFileSync(img);
  const other = join(home, '..', 'other.img');
  let landed = false;
  for (let trial = 0; trial < 5 && !landed; trial++) {
    writeRandom(other, want.length); // an existing image: written in place, only where it differs
    const child = spawnCli(['restore', `vol@${s1.json.snapshot.id}`, '--to', other, '--home', home, '--json']);
    const done = collect(child);
    await untilWritten(other, want.subarray(0, BS), done);
    child.kill('SIGKILL');
    const r = await done;
    if (r.signal !== 'SIGKILL') {
      assert.equal(r.code, 0, r.stderr);
      continue;
    }
    if (sameBytes(other, want)) continue;
    landed = true;
  }
  assert.ok(landed, 'one of the restores was killed while the image was half-written');
  const doc = await cliJson(['doctor', '--home', home]);
  const check = doc.json.checks.find((c: { check: string }) => c.check === `restore onto ${other}`);
  assert.equal(check?.status, 'warn', JSON.stringify(doc.json.checks));
  assert.match(check.fix, new RegExp(`appliance restore vol@${s1.json.snapshot.id} --to `));
  const add = await cliJson(['volume', 'add', 'other', '--path', other, '--home', home]);
  assert.equal(add.code, 1, 'a partly written image is not protected');
  assert.equal(add.json.error.code, 'ERR_VOLUME_MATERIALIZING');
  assert.match(add.json.error.message, /partly written/);

  const rerun = await cliJson(['restore', `vol@${s1.json.snapshot.id}`, '--to', other, '--home', home]);
  assert.equal(rerun.code, 0, rerun.stderr);
  assert.ok(sameBytes(other, want));
  const after = await cliJson(['doctor', '--home', home]);
  assert.ok(!after.json.checks.some((c: { check: string }) => c.check.startsWith('restore onto')), 'the record is gone');
  assert.equal((await cliJson(['volume', 'add', 'other', '--path', other, '--home', home])).code, 0);
});

test('kill -9 the moment restore --force resizes the volume\'s own image: the volume is already marked, so the cut image is not snapshotted; the rerun completes it', async (t) => {
  const { home, img } = await setup(t, 64 * BS);
  const s1 = await cliJson(['snapshot', 'vol', '--home', home]);
  assert.equal(s1.code, 0, s1.stderr);
  const want = readFileSync(img);
  let landed = false;
  for (let trial = 0; trial < 3 && !landed; trial++) {
    writeFileSync(img, Buffer.concat([randomBytes(want.length), randomBytes(32 * BS)])); // grown since s1
    const child = spawnCli(['restore', `vol@${s1.json.snapshot.id}`, '--to', img, '--force', '--home', home, '--json']);
    const done = collect(child);
    // Watched without yielding, so that the kill lands within microseconds of the resize.
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline && statSync(img).size !== want.length);
    if (statSync(img).size === want.length) child.kill('SIGKILL');
    const r = await done;
    if (r.signal !== 'SIGKILL') {
      assert.equal(r.code, 0, r.stderr); // not seen in time: try again
      continue;
    }
    landed = true;
    const vols = await cliJson(['volume', 'list', '--home', home]);
    assert.ok(vols.json.find((v: { name: string }) => v.name === 'vol').materializing, 'the volume was marked before its image was cut');
    const snap = await cliJson(['snapshot', 'vol', '--home', home]);
    assert.equal(snap.code, 1, 'the cut image is not snapshotted');
    assert.equal(snap.json.error.code, 'ERR_VOLUME_MATERIALIZING');
  }
  assert.ok(landed, 'a restore was killed right after the resize');
  const rerun = await cliJson(['restore', `vol@${s1.json.snapshot.id}`, '--to', img, '--home', home]);
  assert.equal(rerun.code, 0, rerun.stderr);
  assert.ok(sameBytes(img, want), 'the rerun wrote the snapshot, byte for byte');
  const vols = await cliJson(['volume', 'list', '--home', home]);
  assert.equal(vols.json.find((v: { name: string }) => v.name === 'vol').materializing, undefined, 'the mark is cleared');
});

test('a restore that meets a corrupt block leaves every block from it on as it was, zero blocks of the snapshot included', async (t) => {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const img = join(dir, 'vol.img');
  const snapData = Buffer.concat([randomBytes(4 * BS), Buffer.alloc(4 * BS)]); // data, then zero blocks
  writeFileSync(img, snapData);
  assert.equal((await cli(['volume', 'add', 'vol', '--path', img, '--home', home])).code, 0);
  const s1 = await cliJson(['snapshot', 'vol', '--home', home]);
  assert.equal(s1.code, 0, s1.stderr);
  const other = randomBytes(8 * BS);
  writeFileSync(img, other); // the volume changed everywhere since
  damageBlock({ dir: home } as Parameters<typeof damageBlock>[0], snapData.subarray(2 * BS, 3 * BS));
  const r = await cliJson(['restore', `vol@${s1.json.snapshot.id}`, '--to', img, '--home', home]);
  assert.equal(r.code, 1);
  assert.equal(r.json.error.code, 'ERR_BLOCK_CORRUPT');
  assert.match(r.json.error.message, /the blocks before block 2 hold the snapshot, the rest are as they were/);
  const now = readFileSync(img);
  for (let b = 0; b < 8; b++) {
    const want = b < 2 ? snapData : other;
    assert.ok(now.subarray(b * BS, (b + 1) * BS).equals(want.subarray(b * BS, (b + 1) * BS)), `block ${b} ${b < 2 ? 'holds the snapshot' : 'is as it was'}`);
  }
});

test('a loop device is the image it reads: restore onto the loop device of a volume\'s image is refused as onto the image (ERR_VOLUME_IN_USE)', { skip: process.getuid?.() !== 0 ? 'needs root for losetup' : false }, async (t) => {
  const { dir, home, img } = await setup(t, 4 * BS);
  const w = join(dir, 'w.img');
  writeRandom(w, 4 * BS);
  assert.equal((await cli(['volume', 'add', 'w', '--path', w, '--home', home])).code, 0);
  assert.equal((await cli(['snapshot', 'w', '--home', home])).code, 0);
  const before = readFileSync(img);
  const dev = loopDevice(t, img);
  if (dev === null) return;
  const r = await cliJson(['restore', 'w', '--to', dev, '--home', home]);
  assert.equal(r.code, 1, r.stdout);
  assert.equal(r.json.error.code, 'ERR_VOLUME_IN_USE');
  assert.match(r.json.error.message, /of volume "vol"/);
  assert.ok(sameBytes(img, before), 'vol was not written');
});

test('a mounted block device is not written: restore refuses it with ERR_VOLUME_IN_USE, naming the mount point, and writes it once unmounted', { skip: process.getuid?.() !== 0 ? 'needs root for losetup and mount' : false }, async (t) => {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const backing = join(dir, 'backing.img');
  writeFileSync(backing, Buffer.alloc(16 * 1024 * 1024));
  try {
    execFileSync('mkfs.ext4', ['-q', '-F', backing], { stdio: 'pipe' });
  } catch (e) {
    t.skip(`mkfs.ext4 failed (${(e as Error).message.split('\n')[0]}): cannot make a file system to mount`);
    return;
  }
  const dev = loopDevice(t, backing);
  if (dev === null) return;
  assert.equal((await cli(['volume', 'add', 'disk', '--path', dev, '--home', home])).code, 0);
  const s = await cliJson(['snapshot', 'disk', '--home', home]);
  assert.equal(s.code, 0, s.stderr);

  const mnt = join(dir, 'mnt point'); // a space: mountinfo escapes it as \040
  execFileSync('mkdir', [mnt]);
  execFileSync('mount', [dev, mnt], { stdio: 'pipe' });
  // Unmounted here whatever happens: the temporary directory cannot be removed under a mount.
  try {
    writeFileSync(join(mnt, 'written-after-the-snapshot'), 'the restore must not clobber this');
    execFileSync('sync');
    const before = readFileSync(dev);

    const refused = await cliJson(['restore', 'disk', '--to', dev, '--home', home]);
    assert.equal(refused.code, 1, refused.stderr);
    assert.equal(refused.json.error.code, 'ERR_VOLUME_IN_USE');
    assert.ok(refused.json.error.message.includes(`is mounted at ${mnt}`), refused.json.error.message);
    assert.match(refused.json.error.message, /unmount it .*nothing was written/);
    assert.ok(sameBytes(dev, before), 'the refused restore wrote nothing');
    const vols = await cliJson(['volume', 'list', '--home', home]);
    assert.equal(vols.json[0].name, 'disk');
    assert.equal(vols.json[0].materializing, undefined, 'the volume is not left marked');
  } finally {
    execFileSync('umount', ['-l', mnt]);
  }
  const ok = await cliJson(['restore', 'disk', '--to', dev, '--home', home]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.ok(ok.json.blocksWritten > 0, 'the blocks the mount changed are written back');
  const again = await cliJson(['snapshot', 'disk', '--home', home]);
  assert.match(s.json.snapshot.root, /^[0-9a-f]{64}$/);
  assert.equal(again.json.snapshot.root, s.json.snapshot.root, 'the device holds the snapshot again');
});

test('an image in use is not written: one a program has open for writing, holds locked (as QEMU locks a running VM\'s disks) or attached as a loop device is refused with ERR_VOLUME_IN_USE', async (t) => {
  const { dir, home, img } = await setup(t, 4 * BS);
  assert.equal((await cli(['snapshot', 'vol', '--home', home])).code, 0);
  const out = join(dir, 'vm-disk.img');
  const held = randomBytes(4 * BS);
  writeFileSync(out, held);

  // A program that has it open for writing (as a hypervisor that takes no lock would).
  const writer = spawn('sh', ['-c', `exec 3<>'${out}'; exec sleep 60`], { stdio: 'ignore' });
  t.after(() => writer.kill('SIGKILL'));
  const until = Date.now() + 10_000;
  while (!readdirSafe(`/proc/${writer.pid}/fd`).includes('3') || readFileSync(`/proc/${writer.pid}/comm`, 'utf8').trim() !== 'sleep') {
    assert.ok(Date.now() < until, 'the writer never opened the image');
    await new Promise((r) => setTimeout(r, 20));
  }
  const writing = await cliJson(['restore', 'vol', '--to', out, '--home', home]);
  assert.equal(writing.json.error?.code, 'ERR_VOLUME_IN_USE', writing.stderr);
  assert.ok(writing.json.error.message.includes(`open for writing by pid ${writer.pid} (sleep)`), writing.json.error.message);
  assert.ok(sameBytes(out, held));
  writer.kill('SIGKILL');
  await new Promise((r) => writer.once('exit', r));

  // flock(1) holds the lock while its child sleeps; /proc/locks names the holder.
  const locker = spawn('flock', [out, 'sleep', '60'], { stdio: 'ignore', detached: true });
  const unlock = () => {
    try {
      process.kill(-locker.pid!, 'SIGKILL'); // flock and the sleep that holds its lock
    } catch { /* gone */ }
  };
  t.after(unlock);
  const deadline = Date.now() + 10_000;
  while (!readFileSync('/proc/locks', 'utf8').includes(`:${statSync(out).ino} `)) {
    assert.ok(Date.now() < deadline, 'flock took no lock');
    await new Promise((r) => setTimeout(r, 20));
  }
  const locked = await cliJson(['restore', 'vol', '--to', out, '--home', home]);
  assert.equal(locked.code, 1, locked.stderr);
  assert.equal(locked.json.error.code, 'ERR_VOLUME_IN_USE');
  assert.match(locked.json.error.message, /is in use \(locked by pid \d+ \((flock|sleep)\)\).*nothing was written/);
  assert.ok(sameBytes(out, held));
  unlock();
  while (readFileSync('/proc/locks', 'utf8').includes(`:${statSync(out).ino} `)) await new Promise((r) => setTimeout(r, 20));

  const ok = await cliJson(['restore', 'vol', '--to', out, '--home', home]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.ok(sameBytes(out, img));

  if (process.getuid?.() === 0) {
    writeFileSync(out, held);
    const dev = loopDevice(t, out);
    if (dev === null) return;
    const attached = await cliJson(['restore', 'vol', '--to', out, '--home', home]);
    assert.equal(attached.json.error?.code, 'ERR_VOLUME_IN_USE', attached.stderr);
    assert.ok(attached.json.error.message.includes(`attached as ${dev}`), attached.json.error.message);
    assert.ok(sameBytes(out, held));
  }
});
