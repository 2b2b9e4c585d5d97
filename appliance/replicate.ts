/**
 * `appliance sync`: replicate a volume to a peer (push) or fail back from it (pull + apply).
 *
 * Push: under the local volume lock, take a fresh snapshot (a full rescan, or only the blocks of
 * a changed-blocks file), take the peer's lease on the volume (one request that also answers
 * "already up to date" when the peer's latest snapshot has the same root), then
 * {@link copySnapshot} local → peer.
 *
 * Pull (`reverse`): the same engine peer → local, for the peer's latest snapshot. With `apply`
 * (failback) the snapshot is then written onto the local volume: the volume is marked
 * materializing, read and compared block by block (it may have changed or been replaced since
 * the disaster), only differing blocks are written, and the written volume is rescanned: its
 * tree root must equal the snapshot's (ERR_VERIFY_FAILED otherwise, and the mark stays). The mark
 * is then cleared.
 *
 * Either way the snapshot both sides now hold is recorded as the sync base (sync-base.ts), so
 * the next sync in either direction is incremental.
 */
import { readFile } from 'node:fs/promises';
import { TandemError, isTandemError } from '../common/errors.js';
import type { Store } from '../store/index.js';
import { checkReceivedSnapshotId } from '../store/ids.js';
import type { Hash, SnapshotRecord, VolumeRecord } from '../store/types.js';
import { copySnapshot, heldBase, type CopyOptions, type CopyResult } from '../sync/engine.js';
import { EarlySender } from '../sync/early.js';
import type { LockAnswer, RemotePeer } from '../api/client.js';
import { checkRecoveryFacts } from './recovery-facts.js';
import type { Home } from './home.js';
import { connectPeer, followCertificate, getPeer, type PeerRecord, type PinChange } from './peers.js';
import { trace } from '../sync/trace.js';
import type { Rate } from '../sync/bwlimit.js';
import { readVolumeState, releaseHold, type Pause } from './scheduler/state.js';
import { beginPush } from './push-attempts.js';
import { recordSyncBase } from './sync-base.js';
import { activePause } from './pause.js';

export interface SyncProgress {
  readonly phase: 'scan' | 'transfer' | 'keep' | 'apply' | 'verify';
  /** Bytes done in this phase. */
  readonly done: number;
  /** Bytes expected in this phase (an estimate during transfer). */
  readonly total: number;
  readonly blocks: number;
}

export interface SyncOptions {
  readonly reverse?: boolean;
  readonly apply?: boolean;
  readonly dryRun?: boolean;
  readonly changedBlocksFile?: string;
  /**
   * With `apply`: write onto a local volume of another size than the pulled snapshot (an image is
   * resized to it; a larger device gets the snapshot on its first bytes). Without it such an apply
   * is refused before anything is written.
   */
  readonly force?: boolean;
  /**
   * With `apply`: false skips the pre-apply snapshot of what the volume holds (applySnapshot),
   * e.g. a replacement disk full of unrelated data that the store has no room to keep.
   */
  readonly keep?: boolean;
  /** Block stream bytes per second, or a function asked every second (a schedule); 0/absent: unlimited. */
  readonly bwlimit?: Rate;
  readonly onProgress?: (p: SyncProgress) => void;
  readonly onNotice?: (message: string) => void;
  readonly signal?: AbortSignal;
}

export interface ApplyResult {
  readonly blocksCompared: number;
  readonly blocksWritten: number;
  readonly blocksZeroed: number;
  readonly bytesWritten: number;
  /** The written volume's rescanned root equals the snapshot's. */
  readonly verified: boolean;
  /**
   * The snapshot of the volume as it was before the apply wrote anything (origin `pre-apply`):
   * what the failback replaced stays restorable. Null when the volume was new or half-written by
   * an earlier apply.
   */
  readonly keptAs: string | null;
}

export interface SyncResult {
  readonly volume: string;
  readonly peer: string;
  readonly direction: 'push' | 'pull';
  readonly dryRun: boolean;
  /** The snapshot synced. */
  readonly snapshot: string;
  readonly root: string;
  /** Nothing had to move: the other side had this tree already. */
  readonly upToDate: boolean;
  readonly nodesSent: number;
  readonly blocksSent: number;
  /** Uncompressed bytes of the blocks sent (dry run: an upper bound). */
  readonly bytesSent: number;
  /** Block stream bytes on the wire (after compression), both directions. */
  readonly wireBytes: number;
  /** HTTP requests made to the peer. */
  readonly requests: number;
  readonly seconds: number;
  readonly applied?: ApplyResult;
  /** The peer's certificate pins changed after the sync (it staged, activated or dropped a certificate: peers.ts followCertificate). */
  readonly certificate?: Exclude<PinChange, 'none'>;
  /** The volume's scheduled jobs are paused (`appliance pause`): this manual sync ran anyway, and said so. */
  readonly paused?: Pause;
}

/** Record the sync base; a push the peer took also releases the daemon's hold on the volume's jobs (scheduler/runner.ts). */
async function recordBase(store: Store, volume: string, peer: string, snap: SnapshotRecord, direction: 'push' | 'pull', taken?: SnapshotRecord, lock?: LockAnswer): Promise<void> {
  await recordSyncBase(store, volume, peer, snap, direction, taken, lock ? checkRecoveryFacts(lock.recovery) : null);
  if (direction === 'push') await releaseHold(store, volume, peer);
}

/** The lock operation name a sync takes (appliance/locks.ts). */
export function syncLockOp(opts: Pick<SyncOptions, 'reverse'>): string {
  return opts.reverse ? 'sync --reverse' : 'sync';
}

/** Sync `volume` with peer `peerName`, taking the local volume lock (ERR_VOLUME_LOCKED if busy). */
export async function syncVolume(home: Home, store: Store, volume: string, peerName: string, opts: SyncOptions = {}): Promise<SyncResult> {
  const release = home.lockVolume(volume, syncLockOp(opts));
  try {
    return await syncVolumeLocked(home, store, volume, peerName, opts);
  } finally {
    release();
  }
}

/**
 * {@link syncVolume} for a caller that holds the volume lock (the CLI takes it before opening
 * the store, so a second sync meets ERR_VOLUME_LOCKED rather than ERR_STORE_BUSY).
 */
export async function syncVolumeLocked(home: Home, store: Store, volume: string, peerName: string, opts: SyncOptions = {}): Promise<SyncResult> {
  if (opts.apply && !opts.reverse) throw new TandemError('ERR_USAGE', '--apply writes a pulled snapshot onto the local volume: use it with --reverse');
  if (opts.changedBlocksFile !== undefined && opts.reverse) throw new TandemError('ERR_USAGE', '--changed-blocks describes the local volume: it applies to a push, not to --reverse');
  if (opts.apply && opts.dryRun) throw new TandemError('ERR_USAGE', '--apply and --dry-run cannot be combined; run --reverse --dry-run to see what would be pulled');
  if (opts.force && !opts.apply) throw new TandemError('ERR_USAGE', '--force lets --reverse --apply write onto a volume of another size: use it with --reverse --apply');
  if (opts.keep === false && !opts.apply) throw new TandemError('ERR_USAGE', '--no-keep skips the snapshot --reverse --apply takes of what it overwrites: use it with --reverse --apply');
  const peer = await getPeer(store, peerName);
  // A manual sync runs whatever a pause says (the operator means it), but says so: a script's
  // log then shows that the daemon's own syncs of the volume are held.
  const paused = activePause((await readVolumeState(store, volume)).paused, Date.now()) ?? undefined;
  if (paused) opts.onNotice?.(describePauseForSync(volume, paused));
  const started = performance.now();
  const remote = connectPeer(peer, { ...(opts.bwlimit ? { bwlimit: opts.bwlimit } : {}), ...(opts.signal ? { signal: opts.signal } : {}) });
  trace('peer connected (lazy)');
  try {
    const r = opts.reverse ? await pull(home, store, remote, volume, peer.name, opts) : await push(home, store, remote, volume, peer.name, opts);
    const seconds = (performance.now() - started) / 1000;
    const certificate = await followPeerCertificate(home, store, peer, remote, opts.onNotice);
    return { ...r, seconds, requests: remote.requests, wireBytes: remote.wireBytesSent + remote.wireBytesReceived, ...(certificate ? { certificate } : {}), ...(paused ? { paused } : {}) };
  } finally {
    await remote.releaseVolume();
    trace('lease released');
    await remote.close();
    trace('peer closed');
  }
}

/** The notice of a manual sync of a paused volume. */
function describePauseForSync(volume: string, p: Pause): string {
  const until = p.until === null ? 'until `appliance resume`' : `until ${p.until}`;
  return `the scheduled jobs of ${volume} are paused (by ${p.by} at ${p.at}, ${until}${p.reason ? `: ${p.reason}` : ''}); this manual sync runs anyway, and \`appliance resume ${volume}\` starts them again`;
}

/**
 * After a sync: when the peer's lock answer named another staged certificate than the record
 * holds (`tls rotate` there, or its staging dropped), or the peer served the staged one (it
 * activated it), follow it as the daemon does every 30 s (peers.ts followCertificate): a host
 * synced by hand or from cron then never meets a refused certificate after the peer's
 * `tls rotate --activate`. No request in the usual case, where nothing changed. A failure here
 * leaves the pins as they were: the sync itself is done.
 */
async function followPeerCertificate(home: Home, store: Store, peer: PeerRecord, remote: RemotePeer, onNotice?: (m: string) => void): Promise<Exclude<PinChange, 'none'> | null> {
  const seen = remote.peerStaged;
  const presented = remote.presentedFingerprint;
  const stagedNews = seen !== undefined && seen !== peer.fingerprint && (seen ?? undefined) !== peer.nextFingerprint;
  if (!stagedNews && (presented === null || presented === peer.fingerprint)) return null;
  try {
    const r = await followCertificate(store, peer, home.identity);
    if (r.change === 'learned') onNotice?.(`${peer.name} staged certificate ${r.peer.nextFingerprint}: taken as well from now on, so its activation breaks no sync${r.acknowledged ? ' (it was told)' : ''}`);
    if (r.change === 'moved') onNotice?.(`${peer.name} now serves certificate ${r.peer.fingerprint}: pinned alone, the old one is taken no more`);
    if (r.change === 'dropped') onNotice?.(`${peer.name} dropped the certificate it had staged: ${r.peer.fingerprint} alone is pinned`);
    return r.change === 'none' ? null : r.change;
  } catch {
    return null; // unreachable now: the daemon, the next sync or `peer update` follows it
  }
}

type Partial = Omit<SyncResult, 'seconds' | 'requests' | 'wireBytes' | 'certificate'>;

function summary(volume: string, peer: string, direction: 'push' | 'pull', snap: SnapshotRecord, copy: CopyResult | null, dryRun: boolean): Partial {
  return {
    volume,
    peer,
    direction,
    dryRun,
    snapshot: snap.id,
    root: snap.root,
    upToDate: copy === null || copy.alreadyPresent || (copy.blocksSent === 0 && copy.nodesSent === 0),
    nodesSent: copy?.nodesSent ?? 0,
    blocksSent: copy?.blocksSent ?? 0,
    bytesSent: copy?.bytesSent ?? 0,
  };
}

/** The engine's transfer progress, counted on from what was sent before it (early sending's tail). */
function transferProgress(opts: SyncOptions, before = { bytes: 0, blocks: 0 }) {
  return (p: { bytesSent: number; bytesTotal: number; blocksSent: number }) =>
    opts.onProgress?.({ phase: 'transfer', done: before.bytes + p.bytesSent, total: before.bytes + Math.max(p.bytesTotal, p.bytesSent), blocks: before.blocks + p.blocksSent });
}

async function push(home: Home, store: Store, remote: RemotePeer, volume: string, peer: string, opts: SyncOptions): Promise<Partial> {
  const vol = await store.getVolume(volume);
  if (!vol) throw new TandemError('ERR_VOLUME_NOT_FOUND', `no volume "${volume}" on this appliance; register it with \`appliance volume add ${volume} --path PATH\``, { details: { volume } });
  // A peer that refuses this sync outright stops the scan as soon as that is known, rather than
  // after minutes of reading a large volume (see refusalWatch).
  const refusal = refusalWatch(remote, vol, peer, home.identity.id, opts);
  // The TCP + TLS handshake with the peer runs while the local snapshot is taken.
  if (!opts.dryRun) remote.warmUp(refusal.peerError);
  const { snapshotVolumeHooked } = await import('./ops.js');
  // Blocks new to the local store start travelling while the scan goes on (sync/early.ts).
  // Once the scan is over, what early sending still sends (its tail) shows as transfer progress.
  let tailFrom: { bytes: number; blocks: number } | null = null;
  const tailSent = () => ({ bytes: Math.max(0, early!.bytes - tailFrom!.bytes), blocks: Math.max(0, early!.blocks - tailFrom!.blocks) }); // blocks refused for a lacking base come off afterwards
  const early = opts.dryRun
    ? null
    : new EarlySender(
        store,
        remote,
        () => {
          if (!tailFrom) return; // still scanning: the scan's progress is shown
          const sent = tailSent();
          opts.onProgress?.({ phase: 'transfer', done: sent.bytes, total: sent.bytes + early!.pending * vol.blockSize, blocks: sent.blocks });
        },
        refusal.peerError,
      );
  let snap: SnapshotRecord;
  try {
    snap = await snapshotVolumeHooked(home, store, volume, {
      ...(opts.changedBlocksFile !== undefined ? { changedBlocksFile: opts.changedBlocksFile } : {}),
      ...(opts.onNotice ? { onNotice: opts.onNotice } : {}),
      signal: refusal.signal,
      ...(early ? { onNewBlocks: (h: Hash[], direct: boolean, replaced: Array<Hash | null>, views?: Buffer[], kept?: boolean, patches?: Array<Buffer | undefined>) => early.add(h, direct, replaced, views, kept, patches), keepViewsUntil: early.done, onScanned: () => early.scanned() } : {}),
      onProgress: (p) => opts.onProgress?.({ phase: 'scan', done: p.blocksDone * vol.blockSize, total: p.blocksTotal * vol.blockSize, blocks: p.blocksDone }),
    });
    trace('local snapshot taken');
    if (early) tailFrom = { bytes: early.bytes, blocks: early.blocks };
  } catch (e) {
    await early?.finish(false);
    throw e;
  } finally {
    refusal.end();
  }
  // The probe's lease (if it took one) is gone before ours is taken: one holder, one lease.
  await refusal.settled();
  const copyOpts = { onProgress: transferProgress(opts), ...(opts.signal ? { signal: opts.signal } : {}) };
  if (opts.dryRun) {
    const latest = await remote.latestSnapshot(volume);
    if (latest?.root === snap.root) return summary(volume, peer, 'push', snap, null, true);
    // As the sync would: blocks equal to the peer's latest are not asked about.
    return summary(volume, peer, 'push', snap, await copySnapshot(store, remote, snap, { ...copyOpts, dryRun: true, base: await heldBase(store, latest) }), true);
  }
  const { lock, held, copy: engine } = await pushTaken(home, store, remote, snap, peer, {
    early,
    ...(opts.signal ? { signal: opts.signal } : {}),
    progress: () => (early ? transferProgress(opts, tailSent()) : copyOpts.onProgress),
  });
  await recordBase(store, volume, peer, held, 'push', snap, lock);
  trace('sync base recorded');
  if (!engine) return summary(volume, peer, 'push', snap, null, false);
  const copy = early ? { ...engine, blocksSent: engine.blocksSent + early.blocks, bytesSent: engine.bytesSent + early.bytes } : engine;
  return summary(volume, peer, 'push', snap, copy, false);
}

/**
 * What the peer answers when it will refuse this sync however long the scan runs: our token is
 * not its token, its certificate is not the pinned one, or it is no Tandem appliance of this
 * protocol. Unreachable or busy is not among them: a peer can come back during a long scan.
 */
const REFUSALS: ReadonlySet<string> = new Set([
  'ERR_UNAUTHORIZED', 'ERR_PEER_FINGERPRINT', 'ERR_PEER_PROTOCOL',
  // Told by the probe's lock request: the peer takes no push of this volume.
  'ERR_VOLUME_FAILED_OVER', 'ERR_VOLUME_NAME_TAKEN', 'ERR_BLOCK_SIZE_MISMATCH',
]);

/** The root a probe's lock request names: no snapshot has it, so the answer is never upToDate. */
const NO_ROOT = '0'.repeat(64);

/**
 * Would `remote` take a push of `volume` from `holder` now? The lock request a push starts with,
 * whose lease, if it gets one, is released at once (not through lockVolume: that lease is not a
 * sync's). Throws the peer's refusal; returns its latest snapshot of the volume.
 */
export async function askPushLock(remote: RemotePeer, volume: string, holder: string): Promise<SnapshotRecord | null> {
  const path = `/v1/volumes/${encodeURIComponent(volume)}/lock`;
  const a = await remote.request<LockAnswer>('POST', path, { holder, ifRoot: NO_ROOT });
  remote.noteLockAnswer(a);
  if (a.lease) await remote.request('DELETE', `${path}/${a.lease}`, undefined, true).catch(() => undefined);
  return a.latest;
}

function blockSizeMismatch(vol: Pick<VolumeRecord, 'name' | 'blockSize'>, peer: string, theirs: SnapshotRecord): TandemError {
  return new TandemError(
    'ERR_BLOCK_SIZE_MISMATCH',
    `peer ${peer} holds "${vol.name}" in blocks of ${theirs.blockSize} bytes, this appliance in blocks of ${vol.blockSize}: the trees cannot be compared and the peer would refuse the snapshot; nothing was committed. Register the volume here with \`--block-size ${theirs.blockSize}\`, or remove it on ${peer} (\`appliance volume remove ${vol.name}\` there) to replicate it anew`,
    { details: { volume: vol.name, peer, blockSize: vol.blockSize, peerBlockSize: theirs.blockSize } },
  );
}

/**
 * The push of a snapshot already taken, after its scan: `appliance sync` (above) and the daemon's
 * push step (scheduler/steps.ts). The peer's lease first (`ifRoot`: nothing more when the peer
 * holds the root), while early sending goes on: its tail is then sent under the lease, as the
 * engine's blocks are (a second sync of the volume meets ERR_VOLUME_LOCKED meanwhile). Then the
 * engine, with the peer's latest snapshot as the base when this store holds it: it asks only
 * about what differs from it. The lock answer named that base the peer's latest and `snap` was
 * taken on it, so the engine need not ask whether the peer has the snapshot or its changed nodes,
 * nor about the blocks early sending saw stored there (a round trip each; on a 50 ms link, 0.15 s
 * of a small sync). Unless a push before this one stopped midway: the nodes it put may be on the
 * peer (push-attempts.ts). Returns the lock answer, the snapshot both sides hold now (the peer's
 * latest when it was up to date) and what the engine sent (null: nothing was to send). The caller
 * records the sync base.
 */
export async function pushTaken(
  home: Home,
  store: Store,
  remote: RemotePeer,
  snap: SnapshotRecord,
  peer: string,
  opts: { early?: EarlySender | null; signal?: AbortSignal; progress?: () => CopyOptions['onProgress'] } = {},
): Promise<{ lock: LockAnswer; held: SnapshotRecord; copy: CopyResult | null }> {
  const early = opts.early ?? null;
  let lock: LockAnswer;
  try {
    lock = await remote.lockVolume(snap.volume, home.identity.id, { ifRoot: snap.root, pointAt: snap.created });
  } catch (e) {
    await early?.finish(false);
    throw e;
  }
  trace(`peer lock answered (upToDate=${lock.upToDate})`);
  if (lock.latest && lock.latest.blockSize !== snap.blockSize) {
    await early?.finish(false);
    throw blockSizeMismatch({ name: snap.volume, blockSize: snap.blockSize }, peer, lock.latest);
  }
  await early?.finish();
  trace('early sending ended');
  if (lock.upToDate && lock.latest) return { lock, held: lock.latest, copy: null };
  const base = await heldBase(store, lock.latest);
  const resumed = await beginPush(store, snap.volume, peer, snap);
  if (resumed) trace(`an earlier push (of ${resumed.snapshot}) stopped midway: nodes are asked about`);
  const onProgress = opts.progress?.();
  const copyOpts = {
    base,
    ...(onProgress ? { onProgress } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
  };
  let copy: CopyResult;
  /** What the first attempt sent, as it last told. */
  let sent = { blocksSent: 0, bytesSent: 0 };
  try {
    copy = await copySnapshot(store, remote, snap, {
      ...copyOpts,
      fresh: resumed === undefined,
      ...(early ? { atTarget: early.atTarget } : {}),
      onProgress: (p) => {
        sent = { blocksSent: p.blocksSent, bytesSent: p.bytesSent };
        onProgress?.(p);
      },
    });
  } catch (e) {
    // The peer lacks blocks or nodes this push counted on: a gc or retention there reclaimed
    // what the push had sent and not yet committed (unreachable until the commit: store/gc.ts).
    // Nothing was committed. Once more, asking the peer about every node and block: only what
    // it lacks now travels again.
    if (!isTandemError(e, 'ERR_SNAPSHOT_INCOMPLETE')) throw e;
    trace(`the peer lost what the push sent (${e.message}): asking it again`);
    let again: CopyResult;
    try {
      again = await copySnapshot(store, remote, snap, copyOpts);
    } catch (e2) {
      if (!isTandemError(e2, 'ERR_SNAPSHOT_INCOMPLETE')) throw e2;
      throw new TandemError('ERR_SNAPSHOT_INCOMPLETE', `peer ${peer} twice reclaimed blocks this push of ${snap.volume} had sent before it could commit them (a gc or retention running there); nothing was committed. Rerun \`appliance sync ${snap.volume} --peer ${peer}\` once it has finished: only what the peer lacks is sent`, { cause: e2, details: e2.details });
    }
    copy = { ...again, blocksSent: sent.blocksSent + again.blocksSent, bytesSent: sent.bytesSent + again.bytesSent };
  }
  trace('copy done');
  return { lock, held: snap, copy };
}

/**
 * A scan still running after this long asks the peer once whether it takes a push of the volume
 * (the lock request a push starts with, and the release of the lease it got), so that a refusal
 * ends the scan whatever early sending does: a token or certificate it does not take, a volume
 * that runs in EC2 after a failover, another appliance's volume of that name, another block
 * size. Short syncs (a change list, a no-op) are over before it: they make no extra request.
 * `TANDEM_PEER_PROBE_MS` sets it (tests; a negative value turns the probe off).
 */
const PROBE_AFTER_MS = Number(process.env.TANDEM_PEER_PROBE_MS ?? 1000);

/**
 * While a push scans its volume, watch what the peer answers: told by the warm-up connection (a
 * wrong certificate, no connection), early sending (its first question or block stream), or a
 * probe (see {@link PROBE_AFTER_MS}). A refusal aborts the scan (`signal`, with the peer's error
 * as the reason, which the scan throws): no local snapshot is taken, and the operator learns
 * within a round trip what is wrong rather than after the whole scan. An unreachable peer is
 * only a notice: the scan goes on, and the sync tries the peer again when it ends. `end()` once
 * the scan is over: later failures are met by the sync's own requests.
 */
function refusalWatch(remote: RemotePeer, vol: VolumeRecord, peer: string, holder: string, opts: Pick<SyncOptions, 'signal' | 'onNotice' | 'dryRun'>) {
  const ctl = new AbortController();
  let scanning = true;
  let told = false;
  /** What the warm-up, early sending or the probe met: a refusal aborts the scan, unreachable is told once. */
  const peerError = (e: unknown): void => {
    if (!scanning || ctl.signal.aborted || !(e instanceof TandemError)) return;
    if (e.code === 'ERR_PEER_UNREACHABLE' && !told) {
      told = true;
      const why = typeof e.details.code === 'string' && e.details.code !== '' ? ` (${e.details.code})` : '';
      opts.onNotice?.(`peer ${peer} does not answer${why}: the scan goes on and the local snapshot will be taken; the sync tries the peer again when the scan ends`);
    }
    if (!REFUSALS.has(e.code)) return;
    trace(`peer refused the sync during the scan: ${e.code}`);
    ctl.abort(e);
  };
  // The caller's signal (Ctrl-C, the daemon stopping) aborts the scan too, with its own reason.
  const outer = opts.signal;
  const follow = () => ctl.abort(outer!.reason);
  if (outer?.aborted) follow();
  else outer?.addEventListener('abort', follow, { once: true });
  let probing: Promise<void> = Promise.resolve();
  const ask = async (): Promise<void> => {
    // A dry run takes no lease, not even for a moment.
    const latest = opts.dryRun ? await remote.latestSnapshot(vol.name) : await askPushLock(remote, vol.name, holder);
    if (latest && latest.blockSize !== vol.blockSize) throw blockSizeMismatch(vol, peer, latest);
  };
  const probe =
    PROBE_AFTER_MS >= 0
      ? setTimeout(() => {
          if (scanning) probing = ask().catch(peerError);
        }, PROBE_AFTER_MS)
      : undefined;
  return {
    signal: ctl.signal,
    peerError,
    end(): void {
      scanning = false;
      clearTimeout(probe);
      outer?.removeEventListener('abort', follow);
    },
    /** Resolves when the probe, if one was sent, has its answer (and its lease is released). */
    settled: (): Promise<void> => probing,
  };
}

async function pull(home: Home, store: Store, remote: RemotePeer, volume: string, peer: string, opts: SyncOptions): Promise<Partial> {
  const local = await store.getVolume(volume);
  if (opts.apply && local?.path === undefined) {
    const steps = local
      ? `attach the device or image to write it onto with \`appliance volume add ${volume} --path PATH\` (an image may not exist yet), then rerun`
      : `pull it first with \`appliance sync ${volume} --peer ${peer} --reverse\`, attach the device or image to write it onto with \`appliance volume add ${volume} --path PATH\` (an image may not exist yet), then rerun with --apply`;
    throw new TandemError('ERR_VOLUME_NOT_FOUND', `--apply writes onto the local volume "${volume}", which has no device or image here: ${steps}`, { details: { volume } });
  }
  const latest = opts.dryRun ? await remote.latestSnapshot(volume) : (await remote.lockVolume(volume, home.identity.id)).latest;
  if (!latest) {
    throw new TandemError('ERR_NOTHING_TO_SYNC', `peer ${peer} has no snapshot of "${volume}"; sync it there first`, { details: { volume, peer } });
  }
  // The record is committed here as the peer gave it: it must be the volume asked for, and dated
  // so that it does not stay this store's latest whatever is taken after it.
  try {
    if (latest.volume !== volume) {
      throw new TandemError('ERR_PEER_PROTOCOL', `peer ${peer} answered the latest snapshot of "${volume}" with one of volume ${JSON.stringify(latest.volume)}; nothing was pulled. Check the peer's version and health (\`appliance doctor\`)`, { details: { volume, peer, answered: latest.volume } });
    }
    checkReceivedSnapshotId(latest.id);
  } catch (e) {
    await remote.releaseVolume();
    throw e;
  }
  // This store's latest snapshot of the volume is a base it holds in full (a failback's: the
  // snapshot the failover started from): the engine reads its nodes here and asks about, fetches
  // and checks only what differs from it (sync/README.md, "Base").
  const base = await store.latestSnapshot(volume);
  const copy = await copySnapshot(remote, store, latest, {
    onProgress: transferProgress(opts), dryRun: opts.dryRun === true, ...(opts.signal ? { signal: opts.signal } : {}),
    ...(base ? { base, baseFrom: 'target' as const } : {}),
  });
  await remote.releaseVolume();
  if (opts.dryRun) return summary(volume, peer, 'pull', latest, copy, true);
  let applied: ApplyResult | undefined;
  if (opts.apply) applied = await applySnapshot(store, local!, latest, opts);
  await recordBase(store, volume, peer, latest, 'pull');
  return { ...summary(volume, peer, 'pull', latest, copy, false), ...(applied ? { applied } : {}) };
}

/**
 * Write `snap` onto the volume's own device or image (the caller holds the volume lock), then
 * prove it: rescan and compare roots.
 *
 * Before anything is written, what the volume holds is snapshotted (origin `pre-apply`): a
 * failback overwrites whatever changed on-premises after the failover, and an operator who finds
 * out later that some of it mattered restores it from there. It costs little: the scan reads and
 * hashes the volume, which the apply had to do anyway to find the differing blocks (it takes
 * them from the two trees instead), and stores only the blocks the store lacks, those changed
 * here since they were last replicated.
 */
async function applySnapshot(store: Store, vol: VolumeRecord, snap: SnapshotRecord, opts: SyncOptions): Promise<ApplyResult> {
  const { materialize } = await import('../sync/materialize.js');
  const { openVolumeReader, openVolumeWriter } = await import('./volumes/index.js');
  const path = vol.path!;
  const { materializing: _previous, ...clean } = vol;
  // Marked before the volume changes (created, resized: openVolumeWriter's beforeChange; else
  // before the first write), so a crash at any point after leaves the mark: a half-made volume is
  // not snapshotted or pushed (an image just created reads as zeros).
  const mark = (await import('./ops.js')).materializingMark(store, clean, snap.id);
  // Opened (and its size checked) before the volume is marked: a refused apply changes nothing.
  // A forced resize waits for the pre-apply snapshot: it would cut what lies past the new size.
  let writer: Awaited<ReturnType<typeof openVolumeWriter>> | null = null;
  try {
    writer = await openVolumeWriter(path, snap.size, { beforeChange: mark });
  } catch (e) {
    if (!isTandemError(e, 'ERR_VOLUME_SIZE_MISMATCH')) throw e;
    if (!opts.force) {
      throw new TandemError(e.code, `cannot apply ${snap.volume}@${snap.id} (${snap.size} bytes, resized on the peer's side) onto volume "${vol.name}", nothing was written: ${e.message}`, { cause: e, details: { volume: vol.name, snapshot: snap.id, ...e.details } });
    }
  }
  let kept: SnapshotRecord | null = null;
  let m;
  try {
    // A volume still marked holds a half-written apply: the first attempt kept what it replaced.
    if (opts.keep !== false && !vol.materializing && !writer?.created) kept = await keepBeforeApply(store, vol, snap, opts);
    writer ??= await openVolumeWriter(path, snap.size, { force: true, beforeChange: mark });
    await mark();
    m = await materialize(store, snap, writer, {
      assumeZero: writer.created,
      ...(kept ? { targetIs: kept } : {}),
      ...(opts.signal ? { signal: opts.signal } : {}),
      onProgress: (p) => opts.onProgress?.({ phase: 'apply', done: p.blocksDone * snap.blockSize, total: p.blocksTotal * snap.blockSize, blocks: p.blocksWritten }),
    });
    await writer.sync();
  } finally {
    await writer?.close();
  }
  // Correctness before speed: read back what is on the volume now and compare trees.
  const whole = await openVolumeReader(path);
  // A device larger than the snapshot (--force) holds it on its first snap.size bytes: those are checked.
  const reader = whole.size === snap.size ? whole : { ...whole, size: snap.size };
  let check: SnapshotRecord;
  try {
    check = await store.scanVolume(reader, {
      volume: vol.name,
      blockSize: snap.blockSize,
      parent: snap,
      origin: 'apply-verify',
      ...(opts.signal ? { signal: opts.signal } : {}),
      onProgress: (p) => opts.onProgress?.({ phase: 'verify', done: p.blocksDone * snap.blockSize, total: p.blocksTotal * snap.blockSize, blocks: p.blocksDone }),
    });
  } finally {
    await reader.close();
  }
  if (check.root !== snap.root) {
    // What was read back is no point of the volume (something else wrote it meanwhile, or the
    // device returns other data): it must not be the volume's latest snapshot, which `restore
    // VOL` and the next sync would take.
    await store.deleteSnapshot(vol.name, check.id).catch(() => undefined);
    throw new TandemError('ERR_VERIFY_FAILED', `after writing snapshot ${snap.id} onto ${path}, the volume reads back with root ${check.root}, not ${snap.root} (something else wrote it meanwhile, or the device returns other data); the volume stays marked materializing: check the device and rerun the sync --reverse --apply`, {
      details: { volume: vol.name, expected: snap.root, got: check.root },
    });
  }
  await store.putVolume({ ...clean, size: snap.size, blockSize: snap.blockSize });
  return { blocksCompared: m.blocksCompared, blocksWritten: m.blocksWritten, blocksZeroed: m.blocksZeroed, bytesWritten: m.bytesWritten, verified: true, keptAs: kept?.id ?? null };
}

/**
 * Room the pre-apply snapshot leaves on the store's disk: it stops when what it stores would eat
 * into this, so that a volume full of unrelated data (a replacement disk) cannot fill the disk
 * and leave the store unable to open, gc or take the next sync.
 */
const KEEP_MARGIN_BYTES = 256 * 1024 * 1024;

/** Snapshot the volume as it is, before an apply overwrites it (see applySnapshot). */
async function keepBeforeApply(store: Store, vol: VolumeRecord, snap: SnapshotRecord, opts: SyncOptions): Promise<SnapshotRecord> {
  const { openVolumeReader } = await import('./volumes/index.js');
  const { statfs } = await import('node:fs/promises');
  const fs = await statfs(store.dir);
  const budget = fs.bavail * fs.bsize - Math.min(KEEP_MARGIN_BYTES, Math.floor((fs.blocks * fs.bsize) / 10));
  const refused = (why: string, cause?: unknown) => new TandemError('ERR_DISK_FULL', `${why} to keep volume "${vol.name}" as it was before the apply (its blocks that differ from ${snap.id}); nothing was written to ${vol.path!}. Free space (\`appliance retention\`, \`appliance gc\`) or rerun with --no-keep to overwrite it without keeping it`, { cause, details: { volume: vol.name, budget } });
  const tooBig = () => refused(`the store's disk cannot spare more than ${Math.max(0, budget)} bytes`);
  if (budget <= 0) throw tooBig();
  let stored = 0;
  const ctl = new AbortController();
  const follow = () => ctl.abort(opts.signal?.reason);
  opts.signal?.addEventListener('abort', follow, { once: true });
  const reader = await openVolumeReader(vol.path!);
  try {
    return await store.scanVolume(reader, {
      volume: vol.name,
      blockSize: vol.blockSize,
      // The pulled snapshot as parent: only blocks that differ from it are looked up and stored.
      parent: snap.blockSize === vol.blockSize ? snap : null,
      origin: 'pre-apply',
      labels: { replacedBy: snap.id },
      signal: ctl.signal,
      onNewBlocks: (hashes) => {
        stored += hashes.length * vol.blockSize;
        if (stored > budget && !ctl.signal.aborted) ctl.abort(tooBig());
      },
      onProgress: (p) => opts.onProgress?.({ phase: 'keep', done: p.blocksDone * vol.blockSize, total: p.blocksTotal * vol.blockSize, blocks: p.blocksStored }),
    });
  } catch (e) {
    if (ctl.signal.aborted && isTandemError(ctl.signal.reason, 'ERR_DISK_FULL')) throw ctl.signal.reason;
    if (!isTandemError(e, 'ERR_DISK_FULL')) throw e;
    throw refused('no space in the store', e);
  } finally {
    opts.signal?.removeEventListener('abort', follow);
    await reader.close();
  }
}

/** The cap config.yaml puts on block traffic with a peer ({@link configuredCap}). */
export interface ConfiguredCap {
  /** What the peer client follows: bytes a second, or the schedule's rate asked every second. */
  readonly rate: Rate;
  /** Bytes a second now (0: no cap now, while a schedule may set one later). */
  readonly now: number;
  /** `replication.schedule` is set: the cap changes as the sync runs. */
  readonly scheduled: boolean;
}

/**
 * The cap config.yaml gives this appliance's block traffic with `peerName`: `replication.bwlimit`
 * and `replication.schedule`, when `peerName` is `replication.peer` (the WAN link they protect);
 * null when there is none. A manual `sync` or `failback` follows it as the daemon's pushes do,
 * unless `--bwlimit` is given. The file is read as config only when it names a cap at all, and
 * then parsed once per edit (the kept copy, config/index.ts homeConfigOf): the parser's modules
 * take ~0.1 s to load in a fresh process, and most appliances set none.
 * ERR_CONFIG_INVALID (the file's problems, and the way around them) when it does not parse.
 */
export async function configuredCap(home: Home, peerName: string): Promise<ConfiguredCap | null> {
  let text: string;
  try {
    text = await readFile(home.paths.config, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new TandemError('ERR_CONFIG_INVALID', `${home.paths.config}: cannot read the config file (${(e as Error).message}) for the replication cap; fix its permissions, or give --bwlimit RATE (0: no cap), which does not read it`, { cause: e, details: { file: home.paths.config, line: 0, key: '' } });
  }
  if (!/\b(?:bwlimit|schedule)\b/.test(text)) return null;
  const [{ homeConfigOf }, { replicationRate, hasSchedule }] = await Promise.all([import('./config/index.js'), import('./config/bwlimit.js')]);
  let r;
  try {
    r = homeConfigOf(home.paths, text).replication; // the kept parsed copy when the file is unchanged
  } catch (e) {
    if (!isTandemError(e, 'ERR_CONFIG_INVALID')) throw e;
    throw new TandemError('ERR_CONFIG_INVALID', `${e.message}. This command reads it for the replication cap; with --bwlimit RATE (0: no cap) it runs without reading it`, { cause: e, details: e.details });
  }
  if (!r || r.peer !== peerName || (r.bwlimit === undefined && !hasSchedule(r))) return null;
  const now = replicationRate(r, new Date());
  if (!hasSchedule(r)) return now === 0 ? null : { rate: now, now, scheduled: false };
  return { rate: () => replicationRate(r, new Date()), now, scheduled: true };
}

/** What an operator reads about a configured cap before a manual sync or failback starts. */
export function describeCap(cap: ConfiguredCap, formatBytes: (n: number) => string): string {
  const now = cap.now === 0 ? 'not capped now' : `capped at ${formatBytes(cap.now)}/s now`;
  return `block traffic ${now} by config.yaml replication.${cap.scheduled ? 'schedule (followed as the sync runs)' : 'bwlimit'}; --bwlimit RATE sets this command's own cap (0: none)`;
}
