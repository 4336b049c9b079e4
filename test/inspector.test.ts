/**
 * The MCP Inspector's CLI (`@modelcontextprotocol/inspector --cli`, a pinned devDependency) against
 * the built stdio server, as a developer runs it: `mcp-inspector --cli node dist/src/cli.js --method
 * tools/list`, once per protocol era it offers. What it sent and got is recorded on the way
 * (test/helpers/stdio-tap.mjs), to see which revision it spoke: 2025-11-25 after an initialize
 * (legacy), 2026-07-28 with no initialize, every request naming it in `_meta` (modern, and auto,
 * which probes with server/discover first).
 */

import { execFile } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const bin = path.join(repo, "dist", "src", "cli.js");
const inspector = path.join(repo, "node_modules", ".bin", "mcp-inspector");
const tap = path.join(repo, "test", "helpers", "stdio-tap.mjs");
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), "seg-inspector-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function inspect(args: string[]): Promise<Run> {
  return new Promise((resolve) => {
    // HOME: the inspector keeps a catalog and OAuth state under ~/.mcp-inspector; none here.
    const env = { ...process.env, HOME: dir };
    execFile(inspector, args, { cwd: dir, env, maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
      resolve({ code: error ? (typeof error.code === "number" ? error.code : 1) : 0, stdout, stderr });
    });
  });
}

/** The JSON-RPC messages the client sent (`>`) and received (`<`), in order. */
function wire(log: string): { dir: ">" | "<"; message: Record<string, unknown> }[] {
  return readFileSync(log, "utf8")
    .split("\n")
    .filter((l) => l.startsWith("> ") || l.startsWith("< "))
    .map((l) => ({ dir: l[0] as ">" | "<", message: JSON.parse(l.slice(2)) }));
}

describe("the MCP Inspector CLI against the stdio server", () => {
  it("is installed", () => {
    expect(existsSync(inspector), "npm install (devDependency @modelcontextprotocol/inspector)").toBe(true);
  });

  it.each([
    ["legacy", "2025-11-25"],
    ["modern", "2026-07-28"],
    ["auto", "2026-07-28"],
  ])("--protocol-era %s lists the three tools over %s", async (era, revision) => {
    const log = path.join(dir, `${era}.log`);
    const r = await inspect([
      "--cli",
      "--protocol-era",
      era,
      "--format",
      "json",
      "--method",
      "tools/list",
      "--",
      process.execPath,
      tap,
      log,
      process.execPath,
      bin,
      "--ep",
      "cpu",
      "--log-level",
      "warn",
    ]);
    expect(r.code, `${r.stdout}\n${r.stderr}`).toBe(0);
    const out = JSON.parse(r.stdout) as { result: { tools: { name: string; outputSchema?: unknown }[] } };
    expect(out.result.tools.map((t) => t.name).sort()).toEqual(["describe_region", "ground", "segment"]);
    expect(out.result.tools.every((t) => t.outputSchema !== undefined)).toBe(true);

    // Which revision it spoke (auto's probe runs in a process of its own: both are in the log).
    const messages = wire(log);
    const sent = messages.filter((m) => m.dir === ">").map((m) => m.message);
    const list = sent.find((m) => m.method === "tools/list") as {
      id: unknown;
      params?: Record<string, unknown>;
    };
    expect(list, JSON.stringify(sent)).toBeDefined();
    const answer = messages.find((m) => m.dir === "<" && m.message.id === list.id)?.message as {
      result?: Record<string, unknown>;
    };
    if (revision === "2025-11-25") {
      const init = sent.find((m) => m.method === "initialize") as { id: unknown };
      expect(init).toBeDefined();
      const accepted = messages.find((m) => m.dir === "<" && m.message.id === init.id)?.message as {
        result: { protocolVersion: string };
      };
      expect(accepted.result.protocolVersion).toBe(revision);
      expect(answer.result?.ttlMs).toBeUndefined();
    } else {
      expect(sent.some((m) => m.method === "initialize")).toBe(false);
      const meta = list.params?._meta as Record<string, unknown> | undefined;
      expect(meta?.["io.modelcontextprotocol/protocolVersion"]).toBe(revision);
      expect(answer.result).toMatchObject({ resultType: "complete", ttlMs: 300_000 });
    }
  });
});
