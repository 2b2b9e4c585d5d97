/**
 * What happens to every AWS request before its operation runs, in this order: remember the
 * operation (for statistics), check the SigV4 header, add the configured latency, then maybe
 * hold the request, or answer with an injected throttling or server error. Control routes (/_emulator) skip all of it.
 */
import type { FastifyReply, FastifyRequest, preHandlerAsyncHookHandler } from 'fastify';
import { checkSigV4 } from './auth.js';
import type { EmulatorContext } from './context.js';
import { EbsError, Ec2Error } from './errors.js';

export type Service = 'ebs' | 'ec2';

export interface RequestInfo {
  service: Service;
  op: string;
}

const infos = new WeakMap<FastifyRequest, RequestInfo>();

export function requestInfo(req: FastifyRequest): RequestInfo | undefined {
  return infos.get(req);
}

/** Throttling errors of EBS, rotated so clients are exercised against each shape the API defines. */
const EBS_THROTTLES: ReadonlyArray<() => EbsError> = [
  () => new EbsError('RequestThrottledException', 400, 'The request was throttled: too many requests for this account; retry with backoff', 'ACCOUNT_THROTTLED'),
  () => new EbsError('ThrottlingException', 400, 'Rate exceeded'),
  () => new EbsError('RequestThrottledException', 400, 'The request was throttled: too many requests for this snapshot; retry with backoff', 'RESOURCE_LEVEL_THROTTLE'),
  () => new EbsError('ConcurrentLimitExceededException', 400, 'You have reached the limit for concurrent API requests; retry with backoff'),
];

/** A route-level pre-handler for one operation of one service. */
export function markOperation(ctx: EmulatorContext, service: Service, op: string): preHandlerAsyncHookHandler {
  return async (req: FastifyRequest, _reply: FastifyReply) => {
    await prepare(ctx, req, service, op);
  };
}

/** Run the pipeline for a request whose operation is known (EC2 learns it from the body). */
export async function prepare(ctx: EmulatorContext, req: FastifyRequest, service: Service, op: string): Promise<void> {
  infos.set(req, { service, op });
  const auth = checkSigV4(req.headers, ctx.state.region, service);
  if (!auth.ok) {
    if (service === 'ebs') {
      if (auth.kind === 'region' || auth.kind === 'service') throw new EbsError('InvalidSignatureException', 403, auth.message);
      throw new EbsError('AccessDeniedException', 403, auth.message, 'UNAUTHORIZED_ACCOUNT');
    }
    throw new Ec2Error('AuthFailure', auth.message, 401);
  }
  const f = ctx.faults.settings;
  if (f.latencyMs > 0) await new Promise((r) => setTimeout(r, f.latencyMs));
  const d = ctx.faults.decide(op);
  if (d.kind === 'hold') {
    ctx.stats.held++;
    await d.released;
    if (service === 'ebs') throw new EbsError('InternalServerException', 500, 'An internal error occurred; retry the request');
    throw new Ec2Error('InternalError', 'An internal error has occurred; retry the request', 500);
  }
  if (d.kind === 'throttle') {
    ctx.stats.throttled++;
    if (service === 'ebs') throw EBS_THROTTLES[d.n % EBS_THROTTLES.length]!();
    throw new Ec2Error('RequestLimitExceeded', 'Request limit exceeded.', 503);
  }
  if (d.kind === 'deny') {
    ctx.stats.denied++;
    if (service === 'ebs') throw new EbsError('AccessDeniedException', 403, 'You do not have sufficient access to perform this action', 'UNAUTHORIZED_ACCOUNT');
    throw new Ec2Error('UnauthorizedOperation', 'You are not authorized to perform this operation.', 403);
  }
  if (d.kind === 'error') {
    ctx.stats.injectedErrors++;
    if (service === 'ebs') throw new EbsError('InternalServerException', 500, 'An internal error occurred; retry the request');
    throw new Ec2Error(d.n % 2 === 0 ? 'InternalError' : 'Unavailable', 'An internal error has occurred; retry the request', d.n % 2 === 0 ? 500 : 503);
  }
}
