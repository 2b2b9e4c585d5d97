/**
 * Snapshots of sparse images (store/scan.ts: a hole of the image is one job and one run of zero
 * blocks for the tree builder): random layouts of data and holes, a first snapshot, random
 * changes (data written into a hole, a range punched out, data overwritten, the size changed),
 * a re-snapshot; each root must equal that of a full read of the same image (the reader without
 * its hole map, which reads every byte), snapshotted from scratch in another store.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, truncateSync, writeSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { Store } from '../../store/index.js';
import { fullScanJobs } from '../../store/scan.js';
import { blockCount } from '../../store/tree.js';
import { openVolumeReader } from '../../appliance/volumes/file.js';
import { tempDir } from './helpers.js';

const MiB = 1024 * 1024;

/** Holes as findHoles gives them: ascending, disjoint, from random cut points of [0, size). */
function holesArb(size: number): fc.Arbitrary<Array<{ start: number; end: number }>> {
  return fc.uniqueArray(fc.integer({ min: 0, max: size }), { maxLength: 30 }).map((cuts) => {
    const xs = [...cuts].sort((a, b) => a - b);
    const out: Array<{ start: number; end: number }> = [];
    for (let i = 0; i + 1 < xs.length; i += 2) if (xs[i]! < xs[i + 1]!) out.push({ start: xs[i]!, end: xs[i + 1]! });
    return out;
  });
}

describe('sparse scan', () => {
  it('fullScanJobs tiles the volume in order; hole jobs lie in holes, every aligned chunk wholly in a hole is in one', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 5000 }).chain((bs) => fc.integer({ min: 1, max: 200_000 }).chain((size) => fc.tuple(fc.constant(bs), fc.constant(size), fc.integer({ min: 1, max: 40 }), holesArb(size)))),
        ([bs, size, max, holes]) => {
          const blocks = blockCount(size, bs);
          const inHole = (a: number, b: number) => holes.some((h) => h.start <= a && b <= h.end);
          const covered = new Set<number>();
          let next = 0;
          for (const job of fullScanJobs(size, bs, max, holes)) {
            assert.equal(job.first, next);
            assert.ok(job.count >= 1);
            next = job.first + job.count;
            const bytes = [job.first * bs, Math.min(size, next * bs)] as const;
            if (job.hole) {
              assert.ok(job.count >= max && inHole(...bytes), `hole job ${job.first}+${job.count}`);
              for (let i = job.first; i < next; i++) covered.add(i);
            } else {
              assert.ok(job.count <= max && Math.floor(job.first / max) === Math.floor((next - 1) / max), `chunk job ${job.first}+${job.count} stays in its chunk`);
            }
          }
          assert.equal(next, blocks);
          for (let c = 0; c * max < blocks; c++) {
            const a = c * max;
            const b = Math.min(blocks, a + max);
            if (b - a === max && inHole(a * bs, Math.min(size, b * bs))) for (let i = a; i < b; i++) assert.ok(covered.has(i), `block ${i} of a chunk in a hole`);
          }
        },
      ),
      { numRuns: 3000 },
    );
  });

  it('first and re-snapshots of random sparse images equal a full read (writes into holes, punched ranges, overwrites, resizes)', async (t) => {
    const dir = await tempDir(t);
    const store = await Store.open(join(dir, 'store'));
    t.after(() => store.close());
    // The full reads go to another store: nothing found there from the snapshots under test.
    const ref = await Store.open(join(dir, 'ref'));
    t.after(() => ref.close());
    const path = join(dir, 'img');
    let mapped = 0;
    let round = 0;

    /** A snapshot of the image with its hole map, and the root of a full read of it from scratch. */
    const both = async (volume: string, blockSize: number, parent: Awaited<ReturnType<Store['scanVolume']>> | undefined) => {
      const r = await openVolumeReader(path);
      if ((r.holes ?? []).length > 0) mapped++;
      const snap = await store.scanVolume(r, { volume, blockSize, ...(parent ? { parent } : {}) }).finally(() => r.close());
      const whole = await openVolumeReader(path, { holeMap: false });
      assert.equal((whole.holes ?? []).length, 0);
      const full = await ref.scanVolume(whole, { volume: `ref${round++}`, blockSize }).finally(() => whole.close());
      assert.equal(snap.root, full.root, `root of ${volume} (${parent ? 're-snapshot' : 'first'}), size ${snap.size}, blocks of ${blockSize}`);
      assert.equal(snap.nonZeroBlocks, full.nonZeroBlocks);
      return snap;
    };

    /** [offset (0: the start, -1: to the end), length]. */
    const extent = (size: number, max = 3 * MiB) => fc.tuple(fc.oneof(fc.constant(0), fc.constant(-1), fc.integer({ min: 0, max: size - 1 })), fc.integer({ min: 1, max }));
    const layout = fc
      // Past 64 MiB unallocated the reader maps the holes (appliance/volumes/file.ts SPARSE_SLACK).
      .tuple(fc.integer({ min: 100 * MiB, max: 400 * MiB }), fc.constantFrom(4096, 65536, 512 * 1024, 1536))
      .chain(([size, blockSize]) =>
        fc.record({
          size: fc.constant(size),
          blockSize: fc.constant(blockSize),
          data: fc.array(extent(size), { maxLength: 8 }),
          // Punched ranges up to 40 MiB: holes over several chunks where the first snapshot had data.
          changes: fc.array(fc.oneof(fc.tuple(fc.constantFrom('write', 'punch', 'resize'), extent(size)), fc.tuple(fc.constant('punch'), extent(size, 40 * MiB))), { minLength: 1, maxLength: 6 }),
          seed: fc.integer({ min: 0, max: 255 }),
        }),
      );
    let volumes = 0;
    await fc.assert(
      fc.asyncProperty(layout, async ({ size, blockSize, data, changes, seed }) => {
        const at = (off: number, len: number, total: number) => (off === -1 ? Math.max(0, total - len) : Math.min(off, total - 1));
        const write = (off: number, len: number, total: number) => {
          const fd = openSync(path, 'r+');
          const buf = Buffer.alloc(len, (seed + off) % 251 + 1);
          writeSync(fd, buf, 0, Math.min(len, total - at(off, len, total)), at(off, len, total));
          closeSync(fd);
        };
        writeFileSync(path, '');
        truncateSync(path, size);
        for (const [off, len] of data) write(off, len, size);
        const volume = `v${volumes++}`;
        let snap = await both(volume, blockSize, undefined);
        let cur = size;
        for (const [op, [off, len]] of changes) {
          if (op === 'write') write(off, len, cur);
          else if (op === 'punch') {
            const r = spawnSync('fallocate', ['--punch-hole', '--offset', String(at(off, len, cur)), '--length', String(len), path]);
            assert.equal(r.status, 0, r.stderr?.toString());
          } else {
            // Grown or shrunk by up to 3 MiB, or to a size that is no multiple of the block size.
            cur = Math.max(1, cur + (off % 2 === 0 ? len : -len) + (seed % 7));
            truncateSync(path, cur);
          }
        }
        snap = await both(volume, blockSize, snap);
        assert.equal(snap.size, cur);
      }),
      { numRuns: 10 },
    );
    if (spawnSync('python3', ['--version']).status === 0) assert.ok(mapped > 0, 'some images had a hole map (python3 is here)');
  });
});
