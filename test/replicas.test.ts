/**
 * Scale-out: two real server processes (the built CLI, the bundled pack) sharing one --out, behind a
 * real haproxy that balances round-robin with no affinity. An SDK client talks to the balancer
 * only: its initialize (2025-11-25) or discovery (2026-07-28), calls and mask reads land on either
 * replica, and every one must work.
 * haproxy must be installed (`apt-get install -y haproxy`; CI's .ci/run does): without it this
 * test fails and says so rather than skipping.
 */

import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { createServer as createNetServer } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import sharp from "sharp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createConfig } from "../src/config.js";
import { type HttpHandle, serveHttp } from "../src/http.js";
import { silentLogger } from "../src/logger.js";
import { groundTool } from "../src/tools/ground.js";
import { segmentTool } from "../src/tools/segment.js";
import { connectClient, ERAS, httpTransport, REVISION } from "./helpers/clients.js";
import { FakeEngine } from "./helpers/fake-engine.js";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = path.join(repo, "dist", "src", "cli.js");
/** $HAPROXY, else haproxy on the PATH, else Debian's /usr/sbin (not on a user's PATH there). */
let haproxy = "haproxy";
const TOKEN = "replicas-token-0123456789";
const AUTH = { authorization: `Bearer ${TOKEN}` };
const IMAGE = path.join(repo, "examples", "shapes-1.png");
/** The red star of examples/shapes-1.png (README's quick start). */
const STAR: [number, number, number, number] = [425, 92, 499, 163];

let root: string;
const stops: (() => Promise<void>)[] = [];

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createNetServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address() as { port: number };
      probe.close(() => resolve(port));
    });
  });
}

async function until<T>(what: string, ms: number, check: () => Promise<T | undefined>): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const value = await check().catch(() => undefined);
    if (value !== undefined) return value;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function stopChild(child: ChildProcess): () => Promise<void> {
  return async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await exited;
    clearTimeout(timer);
  };
}

interface Replica {
  port: number;
  /** Everything the process wrote on stderr (its log, at debug level). */
  log: () => string;
}

/** `qwen3-vl-seg-mcp serve --http 127.0.0.1:0 ...` (stateless, the default), ready when it says where. */
async function startReplica(out: string): Promise<Replica> {
  const child = spawn(
    process.execPath,
    [
      bin,
      "serve",
      "--http",
      "127.0.0.1:0",
      "--out",
      out,
      "--allow-dir",
      path.dirname(IMAGE),
      "--ep",
      "cpu",
      "--log-level",
      "debug",
    ],
    { cwd: root, env: { ...process.env, QWEN3_VL_SEG_TOKEN: TOKEN }, stdio: ["ignore", "ignore", "pipe"] },
  );
  stops.push(stopChild(child));
  let log = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    log += chunk.toString();
  });
  const url = await until("the replica to announce its URL", 60_000, async () => {
    if (child.exitCode !== null) throw new Error(`replica exited with ${child.exitCode}: ${log}`);
    return /serving Streamable HTTP at (http:\/\/\S+)/.exec(log)?.[1];
  }).catch((error: unknown) => {
    throw new Error(`${String(error)}; its log: ${log}`);
  });
  return { port: Number(new URL(url).port), log: () => log };
}

interface Balancer {
  url: string;
  /** haproxy's log: one line per request, "<server> <method> <path> <status>", and state changes. */
  log: () => string;
}

/**
 * haproxy in front of loopback servers: round-robin, no stickiness, /healthz checks. The servers
 * check Host on loopback, so each is named by its address and that name is sent as Host (to the
 * checks too): the balancer names the replica it talks to, as a client of one replica would.
 */
async function startBalancer(ports: number[], abortOnClose = true): Promise<Balancer> {
  const port = await freePort();
  const dir = await mkdtemp(path.join(root, "haproxy-"));
  const config = path.join(dir, "haproxy.cfg");
  await writeFile(
    config,
    [
      "global",
      "  log stdout format raw local0",
      "defaults",
      "  mode http",
      "  log global",
      '  log-format "%s %HM %HU %ST"',
      "  timeout connect 5s",
      "  timeout client 10m",
      "  timeout server 10m",
      // A client that leaves closes the replica's connection at once (the call is cancelled), not
      // at the next write to it.
      ...(abortOnClose ? ["  option abortonclose"] : []),
      "frontend mcp",
      `  bind 127.0.0.1:${port}`,
      "  default_backend replicas",
      "backend replicas",
      "  balance roundrobin",
      "  option httpchk",
      "  http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host %[srv_name]",
      "  http-check expect status 200",
      "  http-send-name-header Host",
      ...ports.map((p) => `  server 127.0.0.1:${p} 127.0.0.1:${p} check inter 1s`),
      "",
    ].join("\n"),
  );
  const child = spawn(haproxy, ["-f", config, "-db"], { stdio: ["ignore", "pipe", "pipe"] });
  stops.push(stopChild(child));
  let log = "";
  const collect = (chunk: Buffer) => {
    log += chunk.toString();
  };
  child.stdout?.on("data", collect);
  child.stderr?.on("data", collect);
  const url = `http://127.0.0.1:${port}/mcp`;
  // Up when every replica answers /healthz through it (round-robin: one probe per replica).
  await until("haproxy to forward to every replica", 30_000, async () => {
    if (child.exitCode !== null) throw new Error(`haproxy exited with ${child.exitCode}: ${log}`);
    for (const _ of ports) {
      if ((await fetch(url.replace("/mcp", "/healthz"))).status !== 200) return undefined;
    }
    return true;
  }).catch((error: unknown) => {
    throw new Error(`${String(error)}; haproxy's log: ${log}`);
  });
  return { url, log: () => log };
}

beforeAll(() => {
  const candidates = process.env.HAPROXY ? [process.env.HAPROXY] : ["haproxy", "/usr/sbin/haproxy"];
  const runs = (bin: string) => {
    const found = spawnSync(bin, ["-v"], { encoding: "utf8" });
    return !found.error && found.status === 0;
  };
  const usable = candidates.find(runs);
  if (usable === undefined) {
    throw new Error(
      `this test runs two replicas behind haproxy, and none of ${candidates.join(", ")} can be run. Install it: apt-get install -y haproxy (Debian/Ubuntu; CI's .ci/run does), or set HAPROXY to its path`,
    );
  }
  haproxy = usable;
  // `npm test` builds first; build here too when vitest runs on its own with an old dist/.
  const stale = (f: string) =>
    !existsSync(bin) ||
    statSync(path.join(repo, "src", f)).mtimeMs >
      statSync(path.join(repo, "dist", "src", f.replace(/\.ts$/, ".js"))).mtimeMs;
  if (["server.ts", "cli.ts", "config.ts"].some(stale)) {
    execFileSync("npx", ["tsc", "-p", "tsconfig.build.json"], { cwd: repo, stdio: "inherit" });
  }
});

beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), "seg-replicas-"));
});

afterAll(async () => {
  await Promise.all(stops.map((stop) => stop()));
  if (root) await rm(root, { recursive: true, force: true });
});

describe("two stateless replicas behind haproxy (round-robin, no affinity)", () => {
  let shared: string;
  let replicas: Replica[];
  let balancer: Balancer;
  beforeAll(async () => {
    shared = path.join(root, "shared-out");
    await mkdir(shared);
    replicas = await Promise.all([startReplica(shared), startReplica(shared)]);
    // Ready once the pack has loaded: /healthz says so (directly, before the balancer is up).
    for (const r of replicas) {
      await until("the replica's pack to load", 120_000, async () => {
        const res = await fetch(`http://127.0.0.1:${r.port}/healthz`);
        return res.status === 200 ? true : undefined;
      });
    }
    balancer = await startBalancer(replicas.map((r) => r.port));
  });

  it.each(ERAS)(
    "serve one %s SDK client: calls and mask reads land on both, all correct, all from one shared --out",
    async (era) => {
      const logFrom = replicas.map((r) => r.log().length);
      const balancerFrom = balancer.log().length;
      const masksBefore = (await readdir(shared)).filter((n) => n.startsWith("mask-")).length;
      const transport = httpTransport(era, balancer.url, AUTH);
      const client = await connectClient(transport, { negotiation: "auto" });
      expect(client.protocolVersion()).toBe(REVISION[era]);
      const uris: { uri: string; area: number }[] = [];
      for (let i = 0; i < 4; i++) {
        const result = await client.callTool("segment", { image: IMAGE, box: STAR });
        expect(result.isError, JSON.stringify(result.content)).toBeFalsy();
        const out = segmentTool.output.parse(result.structuredContent);
        expect(out.found).toBe(true);
        expect(out.image).toEqual({ width: 512, height: 384 });
        const star = out.instances[0];
        expect(star?.mask_score).toBeGreaterThan(0.5);
        // The mask lies inside the given box and fills much of it (README: mask_box 430,97,496,158).
        const [x1, y1, x2, y2] = star?.mask_box ?? [0, 0, 0, 0];
        expect(x1).toBeGreaterThanOrEqual(STAR[0] - 2);
        expect(y1).toBeGreaterThanOrEqual(STAR[1] - 2);
        expect(x2).toBeLessThanOrEqual(STAR[2] + 2);
        expect(y2).toBeLessThanOrEqual(STAR[3] + 2);
        expect(star?.mask.area_px).toBeGreaterThan(1000);
        expect(path.dirname(star?.mask.path ?? "")).toBe(shared);
        uris.push({ uri: star?.mask.uri ?? "", area: star?.mask.area_px ?? 0 });
      }
      const ground = await client.callTool("ground", { image: IMAGE, expression: "the red star" });
      expect(ground.isError, JSON.stringify(ground.content)).toBeFalsy();
      expect(groundTool.output.parse(ground.structuredContent).image).toEqual({ width: 512, height: 384 });

      // Each mask read twice: with strict alternation one of the two reads is served by the replica
      // that did not write it.
      for (const { uri, area } of uris) {
        for (let k = 0; k < 2; k++) {
          // Not from the client's cache (2026-07-28 results may carry a lifetime): from a replica.
          const read = await client.readResource(uri);
          const content = read.contents[0];
          expect(content && "blob" in content).toBe(true);
          const png = Buffer.from((content as { blob: string }).blob, "base64");
          const { data, info } = await sharp(png).greyscale().raw().toBuffer({ resolveWithObject: true });
          expect([info.width, info.height]).toEqual([512, 384]);
          expect(data.reduce((n, v) => n + (v > 127 ? 1 : 0), 0)).toBe(area);
        }
      }
      await transport.terminateSession(); // 405 from a stateless replica: nothing to end
      await client.close();

      // Both replicas served tool calls and mask reads (their debug logs name each request) ...
      const logs = replicas.map((r, i) => r.log().slice(logFrom[i]));
      const calls = logs.map((log) => (log.match(/HTTP POST tools\/call segment/g) ?? []).length);
      const reads = logs.map((log) => (log.match(/HTTP POST resources\/read/g) ?? []).length);
      process.stderr.write(
        `${era}: segment calls per replica ${calls.join(" + ")}, mask reads ${reads.join(" + ")}\n`,
      );
      expect(calls.every((n) => n > 0)).toBe(true);
      expect(calls.reduce((a, b) => a + b, 0)).toBe(4);
      expect(reads.every((n) => n > 0)).toBe(true);
      expect(reads.reduce((a, b) => a + b, 0)).toBe(8);
      // ... which haproxy's own log confirms: POST /mcp 200 from each server, no error status.
      const log = balancer.log().slice(balancerFrom);
      for (const r of replicas) {
        expect(log).toContain(`127.0.0.1:${r.port} POST /mcp 200`);
      }
      expect(log).not.toMatch(/ POST \/mcp (4\d\d|5\d\d)/);
      // The shared folder holds the four new masks, no temporary file.
      const names = await readdir(shared);
      expect(names.filter((n) => n.startsWith("mask-"))).toHaveLength(masksBefore + 4);
      expect(names.filter((n) => n.endsWith(".tmp"))).toEqual([]);
    },
  );
  it.each([
    ["legacy", "with option abortonclose: at once", true, 3_000],
    ["legacy", "without it: at the second SSE keep-alive (5 s each)", false, 15_000],
    ["modern", "with option abortonclose: at once", true, 3_000],
    ["modern", "without it: at the second SSE keep-alive (5 s each)", false, 15_000],
  ] as const)(
    "a %s client that leaves mid-call through the balancer cancels the call on the replica; %s",
    async (era, _, abortOnClose, within) => {
      // A scripted slow engine in this process stands in for a long model call.
      const engine = new FakeEngine({ delayMs: 20_000 });
      if (!existsSync(path.join(root, "img.png"))) {
        await sharp({ create: { width: 40, height: 30, channels: 3, background: "#369" } })
          .png()
          .toFile(path.join(root, "img.png"));
      }
      const config = createConfig({
        cwd: root,
        outDir: path.join(root, "fake-out"),
        logLevel: "silent",
        http: { host: "127.0.0.1", port: 0, token: TOKEN },
      });
      const handle: HttpHandle = await serveHttp(config, engine, silentLogger);
      stops.push(() => handle.close());
      const balancer = await startBalancer([Number(new URL(handle.url).port)], abortOnClose);
      const abort = new AbortController();
      const params = { name: "ground", arguments: { image: "img.png", expression: "slow" } };
      // 2026-07-28: the revision and client in `_meta`, and the standard headers that mirror them.
      const modern = {
        headers: { "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "ground" },
        meta: {
          "io.modelcontextprotocol/protocolVersion": "2026-07-28",
          "io.modelcontextprotocol/clientInfo": { name: "raw", version: "1" },
          "io.modelcontextprotocol/clientCapabilities": {},
        },
      };
      const res = await fetch(balancer.url, {
        method: "POST",
        headers: {
          ...AUTH,
          "content-type": "application/json",
          accept: "application/json, text/event-stream",
          ...(era === "modern" ? modern.headers : {}),
        },
        body: JSON.stringify({
          jsonrpc: "2.0",
          id: 1,
          method: "tools/call",
          params: era === "modern" ? { ...params, _meta: modern.meta } : params,
        }),
        signal: abort.signal,
      });
      expect(res.status).toBe(200);
      await until("the call to reach the engine", 10_000, async () =>
        engine.calls.length > 0 ? true : undefined,
      );
      const left = Date.now();
      abort.abort();
      await until("the engine's signal", 20_000, async () =>
        engine.calls[0]?.signal?.aborted ? true : undefined,
      );
      const ms = Date.now() - left;
      process.stderr.write(
        `${era} client gone -> call cancelled through haproxy (abortonclose ${abortOnClose}) in ${ms} ms\n`,
      );
      expect(ms).toBeLessThan(within);
    },
  );
});
