/**
 * Confidence of an answer, two ways apart: how sure the language model is that a box is the object
 * the expression names (grounding), and how well the mask decoder thinks its mask fits the box (the
 * IoU head). The first comes from the box's own token probabilities (language-model.ts BoxEvidence),
 * turned into a probability of being right by the pack's calibration; the second says nothing about
 * whether the box is the right object.
 */

import type { BoxEvidence } from "./language-model.js";
import type { GroundingCalibration } from "./pack.js";

/** The words of a text: lower-case runs of letters and digits, a plural "s" dropped (but not "ss"). */
function words(text: string): Set<string> {
  const out = new Set<string>();
  for (let w of text.toLowerCase().match(/[\p{L}\p{N}]+/gu) ?? []) {
    if (w.length > 3 && w.endsWith("s") && !w.endsWith("ss")) w = w.slice(0, -1);
    out.add(w);
  }
  return out;
}

/**
 * The share of the label's distinct words that the expression also uses (0 for a label without
 * words). A model that boxes every shape for "a cat" labels them "yellow square", "red star"...;
 * one that found the named object tends to name it as asked. modelkit/calibrate.py computes the same
 * (test/fixtures/label-agreement.json holds the cases both sides check).
 */
export function labelAgreement(label: string, expression: string): number {
  const said = words(label);
  if (said.size === 0) return 0;
  const asked = words(expression);
  let shared = 0;
  for (const w of said) if (asked.has(w)) shared++;
  return shared / said.size;
}

/**
 * Grounding scores for one pack. Calibrated: the logistic model of pack.json over [open, coord_mean,
 * coord_min, label_mean] and, when the calibration has it, label_agreement; and its threshold.
 * Uncalibrated packs (a fresh export): the geometric mean of the coordinate tokens' probabilities,
 * and no threshold.
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

  /** `agreement`: labelAgreement of the box's label with the expression. */
  score(e: BoxEvidence, agreement: number): number {
    const c = this.#calibration;
    if (!c) return Math.exp(e.coordMean);
    const [wo, wm, wn, wl, wa = 0] = c.weights as [number, number, number, number, number?];
    const z = c.bias + wo * e.open + wm * e.coordMean + wn * e.coordMin + wl * e.labelMean + wa * agreement;
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
