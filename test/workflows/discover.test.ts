import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, rmSync, writeFileSync, readFileSync, openSync, writeSync, closeSync, ftruncateSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseLsblk, parseLvs, parseVirshList, parseDomblklist, discover, writeDiscovered, estimateNonZero, type CommandRunner } from '../../appliance/discover/index.js';
import { parseConfig } from '../../appliance/config/index.js';

const FIX = join(__dirname, 'fixtures');
const fixture = (name: string) => readFileSync(join(FIX, name), 'utf8');
const MiB = 1024 * 1024;

test('lsblk: whole disks with the mounts under them; rom, loop, zram and read-only are not proposed', () => {
  const found = parseLsblk(fixture('lsblk.json'), false);
  assert.deepEqual(found.map((f) => [f.name, f.path, f.size, f.skip ?? null]), [
    ['sda', '/dev/sda', 107374182400, null],
    ['sdb', '/dev/sdb', 536870912000, null],
    ['zram0', '/dev/zram0', 8589934592, 'swap/zram'],
  ]);
  assert.equal(found[0]!.mountpoint, '/boot,/,/var/lib/postgresql');
  // Without lvs, LVs come from lsblk.
  const withLvm = parseLsblk(fixture('lsblk.json'), true);
  assert.deepEqual(withLvm.filter((f) => f.kind === 'lvm').map((f) => f.path), ['/dev/mapper/vg0-root', '/dev/mapper/vg0-pgdata']);
});

test('lsblk: a writable loop device (an image attached with losetup) is listed as one; a read-only squashfs one is not', () => {
  const json = JSON.stringify({ blockdevices: [
    { name: 'loop0', path: '/dev/loop0', size: 67108864, type: 'loop', mountpoint: '/snap/core20/1', fstype: 'squashfs', ro: true },
    { name: 'loop3', path: '/dev/loop3', size: 50331648, type: 'loop', mountpoint: null, fstype: null, ro: false },
    { name: 'loop4', path: '/dev/loop4', size: 0, type: 'loop', mountpoint: null, fstype: null, ro: false },
  ] });
  assert.deepEqual(parseLsblk(json, false).map((f) => [f.kind, f.name, f.path, f.size]), [['loop', 'loop3', '/dev/loop3', 50331648]]);
});

test('lvs: logical volumes without snapshots and thin pools', () => {
  assert.deepEqual(parseLvs(fixture('lvs.json')).map((f) => [f.name, f.path, f.size]), [
    ['vg0-pgdata', '/dev/vg0/pgdata', 42949672960],
    ['vg0-root', '/dev/vg0/root', 53687091200],
    ['vg1-vm1', '/dev/vg1/vm1', 21474836480],
  ]);
});

test('virsh: domains and their disks, not cdroms', () => {
  assert.deepEqual(parseVirshList(fixture('virsh-list.txt')), ['erp-db', 'web01']);
  assert.deepEqual(parseDomblklist('erp-db', fixture('virsh-domblklist-erp-db.txt')), [
    { domain: 'erp-db', target: 'vda', source: '/var/lib/libvirt/images/erp-db.qcow2', type: 'file' },
    { domain: 'erp-db', target: 'vdb', source: '/dev/vg1/vm1', type: 'block' },
  ]);
});

test('discover on recorded tool output and a temp dir of images; --write adds assign rules keeping comments', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tandem-disc-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const images = join(dir, 'images');
  mkdirSync(join(images, 'vm2'), { recursive: true });
  // A 8 MiB sparse raw image with 2 MiB of data, a qcow2 image, a small file and a non-image.
  const raw = join(images, 'web01.img');
  const fd = openSync(raw, 'w');
  ftruncateSync(fd, 8 * MiB);
  writeSync(fd, randomBytes(2 * MiB), 0, 2 * MiB, 0);
  closeSync(fd);
  const qcow = Buffer.alloc(2 * MiB);
  Buffer.from([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]).copy(qcow);
  writeFileSync(join(images, 'vm2', 'erp-db.qcow2'), qcow);
  writeFileSync(join(images, 'notes.img'), 'tiny');
  writeFileSync(join(images, 'backup.tar'), randomBytes(2 * MiB));

  const configText = `# site config\nappliance:\n  name: onprem # this box\ndiscovery:\n  paths: [${images}]\n`;
  const config = parseConfig(configText, 'config.yaml');
  const outputs: Record<string, string | null> = {
    lsblk: fixture('lsblk.json'),
    lvs: fixture('lvs.json'),
    'virsh list': fixture('virsh-list.txt'),
    'virsh domblklist erp-db': fixture('virsh-domblklist-erp-db.txt').replace('/var/lib/libvirt/images/erp-db.qcow2', join(images, 'vm2', 'erp-db.qcow2')),
    'virsh domblklist web01': fixture('virsh-domblklist-web01.txt').replace('/var/lib/libvirt/images/web01.img', raw),
  };
  const run: CommandRunner = async (cmd, args) => outputs[[cmd, ...args.slice(0, cmd === 'virsh' ? (args[0] === 'list' ? 1 : 2) : 0)].join(' ')] ?? null;
  const assets = await discover(config, [], { run });
  const by = new Map(assets.map((a) => [a.path, a]));
  const w = by.get(raw)!;
  assert.equal(w.name, 'web01');
  assert.equal(w.format, 'raw');
  assert.equal(w.size, 8 * MiB);
  assert.equal(w.nonZeroEstimate, 2 * MiB, 'sampling finds the 2 MiB of data');
  assert.deepEqual(w.usedBy, ['web01:vda']);
  assert.equal(w.proposedPolicy, 'standard');
  const q = by.get(join(images, 'vm2', 'erp-db.qcow2'))!;
  assert.equal(q.format, 'qcow2');
  assert.equal(q.proposedPolicy, null);
  assert.match(q.note!, /convert to raw first \(qemu-img convert -O raw/);
  assert.deepEqual(q.usedBy, ['erp-db:vda']);
  assert.ok(!by.has(join(images, 'notes.img')) && !by.has(join(images, 'backup.tar')));
  assert.ok(by.has('/dev/sdb') && by.has('/dev/vg0/pgdata') && by.has('/dev/vg1/vm1'));
  assert.deepEqual(by.get('/dev/vg1/vm1')!.usedBy, ['erp-db:vdb']);
  assert.equal(by.get('/dev/zram0')!.proposedPolicy, null);

  const file = join(dir, 'config.yaml');
  writeFileSync(file, configText);
  const proposed = assets.filter((a) => a.proposedPolicy !== null && a.path.startsWith(dir));
  const r = await writeDiscovered(file, config, proposed);
  assert.equal(r.createdPolicy, 'standard');
  assert.deepEqual(r.added, [{ name: 'web01', policy: 'standard' }]);
  assert.deepEqual(r.commands, [`appliance volume add web01 --path ${raw}`]);
  const after = readFileSync(file, 'utf8');
  assert.match(after, /# site config/);
  assert.match(after, /name: onprem # this box/);
  const c2 = parseConfig(after, 'config.yaml');
  assert.equal(c2.policies.standard!.rpoMs, 3_600_000);
  assert.deepEqual(c2.assign, [{ match: 'web01', tag: null, policy: 'standard' }]);
  // Idempotent: a second write adds nothing.
  const again = await writeDiscovered(file, c2, proposed);
  assert.deepEqual(again.added, []);
  assert.equal(readFileSync(file, 'utf8'), after);
});

test('non-zero estimate: bounded sampling of a large sparse file', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'tandem-nz-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const p = join(dir, 'big.img');
  const fd = openSync(p, 'w');
  ftruncateSync(fd, 4 * 1024 * MiB); // 4 GiB, all zeros
  closeSync(fd);
  assert.equal(await estimateNonZero(p, 4 * 1024 * MiB), 0);
  assert.equal(await estimateNonZero(join(dir, 'absent'), 10), null);
});
