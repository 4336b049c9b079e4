/**
 * The engine's one serialising queue: calls run one at a time in arrival order (onnxruntime already
 * uses every core for one request). A call cancelled while it waits leaves at once, the time spent
 * waiting is measured, and a flood of calls is refused with BUSY instead of piling up.
 */

import { cancelled, SegError } from "../errors.js";

export class SerialQueue {
  #running = false;
  readonly #waiting: Array<() => void> = [];
  readonly #maxWaiting: number;

  constructor(maxWaiting: number) {
    this.#maxWaiting = maxWaiting;
  }

  /** Calls running or waiting. */
  get pending(): number {
    return this.#waiting.length + (this.#running ? 1 : 0);
  }

  /** Run `fn` when it is its turn; resolves with its result and the milliseconds spent waiting. */
  async run<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<{ value: T; waitedMs: number }> {
    const start = performance.now();
    if (signal?.aborted) throw cancelled();
    // A finished call hands its turn straight to the next waiter (`running` stays true), so a call
    // arriving in between cannot slip past the queue.
    if (this.#running) {
      if (this.#waiting.length >= this.#maxWaiting) {
        throw new SegError(
          "BUSY",
          `the server is busy (${this.#waiting.length} requests waiting): retry in a little while`,
          { details: { waiting: this.#waiting.length } },
        );
      }
      await new Promise<void>((resolve, reject) => {
        const turn = () => {
          signal?.removeEventListener("abort", onAbort);
          resolve();
        };
        const onAbort = () => {
          const i = this.#waiting.indexOf(turn);
          if (i >= 0) this.#waiting.splice(i, 1);
          reject(cancelled("while waiting for the engine"));
        };
        signal?.addEventListener("abort", onAbort, { once: true });
        this.#waiting.push(turn);
      });
    }
    this.#running = true;
    const waitedMs = performance.now() - start;
    try {
      if (signal?.aborted) throw cancelled();
      return { value: await fn(), waitedMs };
    } finally {
      const next = this.#waiting.shift();
      if (next) next();
      else this.#running = false;
    }
  }
}
