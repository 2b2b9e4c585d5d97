/** `appliance peer add|update|list|remove`: pair with the other appliance. */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 75;

/** What identifies a peer: required by `add`, each optional for `update`. */
function peerOptions(cmd: Command, required: boolean): Command {
  const opt = (flags: string, text: string) => (required ? cmd.requiredOption(flags, text) : cmd.option(flags, text));
  opt('--url <url>', 'https://HOST:PORT of the peer');
  opt('--token <token>', "the peer's API token");
  opt('--fingerprint <sha256>', "SHA-256 fingerprint of the peer's certificate");
  return cmd.option('--no-check', 'do not contact the peer now');
}

export function define(program: Command): void {
  const peer = program.command('peer').description('pair with other appliances (add, update, list, remove)');
  peerOptions(peer
    .command('add <name>')
    .description("pair with a peer: its URL, API token and certificate fingerprint (as its init/serve printed them); checks it answers unless --no-check"), true)
    .action(run(async (g, cmd, args) => {
      const name = args[0] as string;
      const o = cmd.opts<{ url: string; token: string; fingerprint: string; check: boolean }>();
      const { validatePeer, addPeer, assertNoPeer, contactPeer, redactPeer } = await import('../../peers.js');
      const { Home } = await import('../../home.js');
      const rec = validatePeer({ name, url: o.url, token: o.token, fingerprint: o.fingerprint });
      const home = Home.load(g.home);
      // Paired with itself, an appliance would report every volume replicated with no second copy anywhere.
      const { TandemError } = await import('../../../common/errors.js');
      const self = () => new TandemError('ERR_USAGE', `the peer given is this appliance itself ("${home.identity.name}": ${rec.fingerprint === home.fingerprint() ? 'its own certificate fingerprint' : 'it answered with its own id'}); a peer is the other appliance: use the URL, token and fingerprint its \`init\` or \`serve\` printed`, { details: { peer: name } });
      if (rec.fingerprint === home.fingerprint()) throw self();
      const store = await home.openStore();
      try {
        await assertNoPeer(store, name); // before contacting the peer: bad input changes nothing
        const remote = o.check ? await contactPeer(rec) : null;
        if (remote?.id === home.identity.id) throw self();
        await addPeer(store, remote ? { ...rec, id: remote.id } : rec);
        const shown = redactPeer(rec);
        return {
          json: { peer: shown, checked: o.check, remote },
          text: `added peer "${name}" at ${rec.url}${remote ? ` (appliance "${remote.name}", reachable, token accepted)` : ' (not contacted: --no-check)'}`,
        };
      } finally {
        await store.close();
      }
    }));
  peerOptions(peer
    .command('update <name>')
    .description("change a peer's URL, token or fingerprint (after it moved, or rotated its token or certificate); checks it answers with them unless --no-check. With none of them: follow a certificate the peer staged or now serves (`appliance tls rotate` there; the daemon does this every 30 s)"), false)
    .action(run(async (g, cmd, args) => {
      const name = args[0] as string;
      const o = cmd.opts<{ url?: string; token?: string; fingerprint?: string; check: boolean }>();
      const { TandemError } = await import('../../../common/errors.js');
      const { validatePeer, getPeer, updatePeer, contactPeer, redactPeer, followCertificate, forgetPeerPoints } = await import('../../peers.js');
      const { Home } = await import('../../home.js');
      const home = Home.load(g.home);
      if (o.url === undefined && o.token === undefined && o.fingerprint === undefined) {
        if (!o.check) throw new TandemError('ERR_USAGE', 'give what changed: --url, --token and/or --fingerprint (without them, update contacts the peer to follow its certificate: --no-check leaves nothing to do)');
        const store = await home.openStore();
        try {
          const r = await followCertificate(store, await getPeer(store, name), home.identity);
          const said: Record<typeof r.change, string> = {
            none: r.peer.nextFingerprint ? `the peer has staged certificate ${r.peer.nextFingerprint}, taken as well` : `certificate ${r.peer.fingerprint} pinned; the peer has staged none`,
            learned: `learned the certificate the peer staged: ${r.peer.nextFingerprint}, taken as well until it serves it${r.acknowledged ? ' (the peer was told)' : ''}`,
            moved: `the peer serves its new certificate: ${r.peer.fingerprint} is now the only one pinned`,
            dropped: `the peer dropped its staged certificate: only ${r.peer.fingerprint} is taken`,
          };
          return { json: { peer: redactPeer(r.peer), certificate: r.change, acknowledged: r.acknowledged }, text: `peer "${name}": ${said[r.change]}` };
        } finally {
          await store.close();
        }
      }
      const store = await home.openStore();
      try {
        const old = await getPeer(store, name);
        const fingerprint = o.fingerprint ?? old.fingerprint;
        const rec = {
          ...validatePeer({ name, url: o.url ?? old.url, token: o.token ?? old.token, fingerprint }),
          // A staged certificate learned from the peer stays taken unless the pin itself is replaced.
          ...(old.nextFingerprint !== undefined && o.fingerprint === undefined ? { nextFingerprint: old.nextFingerprint } : {}),
          added: old.added,
        };
        if (rec.fingerprint === home.fingerprint()) {
          throw new TandemError('ERR_USAGE', `the fingerprint given is this appliance's own; a peer is the other appliance: use the fingerprint its \`serve\` printed`, { details: { peer: name } });
        }
        // Checked with the new values before anything is written: a wrong one changes nothing.
        const remote = o.check ? await contactPeer(rec) : null;
        if (remote?.id === home.identity.id) throw new TandemError('ERR_USAGE', `the peer given is this appliance itself ("${home.identity.name}"); nothing was changed`, { details: { peer: name } });
        // Another appliance under the same name (a rebuilt cloud appliance): what the old one held does not count.
        const replaced = remote !== null && old.id !== undefined && remote.id !== old.id;
        if (replaced) await forgetPeerPoints(store, name);
        const known = remote ? { id: remote.id } : old.id !== undefined ? { id: old.id } : {};
        await updatePeer(store, { ...rec, ...known });
        const changed = (['url', 'token', 'fingerprint'] as const).filter((k) => rec[k] !== old[k]);
        const replacedNote = replaced ? `\n  "${name}" is now another appliance (id ${remote!.id}, was ${old.id}): what was replicated to the old one no longer counts; the next job (or \`appliance sync VOL --peer ${name}\`) sends it what it lacks` : '';
        return {
          json: { peer: redactPeer(rec), changed, checked: o.check, remote, replaced },
          text: `updated peer "${name}": ${changed.length > 0 ? changed.join(', ') : 'nothing changed'}${remote ? ` (appliance "${remote.name}", reachable, token accepted)` : ' (not contacted: --no-check)'}${replacedNote}`,
        };
      } finally {
        await store.close();
      }
    }));
  peer
    .command('list')
    .description('list peers (tokens are never shown in full)')
    .action(run(async (g) => {
      const { listPeers, redactPeer } = await import('../../peers.js');
      const { Home } = await import('../../home.js');
      const store = await Home.load(g.home).openStore();
      try {
        const peers = (await listPeers(store)).map(redactPeer);
        const text = peers.length === 0
          ? 'no peers; pair with `appliance peer add NAME --url URL --token T --fingerprint F`'
          : peers.map((p) => `${p.name}\t${p.url}\t${p.fingerprint}${p.nextFingerprint ? ` (and staged ${p.nextFingerprint})` : ''}\ttoken ${p.token}\tadded ${p.added}`).join('\n');
        return { json: { peers }, text };
      } finally {
        await store.close();
      }
    }));
  peer
    .command('remove <name>')
    .description('forget a peer')
    .action(run(async (g, _cmd, args) => {
      const name = args[0] as string;
      const { removePeer } = await import('../../peers.js');
      const { Home } = await import('../../home.js');
      const store = await Home.load(g.home).openStore();
      try {
        await removePeer(store, name);
        return { json: { removed: name }, text: `removed peer "${name}"` };
      } finally {
        await store.close();
      }
    }));
}
