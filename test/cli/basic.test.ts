/** The CLI's surface: init, volume add|list|remove, exit codes and errors for bad input. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, writeFileSync, chmodSync, statSync, symlinkSync } from 'node:fs';
import { writeRandom } from '../helpers/files.js';
import { join } from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { BIN, DIST_MAIN, cli, cliCommand, cliJson, spawnCli, tempDir } from '../helpers/cli.js';

test('init prints name, token and fingerprint; a second init is refused', async (t) => {
  const home = join(tempDir(t), 'home');
  const r = await cliJson(['init', '--name', 'site-a', '--home', home]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.json.name, 'site-a');
  assert.equal(r.json.home, home);
  assert.match(r.json.token, /^[A-Za-z0-9_-]{40,}$/);
  assert.match(r.json.fingerprint, /^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
  const again = await cliJson(['init', '--home', home]);
  assert.equal(again.code, 1);
  assert.equal(again.json.error.code, 'ERR_ALREADY_INITIALIZED');
  const text = await cli(['init', '--home', join(tempDir(t), 'h2'), '--name', 'b']);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /token: +\S+/);
  assert.match(text.stdout, /fingerprint: +[0-9A-F:]+/);
});

test('two inits of one home at once: one makes it, the other gets ERR_ALREADY_INITIALIZED, and the home is the winner\'s throughout; init where a file is: ERR_USAGE', async (t) => {
  for (let round = 0; round < 3; round++) {
    const home = join(tempDir(t), 'home');
    const [x, y] = await Promise.all([cliJson(['init', '--name', 'ra', '--home', home]), cliJson(['init', '--name', 'rb', '--home', home])]);
    const won = [x, y].filter((r) => r.code === 0);
    assert.equal(won.length, 1, `exactly one init succeeds: ${x.stderr} ${y.stderr}`);
    const lost = x.code === 0 ? y : x;
    assert.equal(lost.json.error.code, 'ERR_ALREADY_INITIALIZED', lost.stderr);
    const w = won[0]!.json;
    assert.equal(readFileSync(join(home, 'token'), 'utf8').trim(), w.token, 'the token the winner printed is the home\'s');
    assert.equal(JSON.parse(readFileSync(join(home, 'appliance.json'), 'utf8')).name, w.name);
    assert.match(readFileSync(join(home, 'config.yaml'), 'utf8'), new RegExp(`\\b${w.name}\\b`), 'config.yaml names the winner');
  }
  const file = join(tempDir(t), 'afile');
  writeFileSync(file, 'x');
  const onFile = await cliJson(['init', '--name', 'x', '--home', file]);
  assert.equal(onFile.code, 2, onFile.stderr);
  assert.equal(onFile.json.error.code, 'ERR_USAGE');
  assert.equal(readFileSync(file, 'utf8'), 'x', 'the file is left as it was');
});

test('--json usage errors print ERR_USAGE on stdout; an empty --home, --to or --path is refused, an empty TANDEM_HOME is unset; support-bundle into a missing directory is ERR_USAGE', async (t) => {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--name', 'u', '--home', home])).code, 0);
  for (const args of [['status', '--home', home, '--bogus'], ['snapshot', '--home', home], ['bogus']]) {
    const r = await cliJson(args);
    assert.equal(r.code, 2, r.stderr);
    assert.equal(r.json.error.code, 'ERR_USAGE', JSON.stringify(args));
  }
  for (const args of [['init', '--name', 'x', '--home', ''], ['status', '--home', ''], ['restore', 'vol', '--to', '', '--home', home], ['volume', 'add', 'v', '--path', '', '--home', home], ['support-bundle', '--to', join(dir, 'missing', 'b.tgz'), '--home', home]]) {
    const r = await cliJson(args, { cwd: dir });
    assert.equal(r.code, 2, `${JSON.stringify(args)}: ${r.stderr}`);
    assert.equal(r.json.error.code, 'ERR_USAGE', JSON.stringify(args));
  }
  assert.deepEqual(readdirSync(dir), ['home'], 'nothing was written where the commands ran');
  const unset = await cliJson(['status'], { env: { TANDEM_HOME: '' }, cwd: dir });
  assert.equal(unset.json.error.code, 'ERR_NOT_INITIALIZED');
  assert.match(unset.json.error.message, /\/var\/lib\/tandem/, 'the default home, not the current directory');
});

test('a volume no policy matches: volume add, status and doctor say that no job protects it', async (t) => {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--name', 'np', '--home', home])).code, 0);
  const img = join(dir, 'disk.img');
  writeRandom(img, 1024 * 1024);
  const add = await cli(['volume', 'add', 'orphan', '--path', img, '--home', home]);
  assert.equal(add.code, 0, add.stderr);
  assert.match(add.stderr, /no policy matches volume "orphan": no job snapshots or replicates it/);
  const status = await cli(['status', '--home', home]);
  assert.match(status.stdout, /orphan: no policy: no job snapshots or replicates it/);
  const doctor = await cliJson(['doctor', '--home', home]);
  const check = (doctor.json.checks as Array<{ check: string; status: string }>).find((c) => c.check === 'policy of orphan');
  assert.equal(check?.status, 'warn', JSON.stringify(doctor.json.checks));
});

test('commands on an uninitialized home say to run init', async (t) => {
  const r = await cliJson(['volume', 'list', '--home', tempDir(t)]);
  assert.equal(r.code, 1);
  assert.equal(r.json.error.code, 'ERR_NOT_INITIALIZED');
  assert.match(r.stderr, /appliance init/);
});

test('volume add, list and remove; duplicates, unknown volumes and bad input change nothing', async (t) => {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const img = join(dir, 'disk.img');
  writeRandom(img, 1024 * 1024 + 5);

  const add = await cliJson(['volume', 'add', 'db', '--path', img, '--block-size', '64KiB', '--tag', 'prod', 'sql', '--home', home]);
  assert.equal(add.code, 0, add.stderr);
  assert.equal(add.json.size, 1024 * 1024 + 5);
  assert.equal(add.json.blockSize, 65536);
  assert.deepEqual(add.json.tags, ['prod', 'sql']);

  const dup = await cliJson(['volume', 'add', 'db', '--path', img, '--home', home]);
  assert.equal(dup.code, 1);
  assert.equal(dup.json.error.code, 'ERR_VOLUME_EXISTS');

  const cases: Array<[string[], string, number]> = [
    [['volume', 'add', 'x', '--path', join(dir, 'missing.img')], 'ERR_VOLUME_UNREADABLE', 1],
    [['volume', 'add', 'x', '--path', dir], 'ERR_VOLUME_UNREADABLE', 1],
    [['volume', 'add', 'bad/name', '--path', img], 'ERR_BAD_REQUEST', 2],
    [['volume', 'add', 'x', '--path', img, '--block-size', '3000'], 'ERR_BLOCK_SIZE_INVALID', 2],
    [['volume', 'add', 'x', '--path', img, '--block-size', '32MiB'], 'ERR_BLOCK_SIZE_INVALID', 2],
    [['volume', 'add', 'x', '--path', img, '--block-size', 'lots'], 'ERR_USAGE', 2],
    [['volume', 'remove', 'nope'], 'ERR_VOLUME_NOT_FOUND', 1],
    [['snapshot', 'nope'], 'ERR_VOLUME_NOT_FOUND', 1],
    [['snapshots', 'nope'], 'ERR_VOLUME_NOT_FOUND', 1],
    [['restore', 'nope', '--to', join(dir, 'out.img')], 'ERR_VOLUME_NOT_FOUND', 1],
    [['verify', 'nope'], 'ERR_VOLUME_NOT_FOUND', 1],
    [['verify', '--bwlimit', 'fast'], 'ERR_USAGE', 2],
    [['verify', '--bwlimit', '0'], 'ERR_USAGE', 2],
    [['repair', '--peer', 'nowhere'], 'ERR_PEER_NOT_FOUND', 1],
    [['repair', 'db', '--peer', 'nowhere', '--push'], 'ERR_USAGE', 2],
  ];
  for (const [args, code, exit] of cases) {
    const r = await cliJson([...args, '--home', home]);
    assert.equal(r.json.error?.code, code, `${args.join(' ')}: ${r.stdout}`);
    assert.equal(r.code, exit, args.join(' '));
    assert.ok(r.stderr.includes(code), 'the error is on stderr too');
  }
  // Usage errors from commander: exit 2.
  assert.equal((await cli(['volume', 'add', 'x', '--home', home])).code, 2, 'missing --path');
  assert.equal((await cli(['restore', 'db', '--home', home])).code, 2, 'missing --to');
  assert.equal((await cli(['no-such-command', '--home', home])).code, 2);

  const list = await cliJson(['volume', 'list', '--home', home]);
  assert.equal(list.code, 0);
  assert.deepEqual(list.json.map((v: any) => v.name), ['db'], 'failed adds registered nothing');
  assert.equal(list.json[0].snapshots, 0);
  const listText = await cli(['volume', 'list', '--home', home]);
  assert.match(listText.stdout, /^NAME\s+SIZE\s+BLOCK\s+SNAPSHOTS\s+LAST\s+PATH\n/);
  assert.match(listText.stdout, /db\s+1\.0 MiB\s+64\.0 KiB\s+0\s+never\s+\S+disk\.img/);

  const rm = await cliJson(['volume', 'remove', 'db', '--home', home]);
  assert.equal(rm.code, 0, rm.stderr);
  assert.deepEqual((await cliJson(['volume', 'list', '--home', home])).json, []);
});

test('an unreadable volume path is refused (permission)', { skip: process.getuid?.() === 0 ? 'root reads any file' : false }, async (t) => {
  const dir = tempDir(t);
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const img = join(dir, 'secret.img');
  writeRandom(img, 4096);
  chmodSync(img, 0);
  const r = await cliJson(['volume', 'add', 'x', '--path', img, '--home', home]);
  assert.equal(r.json.error.code, 'ERR_VOLUME_UNREADABLE');
  assert.equal(r.code, 1);
});

test('--help is fast and lists the commands', async () => {
  const started = process.hrtime.bigint();
  const r = await cli(['--help']);
  const ms = Number(process.hrtime.bigint() - started) / 1e6;
  assert.equal(r.code, 0);
  for (const c of ['init', 'volume', 'snapshot', 'snapshots', 'restore', 'verify', 'gc']) assert.match(r.stdout, new RegExp(`\\n  ${c}\\b`));
  // The budget is 200 ms on an idle machine; allow for a loaded test machine.
  assert.ok(ms < 2000, `--help took ${ms} ms`);
});

test('the command package.json names is the launcher, and the one these tests run; it works through a symlink', async (t) => {
  assert.ok(BIN.endsWith(join('bin', 'appliance')), BIN);
  assert.match(readFileSync(BIN, 'utf8'), /^#!\/bin\/sh\n/);
  assert.ok((statSync(BIN).mode & 0o111) !== 0, 'the launcher is executable (git keeps its mode)');
  if (process.env.TANDEM_TEST_CLI !== 'source') assert.deepEqual(cliCommand(), { file: BIN, args: [] });
  // npm installs the command as a symlink (node_modules/.bin/appliance).
  const link = join(tempDir(t), 'appliance');
  symlinkSync(BIN, link);
  const r = spawnSync(link, ['--version'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /^\d+\.\d+\.\d+\n$/);
});

test('the launcher keeps NODE_EXTRA_CA_CERTS from Node\'s start and hands it to the appliance (common/ca.ts)', async (t) => {
  // Node reads the file at start, and warns when it cannot; through the launcher it never reads it.
  const missing = join(tempDir(t), 'no-such-ca.pem');
  const direct = spawnSync(process.execPath, [DIST_MAIN, '--version'], { env: { ...process.env, NODE_EXTRA_CA_CERTS: missing }, encoding: 'utf8' });
  assert.match(direct.stderr, /Ignoring extra certs/, 'node itself reads the variable at start');
  const launched = spawnSync(BIN, ['--version'], { env: { ...process.env, NODE_EXTRA_CA_CERTS: missing }, encoding: 'utf8' });
  assert.equal(launched.status, 0, launched.stderr);
  assert.equal(launched.stderr, '');
});

test('the launcher starts servers (serve, daemon) and pulls with their heap settings, and other one-shot commands with no V8 flag', async (t) => {
  // A `node` first on PATH that prints the arguments the launcher gave it.
  const dir = tempDir(t);
  writeFileSync(join(dir, 'node'), '#!/bin/sh\nprintf "%s\\n" "$@"\n');
  chmodSync(join(dir, 'node'), 0o755);
  const argsOf = (...argv: string[]) => {
    const r = spawnSync(BIN, argv, { env: { ...process.env, PATH: `${dir}:${process.env.PATH}` }, encoding: 'utf8' });
    assert.equal(r.status, 0, r.stderr);
    return r.stdout.trimEnd().split('\n');
  };
  const heap = ['--max-semi-space-size=4', '--initial-old-space-size=64'];
  assert.deepEqual(argsOf('serve', '--listen', '127.0.0.1:0').slice(0, 2), heap);
  assert.deepEqual(argsOf('--home', '/h', '--json', 'daemon').slice(0, 2), heap);
  assert.deepEqual(argsOf('--home=/h', 'serve').slice(0, 2), heap);
  const young = heap[0];
  const once = argsOf('--json', 'sync', 'vol', '--peer', 'cloud');
  assert.match(once[0]!, /dist\/appliance\/cli\/bin\.cjs$/, 'a one-shot command: the entry module comes first');
  assert.deepEqual(once.slice(1), ['--json', 'sync', 'vol', '--peer', 'cloud']);
  assert.deepEqual(argsOf('sync', 'vol', '--peer', 'cloud', '--reverse', '--apply').slice(0, 1), [heap[1]], 'a pull receives blocks: the old-generation setting');
  assert.notEqual(argsOf('--home', 'serve', 'volume', 'list')[0], young, "a home named serve is --home's value, not the command");
  assert.notEqual(argsOf('snapshot', 'serve')[0], young, 'a volume named serve is not the command');
});

test('--version prints the package version and exits 0', async () => {
  const pkg = JSON.parse(readFileSync(join(__dirname, '../../package.json'), 'utf8')) as { version: string };
  const r = await cli(['--version']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), pkg.version);
});

test('a command found without loading every module: its own help, one defined elsewhere, a typo', async () => {
  const sync = await cli(['--home', '/nonexistent', 'sync', '--help']);
  assert.equal(sync.code, 0, sync.stderr);
  assert.match(sync.stdout, /Usage: appliance sync \[options\] <volume>/);
  assert.match(sync.stdout, /--reverse/);
  // `drill` is defined by the failover module: found by loading them all.
  const drill = await cli(['drill', '--help']);
  assert.equal(drill.code, 0, drill.stderr);
  assert.match(drill.stdout, /Usage: appliance drill/);
  const typo = await cli(['snapshto', 'vol']);
  assert.equal(typo.code, 2);
  assert.match(typo.stderr, /unknown command 'snapshto'[\s\S]*Did you mean snapshot\?/);
});

test('an option value that starts with a dash is the value, not a flag: a token "-V..." pairs the peer instead of printing the version', async (t) => {
  const home = join(tempDir(t, 'tandem-dash-'), 'home');
  assert.equal((await cliJson(['--home', home, 'init'])).code, 0);
  const token = '-Vh' + 'x'.repeat(40); // base64url tokens start with "-" one time in 64
  const fingerprint = Array.from({ length: 32 }, () => 'AB').join(':');
  const added = await cliJson(['--home', home, 'peer', 'add', 'cloud', '--url', 'https://127.0.0.1:1', '--token', token, '--fingerprint', fingerprint, '--no-check']);
  assert.equal(added.code, 0, added.stderr);
  assert.equal(added.json.peer.name, 'cloud', added.stdout);
  const listed = await cliJson(['--home', home, 'peer', 'list']);
  assert.equal(listed.json.peers[0].token, '-Vhx…');
  // The same after the command words, and for a free-text value; the version flag itself still works.
  const held = await cliJson(['--home', home, 'snapshots', 'nope', '--hold', 'x', '--reason', '-h: before the upgrade']);
  assert.equal(held.json.error.code, 'ERR_VOLUME_NOT_FOUND');
  assert.match((await cli(['--version'])).stdout, /^\d+\.\d+\.\d+/);
});

test('a reader that leaves early (`| head`) cuts nothing short: the snapshot commits, the exit code is the command\'s, no stack trace', async (t) => {
  const dir = tempDir(t, 'tandem-pipe-');
  const home = join(dir, 'home');
  assert.equal((await cli(['init', '--home', home])).code, 0);
  const img = join(dir, 'disk.img');
  writeRandom(img, 3 * 1024 * 1024);
  assert.equal((await cli(['--home', home, 'volume', 'add', 'vol', '--path', img])).code, 0);
  /** Run the CLI with both of its pipes' readers gone before it writes a byte. */
  const unread = async (args: string[]): Promise<{ code: number | null; stderr: string }> => {
    const child = spawnCli(['--home', home, ...args]);
    child.stdout!.destroy();
    const err: Buffer[] = [];
    child.stderr!.once('data', (d: Buffer) => {
      err.push(d); // the first line, then the reader leaves
      child.stderr!.destroy();
    });
    const [code] = (await once(child, 'close')) as [number | null];
    return { code, stderr: Buffer.concat(err).toString() };
  };
  const snap = await unread(['snapshot', 'vol', '--json']);
  assert.equal(snap.code, 0, snap.stderr);
  const listed = await cliJson(['--home', home, 'snapshots', 'vol']);
  assert.equal(listed.json.length, 1, 'the snapshot was committed');
  const list = await unread(['snapshots', 'vol', '--json']);
  assert.equal(list.code, 0, list.stderr);
  assert.doesNotMatch(list.stderr, /EPIPE|Unhandled/);
  const missing = await unread(['snapshots', 'nope', '--json']);
  assert.equal(missing.code, 1, 'a failure keeps its exit code');
});

test('a server killed with -9 and left a zombie by a parent that does not reap it holds nothing: a new serve starts on its home and commands reach the new one', async (t) => {
  const home = tempDir(t, 'tandem-zombie-');
  assert.equal((await cli(['--home', home, 'init', '--name', 'site'])).code, 0);
  const { file, args } = cliCommand();
  const start = [file, ...args, '--home', home, '--json', 'serve', '--listen', '127.0.0.1:0'].map((a) => `'${a}'`).join(' ');
  // The shell starts serve, then becomes `sleep`, which never waits for its children.
  const parent = spawn('sh', ['-c', `${start} & exec sleep 120`], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, CI: 'true' } });
  t.after(() => void parent.kill('SIGKILL'));
  const [line] = (await once(parent.stdout!, 'data')) as [Buffer];
  const old = JSON.parse(line.toString().split('\n')[0]!) as { pid: number; url: string };
  process.kill(old.pid, 'SIGKILL');
  const state = () => {
    const stat = readFileSync(`/proc/${old.pid}/stat`, 'latin1');
    return stat.charAt(stat.lastIndexOf(')') + 2);
  };
  for (let i = 0; i < 100 && state() !== 'Z'; i++) await new Promise((r) => setTimeout(r, 20));
  assert.equal(state(), 'Z', 'the killed server is a zombie of sleep');

  const next = spawnCli(['--home', home, '--json', 'serve', '--listen', '127.0.0.1:0']);
  t.after(() => void next.kill('SIGKILL'));
  const exited = once(next, 'exit');
  const first = await Promise.race([once(next.stdout!, 'data').then(([d]) => String(d)), exited.then(() => null)]);
  assert.ok(first !== null, 'the new serve started');
  assert.doesNotMatch(first, /ERR_STORE_BUSY/, first);
  const served = JSON.parse(first.split('\n')[0]!) as { pid: number; url: string };
  assert.equal(served.pid, next.pid);
  // A command is forwarded to the new server, not to the zombie's closed port.
  const list = await cliJson(['--home', home, 'volume', 'list']);
  assert.equal(list.code, 0, list.stderr);
  next.kill('SIGTERM');
  await exited;
});
