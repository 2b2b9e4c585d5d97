/** Defaults of config.yaml's keys, apart from load.ts so that reading them loads no parser. */

/**
 * The daemon verifies the whole store this often unless the config says otherwise: silent
 * corruption of the DR copy is found within a week, not at failover.
 */
export const DEFAULT_VERIFY_EVERY_MS = 7 * 86_400_000;
/** ... reading at most this fast, so replication keeps most of the disk. */
export const DEFAULT_VERIFY_BYTES_PER_SEC = 100 * 1024 * 1024;

/** A hook that hangs must not stall the schedule forever; operators raise it per group. */
export const DEFAULT_HOOK_TIMEOUT_MS = 60_000;

/**
 * A running job or forwarded command gets this long to finish after SIGTERM: well inside
 * systemd's default stop timeout (90 s; deploy/tandem.service gives 120 s), with time left for
 * the post hooks it owes. Under a supervisor that kills sooner (Docker's 10 s, Kubernetes' 30 s
 * by default) operators set `shutdown.grace` below that supervisor's timeout.
 */
export const DEFAULT_SHUTDOWN_GRACE_MS = 30_000;
