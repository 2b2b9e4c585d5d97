import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, statSync, readFileSync, mkdirSync, truncateSync, existsSync, openSync, writeSync, closeSync, symlinkSync } from 'node:fs';
import { writeRandom } from '../helpers/files.js';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { inspectVolume, openVolumeReader, openVolumeWriter, parseChangedBlocks, readChangedBlocksFile } from '../../appliance/volumes/index.js';
import { findHoles } from '../../appliance/volumes/file.js';
import { loopDevice, tempDir } from '../helpers/cli.js';
import { indicesIn } from '../../store/index.js';

const KiB = 1024;

async function rejectsWith(p: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(p, (e: any) => {
    assert.equal(e.code, code, `expected ${code}, got ${e.code}: ${e.message}`);
    return true;
  });
}

test('reader: size of an image whose size is not a multiple of the block size; short read at the end', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'img');
  const data = randomBytes(3 * 64 * KiB + 1000);
  writeFileSync(path, data);
  const info = await inspectVolume(path);
  assert.deepEqual(info, { path, kind: 'file', size: data.length });
  const r = await openVolumeReader(path);
  t.after(() => r.close());
  const buf = Buffer.alloc(64 * KiB);
  assert.equal(await r.read(buf, 3 * 64 * KiB), 1000);
  assert.deepEqual(buf.subarray(0, 1000), data.subarray(3 * 64 * KiB));
  assert.equal(await r.read(buf, 64 * KiB), 64 * KiB);
  assert.deepEqual(buf, data.subarray(64 * KiB, 128 * KiB));
  assert.equal(await r.read(buf, data.length), 0);
});

test('reader: a missing path, a directory and an empty file are refused with clear codes', async (t) => {
  const dir = tempDir(t);
  await rejectsWith(inspectVolume(join(dir, 'nope')), 'ERR_VOLUME_UNREADABLE');
  await rejectsWith(openVolumeReader(join(dir, 'nope')), 'ERR_VOLUME_UNREADABLE');
  await rejectsWith(inspectVolume(dir), 'ERR_VOLUME_UNREADABLE');
  writeFileSync(join(dir, 'empty'), '');
  await rejectsWith(inspectVolume(join(dir, 'empty')), 'ERR_VOLUME_EMPTY');
});

test('writer: a new file is created sparse at its size and reads as zeros', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'new.img');
  const size = 64 * 1024 * KiB + 123;
  const w = await openVolumeWriter(path, size);
  assert.equal(w.created, true);
  const block = randomBytes(4 * KiB);
  await w.write(block, 8 * 1024 * KiB);
  await w.sync();
  await w.close();
  const st = statSync(path);
  assert.equal(st.size, size);
  assert.ok(st.blocks * 512 < 1024 * KiB, `allocated ${st.blocks * 512} bytes for one 4 KiB write`);
  const back = readFileSync(path);
  assert.deepEqual(back.subarray(8 * 1024 * KiB, 8 * 1024 * KiB + 4 * KiB), block);
  assert.equal(back.subarray(0, 8 * 1024 * KiB).some((b) => b !== 0), false);
});

test('writer: an existing image of another size needs force; zero() clears a range; writes outside are refused', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'old.img');
  const data = randomBytes(256 * KiB);
  writeFileSync(path, data);
  await rejectsWith(openVolumeWriter(path, 512 * KiB), 'ERR_VOLUME_SIZE_MISMATCH');
  assert.deepEqual(readFileSync(path), data, 'a refused open changes nothing');
  const same = await openVolumeWriter(path, 256 * KiB);
  assert.equal(same.created, false);
  await same.zero(10 * KiB, 20 * KiB);
  await rejectsWith(same.write(Buffer.alloc(10), 256 * KiB - 5), 'ERR_INTERNAL');
  await same.close();
  const after = readFileSync(path);
  assert.equal(after.subarray(10 * KiB, 30 * KiB).every((b) => b === 0), true);
  assert.deepEqual(after.subarray(0, 10 * KiB), data.subarray(0, 10 * KiB));
  assert.deepEqual(after.subarray(30 * KiB), data.subarray(30 * KiB));
  const grown = await openVolumeWriter(path, 512 * KiB, { force: true });
  await grown.close();
  assert.equal(statSync(path).size, 512 * KiB);
  await rejectsWith(openVolumeWriter(join(dir, 'no-such-dir', 'x.img'), 4096), 'ERR_VOLUME_UNREADABLE');
});

test('writer: beforeChange is awaited before the first change (a new image created, an existing one resized), never for one left as it is; an empty image is taken as new, without force', async (t) => {
  const dir = tempDir(t);
  const seen: string[] = [];
  const path = join(dir, 'v.img');
  const w1 = await openVolumeWriter(path, 64 * KiB, { beforeChange: async () => void seen.push(`create: exists=${existsSync(path)}`) });
  await w1.close();
  const w2 = await openVolumeWriter(path, 64 * KiB, { beforeChange: async () => void seen.push('same size') });
  await w2.close();
  const w3 = await openVolumeWriter(path, 128 * KiB, { force: true, beforeChange: async () => void seen.push(`resize: size=${statSync(path).size}`) });
  await w3.close();
  assert.deepEqual(seen, ['create: exists=false', 'resize: size=65536']);
  // A hook that fails stops the change: nothing is created.
  await assert.rejects(openVolumeWriter(join(dir, 'w.img'), 64 * KiB, { beforeChange: async () => { throw new Error('mark failed'); } }), /mark failed/);
  assert.equal(existsSync(join(dir, 'w.img')), false);
  // An empty image (a failback killed as it created it) holds nothing a resize could lose.
  const empty = join(dir, 'empty.img');
  writeFileSync(empty, '');
  const w4 = await openVolumeWriter(empty, 64 * KiB);
  assert.equal(w4.created, true, 'it reads as zeros, as a new image');
  await w4.close();
  assert.equal(statSync(empty).size, 64 * KiB);
});

test('block device: held open for writing by another program (a VM on the raw device), it is not written: ERR_VOLUME_IN_USE naming the program', { skip: process.getuid?.() !== 0 ? 'needs root for losetup' : false }, async (t) => {
  const dir = tempDir(t);
  const img = join(dir, 'backing.img');
  writeRandom(img, 1024 * KiB);
  const dev = loopDevice(t, img);
  if (dev === null) return;
  const holder = spawn('sh', ['-c', `exec 3<>${dev}; echo ready; exec sleep 30`], { stdio: ['ignore', 'pipe', 'ignore'] });
  t.after(() => holder.kill('SIGKILL'));
  await once(holder.stdout!, 'data');
  await assert.rejects(openVolumeWriter(dev, 1024 * KiB), (e: any) => e.code === 'ERR_VOLUME_IN_USE' && /open for writing by pid \d+ \(sleep\)/.test(e.message));
  holder.kill('SIGKILL');
  await once(holder, 'exit');
  const w = await openVolumeWriter(dev, 1024 * KiB);
  await w.close();
});

test('block device: size found from /sys, opened read-only for reading', { skip: process.getuid?.() !== 0 ? 'needs root for losetup' : false }, async (t) => {
  const dir = tempDir(t);
  const img = join(dir, 'backing.img');
  const data = randomBytes(3 * 1024 * KiB);
  writeFileSync(img, data);
  const dev = loopDevice(t, img);
  if (dev === null) return;
  const info = await inspectVolume(dev);
  assert.deepEqual(info, { path: dev, kind: 'device', size: data.length });
  const r = await openVolumeReader(dev);
  const buf = Buffer.alloc(64 * KiB);
  assert.equal(await r.read(buf, 1024 * KiB), 64 * KiB);
  assert.deepEqual(buf, data.subarray(1024 * KiB, 1088 * KiB));
  await r.close();
  await rejectsWith(openVolumeWriter(dev, data.length + 4096), 'ERR_VOLUME_SIZE_MISMATCH');
});

test('changed-blocks: indices, ranges, byte ranges, comments; sorted and deduplicated', () => {
  const bs = 64 * KiB;
  const size = 10 * bs + 100; // 11 blocks, the last one short
  const text = [
    '# exported by a tracker',
    '7',
    '2-4   # inclusive',
    '',
    `bytes ${bs - 1}+2`, // touches blocks 0 and 1
    `bytes ${10 * bs}-${10 * bs + 99}`, // the short last block
    '3',
  ].join('\n');
  const listed = parseChangedBlocks(text, size, bs);
  assert.deepEqual([...indicesIn(listed)], [0, 1, 2, 3, 4, 7, 10]);
  assert.deepEqual(listed, { ranges: [{ first: 0, last: 4 }, { first: 7, last: 7 }, { first: 10, last: 10 }], count: 7 });
  assert.deepEqual(parseChangedBlocks('\r\n# nothing\r\n', size, bs), { ranges: [], count: 0 });
});

test('changed-blocks: a range is kept as one, whatever the number of blocks it covers', () => {
  // A 64 TiB volume of 4 KiB blocks: 2^34 blocks, more than any array or Set can hold.
  const bs = 4 * KiB;
  const size = 2 ** 46;
  const listed = parseChangedBlocks(`0-${2 ** 34 - 1}\n5\nbytes ${2 ** 40}+1\n`, size, bs);
  assert.deepEqual(listed, { ranges: [{ first: 0, last: 2 ** 34 - 1 }], count: 2 ** 34 });
});

test('changed-blocks: malformed or out-of-range entries name the line', async (t) => {
  const bs = 64 * KiB;
  const size = 4 * bs;
  const bad: Array<[string, RegExp]> = [
    ['1\nx', /line 2/],
    ['4', /past the last block/],
    ['3-1', /ends before it starts/],
    [`bytes ${4 * bs - 1}+2`, /past the end/],
    ['bytes 0+0', /length 0/],
    ['-1', /line 1/],
    ['1.5', /not a non-negative integer/],
  ];
  for (const [text, re] of bad) {
    assert.throws(() => parseChangedBlocks(text, size, bs, 'cb.txt'), (e: any) => e.code === 'ERR_CHANGED_BLOCKS_INVALID' && re.test(e.message), text);
  }
  const dir = tempDir(t);
  await rejectsWith(readChangedBlocksFile(join(dir, 'missing.txt'), size, bs), 'ERR_CHANGED_BLOCKS_INVALID');
  mkdirSync(join(dir, 'd'));
  writeFileSync(join(dir, 'ok.txt'), '0\n2\n');
  assert.deepEqual([...indicesIn(await readChangedBlocksFile(join(dir, 'ok.txt'), size, bs))], [0, 2]);
  truncateSync(join(dir, 'ok.txt'), 0);
  assert.deepEqual((await readChangedBlocksFile(join(dir, 'ok.txt'), size, bs)).count, 0);
});

test('reader: a sparse image of 101,000 small extents keeps its large hole mapped (holes under 64 KiB are not mapped, nor counted)', async (t) => {
  // 4 KiB of data every 8 KiB, then one hole to 64 GiB. All or nothing past 100,000 holes, the
  // map was dropped and the 64 GiB read through the kernel (a snapshot took 30 s against 0.8 s).
  const path = join(tempDir(t), 'img');
  const size = 64 * 1024 * 1024 * KiB;
  writeFileSync(path, '');
  truncateSync(path, size);
  const fd = openSync(path, 'r+');
  const page = randomBytes(4 * KiB);
  for (let i = 0; i < 101_000; i++) writeSync(fd, page, 0, page.length, i * 8 * KiB);
  closeSync(fd);
  const r = await openVolumeReader(path);
  t.after(() => r.close());
  const holes = r.holes ?? [];
  const last = holes.at(-1);
  if (holes.length === 0 && whereIs('perl') === '' && whereIs('python3') === '') return t.skip('neither perl nor python3: no hole map here');
  assert.ok(last && last.end === size && last.start === 101_000 * 8 * KiB - 4 * KiB, `the large hole is mapped: ${JSON.stringify(last)}`);
  assert.ok(holes.every((h) => h.end - h.start >= 64 * KiB), 'no small hole is mapped');
  const buf = Buffer.alloc(8 * 1024 * KiB, 1);
  assert.equal(await r.read(buf, size - buf.length), buf.length);
  assert.ok(buf.equals(Buffer.alloc(buf.length)), 'the hole reads as zeros');
});

/** The program itself, not a shim that needs the PATH (pyenv's python3). */
function realProgram(program: string): string {
  if (program !== 'python3') return whereIs(program);
  return execFileSync('python3', ['-c', 'import sys; print(sys.executable)'], { encoding: 'utf8' }).trim();
}

/** The program's path on PATH, or ''. */
function whereIs(program: string): string {
  return execFileSync('sh', ['-c', `command -v ${program} || true`], { encoding: 'utf8' }).trim();
}

test('hole map: perl and python3 each map the same holes, and with neither the map is empty (the image is read in full)', async (t) => {
  const dir = tempDir(t);
  const path = join(dir, 'img');
  const size = 256 * 1024 * KiB + 3 * KiB; // not a multiple of the block or page size
  writeFileSync(path, '');
  truncateSync(path, size);
  const fd = openSync(path, 'r+');
  // Data at the start, a short hole (not mapped), data, a long hole, data, and a hole to the end.
  for (const [at, len] of [[0, 64 * KiB], [96 * KiB, 4 * KiB], [100 * 1024 * KiB, 1024 * KiB], [200 * 1024 * KiB + 5, 17]] as const) writeSync(fd, randomBytes(len), 0, len, at);
  closeSync(fd);
  const mappers = ['perl', 'python3'].filter((p) => whereIs(p) !== '');
  if (mappers.length === 0) return t.skip('neither perl nor python3 here');
  const savedPath = process.env.PATH;
  t.after(() => void (process.env.PATH = savedPath));
  const maps: Record<string, Array<{ start: number; end: number }>> = {};
  for (const only of [...mappers, 'none']) {
    // A PATH that holds only that program.
    const bin = join(dir, `bin-${only}`);
    mkdirSync(bin);
    if (only !== 'none') symlinkSync(realProgram(only), join(bin, only));
    process.env.PATH = bin;
    maps[only] = await findHoles(path);
    process.env.PATH = savedPath;
  }
  const want = maps[mappers[0]!]!;
  // The filesystem decides the exact edges (its allocation unit): check the shape, then that
  // every mapped byte reads as zero and every byte written lies outside the holes.
  assert.ok(want.length >= 3, `the long holes are mapped: ${JSON.stringify(want)}`);
  assert.equal(want.at(-1)!.end, size, 'the last hole runs to the end');
  assert.ok(want.every((h) => h.end - h.start >= 64 * KiB), 'no short hole is mapped');
  const img = readFileSync(path);
  for (const h of want) assert.ok(img.subarray(h.start, h.end).equals(Buffer.alloc(h.end - h.start)), `hole ${h.start}-${h.end} reads as zeros`);
  for (const p of mappers) assert.deepEqual(maps[p], want, `${p} maps what ${mappers[0]} maps`);
  assert.deepEqual(maps.none, [], 'with no program the map is empty');
});
