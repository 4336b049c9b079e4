/**
 * Confidence of an answer, two ways apart: how sure the language model is that a box is the object
 * the expression names (grounding), and how well the mask decoder thinks its mask fits the box (the
 * IoU head). The first comes from the box's own token probabilities (language-model.ts BoxEvidence),
 * turned into a probability of being right by the pack's calibration; the second says nothing about
 * whether the box is the right object.
 */

import type { BoxEvidence } from "./language-model.js";
import type { GroundingCalibration } from "./pack.js";

/**
 * Grounding scores for one pack. Calibrated: the logistic model of pack.json over
 * [open, coord_mean, coord_min, label_mean], and its threshold. Uncalibrated packs (a fresh export):
 * the geometric mean of the coordinate tokens' probabilities, and no threshold.
 */
export class GroundingScorer {
  readonly #calibration: GroundingCalibration | undefined;

  constructor(calibration?: GroundingCalibration) {
    this.#calibration = calibration;
  }

  get calibrated(): boolean {
    return this.#calibration !== undefined;
  }

  /** Boxes scoring below this are not returned unless the call sets min_score. */
  get threshold(): number {
    return this.#calibration?.threshold ?? 0;
  }

  score(e: BoxEvidence): number {
    const c = this.#calibration;
    if (!c) return Math.exp(e.coordMean);
    const [wo, wm, wn, wl] = c.weights as [number, number, number, number];
    const z = c.bias + wo * e.open + wm * e.coordMean + wn * e.coordMin + wl * e.labelMean;
    return 1 / (1 + Math.exp(-z));
  }
}

/**
 * The one number instances are ranked by: the product of the grounding score (1 for a box the agent
 * gave) and the mask score, so a sure box with a poor mask and a good mask on a doubtful box both
 * rank low.
 */
export function combinedScore(groundingScore: number | undefined, maskScore: number): number {
  return (groundingScore ?? 1) * maskScore;
}
