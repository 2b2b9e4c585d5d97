/**
 * The peer protocol routes (sync/README.md, "Routes"): content-addressed reads and writes of
 * nodes and blocks, snapshot lookup and commit, volume leases and the receiving-side counters.
 * Every route is stateless except the lease, so a walk can be resumed from any point.
 */
import type { ServerResponse } from 'node:http';
import { Readable } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { TandemError } from '../../common/errors.js';
import { ByteBudget, DEFAULT_BLOCK_SIZE, type Store } from '../../store/index.js';
import { childChanges } from '../../store/tree.js';
import { checkReceivedSnapshotId } from '../../store/ids.js';
import type { NodeChangeToPut, NodeToPut, SnapshotRecord, TreeNode } from '../../store/types.js';
import { BufferPool, coalesce, decodeFrames, encodeFrames, readAhead, takeRelease } from '../../sync/framing.js';
import { trace } from '../../sync/trace.js';
import { CONFIRMED_NS, FEATURES_HEADER, LEASE_HEADER, POINT_AT_HEADER, PROTOCOL_VERSION, SERVER_FEATURES, changesFromWire, changesToWire, frameBlockLength, fromHex, toHex } from '../../sync/protocol.js';
import type { Home } from '../../appliance/home.js';
import { clearDamage, readDamage } from '../../appliance/damage.js';
import { failedOver } from '../../appliance/recovery/state.js';
import { recoveryFacts } from '../../appliance/recovery-facts.js';
import { SOURCES_NS, checkPushSource, recordPull, recordPushSource, type VolumeSource } from '../../appliance/sources.js';
import type { LeaseTable } from '../leases.js';
import type { ServerStats } from '../stats.js';
import * as S from '../schemas.js';

export interface PeerRouteDeps {
  readonly home: Home;
  readonly store: Store;
  readonly leases: LeaseTable;
  readonly stats: ServerStats;
}

export function nodeToWire(n: TreeNode): S.WireNodeT {
  return { hash: toHex(n.hash), level: n.level, children: n.children.map(toHex) };
}

export function nodeFromWire(n: S.WireNodeT): TreeNode {
  return { hash: fromHex(n.hash), level: n.level, children: n.children.map(fromHex) };
}

/** A node of nodes/put: whole (`children`, with an optional `base`) or a change of its `base` (`changed`). */
function putNodeFromWire(n: S.WirePutNodeT): NodeToPut | NodeChangeToPut {
  if (n.changed !== undefined) {
    if (n.children !== undefined || n.base === undefined) {
      throw new TandemError('ERR_BAD_REQUEST', `node ${n.hash} in nodes/put: send either children, or base with changed (the base's children with these replaced), not both`);
    }
    return { hash: fromHex(n.hash), level: n.level, base: fromHex(n.base), changed: changesFromWire(n.changed) };
  }
  if (n.children === undefined) throw new TandemError('ERR_BAD_REQUEST', `node ${n.hash} in nodes/put has neither children nor changed`);
  const node = { hash: fromHex(n.hash), level: n.level, children: n.children.map(fromHex) };
  return n.base === undefined ? node : { ...node, base: fromHex(n.base) };
}

/**
 * After a bad frame the rest of an upload is read and dropped, up to this much, so the sender
 * sees the 422 answer; past it the connection is reset (the sender then reports the peer as
 * unreachable, and a rerun resends only what is missing).
 */
const DRAIN_LIMIT_BYTES = 64 * 1024 * 1024;

/**
 * Frames decoded ahead of the store's writes (8 x 512 KiB = 4 MiB per upload): the network keeps
 * flowing while a block is written. What they hold counts in {@link RECEIVE_BUDGET_BYTES}.
 */
const RECEIVE_AHEAD_FRAMES = 8;
/**
 * Bytes of decoded frames that all uploads (blocks/put, blocks/repair) hold at once, from a
 * frame's decoding to its block's write (sync/framing.ts DecodeOptions.budget, store/budget.ts): a frame takes its
 * decoded length before its payload is read or inflated. A deflated frame of a 16 MiB block of
 * zeros is 16 KB on the wire: 12 uploads of 24 such frames (390 KB each) took a server's peak RSS
 * up by 378-396 MiB before it and {@link receivePool}'s buffers of every size (4 runs), by
 * 212-229 MiB with both (3 runs; 295-311 MiB with the buffers alone; test/sync/hostile-upload.test.ts).
 * A stream holds at most {@link RECEIVE_AHEAD_FRAMES} read ahead, a write batch and one being
 * written (~12 MiB of 512 KiB blocks): 6 streams (two jobs of 3) need 72 MiB and never wait.
 * Blocks built from deltas count apart (the store's delta budget: Store.putBlocks may wait for it
 * while its stream's read-ahead holds this one).
 */
const RECEIVE_BUDGET_BYTES = 128 * 1024 * 1024;
/**
 * Payload buffers (raw and inflated) reused by every block stream this server receives (the
 * store releases each after writing it). 64 of the default block size cover three parallel
 * streams in flight (read ahead plus two write batches each); buffers of other sizes are kept
 * within the same 32 MiB, which is all that stays allocated between syncs.
 */
const receivePool = new BufferPool(DEFAULT_BLOCK_SIZE, 64);

/**
 * A block stream whose sender goes silent in the middle of a frame is ended after this long
 * (between 60 and 120 s of silence: sync/framing.ts DecodeOptions.stall), so that it holds no
 * incomplete frame (up to 16 MiB) for ever. Between frames a stream may wait: early sending keeps
 * its streams open while the scan looks for new blocks. A sender capped by --bwlimit sends its
 * frames in pieces well under a second apart. `TANDEM_STALL_MS` sets it (tests).
 */
const STALL_MS = Number(process.env.TANDEM_STALL_MS ?? 60_000);
/**
 * Block streams (blocks/put, blocks/repair) receiving a frame at once: a stream holds a slot from
 * a frame's first bytes until it is idle between frames (sync/framing.ts DecodeOptions.slot), so
 * streams that wait for their sender (early sending's, open while the scans of a group's other
 * volumes run) hold none. A stream with a slot holds one incomplete frame, and decoded frames
 * count in {@link RECEIVE_BUDGET_BYTES}: the memory of uploads is bounded whatever the senders do
 * (8 x 16 MiB of incomplete frames at the largest block size). A sync sends
 * on up to 3 streams and a daemon runs 2 jobs at once (appliance/scheduler/runner.ts); a frame
 * past them waits for a slot.
 */
const MAX_BLOCK_STREAMS = 8;
/**
 * blocks/get answers being sent at once. Each holds up to ~10 MiB (blocks read ahead, a chunk the
 * socket has not taken): 300 requests whose answers were never read took a server from 99 MiB to
 * 2.8 GiB of RSS. A pull reads on up to 4 connections; past this, a request waits for a slot as an
 * upload does ({@link STREAM_WAIT_MS}, then 503 ERR_SERVER_BUSY).
 */
const MAX_GET_STREAMS = 8;
/** A frame past {@link MAX_BLOCK_STREAMS} waits this long for a slot, then its stream gets 503 ERR_SERVER_BUSY. `TANDEM_STREAM_WAIT_MS` sets it (tests). */
const STREAM_WAIT_MS = Number(process.env.TANDEM_STREAM_WAIT_MS ?? 60_000);

/**
 * A holder of an upload slot is measured over this much of the time the server waited for its
 * bytes within the frame it holds the slot for (time the server spent writing, with the sender
 * held back by TCP, does not count). `TANDEM_SLOW_WINDOW_MS` sets it (tests).
 */
const SLOW_WINDOW_MS = Number(process.env.TANDEM_SLOW_WINDOW_MS ?? 30_000);
/**
 * While a frame waits for a slot, the slowest holder that sent less than this over the last
 * {@link SLOW_WINDOW_MS} is ended (ERR_SERVER_BUSY) and its slot passed on: 8 uploads that each
 * sent 1 byte every 30 s inside a frame held every slot for as long as they liked (the stall
 * check wants 60 s of silence), and each push meanwhile got 503 after its minute of waiting.
 * 16 KiB/s is a 512 KiB frame in 32 s; a push capped by --bwlimit shares its cap among its up to
 * 3 streams, so only a cap under 48 KiB/s can fall below it, and then only a stream that is the
 * slowest while another waits is cut. Nobody is cut while no frame waits. blocks/get answers
 * keep their slots by the same rule, measured over the time the server waited for their client
 * to take what it wrote.
 */
const SLOW_FLOOR_BYTES_PER_S = 16 * 1024;

/**
 * Bytes moved, and the time the route waited on the other side for them (a sender's bytes, a
 * reader taking an answer's). {@link rate} is the rate over the last {@link SLOW_WINDOW_MS} of that
 * waiting within the current slot hold ({@link hold}).
 */
class WaitedRate {
  private bytes = 0;
  /** ms waited on the other side in waits that ended. */
  private waited = 0;
  /** Start of the wait under way, if any. */
  private since: number | null = null;
  /** (waited, bytes) at the slot's taking and then every quarter window at most: the window's start is found among them. */
  private marks: Array<{ readonly waited: number; readonly bytes: number }> = [];
  /** (waited, bytes) at the last bytes moved in this hold: if that is a window back or more, nothing moved since. */
  private last: { readonly waited: number; readonly bytes: number } | null = null;

  private waitedNow(): number {
    return this.waited + (this.since === null ? 0 : performance.now() - this.since);
  }

  /** A wait on the other side begins. */
  waitBegins(): void {
    this.since = performance.now();
  }

  /** The wait under way, if any, is over. */
  waitEnds(): void {
    if (this.since === null) return;
    this.waited += performance.now() - this.since;
    this.since = null;
  }

  /** `n` bytes moved. */
  moved(n: number): void {
    this.bytes += n;
    if (this.marks.length > 0) this.last = { waited: this.waited, bytes: this.bytes };
    const last = this.marks[this.marks.length - 1];
    if (last && this.waited - last.waited >= SLOW_WINDOW_MS / 4) {
      this.marks.push({ waited: this.waited, bytes: this.bytes });
      // Marks older than the newest one a full window back are not needed.
      while (this.marks.length > 1 && this.marks[1]!.waited <= this.waited - SLOW_WINDOW_MS) this.marks.shift();
    }
  }

  /** A slot was taken: measured from now. */
  hold(): void {
    this.marks = [{ waited: this.waitedNow(), bytes: this.bytes }];
    this.last = null;
  }

  /** The slot was given back. */
  unhold(): void {
    this.marks = [];
    this.last = null;
  }

  /** Bytes a second over at least the last SLOW_WINDOW_MS of waiting in this hold, with that many bytes; undefined while it held for less. */
  rate(): { perSecond: number; bytes: number; seconds: number } | undefined {
    const now = this.waitedNow();
    let m: { waited: number; bytes: number } | undefined;
    for (const x of this.marks) if (x.waited <= now - SLOW_WINDOW_MS) m = x;
    // Nothing moved for a window or more (a reader that stopped taking an answer after the socket
    // took a burst): the rate over the window is nil, however much moved before it.
    if (m && this.last && this.last.waited <= now - SLOW_WINDOW_MS && this.last.waited >= m.waited) m = this.last;
    if (!m) return undefined;
    const seconds = (now - m.waited) / 1000;
    return { perSecond: (this.bytes - m.bytes) / seconds, bytes: this.bytes - m.bytes, seconds };
  }
}

/**
 * An upload's body as the decoder reads it, measured ({@link WaitedRate}: the time the route
 * waited for the sender's bytes); {@link end} makes the read under way (or the next) fail with `err`.
 */
class UploadMeter extends WaitedRate {
  /** The error {@link end} gave, once called. */
  private endedWith: Error | null = null;
  /** Fails the read under way, while one is. */
  private fail: (e: Error) => void = () => undefined;

  async *chunks(source: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
    const it = source[Symbol.asyncIterator]();
    for (;;) {
      if (this.endedWith) throw this.endedWith;
      this.waitBegins();
      let r: IteratorResult<Buffer>;
      try {
        // Each read gets a promise of its own that end() can fail. (A race of every read with one
        // promise that never settles kept a reaction per read on it, and with it the chunk read:
        // a 4 GiB upload was held in memory whole, 4.3 GiB of RSS.)
        r = await new Promise<IteratorResult<Buffer>>((resolve, reject) => {
          this.fail = reject;
          it.next().then(resolve, reject);
        });
      } finally {
        this.fail = () => undefined;
        this.waitEnds();
      }
      if (r.done) return;
      this.moved(r.value.length);
      yield r.value;
    }
  }

  /** End the stream: its read fails with `err`. */
  end(err: Error): void {
    this.endedWith ??= err;
    this.fail(err);
  }
}

/** A slot holder that may be ended for a waiting request: an upload, or a blocks/get answer. */
interface SlotHolder {
  rate(): { perSecond: number; bytes: number; seconds: number } | undefined;
  evict(rate: { perSecond: number; bytes: number; seconds: number }): void;
}

/** Slots for the block streams being received, taken in arrival order. */
class StreamSlots {
  private used = 0;
  private readonly waiting: Array<() => void> = [];
  private readonly holders = new Set<{ readonly holder: SlotHolder; evicted: boolean }>();
  /** Holders ended for a waiter whose slots have not come back yet: one per waiter. */
  private evicting = 0;

  constructor(private readonly max: number) {}

  /**
   * While frames wait, the slowest holders under {@link SLOW_FLOOR_BYTES_PER_S} (one per waiter
   * not yet served by an eviction) are ended; their slots pass on as they come back.
   */
  private evictSlow(): void {
    while (this.evicting < this.waiting.length) {
      let slowest: { holder: SlotHolder; evicted: boolean } | undefined;
      let rate: ReturnType<SlotHolder['rate']>;
      for (const h of this.holders) {
        if (h.evicted) continue;
        const r = h.holder.rate();
        if (r && r.perSecond < SLOW_FLOOR_BYTES_PER_S && (!rate || r.perSecond < rate.perSecond)) {
          slowest = h;
          rate = r;
        }
      }
      if (!slowest || !rate) return;
      slowest.evicted = true;
      this.evicting++;
      slowest.holder.evict(rate);
    }
  }

  /** A slot within `ms` (its release function), or null. A `holder` may be ended for a frame that waits. */
  async take(ms: number, holder?: SlotHolder): Promise<(() => void) | null> {
    if (this.used >= this.max) {
      const got = await new Promise<boolean>((resolve) => {
        const wake = () => {
          clearTimeout(timer);
          clearInterval(check);
          resolve(true);
        };
        const timer = setTimeout(() => {
          clearInterval(check);
          this.waiting.splice(this.waiting.indexOf(wake), 1);
          resolve(false);
        }, ms);
        // A holder becomes slow enough to end only as its window fills: looked at again meanwhile.
        const check = setInterval(() => this.evictSlow(), Math.min(1000, SLOW_WINDOW_MS / 4));
        this.waiting.push(wake);
        this.evictSlow();
      });
      if (!got) return null;
    } else this.used++;
    const entry = holder ? { holder, evicted: false } : undefined;
    if (entry) this.holders.add(entry);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      if (entry) {
        this.holders.delete(entry);
        if (entry.evicted) this.evicting--;
      }
      const next = this.waiting.shift();
      if (next) next(); // the slot passes on
      else this.used--;
    };
  }
}

/** How long an upload is read on after a refusal at most (a silent sender is not waited for). */
const DRAIN_MS = 10_000;

async function drain(stream: Readable, limit: number): Promise<void> {
  let n = 0;
  const timer = setTimeout(() => stream.destroy(), DRAIN_MS);
  try {
    for await (const c of stream.iterator({ destroyOnReturn: true })) {
      n += (c as Buffer).length;
      if (n > limit) break;
    }
  } catch {
    /* the client went away: nothing to answer */
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Write a stream's chunks to a response, giving each payload's pooled buffer back (takeRelease)
 * in the write's callback, once the socket has taken it; waits for 'drain' when the response
 * says so; stops when the client goes away.
 */
async function writeChunks(res: ServerResponse, chunks: AsyncIterable<Buffer>, stallMs: number, onStall: () => void, meter?: WaitedRate): Promise<void> {
  // A client that takes nothing for stallMs is gone or hostile: the answer is cut (its slot and
  // buffers freed) rather than held for ever.
  const waitDrain = () =>
    new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        res.off('drain', done);
        res.off('close', done);
        resolve();
      };
      const timer = setTimeout(() => {
        onStall();
        res.destroy();
        done();
      }, stallMs);
      res.on('drain', done);
      res.on('close', done);
    });
  let waitedOnce = false;
  try {
    for await (const chunk of chunks) {
      if (res.destroyed) return;
      const release = takeRelease(chunk);
      const more = res.write(chunk, release ? (err) => void (err ?? release()) : undefined);
      meter?.moved(chunk.length);
      if (!more) {
        // Measured from the first wait on: what the socket took before it is no sign of how
        // fast the client reads.
        if (!waitedOnce) meter?.hold();
        waitedOnce = true;
        meter?.waitBegins();
        await waitDrain();
        meter?.waitEnds();
      }
    }
    if (!res.destroyed) res.end();
  } catch {
    res.destroy(); // a socket error: the client sees the stream cut short (its end frame missing)
  }
}

/**
 * A failed upload (a bad frame, a stream ended for its slowness or refused a slot, a store error)
 * is answered at once, and the rest of its body is read and dropped behind the answer, as bounded
 * ({@link DRAIN_LIMIT_BYTES}, {@link DRAIN_MS}; past either the connection is closed): a client
 * still sending reads the answer (undici does, and stops sending), and a body read to its end
 * leaves the connection usable. The answer used to wait for the drain when the frame was bad:
 * the drain's timer then closed the connection of a sender under --bwlimit before it finished its
 * body, no answer reached it, and it reported the peer unreachable instead of ERR_BLOCK_CORRUPT
 * (the same held for a refused sender, answered at once since).
 */
function drainBehind(body: Readable): void {
  void drain(body, DRAIN_LIMIT_BYTES);
}

function leaseOf(headers: Record<string, unknown>): string | undefined {
  const v = headers[LEASE_HEADER];
  return typeof v === 'string' && v.length <= 64 ? v : undefined;
}

export function peerRoutes(app: FastifyInstance, deps: PeerRouteDeps): void {
  const { home, store, leases, stats } = deps;
  const slots = new StreamSlots(MAX_BLOCK_STREAMS);
  const getSlots = new StreamSlots(MAX_GET_STREAMS);
  const receiveBudget = new ByteBudget(RECEIVE_BUDGET_BYTES);
  type BusyReply = { header(k: string, v: string): unknown; log: { warn(msg: string): void } };
  /** A slot of `from` within STREAM_WAIT_MS (its release function), else 503 ERR_SERVER_BUSY (logged, Retry-After 30) saying `busy`. */
  const slotWithin = async (from: StreamSlots, reply: BusyReply, logged: string, busy: string, holder?: SlotHolder): Promise<() => void> => {
    const release = await from.take(STREAM_WAIT_MS, holder);
    if (release) return release;
    reply.log.warn(`${logged} waited ${STREAM_WAIT_MS / 1000} s for a slot: refused (ERR_SERVER_BUSY)`);
    reply.header('retry-after', '30');
    throw new TandemError('ERR_SERVER_BUSY', `${home.identity.name} is ${busy}, and none ended within ${STREAM_WAIT_MS / 1000} s. Rerun the sync shortly (it moves only what is missing)`);
  };
  /**
   * An upload's slot (DecodeOptions.slot): ERR_SERVER_BUSY when none came free within
   * STREAM_WAIT_MS. While it holds one and a frame waits, an upload whose sender is the slowest
   * under SLOW_FLOOR_BYTES_PER_S is ended with ERR_SERVER_BUSY (logged).
   */
  const slotOf = (req: { ip: string; url: string; log: { warn(msg: string): void } }, reply: BusyReply, meter: UploadMeter) => {
    let release: (() => void) | null = null;
    const holder: SlotHolder = {
      rate: () => meter.rate(),
      evict: ({ perSecond, bytes, seconds }) => {
        const what = `${bytes} bytes in the last ${seconds.toFixed(0)} s the server waited for it in the middle of a block frame (${perSecond.toFixed(1)} B/s, under the ${SLOW_FLOOR_BYTES_PER_S / 1024} KiB/s a stream keeps its slot at while another waits for one)`;
        req.log.warn(`${req.url} from ${req.ip} ended: its sender sent ${what}; its slot went to a waiting block stream (ERR_SERVER_BUSY); nothing of that frame was stored`);
        reply.header('retry-after', '30');
        meter.end(new TandemError('ERR_SERVER_BUSY', `${home.identity.name} ended this block stream: it sent ${what}, and all ${MAX_BLOCK_STREAMS} slots were taken; the blocks before this frame were stored. Rerun the sync (it moves only what is missing); under --bwlimit, give at least ${(3 * SLOW_FLOOR_BYTES_PER_S) / 1024} KiB/s (a sync sends on up to 3 streams)`, { details: { bytesPerSecond: Math.round(perSecond), floor: SLOW_FLOOR_BYTES_PER_S } }));
      },
    };
    return {
      async take(): Promise<void> {
        release = await slotWithin(slots, reply, 'a block stream', `receiving ${MAX_BLOCK_STREAMS} block streams' frames, as many as it takes at once (the blocks before were stored)`, holder);
        meter.hold();
      },
      give(): void {
        meter.unhold();
        release?.();
        release = null;
      },
    };
  };
  /** Ends an upload whose sender went silent mid-frame (DecodeOptions.stall). */
  const stallOf = (req: { raw: { destroy(): unknown }; ip: string; url: string; log: { warn(msg: string): void } }) => ({
    ms: STALL_MS,
    onStall: () => {
      req.log.warn(`${req.url} from ${req.ip} ended: its sender sent no byte for ${STALL_MS / 1000} s or more in the middle of a block frame (stalled); nothing of that frame was stored`);
      req.raw.destroy();
    },
  });

  /** Store nodes as sent by nodes/put or with a commit (each child present, else nothing stored). */
  const putWireNodes = async (nodes: S.WirePutNodeT[]): Promise<void> => {
    await store.putNodes(nodes.map(putNodeFromWire));
    stats.nodesReceived += nodes.length;
    // A node put again replaces a damaged copy (the peer's `repair --push`): it leaves the damage list.
    await clearDamage(store, nodes.map((n) => n.hash));
  };

  app.get('/v1/health', { schema: { summary: 'liveness and identity (no authentication)', security: [] } }, async () => ({
    status: 'ok',
    name: home.identity.name,
    id: home.identity.id,
    protocol: PROTOCOL_VERSION,
    // The appliances compare times (a replica's age against its RPO, retention's buckets):
    // `appliance doctor` measures the skew from this.
    time: new Date().toISOString(),
    // A certificate staged by `appliance tls rotate`: the peers that pin this appliance learn it
    // here, over a connection pinned to the one in use, and accept both until it is served.
    ...((staged) => (staged ? { nextFingerprint: staged.fingerprint } : {}))(home.stagedTls()),
  }));

  app.post('/v1/tls/ack', { schema: { body: S.TlsAckBody, summary: 'the sender accepts the staged certificate (GET /v1/health nextFingerprint); `appliance tls show` lists who did' } }, async (req) => {
    const body = req.body as S.TlsAckBodyT;
    return { recorded: home.ackStagedTls(body.fingerprint, { id: body.id, name: body.name }) };
  });

  app.get('/v1/stats', { schema: { summary: 'receiving-side counters since the server started' } }, async () => stats);

  /** A push of a volume that runs in EC2 would replace the failover point with stale data (appliance/recovery/state.ts). */
  const refuseIfFailedOver = async (vol: string): Promise<void> => {
    const f = await failedOver(store, vol);
    if (!f) return;
    throw new TandemError(
      'ERR_VOLUME_FAILED_OVER',
      `volume "${vol}" runs in EC2 since ${f.since} (failover ${f.run}, instance ${f.instanceId}): ${home.identity.name} takes no push of it, so the copy there stays the newest. Bring the changes home with \`appliance failback ${vol}\` (replication then resumes), or give the failover up with \`appliance failover ${vol} --end\` on ${home.identity.name}`,
      { details: { volume: vol, ...f } },
    );
  };

  /**
   * A commit without its lease (`lease`: the one sent, expired or released since, if any) of a
   * volume an appliance already pushes: ERR_VOLUME_NAME_TAKEN, as it cannot show it is that one
   * (the source rule, appliance/sources.ts, goes by the lease's holder).
   */
  const refuseWithoutLease = async (vol: string, lease: string | undefined): Promise<void> => {
    const src = await store.getMeta<VolumeSource>(SOURCES_NS, vol);
    if (!src) return;
    throw new TandemError(
      'ERR_VOLUME_NAME_TAKEN',
      `volume "${vol}" on ${home.identity.name} is replicated from appliance ${src.id}, and this commit ${lease === undefined ? 'carries no lease' : 'carries a lease that is no longer held (expired or released)'}, so it cannot show it comes from there; nothing was committed. Take the volume's lock (POST /v1/volumes/${vol}/lock) and commit with its lease`,
      { details: { volume: vol, source: src.id } },
    );
  };

  /**
   * A push found this appliance up to date: its source holds nothing newer than `latest` as of
   * `pointAt` (POINT_AT_HEADER: when it took its snapshot of that root), which dates the recovery
   * point here (meta CONFIRMED_NS; appliance/status.ts). Taken only from the volume's source
   * (checkPushSource passed: `holder` is it, or may take it over), dated between `latest` and a
   * minute past now, and newer than what was recorded; anything else is ignored.
   */
  const confirmPoint = async (vol: string, holder: string, latest: SnapshotRecord, pointAt: string | string[] | undefined): Promise<void> => {
    const at = typeof pointAt === 'string' && pointAt.length <= 64 ? Date.parse(pointAt) : NaN;
    if (!Number.isFinite(at) || at < Date.parse(latest.created) || at > Date.now() + 60_000) return;
    const prior = await store.getMeta<{ root: string; at: string }>(CONFIRMED_NS, vol);
    if (prior && prior.root === latest.root && Date.parse(prior.at) >= at) return;
    await store.putMeta(CONFIRMED_NS, vol, { root: latest.root, at: new Date(at).toISOString(), by: holder });
  };

  app.get('/v1/volumes/:vol/snapshots/latest', { schema: { params: S.VolumeParams, summary: 'the latest snapshot of a volume, or null' } }, async (req) => {
    const { vol } = req.params as { vol: string };
    return { snapshot: await store.latestSnapshot(vol) };
  });

  app.get('/v1/volumes/:vol/snapshots/:id', { schema: { params: S.SnapshotParams, summary: 'one snapshot, or null' } }, async (req) => {
    const { vol, id } = req.params as { vol: string; id: string };
    return { snapshot: await store.getSnapshot(vol, id) };
  });

  app.post('/v1/volumes/:vol/lock', { schema: { params: S.VolumeParams, body: S.LockBody, summary: 'take a lease on the volume for a sync' } }, async (req) => {
    const { vol } = req.params as { vol: string };
    const body = req.body as S.LockBodyT;
    const latest = await store.latestSnapshot(vol);
    // A push sends ifRoot, a pull does not (a request field of its own would break older peers).
    if (body.ifRoot !== undefined) {
      await refuseIfFailedOver(vol);
      await checkPushSource(store, vol, body.holder, latest);
    } else if (latest) {
      await recordPull(store, vol, body.holder, latest);
    }
    // The certificate this appliance staged, if any: the sync's client learns it at once (appliance/replicate.ts).
    const staged = home.stagedTls();
    // What this store's last verify found damaged (GET /v1/damage): a pusher that heals it asks for
    // the list only when there is some (scheduler/steps.ts), one round trip less per push.
    const damage = await readDamage(store);
    // What a recovery of the volume here would take (appliance/recovery-facts.ts): the pusher's status estimates its RTO from it.
    const next = { ...(staged ? { nextFingerprint: staged.fingerprint } : {}), damaged: damage.blocks.length + damage.nodes.length, recovery: await recoveryFacts(store, vol) };
    if (body.ifRoot && latest && latest.root === body.ifRoot) {
      await confirmPoint(vol, body.holder, latest, req.headers[POINT_AT_HEADER]);
      return { upToDate: true, lease: null, expiresInMs: 0, latest, ...next };
    }
    const v = await store.getVolume(vol);
    if (v?.materializing) {
      throw new TandemError('ERR_VOLUME_MATERIALIZING', `volume "${vol}" is being written on ${home.identity.name} (snapshot ${v.materializing.snapshot}); finish that restore first`, { details: { volume: vol } });
    }
    const { lease, expiresInMs } = leases.acquire(vol, body.holder);
    return { upToDate: false, lease, expiresInMs, latest, ...next };
  });

  app.delete('/v1/volumes/:vol/lock/:lease', { schema: { params: S.LeaseParams, summary: 'release a lease' } }, async (req) => {
    const { vol, lease } = req.params as { vol: string; lease: string };
    return { released: leases.volumeOf(lease) === vol && leases.release(lease) };
  });

  app.post('/v1/nodes/has', { schema: { body: S.HashList, summary: 'which nodes are present (a present node implies its whole subtree)' } }, async (req) => {
    const { hashes } = req.body as S.HashListBody;
    return { present: await store.hasNodes(hashes.map(fromHex)) };
  });

  app.post('/v1/nodes/get', { schema: { body: S.NodeHashList, summary: 'nodes in the order asked (as changes of the bases named, where shorter); 404 ERR_NODE_MISSING if one is absent' } }, async (req) => {
    const { hashes, bases } = req.body as S.NodeHashListBody;
    if (bases !== undefined && bases.length !== hashes.length) throw new TandemError('ERR_BAD_REQUEST', `nodes/get names ${bases.length} bases for ${hashes.length} nodes; name one per node (null for none)`);
    const nodes = await store.getNodes(hashes.map(fromHex));
    // A base this store does not hold (or of another level) is ignored: that node goes whole.
    const held = bases ? await store.nodesHeld(bases.map((b) => (b === null ? undefined : fromHex(b)))) : [];
    stats.nodesSent += nodes.length;
    return {
      nodes: nodes.map((n, i) => {
        const b = held[i];
        const changed = b && b.level === n.level ? childChanges(n.children, b.children) : null;
        return changed ? { hash: toHex(n.hash), level: n.level, base: toHex(b!.hash), changed: changesToWire(changed) } : nodeToWire(n);
      }),
    };
  });

  app.post('/v1/nodes/put', { schema: { body: S.NodeList, summary: 'store nodes whose children are all present (else 409 ERR_SNAPSHOT_INCOMPLETE, nothing stored)' } }, async (req) => {
    const { nodes } = req.body as S.NodeListBody;
    await putWireNodes(nodes);
    return { stored: nodes.length };
  });

  app.post('/v1/blocks/has', { schema: { body: S.HashList, summary: 'which blocks are present (the zero hash always is)' } }, async (req) => {
    const { hashes } = req.body as S.HashListBody;
    return { present: await store.hasBlocks(hashes.map(fromHex)) };
  });

  app.post('/v1/blocks/get', { schema: { body: S.BlockGetBody, summary: 'blocks as a framed application/octet-stream (sync/README.md, "Framing"); as deltas of the bases named, where held' } }, async (req, reply) => {
    const body = req.body as S.BlockGetBodyType;
    const hashes = body.hashes.map(fromHex);
    if (body.bases !== undefined && body.bases.length !== hashes.length) throw new TandemError('ERR_BAD_REQUEST', `blocks/get names ${body.bases.length} bases for ${hashes.length} blocks; name one per block (null for none)`);
    const bases = body.bases?.map((b) => (b === null ? null : fromHex(b)));
    const present = await store.hasBlocks(hashes);
    const absent = hashes.filter((_, i) => !present[i]);
    if (absent.length > 0) {
      throw new TandemError('ERR_BLOCK_MISSING', `${absent.length} of the blocks asked are not in the store of ${home.identity.name}`, {
        details: { missing: absent.slice(0, 16).map(toHex), count: absent.length },
      });
    }
    const lease = leaseOf(req.headers);
    // The client verifies every block (as it decodes the stream, or in the store it puts them in).
    // Read past the page cache, as the engine's sends are (sync/engine.ts): received blocks went
    // to the disk directly and a failback pulls what the cache no longer holds.
    // The client asked for deltas (it named bases): a block held as a delta of the base named goes as it is.
    const deflateDeltas = bases !== undefined && body.deflateDeltas === true;
    const frames = encodeFrames(store.getBlocks(hashes, { consumerVerifies: true, direct: true, ...(bases ? { bases, storedDeltas: true } : {}) }), {
      errorFrames: true,
      deflateDeltas: () => deflateDeltas,
      onBlock: (n) => {
        stats.blocksSent++;
        stats.bytesSent += n;
        if (lease) leases.touch(lease); // a moving stream keeps its sync's lease (api/leases.ts)
      },
    });
    // Written here, not through reply.send(stream): a stream piped into the response is read ahead
    // with no sign of when the socket has taken a chunk, so its pooled buffers could not go back
    // (a 1 GiB pull spent ~27 % of the sender's CPU in garbage collection that way).
    // While another request waits for a slot, the answer whose client takes it slowest, under
    // SLOW_FLOOR_BYTES_PER_S over the last SLOW_WINDOW_MS the server waited for it, is cut and its
    // slot passes on: 8 clients reading a byte now and then held every slot (the stall check
    // wants STALL_MS of no reading at all), and each pull meanwhile got 503.
    const meter = new WaitedRate();
    const holder: SlotHolder = {
      rate: () => meter.rate(),
      evict: ({ perSecond, bytes, seconds }) => {
        req.log.warn(`blocks/get from ${req.ip} ended: its client took ${bytes} bytes in the last ${seconds.toFixed(0)} s the server waited for it (${perSecond.toFixed(1)} B/s, under the ${SLOW_FLOOR_BYTES_PER_S / 1024} KiB/s an answer keeps its slot at while another waits for one); its slot went to a waiting request`);
        reply.raw.destroy();
      },
    };
    const release = await slotWithin(getSlots, reply, 'a blocks/get answer', `sending ${MAX_GET_STREAMS} blocks/get answers, as many as it sends at once`, holder);
    try {
      reply.hijack();
      reply.raw.writeHead(200, { 'content-type': 'application/octet-stream', [FEATURES_HEADER]: SERVER_FEATURES });
      // Small frames ready together: one write.
      await writeChunks(reply.raw, coalesce(frames), STALL_MS, () => req.log.warn(`blocks/get from ${req.ip} ended: its client took no byte for ${STALL_MS / 1000} s (stalled)`), meter);
    } finally {
      release();
    }
    trace('server: blocks/get answered');
  });

  app.post('/v1/blocks/put', { schema: { summary: 'store a framed application/octet-stream of blocks, each verified; nothing partial is committed' } }, async (req, reply) => {
    const body = req.body as Readable | undefined;
    if (!(body instanceof Readable)) throw new TandemError('ERR_BAD_REQUEST', 'send the blocks as Content-Type: application/octet-stream in the framing of sync/README.md');
    let received = 0;
    let bytes = 0;
    // Not destroying the request stream on a decode error lets the 422 answer reach the client.
    const meter = new UploadMeter();
    const source = meter.chunks(body.iterator({ destroyOnReturn: false }) as AsyncIterable<Buffer>);
    const lease = leaseOf(req.headers);
    async function* counted() {
      const decoded = decodeFrames(source, { pool: receivePool, budget: receiveBudget, deltas: true, upload: true, stall: stallOf(req), slot: slotOf(req, reply, meter) });
      for await (const f of readAhead(decoded, RECEIVE_AHEAD_FRAMES, (dropped) => dropped.release?.())) {
        if (received === 0) trace('server: first block frame decoded');
        if (lease) leases.touch(lease); // a moving stream keeps its sync's lease (api/leases.ts)
        const n = frameBlockLength(f);
        received++;
        bytes += n;
        stats.blocksReceived++;
        stats.bytesReceived += n;
        if (f.delta) stats.deltasReceived++;
        yield f;
      }
    }
    try {
      const r = await store.putBlocks(counted(), { budget: receiveBudget });
      trace(`server: ${received} blocks stored and flushed`);
      stats.blocksStored += r.stored;
      if (r.needWhole) trace(`server: ${r.needWhole.length} deltas of bases not held here: to be sent whole`);
      return { received, bytesReceived: bytes, stored: r.stored, bytes: r.bytes, ...(r.needWhole ? { needWhole: r.needWhole.map(toHex) } : {}) };
    } catch (e) {
      // Answered at once, the rest read on behind it (bounded), so that a client still sending gets
      // this answer rather than a reset.
      drainBehind(body);
      throw e;
    }
  });

  app.get('/v1/damage', { schema: { summary: "what this store's last verify found damaged or missing: {at, blocks, nodes} (hashes, hex)" } }, async () => readDamage(store));

  app.post('/v1/blocks/repair', { schema: { summary: 'good copies of blocks the store holds damaged or lacks (framed like blocks/put), each verified, written anew and indexed in place of the old record' } }, async (req, reply) => {
    const body = req.body as Readable | undefined;
    if (!(body instanceof Readable)) throw new TandemError('ERR_BAD_REQUEST', 'send the blocks as Content-Type: application/octet-stream in the framing of sync/README.md');
    const meter = new UploadMeter();
    const source = meter.chunks(body.iterator({ destroyOnReturn: false }) as AsyncIterable<Buffer>);
    try {
      // Each batch, once durable, leaves the damage list.
      const decoded = decodeFrames(source, { budget: receiveBudget, upload: true, stall: stallOf(req), slot: slotOf(req, reply, meter) });
      const repaired = await store.repairBlocks(decoded, (hashes) => clearDamage(store, hashes.map(toHex)), { budget: receiveBudget });
      return { repaired };
    } catch (e) {
      drainBehind(body);
      throw e;
    }
  });

  app.post('/v1/snapshots/commit', { schema: { body: S.CommitBody, summary: 'commit a snapshot whose root is present (or among `nodes`, put first as by nodes/put); once committed, releases the lease sent with it' } }, async (req) => {
    const snap = (req.body as S.CommitBodyT).snapshot as SnapshotRecord;
    checkReceivedSnapshotId(snap.id);
    const lease = leaseOf(req.headers);
    if (leases.heldByOther(snap.volume, lease)) {
      throw new TandemError('ERR_VOLUME_LOCKED', `volume "${snap.volume}" is leased by another sync; wait for it to finish and retry`, { details: { volume: snap.volume } });
    }
    const v = await store.getVolume(snap.volume);
    if (v?.materializing) {
      throw new TandemError('ERR_VOLUME_MATERIALIZING', `volume "${snap.volume}" is being written on ${home.identity.name}; finish that restore first`, { details: { volume: snap.volume } });
    }
    await refuseIfFailedOver(snap.volume);
    // The snapshot's last nodes, sent with the commit: put as by nodes/put, before the lease is
    // touched, so that a refusal (ERR_SNAPSHOT_INCOMPLETE: a child or base is missing) leaves the
    // sync its lease to send them again on their own.
    const nodes = (req.body as S.CommitBodyT).nodes;
    if (nodes && nodes.length > 0) await putWireNodes(nodes);
    const owned = lease !== undefined && leases.volumeOf(lease) === snap.volume;
    const holder = owned ? leases.holderOf(lease) : undefined;
    // Without its lease (none sent, or one expired or released) a commit cannot show which
    // appliance pushes the volume: it is taken only for a volume no appliance pushes yet.
    if (holder === undefined) await refuseWithoutLease(snap.volume, lease);
    const unlock = owned ? null : home.lockVolume(snap.volume, 'commit');
    try {
      const source = holder !== undefined ? await checkPushSource(store, snap.volume, holder, await store.latestSnapshot(snap.volume)) : undefined;
      await store.commitSnapshot(snap);
      if (holder !== undefined) await recordPushSource(store, snap.volume, holder, source);
    } finally {
      unlock?.();
    }
    // Released once committed: a refused commit (a node or block missing, a tree that does not
    // fit) leaves the sync its lease to send what is missing and commit again, or to give it up.
    if (owned) leases.release(lease);
    stats.snapshotsCommitted++;
    return { committed: true };
  });
}
