/**
 * Request and answer schemas of the peer protocol (JSON Schema, built as TypeBox would by
 * ./json-schema.ts, with TypeBox's static types). Fastify validates
 * every request against them, so a malformed request gets 400 ERR_BAD_REQUEST and changes
 * nothing; @fastify/swagger publishes them at /docs.
 */
import type { Static } from '@sinclair/typebox';
import { Type } from './json-schema.js';
import {
  HEX_HASH_PATTERN,
  MAX_CHILDREN,
  MAX_HASHES_PER_REQUEST,
  MAX_HEIGHT,
  MAX_NODES_PER_REQUEST,
  SNAPSHOT_ID_PATTERN,
  VOLUME_PATTERN,
} from '../sync/protocol.js';

/** Largest block size a snapshot may declare (16 MiB, as appliance/ops.ts MAX_BLOCK_SIZE). */
const MAX_BLOCK_SIZE = 16 * 1024 * 1024;
/** Smallest block size (4 KiB, as appliance/ops.ts MIN_BLOCK_SIZE). */
const MIN_BLOCK_SIZE = 4096;

export const HexHash = Type.String({ pattern: HEX_HASH_PATTERN, description: 'BLAKE3-256, 64 lowercase hex digits' });
export const VolumeName = Type.String({ pattern: VOLUME_PATTERN, maxLength: 128 });
export const SnapshotId = Type.String({ pattern: SNAPSHOT_ID_PATTERN, maxLength: 128 });

export const HashList = Type.Object(
  { hashes: Type.Array(HexHash, { maxItems: MAX_HASHES_PER_REQUEST }) },
  { additionalProperties: false },
);
export type HashListBody = Static<typeof HashList>;

/**
 * blocks/get: the blocks asked, and optionally for each a block the client holds that it may
 * differ little from (`bases`, null where none): the answer sends such a block as a delta frame
 * when the server holds that base too (sync/README.md, "Framing"). Only sent to a server that
 * announces `block-delta` in `x-tandem-features`.
 */
export const BlockGetBody = Type.Object(
  {
    hashes: Type.Array(HexHash, { maxItems: MAX_HASHES_PER_REQUEST }),
    bases: Type.Optional(Type.Array(Type.Union([HexHash, Type.Null()]), { maxItems: MAX_HASHES_PER_REQUEST })),
    /** With bases: deltas may come deflated (codec 3, sync/README.md "Framing"). */
    deflateDeltas: Type.Optional(Type.Boolean()),
  },
  { additionalProperties: false },
);
export type BlockGetBodyType = Static<typeof BlockGetBody>;

/**
 * nodes/get: the nodes asked, and optionally for each a node the client holds at the same
 * position of an earlier tree (`bases`, null where none): the answer gives a node as the
 * children that differ from it where that is shorter.
 */
export const NodeHashList = Type.Object(
  {
    hashes: Type.Array(HexHash, { maxItems: MAX_NODES_PER_REQUEST }),
    bases: Type.Optional(Type.Array(Type.Union([HexHash, Type.Null()]), { maxItems: MAX_NODES_PER_REQUEST })),
  },
  { additionalProperties: false },
);
export type NodeHashListBody = Static<typeof NodeHashList>;

export const PresentAnswer = Type.Object({ present: Type.Array(Type.Boolean()) });

export const WireNode = Type.Object(
  {
    hash: HexHash,
    level: Type.Integer({ minimum: 1, maximum: MAX_HEIGHT }),
    children: Type.Array(HexHash, { minItems: 1, maxItems: MAX_CHILDREN }),
  },
  { additionalProperties: false },
);
export type WireNodeT = Static<typeof WireNode>;

/**
 * A node to store, with the node at its position in the sync's base snapshot (store/types.ts
 * NodeToPut), or as a change of that base node: `changed` ([index, child] pairs) instead of
 * `children` (store/types.ts NodeChangeToPut). Exactly one of the two (checked by the route).
 */
export const WirePutNode = Type.Object(
  {
    hash: HexHash,
    level: WireNode.properties.level,
    children: Type.Optional(WireNode.properties.children),
    base: Type.Optional(HexHash),
    changed: Type.Optional(Type.Array(Type.Tuple([Type.Integer({ minimum: 0, maximum: MAX_CHILDREN - 1 }), HexHash]), { maxItems: MAX_CHILDREN })),
  },
  { additionalProperties: false },
);
export type WirePutNodeT = Static<typeof WirePutNode>;

export const NodeList = Type.Object({ nodes: Type.Array(WirePutNode, { maxItems: MAX_NODES_PER_REQUEST }) }, { additionalProperties: false });
export type NodeListBody = Static<typeof NodeList>;

export const Snapshot = Type.Object(
  {
    id: SnapshotId,
    volume: VolumeName,
    size: Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER }),
    blockSize: Type.Integer({ minimum: MIN_BLOCK_SIZE, maximum: MAX_BLOCK_SIZE }),
    root: HexHash,
    height: Type.Integer({ minimum: 1, maximum: MAX_HEIGHT }),
    created: Type.String({ format: 'date-time', maxLength: 64 }),
    parent: Type.Union([SnapshotId, Type.Null()]),
    origin: Type.String({ minLength: 1, maxLength: 256 }),
    nonZeroBlocks: Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER }),
    labels: Type.Optional(Type.Record(Type.String({ maxLength: 128 }), Type.String({ maxLength: 1024 }), { maxProperties: 64 })),
  },
  { additionalProperties: false },
);

export const SnapshotAnswer = Type.Object({ snapshot: Type.Union([Snapshot, Type.Null()]) });
/** `nodes`: put first, as by `nodes/put`, with the commit (feature `commit-nodes`): one round trip for a small change's nodes and its commit. */
export const CommitBody = Type.Object({ snapshot: Snapshot, nodes: Type.Optional(Type.Array(WirePutNode, { maxItems: MAX_NODES_PER_REQUEST })) }, { additionalProperties: false });
export type CommitBodyT = Static<typeof CommitBody>;

export const VolumeParams = Type.Object({ vol: VolumeName });
export const SnapshotParams = Type.Object({ vol: VolumeName, id: SnapshotId });
export const LeaseParams = Type.Object({ vol: VolumeName, lease: Type.String({ format: 'uuid' }) });

export const LockBody = Type.Object(
  {
    holder: Type.String({ minLength: 1, maxLength: 128, description: 'id of the appliance that syncs (its identity id)' }),
    ifRoot: Type.Optional(Type.Union([HexHash, Type.Null()], { description: 'sent by a push (a pull sends none): when the latest snapshot has this root, answer upToDate and take no lease. A push of a volume that runs in EC2 after a failover is refused (ERR_VOLUME_FAILED_OVER)' })),
  },
  { additionalProperties: false },
);
export type LockBodyT = Static<typeof LockBody>;
export const LockAnswer = Type.Object({
  upToDate: Type.Boolean(),
  lease: Type.Union([Type.String(), Type.Null()]),
  expiresInMs: Type.Integer(),
  latest: Type.Union([Snapshot, Type.Null()]),
  nextFingerprint: Type.Optional(Type.String({ description: 'the certificate this appliance staged (as GET /v1/health nextFingerprint); absent when none is' })),
  damaged: Type.Optional(Type.Integer({ minimum: 0, description: "blocks and tree nodes this store's last verify found damaged or missing (GET /v1/damage lists them); absent from older appliances" })),
  recovery: Type.Optional(Type.Object({
    lastExport: Type.Union([Type.Object({ ebsSnapshotId: Type.String(), tandemSnapshot: Type.String(), created: Type.String() }), Type.Null()]),
    exportBytesPerSec: Type.Union([Type.Number(), Type.Null()]),
    launchSeconds: Type.Union([Type.Number(), Type.Null()]),
    launchMeasuredAt: Type.Union([Type.String(), Type.Null()]),
    lastDrill: Type.Union([Type.Object({ id: Type.String(), at: Type.String(), passed: Type.Boolean(), rtoSeconds: Type.Union([Type.Number(), Type.Null()]) }), Type.Null()]),
  }, { description: "what a recovery of the volume here would take: its last EBS export, the export rate and launch time measured here, its last drill (appliance/recovery-facts.ts); the pusher's status estimates the RTO from it. Absent from older appliances" })),
});

export const TlsAckBody = Type.Object(
  {
    fingerprint: Type.String({ pattern: '^[0-9A-F]{2}(:[0-9A-F]{2}){31}$', description: 'the staged certificate the sender now accepts (from GET /v1/health nextFingerprint)' }),
    id: Type.String({ minLength: 1, maxLength: 128, description: "the sender's identity id" }),
    name: Type.String({ minLength: 1, maxLength: 128, description: "the sender's appliance name" }),
  },
  { additionalProperties: false },
);
export type TlsAckBodyT = Static<typeof TlsAckBody>;

export const CliBody = Type.Object(
  {
    argv: Type.Array(Type.String({ maxLength: 4096 }), { minItems: 2, maxItems: 256 }),
    user: Type.Optional(Type.String({ minLength: 1, maxLength: 256, description: 'who runs the CLI, for the audit log' })),
  },
  { additionalProperties: false },
);

export const ErrorSchema = Type.Object({
  error: Type.Object({ code: Type.String(), message: Type.String(), details: Type.Record(Type.String(), Type.Unknown()) }),
});
