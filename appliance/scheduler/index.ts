/** The scheduler: deadline math, clocks, durable state and the job runner. */
export { realClock, FakeClock, type Clock } from './clock.js';
export { nextStart, expectedDurationMs, updateRates, DEFAULT_RATES, JOB_OVERHEAD_MS, SAFETY_FACTOR, type Rates } from './deadline.js';
export { Scheduler, planUnits, HOLD_CODES, HOLD_PROBE_MS, type JobSteps, type SchedulerStore, type SchedulerOptions, type Unit, type Log } from './runner.js';
export { readVolumeState, readRates, listCheckpoints, STATE_NS, RATES_NS, type VolumeState, type HeldReplication, type JobCheckpoint, updateVolumeState, releaseHold, pushedPointAt } from './state.js';
export { applianceSteps, pushSnapshot } from './steps.js';
