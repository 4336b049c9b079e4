/**
 * npm run soak -- [--clients 8] [--minutes 10] [--interval 30] [--pack DIR] [--out-max-bytes 100000]
 *                  [--era mixed|legacy|modern]
 *
 * A bounded load run: the built server over Streamable HTTP, N clients calling segment (a box),
 * ground and describe_region in a loop on the example images, for M minutes. Every interval it
 * prints a JSON line with the server's RSS and open file descriptors, the output folder's size and
 * file count, calls and errors so far, and latency percentiles of the interval; at the end a summary
 * against the targets: 0 errors, RSS growth after the first 2 minutes under 10 %, file descriptors
 * flat, the output folder within its retention bound. `--era`: the clients speak 2025-11-25 (v1 SDK
 * client), 2026-07-28 (v2 SDK client, a request per call, no session) or, by default, half each.
 */

import { spawn } from "node:child_process";
import { mkdtemp, readdir, readFile, rm, stat } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { Client as V2Client, StreamableHTTPClientTransport as V2Http } from "@modelcontextprotocol/client";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import type { CallToolResult } from "@modelcontextprotocol/sdk/types.js";
import sharp from "sharp";
import { median } from "./compare.js";

const here = path.dirname(new URL(import.meta.url).pathname);
const root = path.resolve(here, here.includes(`${path.sep}dist${path.sep}`) ? "../.." : "..");

const { values } = parseArgs({
  options: {
    clients: { type: "string", default: "8" },
    minutes: { type: "string", default: "10" },
    interval: { type: "string", default: "30" },
    pack: { type: "string" },
    // Small enough that the bound is reached, and kept, within a 10-minute run.
    "out-max-bytes": { type: "string", default: "100000" },
    era: { type: "string", default: "mixed" },
  },
});
if (!["mixed", "legacy", "modern"].includes(values.era)) {
  process.stderr.write(`INVALID_INPUT: --era is mixed, legacy or modern, not ${values.era}\n`);
  process.exit(2);
}

/** The calls a soak client makes, whichever SDK it comes from. */
interface SoakClient {
  call(request: { name: string; arguments: Record<string, unknown> }): Promise<CallToolResult>;
  close(): Promise<void>;
}

async function connect(url: string, k: number): Promise<SoakClient> {
  const info = { name: `soak-${k}`, version: "1" };
  const modern = values.era === "modern" || (values.era === "mixed" && k % 2 === 1);
  if (modern) {
    const client = new V2Client(info, { versionNegotiation: { mode: { pin: "2026-07-28" } } });
    await client.connect(new V2Http(new URL(url)));
    return {
      call: async (request) => (await client.callTool(request, { timeout: 600_000 })) as CallToolResult,
      close: () => client.close(),
    };
  }
  const client = new Client(info);
  await client.connect(new StreamableHTTPClientTransport(new URL(url)));
  return {
    call: async (request) =>
      (await client.callTool(request, undefined, { timeout: 600_000 })) as CallToolResult,
    close: () => client.close(),
  };
}
const clients = Number.parseInt(values.clients, 10);
const durationMs = Number.parseFloat(values.minutes) * 60_000;
const intervalMs = Number.parseFloat(values.interval) * 1000;

function percentile(xs: number[], p: number): number {
  if (xs.length === 0) return 0;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] as number;
}

async function processStats(pid: number): Promise<{ rssMb: number; fds: number }> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const rss = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) / 1024;
  const fds = (await readdir(`/proc/${pid}/fd`)).length;
  return { rssMb: Math.round(rss), fds };
}

async function folderStats(dir: string): Promise<{ files: number; bytes: number }> {
  const names = await readdir(dir).catch(() => [] as string[]);
  let bytes = 0;
  for (const n of names) bytes += (await stat(path.join(dir, n)).catch(() => ({ size: 0 }))).size;
  return { files: names.length, bytes };
}

async function main(): Promise<void> {
  const out = await mkdtemp(path.join(os.tmpdir(), "qvs-soak-"));
  const maxBytes = Number(values["out-max-bytes"]);
  const args = [path.join(root, "dist", "src", "cli.js"), "serve", "--http", "127.0.0.1:0", "--ep", "cpu"];
  args.push("--out", out, "--allow-dir", path.join(root, "examples"), "--out-max-bytes", String(maxBytes));
  args.push("--out-min-age", "0", "--log-level", "info");
  if (values.pack) args.push("--pack", values.pack);
  const server = spawn(process.execPath, args, { stdio: ["ignore", "ignore", "pipe"] });
  const url = await new Promise<string>((resolve, reject) => {
    let err = "";
    server.stderr.on("data", (chunk: Buffer) => {
      err += chunk.toString();
      const m = /serving Streamable HTTP at (http:\/\/\S+)/.exec(err);
      if (m?.[1]) resolve(m[1]);
    });
    server.once("exit", (code) => reject(new Error(`server exited ${code}: ${err}`)));
  });
  const pid = server.pid as number;
  // The example images differ in size: each call's box is the middle half of its image.
  const images = await Promise.all(
    [1, 2, 3, 4].map(async (i) => {
      const file = path.join(root, "examples", `shapes-${i}.png`);
      const { width = 0, height = 0 } = await sharp(file).metadata();
      return { file, box: [width / 4, height / 4, (3 * width) / 4, (3 * height) / 4] };
    }),
  );
  const calls = [
    (image: { file: string; box: number[] }) => ({
      name: "segment",
      arguments: { image: image.file, box: image.box },
    }),
    (image: { file: string; box: number[] }) => ({
      name: "ground",
      arguments: { image: image.file, expression: "the red star", max_instances: 3 },
    }),
    (image: { file: string; box: number[] }) => ({
      name: "describe_region",
      arguments: { image: image.file, box: image.box },
    }),
  ];
  let done = 0;
  let errors = 0;
  let latencies: number[] = [];
  const errorSamples: string[] = [];
  const start = Date.now();
  const worker = async (k: number) => {
    const client = await connect(url, k);
    for (let i = k; Date.now() - start < durationMs; i++) {
      const call = (calls[i % calls.length] as (typeof calls)[number])(
        images[i % images.length] as { file: string; box: number[] },
      );
      const t0 = performance.now();
      try {
        const result = await client.call(call);
        if (result.isError) {
          errors++;
          if (errorSamples.length < 5) errorSamples.push(JSON.stringify(result.content).slice(0, 200));
        }
      } catch (error) {
        errors++;
        if (errorSamples.length < 5) errorSamples.push(String(error).slice(0, 200));
      }
      latencies.push(performance.now() - t0);
      done++;
    }
    await client.close();
  };
  const samples: { t: number; rssMb: number; fds: number; files: number; bytes: number }[] = [];
  const sample = async () => {
    const p = await processStats(pid);
    const f = await folderStats(out);
    const row = {
      t_s: Math.round((Date.now() - start) / 1000),
      calls: done,
      errors,
      p50_ms: Math.round(percentile(latencies, 50)),
      p95_ms: Math.round(percentile(latencies, 95)),
      p99_ms: Math.round(percentile(latencies, 99)),
      rss_mb: p.rssMb,
      fds: p.fds,
      out_files: f.files,
      out_bytes: f.bytes,
    };
    latencies = [];
    samples.push({ t: row.t_s, rssMb: p.rssMb, fds: p.fds, files: f.files, bytes: f.bytes });
    process.stdout.write(`${JSON.stringify(row)}\n`);
  };
  const timer = setInterval(() => void sample(), intervalMs);
  await Promise.all(Array.from({ length: clients }, (_, k) => worker(k)));
  clearInterval(timer);
  await sample();
  server.kill("SIGTERM");
  await new Promise((resolve) => server.once("exit", resolve));
  const after2 = samples.filter((s) => s.t >= 120);
  const base = after2[0]?.rssMb ?? samples[0]?.rssMb ?? 0;
  const peak = Math.max(...after2.map((s) => s.rssMb), base);
  const fds = samples.map((s) => s.fds);
  const bytes = samples.map((s) => s.bytes);
  const summary = {
    clients,
    era: values.era,
    minutes: durationMs / 60_000,
    calls: done,
    errors,
    error_samples: errorSamples,
    rss_mb_at_2_min: base,
    rss_mb_peak_after_2_min: peak,
    rss_growth_after_2_min: base > 0 ? Math.round(((peak - base) / base) * 1000) / 1000 : 0,
    fds_min: Math.min(...fds),
    fds_max: Math.max(...fds),
    out_bytes_max: Math.max(...bytes),
    out_bytes_median: median(bytes),
    out_max_bytes: maxBytes,
    targets: {
      zero_errors: errors === 0,
      rss_growth_under_10_percent: base > 0 && (peak - base) / base < 0.1,
      fds_flat: Math.max(...fds) - Math.min(...fds) <= 4,
      // Near the bound the sweep runs every second: allow what a few seconds write on top of it.
      out_folder_bounded: Math.max(...bytes) <= maxBytes * 1.1,
    },
  };
  process.stdout.write(`${JSON.stringify(summary)}\n`);
  await rm(out, { recursive: true, force: true });
}

await main();
