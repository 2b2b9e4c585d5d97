/**
 * The Signature Version 4 check: every AWS request must carry an `Authorization` header of the
 * SigV4 form whose credential scope names this emulator's region and the right service.
 *
 * The signature itself is not verified (any access key and secret work): the point is to catch
 * unsigned requests and clients configured for another region or service, the two mistakes an
 * operator makes when pointing the appliance at an endpoint.
 */
import type { IncomingHttpHeaders } from 'node:http';

export type AuthResult =
  | { ok: true; accessKeyId: string }
  | { ok: false; kind: 'missing' | 'malformed' | 'region' | 'service'; message: string };

const SCHEME = 'AWS4-HMAC-SHA256';

export function checkSigV4(headers: IncomingHttpHeaders, region: string, service: string): AuthResult {
  const auth = headers.authorization;
  if (!auth) {
    return { ok: false, kind: 'missing', message: 'Missing Authentication Token: the request is not signed; sign it with AWS Signature Version 4 (configure AWS credentials)' };
  }
  if (!auth.startsWith(`${SCHEME} `)) {
    return { ok: false, kind: 'malformed', message: `Authorization header must use ${SCHEME} (Signature Version 4)` };
  }
  const fields = new Map<string, string>();
  for (const part of auth.slice(SCHEME.length + 1).split(',')) {
    const eq = part.indexOf('=');
    if (eq > 0) fields.set(part.slice(0, eq).trim(), part.slice(eq + 1).trim());
  }
  const credential = fields.get('Credential');
  const scope = credential?.split('/');
  if (!scope || scope.length !== 5 || scope[4] !== 'aws4_request' || !fields.get('SignedHeaders') || !fields.get('Signature')) {
    return { ok: false, kind: 'malformed', message: 'Authorization header requires Credential=AKID/DATE/REGION/SERVICE/aws4_request, SignedHeaders and Signature' };
  }
  if (!headers['x-amz-date'] && !headers.date) {
    return { ok: false, kind: 'malformed', message: 'Authorization header requires an X-Amz-Date or Date header' };
  }
  if (scope[2] !== region) {
    return { ok: false, kind: 'region', message: `Credential should be scoped to a valid region, not '${scope[2]}'; this endpoint serves region '${region}' (set AWS_REGION=${region})` };
  }
  if (scope[3] !== service) {
    return { ok: false, kind: 'service', message: `Credential should be scoped to correct service: '${service}', not '${scope[3]}'` };
  }
  return { ok: true, accessKeyId: scope[0]! };
}
