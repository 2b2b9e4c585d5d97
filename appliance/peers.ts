/**
 * Peers: the other appliances this one syncs with, kept in the store's meta namespace 'peers'
 * as {name, url, token, fingerprint, added}. A peer is reached with {@link connectPeer}, which
 * pins its certificate fingerprint (api/client.ts).
 */
import { TandemError } from '../common/errors.js';
import { RemotePeer, normalizeFingerprint } from '../api/client.js';

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
  readonly added: string;
}

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

export async function removePeer(store: PeerStore, name: string): Promise<PeerRecord> {
  const p = await getPeer(store, name);
  await store.deleteMeta(PEERS_NS, name);
  return p;
}

/** A peer record without its secret, for listings. */
export function redactPeer(p: PeerRecord): Omit<PeerRecord, 'token'> & { token: string } {
  return { ...p, token: `${p.token.slice(0, TOKEN_SHOWN)}…` };
}

/** A client for a peer, pinned to its fingerprint. */
export function connectPeer(p: PeerRecord, opts: { bwlimit?: number } = {}): RemotePeer {
  return new RemotePeer({ url: p.url, token: p.token, fingerprint: p.fingerprint, name: p.name, ...(opts.bwlimit ? { bwlimit: opts.bwlimit } : {}) });
}
