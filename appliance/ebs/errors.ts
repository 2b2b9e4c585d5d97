/**
 * How EBS direct API failures are classified (retry or not) and turned into TandemErrors that
 * tell the operator what to do next.
 */
import { TandemError } from '../../common/errors.js';

/** What the retry loop does with a failed attempt. */
export type FailureKind =
  /** Slow down: halve the concurrency limit, back off, retry. */
  | 'throttle'
  /** A server or network hiccup: back off, retry. */
  | 'transient'
  /** "Does not exist": retried only within the eventual-consistency grace period. */
  | 'not-found'
  /** The request itself is wrong (or refused): retrying cannot help. */
  | 'fatal';

/** Exception names AWS uses for "too many requests" on the EBS direct APIs. */
const THROTTLE_NAMES = new Set([
  'RequestThrottledException',
  'ThrottlingException',
  'ConcurrentLimitExceededException',
  'ServiceQuotaExceededException',
  'TooManyRequestsException',
  'SlowDown',
]);
/** Node / SDK network failures worth another attempt. */
const NETWORK_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'EAI_AGAIN', 'ENOTFOUND', 'UND_ERR_SOCKET', 'ECONNABORTED']);
const CREDENTIAL_NAMES = new Set(['CredentialsProviderError', 'UnrecognizedClientException', 'InvalidSignatureException', 'ExpiredTokenException', 'InvalidClientTokenId', 'SignatureDoesNotMatch', 'IncompleteSignatureException', 'MissingAuthenticationTokenException']);

interface AwsLike {
  name?: string;
  code?: string;
  message?: string;
  Reason?: string;
  $metadata?: { httpStatusCode?: number };
  $response?: { statusCode?: number };
  cause?: unknown;
}

function statusOf(e: AwsLike): number | undefined {
  return e.$metadata?.httpStatusCode ?? e.$response?.statusCode;
}

function isCredentialProblem(e: AwsLike): boolean {
  const name = e.name ?? '';
  const msg = e.message ?? '';
  return CREDENTIAL_NAMES.has(name) || /Region is missing|Could not load credentials|credential should be scoped|security token included in the request is invalid/i.test(msg);
}

/** The EBS `Reason` of a ValidationException (e.g. INVALID_BLOCK_TOKEN), if any. */
export function validationReason(e: unknown): string | undefined {
  const err = e as AwsLike;
  return err?.name === 'ValidationException' ? err.Reason : undefined;
}

/** True for an expired or unknown block/page token: list again instead of failing. */
export function isExpiredToken(e: unknown): boolean {
  const r = validationReason(e);
  if (r === 'INVALID_BLOCK_TOKEN' || r === 'INVALID_PAGE_TOKEN') return true;
  const err = e as AwsLike;
  return err?.name === 'ValidationException' && /token/i.test(err.message ?? '') && /expired|invalid/i.test(err.message ?? '');
}

export function classify(e: unknown): FailureKind {
  if (e instanceof TandemError) return 'fatal';
  const err = (e ?? {}) as AwsLike;
  const name = err.name ?? '';
  if (THROTTLE_NAMES.has(name)) return 'throttle';
  if (isCredentialProblem(err)) return 'fatal';
  if (name === 'ResourceNotFoundException') return 'not-found';
  if (name === 'ValidationException' || name === 'AccessDeniedException' || name === 'ConflictException') return 'fatal';
  const status = statusOf(err);
  if (status === 429) return 'throttle';
  if (name === 'InternalServerException' || name === 'ServiceUnavailableException' || name === 'TimeoutError' || name === 'RequestTimeout') return 'transient';
  if (status !== undefined && status >= 500) return 'transient';
  const code = err.code ?? (err.cause as AwsLike | undefined)?.code;
  if (code && NETWORK_CODES.has(code)) return 'transient';
  if (/socket hang up|ECONNRESET|other side closed|terminated/i.test(err.message ?? '')) return 'transient';
  if (status !== undefined && status >= 400) return 'fatal';
  // Unknown failures without a status (a stream broke, a parser choked on a cut body): retry, bounded.
  return 'transient';
}

/**
 * Map an EBS failure to a TandemError with advice. `what` names the call and its subject,
 * e.g. "StartSnapshot for volume db".
 */
export function ebsError(e: unknown, what: string): TandemError {
  if (e instanceof TandemError) return e;
  const err = (e ?? {}) as AwsLike;
  const name = err.name ?? 'Error';
  const reason = err.Reason ? ` (${err.Reason})` : '';
  const msg = `${what}: ${name}${reason}: ${err.message ?? String(e)}`;
  const details: Record<string, unknown> = { awsError: name, reason: err.Reason, httpStatus: statusOf(err) };
  if (isCredentialProblem(err)) {
    return new TandemError('ERR_AWS_CREDENTIALS', `${msg}; set AWS_REGION to the region of the snapshots and provide credentials through the standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)`, { cause: e, details });
  }
  if (name === 'AccessDeniedException' || statusOf(err) === 403) {
    return new TandemError('ERR_AWS_ACCESS_DENIED', `${msg}; grant the appliance's IAM role ebs:StartSnapshot, ebs:PutSnapshotBlock, ebs:CompleteSnapshot, ebs:ListSnapshotBlocks, ebs:ListChangedBlocks, ebs:GetSnapshotBlock (and kms:* on the key for encrypted snapshots)`, { cause: e, details });
  }
  if (name === 'ResourceNotFoundException') {
    return new TandemError('ERR_AWS_NOT_FOUND', `${msg}; check the snapshot id and that AWS_REGION is the snapshot's region`, { cause: e, details });
  }
  if (name === 'ValidationException' || name === 'ConflictException') {
    return new TandemError('ERR_AWS_VALIDATION', `${msg}; the request was refused as invalid, retrying will not help: check the ids, the KMS key and the volume size`, { cause: e, details });
  }
  if (classify(e) === 'throttle') {
    return new TandemError('ERR_AWS_THROTTLED', `${msg}; EBS kept throttling after every retry: run fewer transfers at once or ask AWS for a higher EBS direct API quota, then rerun (it resumes)`, { cause: e, details });
  }
  return new TandemError('ERR_AWS_FAILED', `${msg}; rerun the command (an export resumes where it stopped)`, { cause: e, details });
}
