/**
 * The emulator's tables: EBS snapshots (shared by the EBS direct API and EC2), EC2 volumes,
 * images, instances and subnets, plus the block data they point to.
 *
 * A snapshot keeps only the blocks written to it ("own" blocks, index → SHA-256 hex); a read
 * goes through its parent lineage, as EBS does: a child snapshot shares its parent's blocks.
 * With a data directory the tables are saved to `state.json` (temporary file, fsync, rename),
 * coalesced so a burst of PutSnapshotBlock calls costs one write; `flush()` waits for it.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { DirBlobStore, MemoryBlobStore, type BlobStore } from './blobs.js';

export type SnapshotStatus = 'pending' | 'completed' | 'error';

export interface Tag {
  Key: string;
  Value: string;
}

export interface SnapshotRec {
  id: string;
  status: SnapshotStatus;
  statusMessage: string;
  /** Epoch ms. */
  startTime: number;
  completionTime: number | null;
  volumeSizeGiB: number;
  parentId: string | null;
  tags: Tag[];
  description: string;
  encrypted: boolean;
  kmsKeyArn: string | null;
  /** StartSnapshot's ClientToken and a canonical form of its parameters (idempotency). */
  clientToken: string | null;
  requestKey: string | null;
  timeoutMinutes: number;
  /** The EC2 volume it was taken from (CreateSnapshot), or null for the EBS direct API. */
  volumeId: string | null;
  /** Blocks written to this snapshot: index → SHA-256 hex of the 512 KiB block. */
  blocks: Map<number, string>;
}

export interface VolumeRec {
  id: string;
  sizeGiB: number;
  snapshotId: string | null;
  /** The last snapshot taken of it (CreateSnapshot parents the next one to it), else its source. */
  lastSnapshotId: string | null;
  state: 'creating' | 'available' | 'in-use' | 'deleted';
  createTime: number;
  attachedTo: string | null;
  device: string | null;
  deleteOnTermination: boolean;
  volumeType: string;
  tags: Tag[];
  /** Every block that is not plain zeros: index → SHA-256 hex. */
  blocks: Map<number, string>;
}

export interface ImageMapping {
  deviceName: string;
  snapshotId: string;
  volumeSizeGiB: number;
  volumeType: string;
  deleteOnTermination: boolean;
}

export interface ImageRec {
  id: string;
  name: string;
  description: string;
  architecture: string;
  virtualizationType: string;
  rootDeviceName: string;
  enaSupport: boolean;
  state: 'available' | 'deregistered';
  creationDate: number;
  mappings: ImageMapping[];
  tags: Tag[];
}

export type InstanceStateName = 'pending' | 'running' | 'shutting-down' | 'terminated' | 'stopping' | 'stopped';

export interface InstanceRec {
  id: string;
  reservationId: string;
  imageId: string;
  instanceType: string;
  subnetId: string;
  vpcId: string;
  privateIp: string;
  securityGroupIds: string[];
  userData: string | null;
  keyName: string | null;
  clientToken: string | null;
  state: InstanceStateName;
  /** Epoch ms at which a pending instance runs / a shutting-down one is terminated. */
  transitionAt: number;
  launchTime: number;
  volumes: Array<{ device: string; volumeId: string; deleteOnTermination: boolean }>;
  rootDeviceName: string;
  architecture: string;
  tags: Tag[];
  /** Set by a `fail` launch fault: the instance goes from `pending` to `terminated`, as one whose launch failed. */
  failsOnLaunch?: boolean;
  /** Why the instance last changed state, when EC2 says (DescribeInstances `stateReason`). */
  stateReason?: { code: string; message: string };
}

export interface SubnetRec {
  id: string;
  vpcId: string;
  cidr: string;
  availabilityZone: string;
  tags: Tag[];
}

/** EC2's instance state codes (DescribeInstances instanceState/code). */
export const INSTANCE_STATE_CODES: Record<InstanceStateName, number> = {
  pending: 0,
  running: 16,
  'shutting-down': 32,
  terminated: 48,
  stopping: 64,
  stopped: 80,
};

/** How long after a write burst the tables are saved: one write per burst, not per block. */
const SAVE_COALESCE_MS = 50;

export interface StateOptions {
  dataDir?: string;
  region: string;
}

export class EmulatorState {
  readonly region: string;
  readonly blobs: BlobStore;
  readonly snapshots = new Map<string, SnapshotRec>();
  readonly volumes = new Map<string, VolumeRec>();
  readonly images = new Map<string, ImageRec>();
  readonly instances = new Map<string, InstanceRec>();
  readonly subnets = new Map<string, SubnetRec>();
  /** StartSnapshot ClientToken → snapshot id. */
  readonly clientTokens = new Map<string, string>();
  /** Key of the HMAC that makes block and page tokens unforgeable (kept across restarts). */
  tokenKey: Buffer;
  readonly #dataDir: string | undefined;
  #saveTimer: NodeJS.Timeout | null = null;
  #saving: Promise<void> = Promise.resolve();

  private constructor(opts: StateOptions) {
    this.region = opts.region;
    this.#dataDir = opts.dataDir;
    this.blobs = opts.dataDir ? new DirBlobStore(join(opts.dataDir, 'blocks')) : new MemoryBlobStore();
    this.tokenKey = randomBytes(32);
  }

  /** Open the state: loads `state.json` from the data directory when present, else seeds subnets. */
  static async open(opts: StateOptions): Promise<EmulatorState> {
    const s = new EmulatorState(opts);
    if (opts.dataDir) {
      await mkdir(opts.dataDir, { recursive: true });
      const loaded = await s.#load();
      if (loaded) return s;
    }
    s.#seedSubnets();
    return s;
  }

  /** The default VPC's subnets, plus one isolated subnet (no route out) for DR drills. */
  #seedSubnets(): void {
    const az = `${this.region}a`;
    const seeds: SubnetRec[] = [
      { id: 'subnet-0a1b2c3d4e5f60001', vpcId: 'vpc-0a1b2c3d4e5f60001', cidr: '10.0.1.0/24', availabilityZone: az, tags: [{ Key: 'Name', Value: 'recovery' }] },
      { id: 'subnet-0a1b2c3d4e5f60002', vpcId: 'vpc-0a1b2c3d4e5f60001', cidr: '10.0.2.0/24', availabilityZone: az, tags: [{ Key: 'Name', Value: 'isolated' }, { Key: 'isolated', Value: 'true' }] },
    ];
    for (const sn of seeds) this.subnets.set(sn.id, sn);
  }

  /**
   * The subnet with this id; an unknown `subnet-*` id is accepted and registered (subnets are
   * configured by the operator's AWS account, which the emulator cannot know in advance).
   */
  subnet(id: string): SubnetRec {
    let sn = this.subnets.get(id);
    if (!sn) {
      const n = this.subnets.size + 1;
      sn = { id, vpcId: 'vpc-0a1b2c3d4e5f60001', cidr: `10.0.${n}.0/24`, availabilityZone: `${this.region}a`, tags: [] };
      this.subnets.set(id, sn);
      this.changed();
    }
    return sn;
  }

  /** Mark the tables changed; they are saved shortly (data directory only). */
  changed(): void {
    if (!this.#dataDir || this.#saveTimer) return;
    this.#saveTimer = setTimeout(() => {
      this.#saveTimer = null;
      this.#saving = this.#saving.then(() => this.#save()).catch(() => undefined);
    }, SAVE_COALESCE_MS);
    this.#saveTimer.unref();
  }

  /** Save now if anything changed, and wait for it. */
  async flush(): Promise<void> {
    if (this.#saveTimer) {
      clearTimeout(this.#saveTimer);
      this.#saveTimer = null;
      this.#saving = this.#saving.then(() => this.#save());
    }
    await this.#saving;
  }

  async #save(): Promise<void> {
    const dir = this.#dataDir!;
    const doc = {
      version: 1,
      tokenKey: this.tokenKey.toString('base64'),
      snapshots: [...this.snapshots.values()].map((s) => ({ ...s, blocks: [...s.blocks] })),
      volumes: [...this.volumes.values()].map((v) => ({ ...v, blocks: [...v.blocks] })),
      images: [...this.images.values()],
      instances: [...this.instances.values()],
      subnets: [...this.subnets.values()],
      clientTokens: [...this.clientTokens],
    };
    const path = join(dir, 'state.json');
    const tmp = `${path}.tmp`;
    const fh = await open(tmp, 'w');
    try {
      await fh.writeFile(JSON.stringify(doc));
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  }

  async #load(): Promise<boolean> {
    let text: string;
    try {
      text = await readFile(join(this.#dataDir!, 'state.json'), 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw e;
    }
    const doc = JSON.parse(text);
    this.tokenKey = Buffer.from(doc.tokenKey, 'base64');
    for (const s of doc.snapshots) this.snapshots.set(s.id, { ...s, blocks: new Map(s.blocks) });
    for (const v of doc.volumes) this.volumes.set(v.id, { ...v, blocks: new Map(v.blocks) });
    for (const i of doc.images) this.images.set(i.id, i);
    for (const i of doc.instances) this.instances.set(i.id, i);
    for (const sn of doc.subnets) this.subnets.set(sn.id, sn);
    for (const [k, v] of doc.clientTokens) this.clientTokens.set(k, v);
    return true;
  }

  /**
   * The snapshot with this id, its state brought up to date (a pending snapshot past its
   * Timeout becomes `error`), or undefined.
   */
  snapshot(id: string, now = Date.now()): SnapshotRec | undefined {
    const s = this.snapshots.get(id);
    if (s && s.status === 'pending' && now > s.startTime + s.timeoutMinutes * 60_000) {
      s.status = 'error';
      s.statusMessage = `not completed within its timeout of ${s.timeoutMinutes} minutes`;
      this.changed();
    }
    return s;
  }

  /** The lineage of a snapshot, itself first, then its parent, grandparent... */
  lineage(s: SnapshotRec): SnapshotRec[] {
    const out: SnapshotRec[] = [];
    let cur: SnapshotRec | undefined = s;
    while (cur) {
      out.push(cur);
      cur = cur.parentId ? this.snapshots.get(cur.parentId) : undefined;
    }
    return out;
  }

  /** The digest of block `index` as read through the lineage, or null when never written (zeros). */
  blockDigest(s: SnapshotRec, index: number): string | null {
    for (const cur of this.lineage(s)) {
      const d = cur.blocks.get(index);
      if (d !== undefined) return d;
    }
    return null;
  }

  /** Every written block of the lineage: index → digest (the nearest snapshot wins). */
  effectiveBlocks(s: SnapshotRec): Map<number, string> {
    const out = new Map<number, string>();
    for (const cur of this.lineage(s)) {
      for (const [i, d] of cur.blocks) if (!out.has(i)) out.set(i, d);
    }
    return out;
  }

  /** Advance instances whose pending/shutting-down delay has passed. */
  tickInstances(now = Date.now()): void {
    for (const inst of this.instances.values()) {
      if (now < inst.transitionAt) continue;
      if (inst.state === 'pending' && inst.failsOnLaunch) {
        inst.state = 'terminated';
        inst.stateReason = { code: 'Server.InternalError', message: 'Server.InternalError: Internal error on launch' };
        this.#releaseVolumes(inst);
        this.changed();
      } else if (inst.state === 'pending') {
        inst.state = 'running';
        this.changed();
      } else if (inst.state === 'stopping') {
        inst.state = 'stopped';
        this.changed();
      } else if (inst.state === 'shutting-down') {
        inst.state = 'terminated';
        this.#releaseVolumes(inst);
        this.changed();
      }
    }
  }

  /** A terminated instance's volumes: deleted with DeleteOnTermination, else `available`. */
  #releaseVolumes(inst: InstanceRec): void {
    for (const v of inst.volumes) {
      const vol = this.volumes.get(v.volumeId);
      if (!vol) continue;
      vol.attachedTo = null;
      vol.state = v.deleteOnTermination ? 'deleted' : 'available';
    }
  }
}
