/**
 * An AbortController that follows its parents (aborted with the reason of the first of them to
 * abort) until `unlink()`, which leaves nothing behind on them.
 *
 * For a child made often under a long-lived parent (a window of a sync, a request of a peer
 * client under the daemon's or a sync's stop signal): AbortSignal.any keeps every signal it made
 * listed on its long-lived inputs (nodejs/node#55351, #54614), which grows with each call.
 */
export function linkedAbort(...parents: Array<AbortSignal | undefined>): { readonly controller: AbortController; unlink(): void } {
  const controller = new AbortController();
  const links: Array<() => void> = [];
  for (const parent of parents) {
    if (!parent) continue;
    if (parent.aborted) {
      controller.abort(parent.reason);
      break;
    }
    const follow = () => controller.abort(parent.reason);
    parent.addEventListener('abort', follow, { once: true });
    links.push(() => parent.removeEventListener('abort', follow));
  }
  return { controller, unlink: () => links.splice(0).forEach((f) => f()) };
}
