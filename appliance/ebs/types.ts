/**
 * Types-only: the part of the store the EBS code needs (the store's `Store` satisfies it), and
 * the public result types.
 */
import type { EBSClient } from '@aws-sdk/client-ebs';
import type { Hash, SnapshotRecord } from '../../store/types.js';

/** The narrow store surface export and import use. */
export interface EbsStore {
  getMeta<T>(ns: string, key: string): Promise<T | undefined>;
  putMeta(ns: string, key: string, value: unknown): Promise<void>;
  deleteMeta(ns: string, key: string): Promise<void>;
  getSnapshot(volume: string, id: string): Promise<SnapshotRecord | null>;
  getVolume(name: string): Promise<{ readonly blockSize: number; readonly size: number } | null>;
  getBlock(hash: Hash, length?: number): Promise<Buffer>;
  putBlock(hash: Hash, data: Buffer): Promise<unknown>;
  flush(): Promise<void>;
  diffSnapshots(base: SnapshotRecord | null, target: SnapshotRecord): AsyncIterable<{ index: number; hash: Hash }>;
  buildSnapshot(opts: {
    volume: string; size: number; blockSize: number; parent: SnapshotRecord | null;
    changes: Iterable<{ index: number; hash: Hash }> | AsyncIterable<{ index: number; hash: Hash }>;
    origin: string; labels?: Record<string, string>; created?: string; id?: string;
  }): Promise<SnapshotRecord>;
}

export interface EbsExportResult {
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  readonly parentEbsSnapshotId: string | null;
  /** Blocks sent by this run (a resumed run does not count blocks a crashed run had confirmed). */
  readonly blocksUploaded: number;
  readonly bytesUploaded: number;
  /** HTTP requests sent by this run, retries included. */
  readonly requests: number;
  /** True when this run continued a pending EBS snapshot left by an interrupted one. */
  readonly resumed: boolean;
  readonly seconds: number;
}

export interface EbsExportOptions {
  /** This appliance's name, tagged `tandem:appliance` on the EBS snapshot (adopt.ts tells lineages apart by it). */
  readonly appliance?: string;
  readonly kmsKeyArn?: string;
  readonly description?: string;
  /** Called with (blocks done, blocks to do). */
  readonly onProgress?: (done: number, total: number) => void;
  readonly signal?: AbortSignal;
  readonly client?: EBSClient;
}

export interface EbsImportResult {
  readonly snapshot: SnapshotRecord;
  readonly ebsSnapshotId: string;
  readonly baseEbsSnapshotId: string | null;
  readonly blocksFetched: number;
  readonly bytesFetched: number;
  readonly requests: number;
  readonly seconds: number;
}

export interface EbsImportOptions {
  /** Must be the EBS block size (524288), the default. */
  readonly blockSize?: number;
  /** Called with (blocks fetched, blocks listed so far). */
  readonly onProgress?: (done: number, total: number) => void;
  readonly signal?: AbortSignal;
  readonly client?: EBSClient;
  /** Diff against this EBS snapshot (it must map to a Tandem snapshot of the volume). */
  readonly baseEbsSnapshotId?: string;
  /**
   * The snapshot the export was made from, as its tags tell (adopt.ts): the import takes its id,
   * time and byte size, so that it is that snapshot, root included, rather than a new one.
   */
  readonly as?: { readonly id: string; readonly created: string; readonly size: number | null };
}

export interface EbsMapping {
  readonly ebsSnapshotId: string;
  readonly tandemSnapshot: string;
  readonly created: string;
  readonly parentEbsSnapshotId: string | null;
  /** The Tandem volume's byte size at that point. */
  readonly size: number;
}

/** The hash that stands for an all-zero block in a tree: 32 zero bytes (the store's ZERO_HASH). */
export const ZERO_HASH: Hash = Buffer.alloc(32);
