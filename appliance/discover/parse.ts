/**
 * Parsers of the system tools' output that discovery reads. Pure functions over text, tested
 * on recorded output (test/workflows/fixtures/).
 */

/** A device or volume found by a tool, before sizing and policy proposal. */
export interface Found {
  readonly kind: 'disk' | 'lvm' | 'loop' | 'image' | 'libvirt';
  readonly name: string;
  readonly path: string;
  readonly size: number;
  readonly mountpoint?: string | null;
  readonly fstype?: string | null;
  /** libvirt: the domain and its target device (vda) using this disk. */
  readonly domain?: string;
  readonly target?: string;
  /** Why it is listed but not proposed (read-only, swap, ...), if so. */
  readonly skip?: string;
}

interface LsblkDevice {
  name: string;
  path?: string;
  size: number | string;
  type: string;
  mountpoint?: string | null;
  fstype?: string | null;
  ro?: boolean | string;
  children?: LsblkDevice[];
}

/** Mount points anywhere under a device (partitions, LVs on it). */
function mountsUnder(d: LsblkDevice): string[] {
  const own = d.mountpoint ? [d.mountpoint] : [];
  return [...own, ...(d.children ?? []).flatMap(mountsUnder)];
}

/**
 * `lsblk --json -b -o NAME,PATH,SIZE,TYPE,MOUNTPOINT,FSTYPE,RO`: whole disks (partitions are
 * protected with their disk; LVs come from `lvs`, or from here when `lvs` is absent).
 */
export function parseLsblk(json: string, includeLvm: boolean): Found[] {
  const doc = JSON.parse(json) as { blockdevices?: LsblkDevice[] };
  const out: Found[] = [];
  const visit = (d: LsblkDevice) => {
    const size = Number(d.size);
    const path = d.path ?? `/dev/${d.name}`;
    const ro = d.ro === true || d.ro === '1';
    if (d.type === 'disk') {
      const skip = ro ? 'read-only' : size === 0 ? 'empty' : d.name.startsWith('zram') || d.fstype === 'swap' ? 'swap/zram' : undefined;
      const mounts = mountsUnder(d);
      out.push({ kind: 'disk', name: d.name, path, size, mountpoint: mounts.length > 0 ? mounts.join(',') : null, fstype: d.fstype ?? null, ...(skip ? { skip } : {}) });
    } else if (d.type === 'loop' && !ro && size > 0 && d.fstype !== 'squashfs') {
      // A writable loop device (an image attached with losetup, a VM's or a test's disk); the
      // read-only ones (snap packages' squashfs) are nothing to protect.
      const mounts = mountsUnder(d);
      out.push({ kind: 'loop', name: d.name, path, size, mountpoint: mounts.length > 0 ? mounts.join(',') : null, fstype: d.fstype ?? null });
    } else if (d.type === 'lvm' && includeLvm) {
      out.push({ kind: 'lvm', name: d.name, path, size, mountpoint: d.mountpoint ?? null, fstype: d.fstype ?? null, ...(ro ? { skip: 'read-only' } : {}) });
    }
    for (const c of d.children ?? []) if (c.type === 'lvm') visit(c); else for (const cc of c.children ?? []) if (cc.type === 'lvm') visit(cc);
  };
  for (const d of doc.blockdevices ?? []) visit(d);
  // An LV under several PVs appears once per PV: keep one.
  const seen = new Set<string>();
  return out.filter((f) => !seen.has(f.path) && (seen.add(f.path), true));
}

interface LvsRow { lv_name: string; vg_name: string; lv_attr: string; lv_size: string; lv_path?: string }

/**
 * `lvs --reportformat json --units b -o lv_name,vg_name,lv_attr,lv_size,lv_path`: logical
 * volumes, without snapshots (attr 's'/'S') and thin pools ('t'), which are not data of their own.
 */
export function parseLvs(json: string): Found[] {
  const doc = JSON.parse(json) as { report?: Array<{ lv?: LvsRow[] }> };
  const out: Found[] = [];
  for (const r of doc.report ?? []) {
    for (const lv of r.lv ?? []) {
      const type = lv.lv_attr[0];
      if (type === 't' || type === 's' || type === 'S') continue;
      out.push({ kind: 'lvm', name: `${lv.vg_name}-${lv.lv_name}`, path: lv.lv_path || `/dev/${lv.vg_name}/${lv.lv_name}`, size: Number(lv.lv_size.replace(/B$/i, '')) });
    }
  }
  return out;
}

/** `virsh list --all --name`: one domain per line. */
export function parseVirshList(text: string): string[] {
  return text.split('\n').map((l) => l.trim()).filter((l) => l.length > 0);
}

/** `virsh domblklist DOMAIN --details`: the domain's disks (not cdroms, not empty drives). */
export function parseDomblklist(domain: string, text: string): Array<{ domain: string; target: string; source: string; type: string }> {
  const out: Array<{ domain: string; target: string; source: string; type: string }> = [];
  for (const line of text.split('\n')) {
    const cols = line.trim().split(/\s+/);
    if (cols.length < 4 || cols[0] === 'Type' || /^-+$/.test(cols[0]!)) continue;
    const [type, device, target, ...rest] = cols;
    const source = rest.join(' ');
    if (device !== 'disk' || source === '-' || source === '') continue;
    out.push({ domain, target: target!, source, type: type! });
  }
  return out;
}
