/** What every part of the emulator shares: the tables, the fault injector, the statistics and the settings. */
import type { EmulatorState } from './state.js';
import type { Faults, Stats } from './faults.js';

export interface EmulatorContext {
  readonly state: EmulatorState;
  readonly faults: Faults;
  readonly stats: Stats;
  /** How long a block token from a listing stays valid. */
  readonly blockTokenTtlMs: number;
  /** How long a NextToken stays valid. */
  readonly nextTokenTtlMs: number;
  /** StartSnapshot's Timeout when the request gives none (minutes; fractions allowed for tests). */
  readonly pendingTimeoutMinutes: number;
  /** How long an instance stays `pending` / `shutting-down` before `running` / `terminated`. */
  readonly instanceDelayMs: number;
  /**
   * Launch faults by instance type (POST /_emulator/launch-faults): `capacity` refuses RunInstances
   * with InsufficientInstanceCapacity; `fail` launches the instance, which then terminates
   * instead of running (state reason Server.InternalError), as EC2 does when a launch fails;
   * `lost` launches the instance but answers InternalError (500), the retries with its client
   * token too, as when EC2's answers never reach the caller.
   */
  readonly launchFaults: Map<string, LaunchFault>;
}

export type LaunchFault = 'capacity' | 'fail' | 'lost';
