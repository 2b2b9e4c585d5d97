/**
 * gc: reclaim blocks and nodes that no snapshot reaches, by repacking.
 *
 * 1. Mark: walk every snapshot's tree. Live nodes go into a set (a node stands for up to 256
 *    blocks), live blocks into a {@link LiveBlocks} (8 bytes a block), then the bases of live
 *    delta records (store/README.md, "Delta records"). A missing or damaged node
 *    aborts gc before anything changes (run verify first). The dead nodes' entries are then
 *    deleted, in one synced batch, before any block's: a node in the index implies its whole
 *    subtree is there.
 * 2. Choose the packs to rewrite: those with a dead record, or with bytes no index entry
 *    accounts for (a block two writers stored at once, copies a crashed gc made), or with no
 *    entry at all; and, once there are {@link MERGE_MIN_PACKS} packs below
 *    {@link SMALL_PACK_BYTES} with nothing to reclaim, those, the smallest first, up to
 *    {@link MERGE_BYTES} a run: their records go into the packs gc writes, which merges them.
 * 3. Copy, a group of packs at a time: the packs with the smallest live share first, as many as
 *    have live records adding up to at most half the free space on the store's disk (at least one
 *    pack; all of them on a disk with room, which makes one group, one pass over the index). A
 *    group's entries are found in one pass over the index and handled in rounds of at most
 *    {@link ROUND_ENTRIES} index entries (memory stays bounded whatever the store's size): the
 *    round's live records are copied (CRC and hash checked) into new packs under fresh ids,
 *    which are fsync'd; then one synced index batch moves their entries to the new packs, names
 *    the new packs ('p' entries) and deletes the round's dead entries. A batch is atomic, and
 *    each leaves a valid store: every entry points at an intact record of a pack the index names
 *    (an old one, or a new one synced before).
 * 4. Switch, once a group is done: one synced batch deletes its packs' 'p' entries (no entry
 *    points into them any more).
 * 5. Delete the group's pack files at once, so the next group has their space: gc needs free
 *    space for about one group, not for every live record it moves (with every pack copied
 *    before any was deleted, a disk with less free space than the live records to move refused
 *    gc with ERR_DISK_FULL every time). The last group's files go once the locks are released:
 *    nothing refers to them, and snapshots need not wait for the filesystem to free the space.
 *    Earlier groups' go under the locks (there are several groups only on a disk without room
 *    for all): the next group needs that space. Readers take no lock and may race a deletion
 *    either way; one that read a moved block's old place looks it up again (Store.getBlock).
 *    A pack whose live records need more than is free is not started: the others are
 *    rewritten, then gc fails with ERR_DISK_FULL naming it (a copy bound to fail would only fill
 *    the disk); a pack only to merge (nothing dead in it) is named in the report's
 *    `packsNotMerged` instead, and the run does not fail for it. A pack write that fails anyway gives back the copies not yet synced at once.
 *    A crash before a deletion leaves files without a 'p' entry, which open() deletes. A crash
 *    between rounds leaves old packs that hold only moved or dead records, which the rerun
 *    rewrites to nothing (first: their live share is 0). So a crash at any point leaves a valid
 *    store, and rerunning gc finishes the job.
 *
 * A live record that fails its check stays where it is: its entry keeps pointing into its old
 * pack, which is kept (verify reports the block); the pack's other records move out.
 *
 * gc runs alone until its last group is switched (exclusive gc lock + the write lock): snapshot
 * builds and commits wait. Blocks and nodes put by a sync that has not committed its snapshot
 * yet are unreachable and may be reclaimed; that sync then gets ERR_SNAPSHOT_INCOMPLETE and its
 * rerun sends them again.
 */
import { statfs } from 'node:fs/promises';
import { TandemError } from '../common/errors.js';
import { DIRECT_ALIGN, alignedSlots } from '../common/io-buffers.js';
import { isZeroHash, toHex, blake3 } from './hash.js';
import { blockKey, decodeLocation, encodeLocation, encodeU64, LOCATION_LENGTH, namespaceRange, nodeKey, NS, packKey, type BlockLocation } from './keys.js';
import { CODEC_DELTA, DELTA_PAYLOAD_MIN, decodePayload, decodeRecord, PACK_TARGET_SIZE, recordLength } from './pack.js';
import { fsyncDir, type PackFiles } from './pack-files.js';
import { decodeNode } from './tree.js';
import type { Store } from './store.js';
import type { GcProgress, GcReport, Hash, PackLeft, SnapshotRecord } from './types.js';

/**
 * Index entries (live and dead) of the packs being rewritten handled per round (~8 MiB of them).
 * A round ends with an fsync and a synced batch: 262,144 live 4 KiB blocks to move took 18 s in
 * rounds of 16,384 (peak RSS 173 MiB), 14-15 s in rounds of 32,768 (204 MiB), 11-13 s in rounds
 * of 65,536 (248-256 MiB). `TANDEM_GC_ROUND_ENTRIES` sets it (the crash test makes rounds small,
 * so kills fall between them).
 */
const ROUND_ENTRIES = 32768;
/** Records of a pack read in one span when no more than this lies between them. */
const SPAN_GAP = 64 * 1024;
/** A span's bytes at most (a larger record is read alone, in a span of its own size). */
const SPAN_BYTES = 4 * 1024 * 1024;
/** Spans read ahead of the one being checked (O_DIRECT reads into reused aligned buffers). */
const SPANS_AHEAD = 4;
/** Payload bytes copied per pack write: a direct-append staging slot's worth (store/pack-files.ts). */
const COPY_BATCH_BYTES = 8 * 1024 * 1024;
/**
 * Packs smaller than this (an eighth of the target size) with nothing to reclaim are merged. A
 * store got them because gc started a new pack on every run, and the next snapshot appended
 * there (an audit saw a daemon's store go from 1 to 32 packs in 15 minutes); gc now starts one
 * only when it rewrites something, after which they still come.
 */
const SMALL_PACK_BYTES = PACK_TARGET_SIZE / 8;
/** Small packs there must be before gc merges them: fewer cost little (an open file and a 'p' entry each) and merging them would copy the same records every run. */
const MERGE_MIN_PACKS = 4;
/** Bytes of small packs merged a run at most: one pack's worth (31 packs of 8 MiB took 0.62-0.67 s, 0.27-0.31 CPU s, here). */
const MERGE_BYTES = PACK_TARGET_SIZE;
/**
 * Free space a pack's copy needs beyond its live records: the index's log for the round's batch
 * (~100 bytes an entry) and the filesystem's own blocks; the store's reserve's size. A pack that
 * needs more than is free is left as it is (ERR_DISK_FULL at the end), not copied until the disk
 * is full.
 */
const COPY_SLACK_BYTES = 8 * 1024 * 1024;

type Entry = { hash: Hash; loc: BlockLocation };

/**
 * The live blocks, as the first 8 bytes of each hash read big-endian (so their numeric order is
 * the index's key order), sorted and unique: 8 bytes a block, where a set of hash strings took
 * ~100 (a store of 262,144 live 4 KiB blocks: gc peaked at 395 MiB of RSS). Two hashes that share
 * their first 8 bytes count as live together: a dead block may then be kept (one chance in 2^64
 * for a pair), a live one is never dropped.
 */
export class LiveBlocks {
  private a = new BigUint64Array(1 << 16);
  private n = 0;

  add(hash: Hash): void {
    if (this.n === this.a.length) this.grow();
    this.a[this.n++] = hash.readBigUInt64BE(0);
  }

  /** Sort and drop repeats (a block shared by many snapshots is added once per tree node naming it). */
  seal(): void {
    const v = this.a.subarray(0, this.n).sort();
    let w = 0;
    for (let i = 0; i < v.length; i++) if (w === 0 || v[i] !== v[w - 1]) v[w++] = v[i]!;
    this.n = w;
  }

  get size(): number {
    return this.n;
  }

  /** Membership for hashes asked in ascending order (an index iteration), after {@link seal}. */
  cursor(): (hash: Hash) => boolean {
    let p = 0;
    return (hash) => {
      const x = hash.readBigUInt64BE(0);
      while (p < this.n && this.a[p]! < x) p++;
      return p < this.n && this.a[p] === x;
    };
  }

  private grow(): void {
    this.seal();
    if (this.n * 2 <= this.a.length) return; // repeats made room
    const b = new BigUint64Array(this.a.length * 2);
    b.set(this.a.subarray(0, this.n));
    this.a = b;
  }
}

interface PackStats {
  live: number;
  liveBytes: number;
  dead: number;
}

export async function collectGarbage(store: Store, onProgress?: (p: GcProgress) => void): Promise<GcReport> {
  const report = await store.gcLock.exclusive(() => store.writeLock.run(() => givingBackOnFailure(store.packs, async () => {
    // The packs an earlier gc was still deleting are gone before their ids are looked at.
    await store.reclaiming.catch(() => undefined);
    await store.flushLocked();
    const { db, packs } = store;

    // 1. mark
    const liveNodes = new Set<string>();
    const live = new LiveBlocks();
    const mark = async (h: Hash, level: number, snap: SnapshotRecord): Promise<void> => {
      if (isZeroHash(h)) return;
      const key = h.toString('latin1');
      if (liveNodes.has(key)) return;
      const v = await db.get(nodeKey(h));
      const node = v === undefined ? undefined : decodeNode(h, v);
      if (!node || node.level !== level) {
        throw new TandemError('ERR_STORE_CORRUPT', `gc stopped before changing anything: tree node ${toHex(h)} of snapshot ${snap.volume}@${snap.id} is missing or damaged; run \`appliance repair --peer NAME\` (it verifies, then fetches good copies from the peer) or delete that snapshot`, {
          details: { hash: toHex(h), volume: snap.volume, snapshot: snap.id },
        });
      }
      for (const c of node.children) {
        if (level === 1) {
          if (!isZeroHash(c)) live.add(c);
        } else {
          await mark(c, level - 1, snap);
        }
      }
      liveNodes.add(key);
    };
    for await (const v of db.values(namespaceRange(NS.snapshot))) {
      const snap = JSON.parse(v.toString('utf8')) as SnapshotRecord;
      await mark(Buffer.from(snap.root, 'hex'), snap.height, snap);
    }
    live.seal();
    // The base of a live delta record is live too, snapshot or not (store/README.md, "Delta
    // records"). A base is never a delta itself, so one pass finds them all.
    {
      const isLive = live.cursor();
      const bases: Hash[] = [];
      for await (const [k, v] of db.iterator(namespaceRange(NS.block))) {
        if (v.length !== LOCATION_LENGTH && isLive(k.subarray(1))) bases.push(decodeLocation(v).base!);
      }
      for (const b of bases) live.add(b);
      if (bases.length > 0) live.seal();
    }

    // 2. per-pack statistics, and the packs to rewrite
    const stats = new Map<number, PackStats>();
    let blocksKept = 0;
    {
      const isLive = live.cursor();
      for await (const [k, v] of db.iterator(namespaceRange(NS.block))) {
        const loc = decodeLocation(v);
        let s = stats.get(loc.pack);
        if (!s) stats.set(loc.pack, (s = { live: 0, liveBytes: 0, dead: 0 }));
        if (isLive(k.subarray(1))) {
          s.live++;
          s.liveBytes += recordLength(loc.length);
          blocksKept++;
        } else {
          s.dead++;
        }
      }
    }
    const rewrite = new Set<number>();
    const progress = { entriesDone: 0, entriesTotal: 0, bytesCopied: 0 };
    for (const id of packs.ids()) {
      const s = stats.get(id);
      if (!s || s.dead > 0 || s.liveBytes < (packs.durable.get(id) ?? 0)) {
        rewrite.add(id);
        progress.entriesTotal += s ? s.live + s.dead : 0;
      }
    }
    // Small packs with nothing to reclaim are merged, the smallest first, a bounded amount a run.
    const merge = new Set<number>();
    {
      const size = (id: number) => packs.durable.get(id) ?? 0;
      const small = packs.ids().filter((id) => !rewrite.has(id) && size(id) < SMALL_PACK_BYTES).sort((a, b) => size(a) - size(b) || a - b);
      if (small.length >= MERGE_MIN_PACKS) {
        for (let i = 0, bytes = 0; i < small.length && bytes + size(small[i]!) <= MERGE_BYTES; i++) {
          merge.add(small[i]!);
          bytes += size(small[i]!);
        }
        if (merge.size < 2) merge.clear(); // one pack alone would only be copied
        for (const id of merge) {
          rewrite.add(id);
          progress.entriesTotal += stats.get(id)!.live;
        }
      }
    }

    // The dead nodes go first, in a synced batch of their own: a node in the index implies its
    // whole subtree is there (store/README.md), and the rounds below delete dead blocks.
    let nodesRemoved = 0;
    {
      const batch = db.batch();
      for await (const k of db.keys(namespaceRange(NS.node))) {
        if (!liveNodes.has(k.subarray(1).toString('latin1'))) {
          batch.del(k);
          nodesRemoved++;
        }
      }
      if (nodesRemoved > 0) {
        await batch.write({ sync: true });
        store.forgetNodes();
      } else await batch.close();
    }

    // 3. copy, a group of packs at a time (most dead first), round by round
    const roundEntries = Number(process.env.TANDEM_GC_ROUND_ENTRIES) || ROUND_ENTRIES;
    // `TANDEM_GC_GROUP_BYTES` caps a group's live bytes instead of the free space (the crash tests
    // make groups of one pack, so kills fall between and inside their deletions).
    const groupBytes = Number(process.env.TANDEM_GC_GROUP_BYTES) || 0;
    // Copies go to new packs, started before the first copy. With nothing copied (nothing to
    // rewrite, or no room for any of it), the pack being appended to stays open: a new pack on
    // every run (a daemon runs gc after its jobs' retention) left small packs that the merges
    // then copied again.
    let rolledOver = false;
    const spans = alignedSlots(SPANS_AHEAD, SPAN_BYTES + 2 * DIRECT_ALIGN);
    /** Packs kept as they are: one of their live records is damaged. */
    const kept = new Set<number>();
    const newLengths = new Map<number, number>();
    let blocksRemoved = 0;
    let moves: Entry[] = [];
    let dead: Hash[] = [];
    const round = async (): Promise<void> => {
      if (moves.length === 0 && dead.length === 0) return;
      const byPack = new Map<number, Entry[]>();
      for (const m of moves) {
        let list = byPack.get(m.loc.pack);
        if (!list) byPack.set(m.loc.pack, (list = []));
        list.push(m);
      }
      const moved: Entry[] = [];
      for (const [id, list] of byPack) {
        list.sort((a, b) => a.loc.offset - b.loc.offset);
        if (!(await copyLive(store, id, list, spans, moved))) kept.add(id);
      }
      const lengths = await packs.sync();
      const batch = db.batch();
      for (const m of moved) batch.put(blockKey(m.hash), encodeLocation(m.loc));
      for (const h of dead) batch.del(blockKey(h));
      for (const [id, n] of lengths) {
        batch.put(packKey(id), encodeU64(n));
        newLengths.set(id, n);
      }
      await batch.write({ sync: true });
      packs.markDurable(lengths);
      blocksRemoved += dead.length;
      progress.entriesDone += moves.length + dead.length;
      progress.bytesCopied += moved.reduce((n, m) => n + recordLength(m.loc.length), 0);
      onProgress?.({ ...progress });
      moves = [];
      dead = [];
    };
    // The packs that free the most for what they copy go first (the smallest live share), so on a
    // nearly full disk the first groups make room for the next.
    const liveShare = (id: number) => (stats.get(id)?.liveBytes ?? 0) / Math.max(1, packs.durable.get(id) ?? 0);
    const order = [...rewrite].sort((a, b) => liveShare(a) - liveShare(b) || a - b);
    const old: number[] = [];
    let oldBytes = 0;
    let last: number[] = [];
    /** Packs with dead records left as they are: the disk has not the room to copy their live records (ERR_DISK_FULL). */
    const tooBig: PackLeft[] = [];
    /** Packs only to merge left as they are for the same reason: nothing is lost, the report names them. */
    const notMerged: PackLeft[] = [];
    for (let i = 0; i < order.length; ) {
      // A group: packs whose live records add up to at most half the free space (at least one
      // pack; every pack left when the disk has room for all of them: one pass, as before). A
      // pack that alone needs more than is free is not started: it would fill the disk and fail.
      const free = await freeBytes(packs.dir);
      const budget = groupBytes || free / 2;
      const group = new Set<number>();
      let groupEntries = 0;
      for (let bytes = 0; i < order.length; i++) {
        const s = stats.get(order[i]!);
        const need = (s?.liveBytes ?? 0) + COPY_SLACK_BYTES;
        if (group.size === 0 && s && s.live > 0 && need > free) {
          // A pack only to merge has nothing to reclaim: the run does not fail for it.
          (merge.has(order[i]!) ? notMerged : tooBig).push({ pack: order[i]!, needBytes: need, freeBytes: free });
          continue;
        }
        if (group.size > 0 && bytes + (s?.liveBytes ?? 0) > budget) break;
        group.add(order[i]!);
        bytes += s?.liveBytes ?? 0;
        groupEntries += s ? s.live + s.dead : 0;
      }
      // Started before the first group, whatever it holds: a pack the group deletes may be the one being appended to.
      if (group.size > 0 && !rolledOver) {
        await packs.rollover();
        rolledOver = true;
      }
      if (groupEntries > 0) {
        // Writing behind the iterator is safe: it reads the index as it was when it began.
        const isLive = live.cursor();
        for await (const [k, v] of db.iterator(namespaceRange(NS.block))) {
          const loc = decodeLocation(v);
          if (!group.has(loc.pack)) continue;
          const hash = Buffer.from(k.subarray(1));
          if (isLive(hash)) moves.push({ hash, loc });
          else dead.push(hash);
          if (moves.length + dead.length >= roundEntries) await round();
        }
        await round();
      }
      // 4. switch: no entry points into the group's packs any more; one synced batch deletes
      // their 'p' entries, then (5) their files go at once, so the next group has their space.
      const gone = [...group].filter((id) => !kept.has(id));
      if (gone.length === 0) continue;
      const batch = db.batch();
      for (const id of gone) {
        oldBytes += packs.durable.get(id) ?? 0;
        batch.del(packKey(id));
      }
      await batch.write({ sync: true });
      old.push(...gone);
      if (i < order.length) await removePacks(packs, gone);
      else last = gone;
    }
    if (rolledOver) await packs.rollover();
    const newBytes = [...newLengths.values()].reduce((a, b) => a + b, 0);

    // 5. delete the last group's packs. Nothing refers to them any more, so this goes on after
    // the locks are released: snapshots and commits need not wait for the filesystem to free
    // the space (~1 s for 2 GiB on a disk mounted with discard). The next gc, and close, wait
    // for it.
    if (tooBig.length > 0) {
      await removePacks(packs, last); // here: nothing would wait for it after the throw
      const first = tooBig[0]!;
      const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
      throw new TandemError('ERR_DISK_FULL', `gc rewrote ${old.length} packs but left ${tooBig.length} with dead records as they are, for lack of space: pack ${first.pack} needs ${mib(first.needBytes)} free to copy its live records and ${mib(first.freeBytes)} were free; free space on the store's disk or grow it, then run gc again (the store is valid)`, {
        details: { packs: tooBig.map((p) => p.pack), needBytes: first.needBytes, freeBytes: first.freeBytes, packsRewritten: old.length, packsNotMerged: notMerged },
      });
    }
    store.reclaiming = removePacks(packs, last);
    return { blocksKept, blocksRemoved, bytesReclaimed: Math.max(0, oldBytes - newBytes), nodesRemoved, packsRewritten: old.length, packsNotMerged: notMerged };
  })));
  await store.reclaiming; // a failure to delete is this gc's; the next open deletes what is left
  return report;
}

/**
 * Copy the live records `list` of pack `id` (sorted by offset) into the packs being written,
 * each checked (CRC, then BLAKE3 of its payload) first, and add their new places to `moved`.
 * False when a record failed its check: it is not copied, and its entry stays with the pack.
 *
 * The old packs are mostly not in the page cache and the new ones will not be read soon, so
 * both go past it: records close together are read in one span of up to {@link SPAN_BYTES}
 * with O_DIRECT, {@link SPANS_AHEAD} spans in flight while one is checked, and appended directly
 * in batches of up to {@link COPY_BATCH_BYTES}. With one buffered record at a time, a gc moving
 * 1 GiB of live 512 KiB records took 4.1-5.7 s and 2.0-4.0 CPU s (store/README.md has the rest).
 */
async function copyLive(store: Store, id: number, list: readonly Entry[], slots: readonly Buffer[], moved: Entry[]): Promise<boolean> {
  const { packs } = store;
  const spans: Array<{ start: number; end: number; items: Entry[] }> = [];
  for (const it of list) {
    const start = it.loc.offset;
    const end = start + recordLength(it.loc.length);
    const last = spans[spans.length - 1];
    if (last && start - last.end <= SPAN_GAP && end - last.start <= SPAN_BYTES) {
      last.end = end;
      last.items.push(it);
    } else {
      spans.push({ start, end, items: [it] });
    }
  }
  const free = [...slots];
  const reads: Array<Promise<{ buf: Buffer | undefined; slot: Buffer | null }>> = [];
  let next = 0;
  const fill = () => {
    for (; next < spans.length && free.length > 0 && reads.length < SPANS_AHEAD; next++) {
      const { start, end } = spans[next]!;
      // A record larger than a slot (blocks up to 16 MiB) is read into a buffer of its own.
      const slot = end - start <= SPAN_BYTES ? free.pop()! : null;
      const into = slot ?? alignedSlots(1, end - start + 2 * DIRECT_ALIGN)[0]!;
      reads.push(packs.readSpan(id, start, end - start, into).then((buf) => ({ buf, slot }), () => ({ buf: undefined, slot })));
    }
  };
  let ok = true;
  let batch: Array<{ hash: Hash; codec: number; payload: Buffer; base?: Hash }> = [];
  let bytes = 0;
  /** Slots whose records are all in the batch: free again once it is written. */
  let done: Buffer[] = [];
  const write = async () => {
    if (batch.length > 0) {
      // appendMany has copied or written the payloads when it returns: the slots can be reused.
      const locs = await packs.appendMany(batch, { direct: true });
      batch.forEach((r, i) => moved.push({ hash: r.hash, loc: r.base ? { ...locs[i]!, base: r.base } : locs[i]! }));
    }
    free.push(...done);
    batch = [];
    bytes = 0;
    done = [];
  };
  try {
    for (const span of spans) {
      fill();
      const { buf, slot } = await reads.shift()!;
      for (const { hash, loc } of span.items) {
        const at = loc.offset - span.start;
        const rec = buf && decodeRecord(buf.subarray(at, at + recordLength(loc.length))); // undefined when short (a truncated pack)
        const good = rec && rec.hash.equals(hash) && rec.codec === loc.codec && (rec.codec === CODEC_DELTA ? await deltaHolds(store, hash, rec.payload, loc) : blake3Holds(hash, rec.codec, rec.payload));
        if (!rec || !good) {
          ok = false; // this block stays where it is: verify reports it
          continue;
        }
        if (bytes + rec.payload.length > COPY_BATCH_BYTES) await write();
        batch.push({ hash, codec: rec.codec, payload: rec.payload, ...(loc.base ? { base: loc.base } : {}) });
        bytes += rec.payload.length;
      }
      if (slot) done.push(slot);
      if (free.length === 0 && reads.length === 0) await write(); // every slot holds batched records
    }
    await write();
    return ok;
  } finally {
    await Promise.allSettled(reads); // nothing reads into a slot once this returns
  }
}

function blake3Holds(hash: Hash, codec: number, payload: Buffer): boolean {
  const data = decodePayload(codec, payload);
  return data !== undefined && blake3(data).equals(hash);
}

/** A delta record's payload, applied to the store's copy of its base, gives the block (checked by its hash). */
async function deltaHolds(store: Store, hash: Hash, payload: Buffer, loc: BlockLocation): Promise<boolean> {
  if (payload.length < DELTA_PAYLOAD_MIN || !loc.base?.equals(payload.subarray(0, 32))) return false;
  try {
    (await store.applyDeltaPayload(hash, payload, true, true)).release?.();
    return true;
  } catch {
    return false;
  }
}

/**
 * `fn`, and when it fails after a pack write failed (a full disk), the copies it had not synced
 * are given back at once (PackFiles.discardUnsynced: the packs cut back to their durable length,
 * one never made durable deleted), as the store does for its own writes: the disk is left as gc
 * found it apart from the rounds it completed, not full until the next write or open.
 */
async function givingBackOnFailure<T>(packs: PackFiles, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (packs.failed) await packs.discardUnsynced().catch(() => undefined);
    throw e;
  }
}

/**
 * The bytes this process may still write on the filesystem holding `dir`: root may use the blocks
 * ext4 reserves for it (5 % by default), others may not.
 */
async function freeBytes(dir: string): Promise<number> {
  const s = await statfs(dir).catch(() => undefined);
  if (!s) return Infinity; // unknown: one group, as if there were room
  return (process.getuid?.() === 0 ? s.bfree : s.bavail) * s.bsize;
}

/** Delete packs the index no longer names (gc step 5), then make that durable in the directory. */
async function removePacks(packs: PackFiles, ids: readonly number[]): Promise<void> {
  for (const id of ids) await packs.remove(id);
  if (ids.length > 0) await fsyncDir(packs.dir);
}
