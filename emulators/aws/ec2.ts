/**
 * The EC2 Query API (service "ec2", API version 2016-11-15): POST / with a form body
 * `Action=...&Version=...`, XML answers. Only the actions a DR failover needs are emulated.
 */
import type { FastifyInstance, FastifyReply } from 'fastify';
import type { EmulatorContext } from './context.js';
import { Ec2Error } from './errors.js';
import { prepare } from './pipeline.js';
import { ec2ErrorXml } from './xml.js';

export function renderEc2Error(reply: FastifyReply, e: Ec2Error, requestId: string): FastifyReply {
  return reply.code(e.status).header('content-type', 'text/xml;charset=UTF-8').send(ec2ErrorXml(e.code, e.message, requestId));
}

export function registerEc2(app: FastifyInstance, ctx: EmulatorContext): void {
  app.post('/', async (req) => {
    const form = new URLSearchParams(typeof req.body === 'string' ? req.body : Buffer.isBuffer(req.body) ? req.body.toString('utf8') : '');
    const action = form.get('Action') ?? '';
    await prepare(ctx, req, 'ec2', action || 'Unknown');
    throw new Ec2Error('InvalidAction', `The action ${action} is not valid for this web service.`);
  });
}
