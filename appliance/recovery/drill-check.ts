/**
 * A drill's own check of the recovered server: config.yaml `recovery.PLAN.drill.check`. That the
 * instance runs in the isolated subnet with its disks attached (launch.ts drillChecks) says little
 * about the application; this command, written by the operator, says whether the server came back
 * as it should (a health URL answers, the database opens, a file written before the snapshot is
 * there). It runs on the cloud appliance (`sh -c`, like the snapshot hooks) once the instance
 * runs, and is tried every `interval` (default 15s) until it exits 0 or `timeout` (default 10m)
 * has passed, since a server takes a while to boot; one attempt may run at most a minute. The drill
 * passes only if it does; its output's tail goes into the drill's report.
 *
 * Environment: TANDEM_DRILL_RUN, TANDEM_PLAN, TANDEM_INSTANCE_ID, TANDEM_PRIVATE_IP,
 * TANDEM_EC2_VOLUMES (`DEVICE=VOLUME-ID`, space-separated, root first), TANDEM_HOOK=check.
 */
import type { RawDrillCheck } from '../config/schema.js';
import { parseDuration } from '../config/duration.js';
import { runHook, type HookRun } from '../hooks.js';
import { realClock } from '../scheduler/clock.js';
import type { DrillCheck, LaunchedServer } from './launch.js';

export const DEFAULT_CHECK_TIMEOUT_MS = 10 * 60_000;
export const DEFAULT_CHECK_INTERVAL_MS = 15_000;
/** Longest one attempt may run. */
const ATTEMPT_TIMEOUT_MS = 60_000;

function outcome(r: HookRun): string {
  const how = r.timedOut ? 'did not finish in time' : r.exitCode === null ? `was killed by ${r.signal ?? 'a signal'}` : `exited ${r.exitCode}`;
  const out = r.output ? `: ${r.output.split('\n').slice(-3).join(' | ')}` : '';
  return `${how}${out}`;
}

/** Run `check` against `server` of drill `runId` (see the module comment). Never throws: the outcome is the check. */
export async function runDrillCheck(check: RawDrillCheck, server: LaunchedServer, runId: string, signal?: AbortSignal, step: (line: string) => void = () => {}): Promise<DrillCheck> {
  const name = `${server.plan} check`;
  const timeoutMs = check.timeout === undefined ? DEFAULT_CHECK_TIMEOUT_MS : parseDuration(check.timeout);
  const intervalMs = check.interval === undefined ? DEFAULT_CHECK_INTERVAL_MS : parseDuration(check.interval);
  const env = {
    TANDEM_DRILL_RUN: runId,
    TANDEM_PLAN: server.plan,
    TANDEM_INSTANCE_ID: server.instanceId,
    TANDEM_PRIVATE_IP: server.privateIp ?? '',
    TANDEM_EC2_VOLUMES: server.disks.map((d) => `${d.device}=${d.ec2VolumeId ?? ''}`).join(' '),
  };
  const started = Date.now();
  const deadline = started + timeoutMs;
  for (let attempt = 1; ; attempt++) {
    const r = await runHook('check', check.command, Math.max(1000, Math.min(ATTEMPT_TIMEOUT_MS, deadline - Date.now())), env, signal);
    const secs = Math.round((Date.now() - started) / 100) / 10;
    if (!r.timedOut && r.exitCode === 0) {
      return { name, ok: true, detail: `\`${check.command}\` passed on attempt ${attempt} after ${secs} s${r.output ? `: ${r.output.split('\n').slice(-3).join(' | ')}` : ''}` };
    }
    if (signal?.aborted) return { name, ok: false, detail: `\`${check.command}\` stopped: the drill was interrupted (attempt ${attempt} ${outcome(r)})` };
    if (Date.now() + intervalMs >= deadline) {
      return { name, ok: false, detail: `\`${check.command}\` did not pass in ${attempt} attempt(s) over ${secs} s (timeout ${check.timeout ?? '10m'}); the last ${outcome(r)}` };
    }
    step(`${name}: attempt ${attempt} ${outcome(r)}; again in ${Math.round(intervalMs / 1000)} s`);
    await realClock.sleep(intervalMs, signal);
  }
}
