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
}
