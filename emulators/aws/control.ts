/**
 * Control routes (not AWS; no authentication; JSON): fault injection, statistics, a summary of
 * the state, and reads/writes of EC2 volumes that stand for changes made on a recovered
 * instance. Bad input is answered with 400 {error} and changes nothing.
 */
import type { FastifyInstance } from 'fastify';
import { EBS_BLOCK_SIZE } from './blobs.js';
import type { EmulatorContext, LaunchFault } from './context.js';
import { readVolume, volumeDigests, writeVolume } from './volumes.js';

export function registerControl(app: FastifyInstance, ctx: EmulatorContext): void {
  const { state } = ctx;

  app.post('/_emulator/faults', async (req) => ctx.faults.configure((req.body ?? {}) as Record<string, unknown>));
  app.get('/_emulator/faults', async () => ctx.faults.settings);

  // Launch faults by instance type: `{"r5.large": "capacity", "t3.small": "fail", "m5.large": "lost"}` replaces them all; `{}` clears.
  app.post('/_emulator/launch-faults', async (req) => {
    const body = (req.body ?? {}) as Record<string, unknown>;
    if (typeof body !== 'object' || Array.isArray(body)) throw Object.assign(new Error('body must be {instanceType: "capacity" | "fail"}'), { statusCode: 400 });
    for (const [type, how] of Object.entries(body)) {
      if (how !== 'capacity' && how !== 'fail' && how !== 'lost') throw Object.assign(new Error(`launch fault of ${type} must be "capacity", "fail" or "lost"`), { statusCode: 400 });
    }
    ctx.launchFaults.clear();
    for (const [type, how] of Object.entries(body)) ctx.launchFaults.set(type, how as LaunchFault);
    return Object.fromEntries(ctx.launchFaults);
  });
  app.get('/_emulator/launch-faults', async () => Object.fromEntries(ctx.launchFaults));

  app.get('/_emulator/stats', async () => ctx.stats.toJSON());
  app.post('/_emulator/stats/reset', async () => {
    ctx.stats.reset();
    return ctx.stats.toJSON();
  });

  function volume(id: string) {
    const v = state.volumes.get(id);
    if (!v || v.state === 'deleted') throw Object.assign(new Error(`no volume ${id}`), { statusCode: 404 });
    return v;
  }

  app.post<{ Params: { volumeId: string } }>('/_emulator/volumes/:volumeId/write', async (req) => {
    const v = volume(req.params.volumeId);
    const { offset, dataBase64 } = (req.body ?? {}) as { offset?: unknown; dataBase64?: unknown };
    if (typeof offset !== 'number' || typeof dataBase64 !== 'string') {
      throw Object.assign(new Error('body must be {offset: number, dataBase64: string}'), { statusCode: 400 });
    }
    // A write stands for the recovered server's own: an instance that is not running writes nothing.
    state.tickInstances();
    const inst = v.attachedTo ? state.instances.get(v.attachedTo) : undefined;
    if (inst && inst.state !== 'running' && inst.state !== 'pending') {
      throw Object.assign(new Error(`volume ${v.id} belongs to instance ${inst.id}, which is ${inst.state}: nothing writes to it`), { statusCode: 409 });
    }
    const data = Buffer.from(dataBase64, 'base64');
    try {
      const r = await writeVolume(state, v, offset, data);
      return { volumeId: v.id, offset, length: data.length, blocksChanged: r.blocksChanged };
    } catch (e) {
      throw e instanceof RangeError ? Object.assign(e, { statusCode: 400 }) : e;
    }
  });

  app.get<{ Params: { volumeId: string }; Querystring: { offset?: string; length?: string; format?: string } }>(
    '/_emulator/volumes/:volumeId/read',
    async (req, reply) => {
      const v = volume(req.params.volumeId);
      const offset = Number(req.query.offset ?? 0);
      const length = Number(req.query.length ?? EBS_BLOCK_SIZE);
      let data: Buffer;
      try {
        data = await readVolume(state, v, offset, length);
      } catch (e) {
        throw e instanceof RangeError ? Object.assign(e, { statusCode: 400 }) : e;
      }
      if (req.query.format === 'raw') return reply.header('content-type', 'application/octet-stream').send(data);
      return { volumeId: v.id, offset, length, dataBase64: data.toString('base64') };
    },
  );

  app.get<{ Params: { volumeId: string }; Querystring: { first?: string; count?: string } }>('/_emulator/volumes/:volumeId/digests', async (req) => {
    const v = volume(req.params.volumeId);
    const first = Number(req.query.first ?? 0);
    const count = req.query.count === undefined ? (v.sizeGiB * 1024 * 1024 * 1024) / EBS_BLOCK_SIZE - first : Number(req.query.count);
    try {
      return { volumeId: v.id, blockSize: EBS_BLOCK_SIZE, first, digests: volumeDigests(v, first, count) };
    } catch (e) {
      throw e instanceof RangeError ? Object.assign(e, { statusCode: 400 }) : e;
    }
  });

  app.get('/_emulator/state', async () => {
    state.tickInstances();
    const snapshots = [...state.snapshots.keys()].map((id) => state.snapshot(id)!);
    return {
      region: state.region,
      snapshots: snapshots.map((s) => ({
        id: s.id,
        status: s.status,
        parentId: s.parentId,
        volumeSizeGiB: s.volumeSizeGiB,
        blocksWritten: s.blocks.size,
        volumeId: s.volumeId,
        tags: s.tags,
      })),
      volumes: [...state.volumes.values()].map((v) => ({ id: v.id, state: v.state, sizeGiB: v.sizeGiB, snapshotId: v.snapshotId, attachedTo: v.attachedTo, device: v.device })),
      images: [...state.images.values()].map((i) => ({ id: i.id, name: i.name, state: i.state, snapshots: i.mappings.map((m) => m.snapshotId) })),
      instances: [...state.instances.values()].map((i) => ({ id: i.id, state: i.state, imageId: i.imageId, subnetId: i.subnetId, privateIp: i.privateIp, volumes: i.volumes.map((v) => v.volumeId), tags: i.tags })),
      subnets: [...state.subnets.values()].map((s) => ({ id: s.id, cidr: s.cidr, tags: s.tags })),
    };
  });
}
