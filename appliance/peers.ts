/**
 * Peers: the other appliances this one syncs with, kept in the store's meta namespace 'peers'
 * as {name, url, token, fingerprint, added}. A peer is reached with {@link connectPeer}, which
 * pins its certificate fingerprint (api/client.ts).
 */
import { TandemError } from '../common/errors.js';
import { RemotePeer, normalizeFingerprint } from '../api/client.js';
import type { Rate } from '../sync/bwlimit.js';
import { forgetSyncRecords } from './sync-base.js';

export const PEERS_NS = 'peers';
const PEER_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;
/** Visible characters of a token in `peer list`: enough to tell two apart, too few to use. */
const TOKEN_SHOWN = 4;

export interface PeerRecord {
  readonly name: string;
  readonly url: string;
  readonly token: string;
  /** Uppercase colon-separated SHA-256 fingerprint of the peer's certificate. */
  readonly fingerprint: string;
  /** A certificate the peer staged (`appliance tls rotate` there), taken as well until it serves it ({@link followCertificate}). */
  readonly nextFingerprint?: string;
  readonly added: string;
  /** The identity id the peer answered with when it was last contacted by `peer add` or `peer update` (absent: never contacted so). */
  readonly id?: string;
}

/** What {@link followCertificate} did to a peer's pins. */
export type PinChange = 'none' | 'learned' | 'moved' | 'dropped';

/** The store surface peers need. */
export interface PeerStore {
  getMeta<T>(ns: string, key: string): Promise<T | undefined>;
  putMeta(ns: string, key: string, value: unknown): Promise<void>;
  deleteMeta(ns: string, key: string): Promise<void>;
  listMeta<T>(ns: string): Promise<Array<[string, T]>>;
}

/** Check and normalize a peer definition (ERR_USAGE naming the bad field); changes nothing. */
export function validatePeer(input: { name: string; url: string; token: string; fingerprint: string }): PeerRecord {
  if (!PEER_NAME.test(input.name)) throw new TandemError('ERR_USAGE', `peer name "${input.name}" is not valid; use letters, digits, '.', '_' and '-' (up to 63)`);
  let u: URL;
  try {
    u = new URL(input.url);
  } catch {
    throw new TandemError('ERR_USAGE', `--url "${input.url}" is not a URL; write https://HOST:PORT as the peer's \`serve\` printed it`);
  }
  if (u.protocol !== 'https:' || u.pathname !== '/' || u.search || u.username) {
    throw new TandemError('ERR_USAGE', `--url "${input.url}" must be https://HOST:PORT with no path (peers talk over TLS only)`);
  }
  const token = input.token.trim();
  if (!/^[\x21-\x7e]{16,512}$/.test(token)) throw new TandemError('ERR_USAGE', '--token is not a token; copy the one `appliance init` printed on the peer');
  return { name: input.name, url: u.origin, token, fingerprint: normalizeFingerprint(input.fingerprint), added: new Date().toISOString() };
}

/** ERR_PEER_EXISTS when a peer of that name is registered. */
export async function assertNoPeer(store: PeerStore, name: string): Promise<void> {
  if (await store.getMeta(PEERS_NS, name)) {
    throw new TandemError('ERR_PEER_EXISTS', `a peer named "${name}" exists; remove it first (\`appliance peer remove ${name}\`)`, { details: { peer: name } });
  }
}

/**
 * Contact a peer with `rec`'s URL, certificate pin and token: who answers (ERR_UNAUTHORIZED,
 * ERR_PEER_FINGERPRINT, ERR_PEER_UNREACHABLE otherwise), and how far its clock is from ours
 * (ms, positive when it is ahead; null from a peer that does not tell its time).
 */
export async function contactPeer(rec: PeerRecord): Promise<{ name: string; id: string; clockSkewMs: number | null }> {
  const client = connectPeer(rec);
  try {
    const sent = Date.now();
    const h = await client.health();
    const got = Date.now();
    await client.stats(); // the token is checked too: stats needs it
    const theirs = h.time === undefined ? NaN : Date.parse(h.time);
    return { name: h.name, id: h.id, clockSkewMs: Number.isNaN(theirs) ? null : Math.round(theirs - (sent + got) / 2) };
  } finally {
    await client.close();
  }
}

/** Replace a registered peer's record (ERR_PEER_NOT_FOUND if there is none). */
export async function updatePeer(store: PeerStore, peer: PeerRecord): Promise<void> {
  await getPeer(store, peer.name);
  await store.putMeta(PEERS_NS, peer.name, { ...peer, updated: new Date().toISOString() });
}

/** Register a peer; ERR_PEER_EXISTS if the name is taken. */
export async function addPeer(store: PeerStore, peer: PeerRecord): Promise<void> {
  await assertNoPeer(store, peer.name);
  await store.putMeta(PEERS_NS, peer.name, peer);
}

export async function getPeer(store: PeerStore, name: string): Promise<PeerRecord> {
  const p = await store.getMeta<PeerRecord>(PEERS_NS, name);
  if (!p) throw new TandemError('ERR_PEER_NOT_FOUND', `no peer named "${name}"; pair first with \`appliance peer add ${name} --url URL --token T --fingerprint F\` (see \`appliance peer list\`)`, { details: { peer: name } });
  return p;
}

export async function listPeers(store: PeerStore): Promise<PeerRecord[]> {
  return (await store.listMeta<PeerRecord>(PEERS_NS)).map(([, v]) => v).sort((a, b) => a.name.localeCompare(b.name));
}

/**
 * Forget a peer, and what this appliance recorded of its volumes there (keys `VOL@PEER`): their
 * sync bases, which would keep their snapshots from retention for good and have `status` count
 * the removed peer's copies as replicated (a new appliance added under the name holds none of
 * them), and unfinished pushes to it. The records go first: a crash midway leaves the peer,
 * and `peer remove` again finishes.
 */
export async function removePeer(store: PeerStore, name: string): Promise<PeerRecord> {
  const p = await getPeer(store, name);
  await forgetPeerPoints(store, name);
  await store.deleteMeta(PEERS_NS, name);
  return p;
}

/**
 * Forget what was replicated to peer `name`: its sync bases and pushes under way, and the
 * daemon's last push to it. A peer removed, or re-paired under its name with another appliance
 * (a new cloud appliance), holds none of it: status must not count those points, and the
 * daemon's next job pushes at once, not an RPO later.
 */
export async function forgetPeerPoints(store: PeerStore, name: string): Promise<void> {
  await forgetSyncRecords(store, (_volume, peer) => peer === name);
  const { STATE_NS, updateVolumeState } = await import('./scheduler/state.js');
  for (const [volume, st] of await store.listMeta<{ lastReplicated?: string | null; lastReplicatedTo?: string }>(STATE_NS)) {
    // Records of earlier releases do not name the peer: their point is dropped too (the next job pushes again).
    const toIt = (s: { lastReplicated?: string | null; lastReplicatedTo?: string }) => s.lastReplicatedTo === name || (s.lastReplicatedTo === undefined && (s.lastReplicated ?? null) !== null);
    // lastReplicatedTo '' names no peer: no point counts (scheduler/state.ts pushedPointAt).
    if (toIt(st)) await updateVolumeState(store, volume, (s) => (toIt(s) ? { lastReplicated: null, lastReplicatedAt: undefined, lastReplicatedTo: '' } : null));
  }
}

/** A peer record without its secret, for listings. */
export function redactPeer(p: PeerRecord): Omit<PeerRecord, 'token'> & { token: string } {
  return { ...p, token: `${p.token.slice(0, TOKEN_SHOWN)}…` };
}

/** A client for a peer, pinned to its fingerprint (and to the one it staged, when known). */
export function connectPeer(p: PeerRecord, opts: { bwlimit?: Rate; signal?: AbortSignal } = {}): RemotePeer {
  return new RemotePeer({
    url: p.url,
    token: p.token,
    fingerprint: p.fingerprint,
    ...(p.nextFingerprint ? { nextFingerprint: p.nextFingerprint } : {}),
    name: p.name,
    ...(opts.bwlimit ? { bwlimit: opts.bwlimit } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
  });
}

/**
 * Follow a peer's certificate rotation (`appliance tls rotate` there, then `--activate`), so that
 * it breaks no sync. Over a connection pinned as the record says, the peer's health answer names
 * the certificate it staged: that fingerprint is kept as `nextFingerprint` and taken as well,
 * and the peer is told (POST /v1/tls/ack; its `tls show` lists who has it). Once the peer serves
 * that certificate, it becomes the only pin: the old one is taken no more. A staging the peer
 * dropped is dropped here too. Learned only from the peer holding the pinned key, so nothing
 * else can add a pin. The daemon calls this for every peer every 30 s; `appliance peer update
 * NAME` does it at once. Errors (an unreachable peer) are thrown; nothing is changed then.
 */
export async function followCertificate(store: PeerStore, rec: PeerRecord, me: { id: string; name: string }): Promise<{ change: PinChange; peer: PeerRecord; acknowledged: boolean }> {
  const client = connectPeer(rec);
  try {
    const h = await client.health();
    const presented = client.presentedFingerprint;
    let staged: string | undefined;
    try {
      staged = h.nextFingerprint === undefined ? undefined : normalizeFingerprint(h.nextFingerprint);
    } catch {
      staged = undefined; // not a fingerprint: nothing to learn
    }
    let change: PinChange = 'none';
    let next: PeerRecord = rec;
    const { nextFingerprint: _old, ...pinned } = rec;
    if (presented !== null && presented === rec.nextFingerprint) {
      next = { ...pinned, fingerprint: presented };
      change = 'moved';
    } else if (staged !== undefined && staged !== rec.fingerprint && staged !== rec.nextFingerprint) {
      next = { ...rec, nextFingerprint: staged };
      change = 'learned';
    } else if (staged === undefined && rec.nextFingerprint !== undefined) {
      next = pinned;
      change = 'dropped';
    }
    if (change !== 'none') {
      // Another process may have changed the record meanwhile (`peer update`): then leave it.
      const now = await store.getMeta<PeerRecord>(PEERS_NS, rec.name);
      if (!now || now.fingerprint !== rec.fingerprint || now.nextFingerprint !== rec.nextFingerprint || now.url !== rec.url) return { change: 'none', peer: now ?? rec, acknowledged: false };
      await store.putMeta(PEERS_NS, rec.name, { ...next, updated: new Date().toISOString() });
    }
    let acknowledged = false;
    if (next.nextFingerprint !== undefined) {
      // Only informs the peer's operator (`tls show`): a peer that does not take it changes nothing here.
      acknowledged = await client.ackStagedCertificate(next.nextFingerprint, me).catch(() => false);
    }
    return { change, peer: next, acknowledged };
  } finally {
    await client.close();
  }
}
