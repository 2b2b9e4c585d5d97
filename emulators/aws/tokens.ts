/**
 * Block tokens and page tokens: opaque to clients, unforgeable (HMAC), and expiring, like the
 * real ones. A block token names one block's data (index + SHA-256); a page token names where a
 * listing resumes. Both are standard base64, which the API's token pattern `^[A-Za-z0-9+/=]+$` allows.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';

/** Bytes of HMAC kept in a token: 128 bits is plenty against guessing in a test emulator. */
const MAC_BYTES = 16;

function mac(key: Buffer, data: Buffer): Buffer {
  return createHmac('sha256', key).update(data).digest().subarray(0, MAC_BYTES);
}

export type TokenCheck<T> = { ok: true; value: T } | { ok: false; expired: boolean };

/** Layout: expiry ms (8 bytes BE) | block index (4 bytes BE) | SHA-256 (32) | MAC (16). */
export function encodeBlockToken(key: Buffer, index: number, digestHex: string, expiresAt: number): string {
  const body = Buffer.alloc(44);
  body.writeBigUInt64BE(BigInt(expiresAt), 0);
  body.writeUInt32BE(index, 8);
  Buffer.from(digestHex, 'hex').copy(body, 12);
  return Buffer.concat([body, mac(key, body)]).toString('base64');
}

export function decodeBlockToken(key: Buffer, token: string, now = Date.now()): TokenCheck<{ index: number; digestHex: string }> {
  const raw = Buffer.from(token, 'base64');
  if (raw.length !== 44 + MAC_BYTES) return { ok: false, expired: false };
  const body = raw.subarray(0, 44);
  if (!timingSafeEqual(mac(key, body), raw.subarray(44))) return { ok: false, expired: false };
  if (Number(body.readBigUInt64BE(0)) < now) return { ok: false, expired: true };
  return { ok: true, value: { index: body.readUInt32BE(8), digestHex: body.subarray(12, 44).toString('hex') } };
}

/** A page token binds the listing (operation + snapshot ids) and the next block index to scan. */
export interface PageState {
  listing: string;
  next: number;
}

export function encodePageToken(key: Buffer, state: PageState, expiresAt: number): string {
  const body = Buffer.from(JSON.stringify([state.listing, state.next, expiresAt]));
  return Buffer.concat([body, mac(key, body)]).toString('base64');
}

export function decodePageToken(key: Buffer, token: string, listing: string, now = Date.now()): TokenCheck<PageState> {
  const raw = Buffer.from(token, 'base64');
  if (raw.length <= MAC_BYTES) return { ok: false, expired: false };
  const body = raw.subarray(0, raw.length - MAC_BYTES);
  if (!timingSafeEqual(mac(key, body), raw.subarray(raw.length - MAC_BYTES))) return { ok: false, expired: false };
  let parsed: unknown;
  try {
    parsed = JSON.parse(body.toString('utf8'));
  } catch {
    return { ok: false, expired: false };
  }
  const [l, next, exp] = parsed as [string, number, number];
  if (l !== listing || !Number.isSafeInteger(next)) return { ok: false, expired: false };
  if (exp < now) return { ok: false, expired: true };
  return { ok: true, value: { listing: l, next } };
}
