/** Stage timings of one request, and its progress reports. */

import type { ProgressFn, Stage, StageTimings } from "./types.js";

export class Timer {
  readonly timings: StageTimings = {};
  readonly #start = performance.now();
  #last = this.#start;
  readonly #onProgress: ProgressFn | undefined;

  constructor(onProgress: ProgressFn | undefined) {
    this.#onProgress = onProgress;
  }

  /** Close the current stage (adds its time since the last lap) and announce the next one. */
  lap(stage: Exclude<Stage, "queued">, next?: Stage, fraction = 0): void {
    const now = performance.now();
    this.timings[stage] = (this.timings[stage] ?? 0) + (now - this.#last);
    this.#last = now;
    if (next) this.#onProgress?.({ stage: next, fraction });
  }

  progress(stage: Stage, fraction: number, message?: string): void {
    this.#onProgress?.(message === undefined ? { stage, fraction } : { stage, fraction, message });
  }

  /** Record the mean duration of one generation step. */
  perStep(steps: number): void {
    if (steps > 0) this.timings.per_step = (this.timings.generate ?? 0) / steps;
  }

  /** The timings rounded to 0.1 ms, with the total wall time. */
  finish(): StageTimings {
    this.timings.total = performance.now() - this.#start;
    for (const k of Object.keys(this.timings) as (keyof StageTimings)[]) {
      this.timings[k] = Math.round((this.timings[k] as number) * 10) / 10;
    }
    return this.timings;
  }
}
