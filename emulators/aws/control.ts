/**
 * Control routes (not AWS; no authentication): fault injection, statistics, a look at the
 * state, and reads/writes of EC2 volumes that stand for changes made on a recovered instance.
 */
import type { FastifyInstance } from 'fastify';
import type { EmulatorContext } from './context.js';

export function registerControl(app: FastifyInstance, ctx: EmulatorContext): void {
  app.post('/_emulator/faults', async (req) => {
    const body = (req.body ?? {}) as Record<string, unknown>;
    return ctx.faults.configure(body);
  });
  app.get('/_emulator/faults', async () => ctx.faults.settings);
  app.get('/_emulator/stats', async () => ctx.stats.toJSON());
  app.post('/_emulator/stats/reset', async () => {
    ctx.stats.reset();
    return ctx.stats.toJSON();
  });
}
