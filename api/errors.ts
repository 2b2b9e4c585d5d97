/**
 * The API's one mapping from errors to answers: every failure becomes
 * `{"error": {"code", "message", "details"}}` with the status the catalog (common/errors.ts)
 * gives its code. Fastify's own failures (validation, body size, content type, JSON syntax) are
 * mapped onto catalog codes too, so a peer only ever sees catalog codes.
 */
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { TandemError, diskFullError, indexError, isTandemError } from '../common/errors.js';

export interface ErrorAnswer {
  readonly error: { readonly code: string; readonly message: string; readonly details: Record<string, unknown> };
}

/** Turn anything thrown in a route into a TandemError the operator can act on. */
export function toTandemError(e: unknown): TandemError {
  if (isTandemError(e)) return e;
  const fe = e as Partial<FastifyError> & { validation?: unknown };
  if (fe?.validation) {
    return new TandemError('ERR_BAD_REQUEST', `invalid request: ${fe.message ?? 'validation failed'}; see /docs for the schema`);
  }
  switch (fe?.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new TandemError('ERR_PAYLOAD_TOO_LARGE', 'request body exceeds the limit; send fewer hashes or nodes per request (sync/README.md, "Limits")');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
    case 'FST_ERR_CTP_EMPTY_TYPE':
    case 'FST_ERR_CTP_INVALID_TYPE':
      return new TandemError('ERR_BAD_REQUEST', `bad request body: ${fe.message}`);
    default:
      break;
  }
  if (typeof fe?.statusCode === 'number' && fe.statusCode >= 400 && fe.statusCode < 500) {
    return new TandemError('ERR_BAD_REQUEST', `bad request: ${fe.message ?? 'rejected'}`);
  }
  if (e instanceof SyntaxError) return new TandemError('ERR_BAD_REQUEST', `bad request body: ${e.message}`);
  // A full disk met anywhere (a lock file, the index, a pack) is the operator's to fix, not a bug.
  return indexError(e) ?? diskFullError(e, "this appliance's disk", 'free space here, then rerun (nothing was committed)') ?? new TandemError('ERR_INTERNAL', `unexpected server error: ${(e as Error)?.message ?? String(e)}; see the server log`, { cause: e });
}

export function errorAnswer(err: TandemError): ErrorAnswer {
  return { error: { code: err.code, message: err.message, details: err.details } };
}

/** Fastify error handler: logs 5xx, answers with the catalog's status. */
export function handleError(e: unknown, request: FastifyRequest, reply: FastifyReply): void {
  const err = toTandemError(e);
  if (err.http >= 500) request.log.error({ err: e }, err.message);
  void reply.status(err.http).send(errorAnswer(err));
}
