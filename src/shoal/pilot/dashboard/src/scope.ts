// scope.ts: the lifetime of one view. Everything a view starts (polling loops, fetches,
// taps, charts, the graph) registers here and is stopped when the user navigates away,
// so views never keep polling in the background.

import { ApiError } from "./api";
import { reportError, reportOk } from "./status";

export class Scope {
  private readonly controller = new AbortController();
  private readonly disposers: (() => void)[] = [];

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  get disposed(): boolean {
    return this.controller.signal.aborted;
  }

  onDispose(fn: () => void): void {
    this.disposers.push(fn);
  }

  /** Run `task` now, then `intervalMs` after each run ends (runs never overlap). A run
   * that fails reports the error in the header and the loop goes on; while the tab is
   * hidden the loop waits. */
  every(intervalMs: number, task: (signal: AbortSignal) => Promise<void>): void {
    let timer: number | undefined;
    const run = async (): Promise<void> => {
      timer = undefined;
      if (this.disposed) return;
      if (document.hidden) {
        timer = window.setTimeout(run, 1000);
        return;
      }
      try {
        await task(this.signal);
        reportOk();
      } catch (error) {
        if (this.disposed) return;
        reportError(error);
      }
      if (!this.disposed) timer = window.setTimeout(run, intervalMs);
    };
    this.onDispose(() => window.clearTimeout(timer));
    void run();
  }

  dispose(): void {
    this.controller.abort();
    for (const fn of this.disposers.splice(0).reverse()) {
      try {
        fn();
      } catch (error) {
        console.error("dispose failed", error);
      }
    }
  }
}

/** True when the error means "this pilot has no such endpoint" (an older or newer API). */
export function isMissing(error: unknown): boolean {
  return error instanceof ApiError && (error.status === 404 || error.status === 405);
}
