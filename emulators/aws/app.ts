/**
 * Builds the emulator's fastify app: one HTTP server for the EBS direct API (REST-JSON routes
 * under /snapshots), the EC2 Query API (POST /) and the control routes (/_emulator). Errors of
 * every part are rendered here, in the wire shape of the service the request was for.
 */
import Fastify, { type FastifyError, type FastifyInstance, type FastifyRequest } from 'fastify';
import type { EmulatorContext } from './context.js';
import { registerControl } from './control.js';
import { registerEbs } from './ebs.js';
import { registerEc2, renderEc2Error } from './ec2.js';
import { EbsError, Ec2Error } from './errors.js';
import { newRequestId } from './ids.js';
import { requestInfo, type Service } from './pipeline.js';

/**
 * The largest request body: a PutSnapshotBlock carries 512 KiB; EC2 forms are small. Bodies a
 * little over a block reach the handler, which answers with the API's ValidationException.
 */
const BODY_LIMIT = 2 * 1024 * 1024;

function serviceOf(req: FastifyRequest): Service | 'control' {
  const info = requestInfo(req);
  if (info) return info.service;
  if (req.url.startsWith('/_emulator')) return 'control';
  return req.url.startsWith('/snapshots') ? 'ebs' : 'ec2';
}

export async function buildApp(ctx: EmulatorContext, logger: boolean): Promise<FastifyInstance> {
  const app = Fastify({ logger, bodyLimit: BODY_LIMIT });

  // Block payloads and any other untyped body arrive as a Buffer; EC2 forms as a string.
  app.addContentTypeParser('application/octet-stream', { parseAs: 'buffer' }, (_req, body, done) => done(null, body));
  app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string' }, (_req, body, done) => done(null, body));
  app.addContentTypeParser('*', { parseAs: 'buffer' }, (_req, body, done) => done(null, body));

  app.addHook('onRequest', async (_req, reply) => {
    reply.header('x-amzn-RequestId', newRequestId());
  });
  app.addHook('onResponse', async (req, reply) => {
    const info = requestInfo(req);
    if (info) ctx.stats.record(info.op, reply.statusCode);
  });

  app.setErrorHandler((err: FastifyError | EbsError | Ec2Error, req, reply) => {
    const service = serviceOf(req);
    const requestId = String(reply.getHeader('x-amzn-RequestId') ?? newRequestId());
    if (service === 'control') {
      const status = (err as FastifyError).statusCode ?? (err instanceof RangeError ? 400 : 500);
      return reply.code(status).send({ error: err.message });
    }
    if (service === 'ebs') {
      const e = err instanceof EbsError
        ? err
        : (err as FastifyError).statusCode !== undefined && (err as FastifyError).statusCode! < 500
          ? new EbsError('ValidationException', 400, err.message, 'INVALID_PARAMETER_VALUE')
          : new EbsError('InternalServerException', 500, `internal error: ${err.message}`);
      if (e.status >= 500 && !(err instanceof EbsError)) req.log.error(err);
      return reply
        .code(e.status)
        .header('x-amzn-ErrorType', e.type)
        .header('content-type', 'application/json')
        .send(JSON.stringify(e.reason === undefined ? { Message: e.message } : { Message: e.message, Reason: e.reason }));
    }
    const e = err instanceof Ec2Error
      ? err
      : (err as FastifyError).statusCode !== undefined && (err as FastifyError).statusCode! < 500
        ? new Ec2Error('InvalidParameterValue', err.message)
        : new Ec2Error('InternalError', `internal error: ${err.message}`, 500);
    if (e.status >= 500 && !(err instanceof Ec2Error)) req.log.error(err);
    return renderEc2Error(reply, e, requestId);
  });

  app.setNotFoundHandler((req, reply) => {
    const service = serviceOf(req);
    if (service === 'control') return reply.code(404).send({ error: `no control route ${req.method} ${req.url}` });
    if (service === 'ebs') {
      return reply
        .code(404)
        .header('x-amzn-ErrorType', 'UnknownOperationException')
        .header('content-type', 'application/json')
        .send(JSON.stringify({ Message: `No EBS direct API operation at ${req.method} ${req.url}` }));
    }
    return renderEc2Error(reply, new Ec2Error('InvalidAction', `No such route ${req.method} ${req.url}; EC2 requests are POST / with Action=...`), String(reply.getHeader('x-amzn-RequestId')));
  });

  registerEbs(app, ctx);
  registerEc2(app, ctx);
  registerControl(app, ctx);
  return app;
}
