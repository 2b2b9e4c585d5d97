/**
 * Identifiers in the shapes AWS uses, so clients that validate ids (or log them) see familiar values.
 */
import { randomBytes, randomUUID } from 'node:crypto';

/** The account every emulated resource belongs to (the documentation's example account). */
export const OWNER_ID = '123456789012';

/** `prefix-` + 17 lowercase hex digits: the long id format of EC2/EBS (snap-, vol-, i-, ami-). */
export function newId(prefix: 'snap' | 'vol' | 'i' | 'ami' | 'r' | 'subnet' | 'sg' | 'vpc'): string {
  return `${prefix}-${randomBytes(9).toString('hex').slice(0, 17)}`;
}

export function newRequestId(): string {
  return randomUUID();
}
