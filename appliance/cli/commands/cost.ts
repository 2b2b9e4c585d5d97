/**
 * `appliance cost [--json]`: the monthly cost of the DR site (snapshot storage, EBS direct API
 * requests, the cloud appliance) against a hot standby running the recovery plans' servers all
 * month, every line explained, from measured data and the dated price table (config `prices`).
 */
import type { Command } from 'commander';
import { run } from '../output.js';

export const order = 86;

export function define(program: Command): void {
  program
    .command('cost')
    .description('monthly cost of the DR site from measured data, against a hot standby')
    .action(run(async (g) => {
      const { withHomeStore } = await import('../../ops.js');
      const { loadConfig } = await import('../../config/index.js');
      const { costReport } = await import('../../cost/index.js');
      return withHomeStore(g.home, async (home, store) => {
        const r = await costReport(store, await loadConfig(home));
        const usd = (x: number) => `$${x.toFixed(2)}`;
        const section = (title: string, lines: typeof r.dr.lines, total: number | null) => [
          title,
          ...lines.map((l) => `  ${usd(l.cost).padStart(10)}  ${l.item}: ${l.quantity} ${l.unit} x ${l.unitPrice}${l.unit === 'requests' ? ' per 1,000' : ''}\n              ${l.explain}`),
          ...(total === null ? [] : [`  ${usd(total).padStart(10)}  total per month`]),
        ].join('\n');
        const text = [
          `prices: ${r.prices.note}`,
          '',
          section('DR site (Tandem), per month:', r.dr.lines, r.dr.monthly),
          '',
          section('Hot standby (same servers running all month), per month:', r.hotStandby.lines, r.hotStandby.monthly),
          '',
          section('One-off (per event, not monthly):', r.oneOff, null),
          '',
          `Difference: ${usd(r.savingsMonthly)} per month in favour of ${r.savingsMonthly >= 0 ? 'the DR site' : 'the hot standby'}.`,
          'Not included: data transfer into AWS (free) or out (failback), drills, taxes.',
        ].join('\n');
        return { json: r, text };
      });
    }));
}
