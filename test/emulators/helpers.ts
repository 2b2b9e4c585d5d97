/** Shared set-up of the emulator tests: a real emulator on 127.0.0.1:0 and real SDK clients. */
import { createHash } from 'node:crypto';
import { EBSClient, PutSnapshotBlockCommand, StartSnapshotCommand, CompleteSnapshotCommand } from '@aws-sdk/client-ebs';
import { EC2Client } from '@aws-sdk/client-ec2';
import type { TestContext } from 'node:test';
import { startAwsEmulator, type AwsEmulatorOptions } from '../../emulators/aws/index.js';

// The SDK's standard chain reads these, as the appliance does.
process.env.AWS_ACCESS_KEY_ID = 'AKIDTESTEMULATOR';
process.env.AWS_SECRET_ACCESS_KEY = 'test-secret';
process.env.AWS_REGION = 'us-east-1';

export const BLOCK = 524288;

export interface Emu {
  url: string;
  ebs: EBSClient;
  ec2: EC2Client;
  control(path: string, body?: unknown): Promise<any>;
}

export async function emulator(t: TestContext, opts: AwsEmulatorOptions = {}, clientOpts: { maxAttempts?: number; region?: string } = {}): Promise<Emu> {
  const emu = await startAwsEmulator(opts);
  const ebs = new EBSClient({ endpoint: emu.url, ...clientOpts });
  const ec2 = new EC2Client({ endpoint: emu.url, ...clientOpts });
  t.after(async () => {
    ebs.destroy();
    ec2.destroy();
    await emu.close();
  });
  return {
    url: emu.url,
    ebs,
    ec2,
    async control(path, body) {
      const r = await fetch(`${emu.url}${path}`, body === undefined ? {} : { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
      return r.json();
    },
  };
}

/** A 512 KiB block filled with a pattern derived from `seed`. */
export function block(seed: number): Buffer {
  const b = Buffer.alloc(BLOCK);
  for (let i = 0; i < BLOCK; i += 4) b.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return b;
}

export function sha256(b: Buffer): Buffer {
  return createHash('sha256').update(b).digest();
}

export async function put(ebs: EBSClient, snapshotId: string, index: number, data: Buffer): Promise<void> {
  await ebs.send(new PutSnapshotBlockCommand({
    SnapshotId: snapshotId,
    BlockIndex: index,
    BlockData: data,
    DataLength: data.length,
    Checksum: sha256(data).toString('base64'),
    ChecksumAlgorithm: 'SHA256',
  }));
}

/** LINEAR aggregate: SHA256 over the raw digests of the written blocks in index order. */
export function aggregate(blocks: Map<number, Buffer>): string {
  const digests = [...blocks.entries()].sort((a, b) => a[0] - b[0]).map(([, d]) => sha256(d));
  return sha256(Buffer.concat(digests)).toString('base64');
}

/** Start, write `blocks`, complete (with count and aggregate): an EBS snapshot through the direct API. */
export async function writeSnapshot(ebs: EBSClient, volumeSize: number, blocks: Map<number, Buffer>, parent?: string): Promise<string> {
  const s = await ebs.send(new StartSnapshotCommand({ VolumeSize: volumeSize, ParentSnapshotId: parent, Description: 'test' }));
  for (const [i, d] of blocks) await put(ebs, s.SnapshotId!, i, d);
  const r = await ebs.send(new CompleteSnapshotCommand({
    SnapshotId: s.SnapshotId!,
    ChangedBlocksCount: blocks.size,
    Checksum: aggregate(blocks),
    ChecksumAlgorithm: 'SHA256',
    ChecksumAggregationMethod: 'LINEAR',
  }));
  if (r.Status !== 'completed') throw new Error(`snapshot ${s.SnapshotId} is ${r.Status}`);
  return s.SnapshotId!;
}

export async function rejects(p: Promise<unknown>): Promise<any> {
  try {
    await p;
  } catch (e) {
    return e;
  }
  throw new Error('expected a rejection');
}
