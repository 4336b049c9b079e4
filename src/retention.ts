/**
 * The output folder's retention: the masks and overlays this server writes are removed when older
 * than a maximum age, and the oldest go first while their total is over a size bound; none younger
 * than a minimum age is removed, so a client that was just told about a file can still read it.
 * Temporary files left by a killed writer are removed too. Only files named as this server names
 * them are ever touched: --out may be a folder that holds other things.
 *
 * Several processes may share one folder (replicas behind a load balancer, on one host or many):
 * each removes only files old enough by the bounds above, a file another sweep removed first is
 * skipped, and a temporary file is judged by its writer's pid only when that pid lives in this
 * process's pid space (same boot, pid namespace and host); any other is removed only once it is
 * older than any write takes.
 */

import { readdir, stat, unlink } from "node:fs/promises";
import path from "node:path";
import type { Logger } from "./logger.js";
import { processPidSpace } from "./runtime/output.js";

/** The bounds (Config's outMaxAgeMs, outMaxBytes, outMinAgeMs). */
export interface Retention {
  outMaxAgeMs: number;
  outMaxBytes: number;
  outMinAgeMs: number;
}

/** mask-<time>-<16 hex>[-<i>].png and overlay-<time>-<16 hex>.png (runtime/output.ts's names). */
const OURS = /^(mask|overlay)-[0-9a-z]+-[0-9a-f]{16}(-\d+)?\.png$/;
/**
 * .<our name>.<pid space>-<pid>-<12 hex>.tmp (writeFileAtomic's temporary names); earlier versions
 * wrote .<our name>.<pid>-<12 hex>.tmp, with no pid space.
 */
const TEMP =
  /^\.(mask|overlay)-[0-9a-z]+-[0-9a-f]{16}(-\d+)?\.png\.(?:([0-9a-f]{8})-)?(\d+)-[0-9a-f]{12}\.tmp$/;
/**
 * A temporary file this old is a leftover whoever wrote it: a write takes milliseconds (one
 * writeFile, then a rename), and the pid may have been reused or belong to another host.
 */
export const TEMP_MAX_AGE_MS = 10 * 60_000;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

export interface SweepResult {
  removed: number;
  keptFiles: number;
  keptBytes: number;
}

/** One pass over `dir`. Files that vanish meanwhile (another replica's sweep) are skipped. */
export async function sweepOutputDir(dir: string, policy: Retention, now = Date.now()): Promise<SweepResult> {
  const names = await readdir(dir).catch(() => [] as string[]);
  const files: { file: string; mtime: number; size: number }[] = [];
  let removed = 0;
  const remove = async (file: string) => {
    if (
      await unlink(file).then(
        () => true,
        () => false,
      )
    )
      removed++;
  };
  for (const name of names) {
    const temp = TEMP.exec(name);
    if (!temp && !OURS.test(name)) continue;
    const file = path.join(dir, name);
    const info = await stat(file).catch(() => undefined);
    if (!info?.isFile()) continue;
    const age = now - info.mtimeMs;
    if (temp) {
      const ours = temp[3] === processPidSpace();
      if ((ours && !alive(Number(temp[4]))) || age > TEMP_MAX_AGE_MS) await remove(file);
    } else if (age > policy.outMaxAgeMs) {
      await remove(file);
    } else {
      files.push({ file, mtime: info.mtimeMs, size: info.size });
    }
  }
  files.sort((a, b) => a.mtime - b.mtime); // oldest first
  let total = files.reduce((n, f) => n + f.size, 0);
  const kept: typeof files = [];
  for (const f of files) {
    if (total > policy.outMaxBytes && now - f.mtime >= policy.outMinAgeMs) {
      await remove(f.file);
      total -= f.size;
    } else {
      kept.push(f);
    }
  }
  return { removed, keptFiles: kept.length, keptBytes: total };
}

/** A sweep that leaves the folder above this share of its size bound comes back after SOON_MS. */
const NEAR_BOUND = 0.8;
const SOON_MS = 1_000;

/**
 * Sweeps once now and then every `everyMs` until stopped; a failed sweep is logged, never thrown.
 * While the folder stays near its size bound the next sweep comes after a second instead, so a busy
 * server overshoots the bound by at most about a second of writes, not a whole interval's.
 */
export function keepOutputDir(
  dir: string,
  policy: Retention,
  log: Logger,
  everyMs = Math.max(10_000, Math.min(5 * 60_000, policy.outMinAgeMs)),
): { stop(): void; sweep(): Promise<SweepResult> } {
  let running: Promise<SweepResult> | undefined;
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const sweep = () => {
    running ??= sweepOutputDir(dir, policy)
      .then((r) => {
        if (r.removed > 0) log.debug(`output folder: removed ${r.removed} old files; ${r.keptFiles} kept`);
        return r;
      })
      .catch((error: unknown) => {
        log.warn(`output folder sweep failed: ${String(error)}`);
        return { removed: 0, keptFiles: 0, keptBytes: 0 };
      })
      .finally(() => {
        running = undefined;
      });
    return running;
  };
  const next = (after: SweepResult) => {
    if (stopped) return;
    const soon = after.keptBytes > NEAR_BOUND * policy.outMaxBytes;
    timer = setTimeout(() => void sweep().then(next), soon ? Math.min(SOON_MS, everyMs) : everyMs);
    timer.unref();
  };
  void sweep().then(next);
  return {
    stop: () => {
      stopped = true;
      clearTimeout(timer);
    },
    sweep,
  };
}
