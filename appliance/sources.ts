/**
 * Which appliance a replicated volume comes from, on the appliance that receives it (meta
 * `volume-source`, one record per volume: `{id, since, pulledBy?}`).
 *
 * Volume names are chosen per appliance. Two on-prem appliances paired with one cloud appliance
 * (two sites, say) may both call a disk `root`: their pushes would interleave two disks in one
 * volume's history, and a failover of `root` would launch whichever pushed last. So the first
 * appliance whose push commits a volume becomes its source, and a push of it from any other is
 * refused (ERR_VOLUME_NAME_TAKEN) before anything is committed.
 *
 * The source changes hands only on purpose: an appliance that pulled the volume's latest
 * snapshot (a rebuilt on-prem appliance failing back, `sync --reverse`) may push it on from
 * there, as long as nothing was committed since its pull; its first push makes it the source.
 * `appliance volume remove VOL` on the receiving appliance forgets the source with the volume.
 */
import { TandemError } from '../common/errors.js';
import type { SnapshotRecord, Store } from '../store/index.js';

export const SOURCES_NS = 'volume-source';

export interface VolumeSource {
  /** Identity id of the appliance that pushes the volume. */
  readonly id: string;
  /** When it became the source (ISO). */
  readonly since: string;
  /** The last other appliance that pulled the volume, and the snapshot that was latest then. */
  readonly pulledBy?: { readonly id: string; readonly latest: string; readonly at: string };
}

type MetaStore = Pick<Store, 'getMeta' | 'putMeta'>;

/**
 * Refuse a push of `volume` from `holder` unless it is the volume's source or took it over
 * (above); returns the source record as it stands, for {@link recordPushSource}.
 */
export async function checkPushSource(store: MetaStore, volume: string, holder: string, latest: SnapshotRecord | null): Promise<VolumeSource | undefined> {
  const src = await store.getMeta<VolumeSource>(SOURCES_NS, volume);
  if (!src || src.id === holder) return src;
  if (src.pulledBy?.id === holder && latest !== null && src.pulledBy.latest === latest.id) return src;
  throw new TandemError(
    'ERR_VOLUME_NAME_TAKEN',
    `volume "${volume}" on this appliance is replicated from another appliance (id ${src.id}, since ${src.since}); a push from appliance ${holder} would mix two disks in one volume. Register the volume under another name on the appliance that pushes it (\`appliance volume add NAME --path PATH\`); if it replaces the other appliance, pull the volume first (\`appliance sync ${volume} --peer PEER --reverse\`)`,
    { details: { volume, source: src.id, holder } },
  );
}

/** After a push from `holder` committed `volume` (`src`: what {@link checkPushSource} returned): it is the source from now on. */
export async function recordPushSource(store: MetaStore, volume: string, holder: string, src: VolumeSource | undefined): Promise<void> {
  if (src?.id === holder) return;
  await store.putMeta(SOURCES_NS, volume, { id: holder, since: new Date().toISOString() } satisfies VolumeSource);
}

/** A pull of `volume` by `holder`, whose latest snapshot is `latest`: it may take the volume over. */
export async function recordPull(store: MetaStore, volume: string, holder: string, latest: SnapshotRecord): Promise<void> {
  const src = await store.getMeta<VolumeSource>(SOURCES_NS, volume);
  if (!src || src.id === holder) return;
  if (src.pulledBy?.id === holder && src.pulledBy.latest === latest.id) return;
  await store.putMeta(SOURCES_NS, volume, { ...src, pulledBy: { id: holder, latest: latest.id, at: new Date().toISOString() } } satisfies VolumeSource);
}
