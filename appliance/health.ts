/**
 * The appliance's own health, beside its volumes': room on the store's disk (a full disk stops
 * every snapshot and every replica arriving) and the TLS certificate's end (tools that check
 * dates stop trusting it then). One place for the thresholds: `appliance doctor` reports them,
 * the daemon alerts on them (`disk_low`, `certificate_expiring`, once per transition) and
 * exports them in /metrics, and `appliance status` prints a line when one is reached.
 */
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { statfs } from 'node:fs/promises';
import type { Home } from './home.js';

/** Below this much free space a store's disk is low whatever its size (a failback's pre-apply budget, store/README.md). */
export const DISK_LOW_BYTES = 256 * 1024 * 1024;
/** ... and below this fraction free. */
export const DISK_LOW_FRACTION = 0.1;
/** A certificate that ends within this many days is expiring. */
export const CERT_EXPIRING_DAYS = 30;

export interface ApplianceHealth {
  readonly storeFreeBytes: number;
  readonly storeDiskBytes: number;
  /** Free space below {@link DISK_LOW_BYTES} or {@link DISK_LOW_FRACTION} of the disk. */
  readonly diskLow: boolean;
  /** Below DISK_LOW_BYTES: the next large write may fail. */
  readonly diskCritical: boolean;
  /** The certificate's end, ISO; null when it cannot be read. */
  readonly certificateNotAfter: string | null;
  /** Ends within {@link CERT_EXPIRING_DAYS} days, or has ended. */
  readonly certificateExpiring: boolean;
}

/** The end of the home's TLS certificate, ISO; null when it cannot be read. */
export function certificateEnd(home: Home): string | null {
  try {
    return new Date(new X509Certificate(readFileSync(home.paths.tlsCert)).validTo).toISOString();
  } catch {
    return null;
  }
}

export async function applianceHealth(home: Home, now = Date.now()): Promise<ApplianceHealth> {
  const fs = await statfs(home.paths.store);
  const free = fs.bavail * fs.bsize;
  const total = fs.blocks * fs.bsize;
  const notAfter = certificateEnd(home);
  return {
    storeFreeBytes: free,
    storeDiskBytes: total,
    diskLow: free < DISK_LOW_BYTES || free < DISK_LOW_FRACTION * total,
    diskCritical: free < DISK_LOW_BYTES,
    certificateNotAfter: notAfter,
    certificateExpiring: notAfter === null || Date.parse(notAfter) - now < CERT_EXPIRING_DAYS * 86_400_000,
  };
}
