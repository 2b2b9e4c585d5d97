/** Plain-text tables for human CLI output (--json prints the data instead). */

/** Left-aligned columns separated by two spaces; numbers are right-aligned. */
export function formatTable(header: readonly string[], rows: ReadonlyArray<ReadonlyArray<string | number>>): string {
  const cells = [header.map(String), ...rows.map((r) => r.map(String))];
  const numeric = header.map((_, c) => rows.length > 0 && rows.every((r) => typeof r[c] === 'number'));
  const widths = header.map((_, c) => Math.max(...cells.map((r) => (r[c] ?? '').length)));
  return cells
    .map((r) => r.map((v, c) => (numeric[c] ? v.padStart(widths[c]!) : v.padEnd(widths[c]!))).join('  ').trimEnd())
    .join('\n');
}

/** "3m ago", "2h ago", "5d ago" for an ISO time; "never" for none. */
export function formatAge(iso: string | undefined, now = Date.now()): string {
  if (!iso) return 'never';
  const d = Math.round((now - Date.parse(iso)) / 1000);
  // Dated ahead of this clock by more than a moment (a clock set back, a peer's clock ahead): said so.
  const s = Math.abs(d);
  const span = s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m` : s < 86400 ? `${Math.floor(s / 3600)}h` : `${Math.floor(s / 86400)}d`;
  return d < -1 ? `in ${span} (ahead)` : `${Math.max(0, d) === 0 ? '0s' : span} ago`;
}
