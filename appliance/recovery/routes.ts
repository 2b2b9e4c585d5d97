/**
 * Management API routes of the DR workflows (mounted by `serve` and `daemon` on every
 * appliance; meaningful on the cloud one). Documented in sync/README.md, "Management API".
 *
 * | route | does |
 * | --- | --- |
 * | GET /v1/recovery/runs | failovers and drills recorded here, newest first |
 * | POST /v1/recovery/failback/prepare {volume, stop} | failback step 1: (stop: stop the instance first) snapshot the EC2 volume, import it incrementally; answers the new snapshot |
 * | POST /v1/recovery/failback/complete {volume, snapshot, terminate} | failback step 3 |
 *
 * Authentication and error answers are the server's (bearer token, catalog statuses).
 */
import type { Static } from '@sinclair/typebox';
import { Type } from '../../api/json-schema.js';
import type { FastifyInstance } from 'fastify';
import type { Home } from '../home.js';
import type { Store } from '../../store/index.js';

const VolumeName = Type.String({ pattern: '^[A-Za-z0-9._-]{1,64}$' });
const PrepareBody = Type.Object({ volume: VolumeName, stop: Type.Optional(Type.Boolean()) }, { additionalProperties: false });
const CompleteBody = Type.Object({
  volume: VolumeName,
  snapshot: Type.String({ minLength: 1, maxLength: 128 }),
  terminate: Type.Optional(Type.Boolean()),
}, { additionalProperties: false });
/** For test/api/schemas.test.ts, which checks them against TypeBox's. */
export const RECOVERY_SCHEMAS = { VolumeName, PrepareBody, CompleteBody };

export function recoveryRoutes(home: Home, store: Store) {
  return async (app: FastifyInstance): Promise<void> => {
    app.get('/v1/recovery/runs', { schema: { tags: ['recovery'], summary: 'Failovers and drills, newest first' } }, async () => {
      const { listRuns } = await import('./launch.js');
      return { runs: await listRuns(store) };
    });
    app.post<{ Body: Static<typeof PrepareBody> }>('/v1/recovery/failback/prepare', {
      schema: { tags: ['recovery'], summary: 'Failback step 1: snapshot the EC2 volume and import it incrementally', body: PrepareBody },
    }, async (req) => {
      const { prepare } = await import('./index.js');
      return audited(['failback', 'prepare', req.body.volume, ...(req.body.stop === true ? ['--stop'] : [])], async () => {
        const release = home.lockVolume(req.body.volume, 'failback-prepare');
        try {
          return await prepare(home, store, req.body.volume, { stop: req.body.stop === true });
        } finally {
          release();
        }
      });
    });
    app.post<{ Body: Static<typeof CompleteBody> }>('/v1/recovery/failback/complete', {
      schema: { tags: ['recovery'], summary: 'Failback step 3: mark the volume home, optionally terminate the instances', body: CompleteBody },
    }, async (req) => {
      const { complete } = await import('./index.js');
      return audited(['failback', 'complete', req.body.volume, req.body.snapshot, ...(req.body.terminate === true ? ['--terminate'] : [])], () => complete(store, req.body.volume, req.body.snapshot, req.body.terminate === true));
    });
  };

  /**
   * Run a failback step a peer asked for and record it in this appliance's audit log (it stops
   * or terminates instances and deletes EBS snapshots: `appliance audit` here must show it).
   */
  async function audited<T>(command: string[], fn: () => Promise<T>): Promise<T> {
    const { appendAudit } = await import('../audit.js');
    const record = (exitCode: number, error?: string) => {
      try {
        appendAudit(home.dir, { at: new Date().toISOString(), user: 'peer (API)', pid: process.pid, command: ['(peer API)', ...command], exitCode, ...(error ? { error } : {}) });
      } catch {
        // the audit log could not be written: the step's own answer stands
      }
    };
    try {
      const r = await fn();
      record(0);
      return r;
    } catch (e) {
      record(1, (e as { code?: string }).code ?? 'ERR_INTERNAL');
      throw e;
    }
  }
}
