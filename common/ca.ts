/**
 * Extra certificate authorities, loaded only by the clients that check a server against CAs:
 * the AWS clients (EBS, EC2) and the alert webhook. Peer links do not: a peer's certificate is
 * pinned by its fingerprint (api/client.ts), and the CLI reaches its own appliance through a
 * Unix socket or the same pinning (appliance/cli/forward-client.cts).
 *
 * Why: Node 20 reads and parses the file NODE_EXTRA_CA_CERTS names at every start, before any
 * JavaScript runs, together with its whole bundled root store. With Debian's bundle (144
 * certificates) that is 80-95 ms on the development machine, more than everything else
 * `appliance --help` does (220 ms with it, 125 ms without). So the `appliance` launcher
 * (bin/appliance) moves the variable to {@link EXTRA_CA_VAR} before it starts Node, and the
 * clients that need the extra CAs build one TLS context with them, once, when first made.
 * A process started without the launcher (node dist/appliance/cli/bin.cjs) still has Node's own
 * NODE_EXTRA_CA_CERTS handling, and {@link extraCaContext} then has nothing to add.
 *
 * Not covered: the SDK credential chain's own calls to STS or SSO (assume-role profiles, SSO
 * sessions) use Node's default CAs. An appliance that needs an extra CA for those is started as
 * `node dist/appliance/cli/bin.cjs`, without the launcher, and Node loads the file itself.
 */
import { readFileSync } from 'node:fs';
import type { AgentOptions } from 'node:https';
import { createSecureContext, rootCertificates, type SecureContext } from 'node:tls';
import type { Dispatcher } from 'undici';

/** Where the launcher puts NODE_EXTRA_CA_CERTS's value. */
export const EXTRA_CA_VAR = 'TANDEM_EXTRA_CA_CERTS';

let context: SecureContext | null | undefined;

/**
 * A TLS context trusting Node's bundled roots plus the certificates of {@link EXTRA_CA_VAR}'s
 * file, or undefined when the variable is not set. Built once. An unreadable or invalid file is
 * ignored with a warning, as Node does for NODE_EXTRA_CA_CERTS.
 */
export function extraCaContext(): SecureContext | undefined {
  if (context !== undefined) return context ?? undefined;
  const file = process.env[EXTRA_CA_VAR];
  context = null;
  if (!file) return undefined;
  try {
    context = createSecureContext({ ca: [...rootCertificates, readFileSync(file, 'utf8')] });
  } catch (e) {
    process.emitWarning(`Ignoring extra certs from \`${file}\`, load failed: ${(e as Error).message}`);
  }
  return context ?? undefined;
}

/** The AWS SDK's switch for its NodeVersionSupportWarning (@aws-sdk/core). */
const SDK_NODE_WARNING_OFF = 'AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED';

/**
 * Options every AWS SDK client of ours is made with: its HTTPS agent trusts the extra CAs when
 * there are any (the SDK's defaults otherwise; keep-alive and 50 sockets are the SDK's own).
 *
 * It also turns off the SDK's NodeVersionSupportWarning, eight lines on stderr before the output
 * of every EBS or EC2 command on Node 20 (and in the daemon's log) that the operator can do
 * nothing about: it says the SDK's releases after the first week of January 2027 need Node 22.
 * package-lock.json pins a release that runs on Node 20; moving the SDK past January 2027 means
 * moving the appliance to Node 22 (README, "Quick start"). An operator's own value of the
 * variable is kept.
 */
export function awsClientOptions(): { requestHandler?: { httpsAgent: AgentOptions } } {
  process.env[SDK_NODE_WARNING_OFF] ??= 'true';
  const secureContext = extraCaContext();
  return secureContext ? { requestHandler: { httpsAgent: { keepAlive: true, maxSockets: 50, secureContext } } } : {};
}

let dispatcher: Dispatcher | undefined;

/**
 * The dispatcher for undici's `fetch` of an operator-given HTTPS URL (the webhook), trusting the
 * extra CAs; undefined without any. undici is loaded here, not with this module: it takes
 * 120-170 ms, which the AWS clients importing this module need not pay.
 */
export async function extraCaDispatcher(): Promise<Dispatcher | undefined> {
  const secureContext = extraCaContext();
  if (!secureContext) return undefined;
  if (!dispatcher) {
    const { Agent } = await import('undici');
    dispatcher = new Agent({ connect: { secureContext } });
  }
  return dispatcher;
}

/** Environment for a child process: the extra CAs back in NODE_EXTRA_CA_CERTS, where other programs look. */
export function childEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const file = env[EXTRA_CA_VAR];
  if (!file || env.NODE_EXTRA_CA_CERTS) return env;
  const out: NodeJS.ProcessEnv = { ...env, NODE_EXTRA_CA_CERTS: file };
  delete out[EXTRA_CA_VAR];
  return out;
}
