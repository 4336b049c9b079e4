/**
 * The MCP bundle: `npm run bundle` builds qwen3-vl-seg-mcp-<version>-<platform>-<arch>.mcpb, `mcpb
 * validate` accepts its manifest, and the unpacked bundle's entry point serves MCP over stdio when
 * started the way an MCPB host starts it (mcp_config with the user's settings substituted by the
 * mcpb library's own getMcpConfigForManifest, an optional setting left empty).
 */

import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { mkdir, mkdtemp, realpath, rm } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { getMcpConfigForManifest } from "@anthropic-ai/mcpb/node";
import { getDefaultEnvironment } from "@modelcontextprotocol/client/stdio";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_PACK_NAME, PACKAGE_NAME } from "../../src/config.js";
import { connectClient, ERAS, stdioTransport } from "../helpers/clients.js";
import { exampleImage, explain, repo, run, segmentOverMcp, TOOL_NAMES } from "./shared.js";

const pkg = JSON.parse(readFileSync(path.join(repo, "package.json"), "utf8")) as {
  version: string;
  devDependencies: Record<string, string>;
};
const platform = `${process.platform}-${process.arch}`;
const mcpb = path.join(repo, "node_modules", "@anthropic-ai", "mcpb", "dist", "cli", "cli.js");

let work: string;
let bundle: string | undefined;
let unpacked: string;
type McpbManifest = Parameters<typeof getMcpConfigForManifest>[0]["manifest"];
let manifest: McpbManifest & {
  tools: { name: string; description?: string }[];
  user_config: Record<string, { type: string; multiple?: boolean; required?: boolean }>;
};

beforeAll(async () => {
  work = await realpath(await mkdtemp(path.join(os.tmpdir(), "seg-bundle-")));
  unpacked = path.join(work, "unpacked");
});

afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

describe("MCP bundle", () => {
  it("npm run bundle builds qwen3-vl-seg-mcp-<version>-<platform>.mcpb", async () => {
    const r = await run("npm", ["run", "--silent", "bundle", "--", "--out-dir", work], { cwd: repo });
    expect(r.code, explain("npm run bundle", r)).toBe(0);
    bundle = r.stdout.trim().split("\n").at(-1);
    expect(bundle).toBe(path.join(work, `${PACKAGE_NAME}-${pkg.version}-${platform}.mcpb`));
    const size = statSync(bundle ?? "").size;
    console.log(`bundle ${path.basename(bundle ?? "")}: ${(size / 1e6).toFixed(1)} MB`);
    expect(readdirSync(work).filter((f) => f.startsWith("stage-") || f.endsWith(".tgz"))).toEqual([]);
  });

  it("mcpb unpack, then mcpb validate passes on its manifest", async () => {
    expect(bundle, "bundle built").toBeDefined();
    const u = await run(process.execPath, [mcpb, "unpack", bundle ?? "", unpacked], { cwd: work });
    expect(u.code, explain("mcpb unpack", u)).toBe(0);
    const v = await run(process.execPath, [mcpb, "validate", path.join(unpacked, "manifest.json")], {
      cwd: work,
    });
    expect(v.code, explain("mcpb validate", v)).toBe(0);
    expect(v.stdout).toContain("Manifest schema validation passes");

    manifest = JSON.parse(readFileSync(path.join(unpacked, "manifest.json"), "utf8"));
    expect(manifest).toMatchObject({
      name: PACKAGE_NAME,
      version: pkg.version,
      server: { type: "node", entry_point: "server/index.js" },
      compatibility: { platforms: [process.platform] },
    });
    expect(existsSync(path.join(unpacked, "server", "index.js"))).toBe(true);
    expect(manifest.tools.map((t) => t.name).sort()).toEqual(TOOL_NAMES);
    expect(manifest.user_config.allowed_directories).toMatchObject({
      type: "directory",
      multiple: true,
      required: true,
    });
    expect(manifest.user_config.output_directory?.type).toBe("directory");
    expect(manifest.user_config.pack_directory).toMatchObject({ type: "directory", required: false });
  });

  it("holds the default pack and production dependencies for this platform only", () => {
    expect(manifest, "unpacked").toBeDefined();
    expect(readdirSync(path.join(unpacked, "models")).sort()).toEqual(["README.md", DEFAULT_PACK_NAME]);
    const modules = path.join(unpacked, "node_modules");
    for (const dev of Object.keys(pkg.devDependencies)) {
      expect(existsSync(path.join(modules, dev)), `devDependency ${dev} is not bundled`).toBe(false);
    }
    const ort = path.join(modules, "onnxruntime-node", "bin", "napi-v6");
    expect(readdirSync(ort)).toEqual([process.platform]);
    expect(readdirSync(path.join(ort, process.platform))).toEqual([process.arch]);
    expect(existsSync(path.join(unpacked, "test"))).toBe(false);
    expect(existsSync(path.join(unpacked, "dist", "bench"))).toBe(false);
  });

  it.each(ERAS)("its entry point serves MCP over stdio to a %s client as a host starts it", async (era) => {
    expect(manifest, "unpacked").toBeDefined();
    const out = path.join(work, `masks-${era}`);
    await mkdir(out);
    const home = os.homedir();
    // What Claude Desktop does: the manifest's mcp_config with the user's settings substituted.
    const config = await getMcpConfigForManifest({
      manifest,
      extensionPath: unpacked,
      systemDirs: {
        HOME: home,
        DESKTOP: path.join(home, "Desktop"),
        DOCUMENTS: path.join(home, "Documents"),
        DOWNLOADS: path.join(home, "Downloads"),
      },
      // pack_directory left empty: the host passes its placeholder through, the entry point drops it.
      userConfig: { allowed_directories: [path.dirname(exampleImage)], output_directory: out },
      pathSeparator: path.sep,
    });
    if (!config) throw new Error("the host would not start the server: required settings missing");
    expect(config.args).toContainEqual(expect.stringMatching(/^\$\{user_config\.pack_directory\}$/));
    const transport = stdioTransport(era, {
      command: config.command === "node" ? process.execPath : config.command,
      args: config.args ?? [],
      env: { ...getDefaultEnvironment(), ...config.env },
      // desktop hosts start servers in the filesystem root
      cwd: path.parse(work).root,
    });
    let stderr = "";
    transport.stderr?.on("data", (chunk: Buffer) => {
      stderr += chunk.toString();
    });
    const client = await connectClient(transport, { name: "bundle-test" });
    try {
      const tools = await segmentOverMcp(client, era, out);
      // the manifest lists the server's own tools, with the same descriptions
      expect(
        manifest.tools
          .map((t) => ({ name: t.name, description: t.description }))
          .sort((a, b) => a.name.localeCompare(b.name)),
      ).toEqual(tools.sort((a, b) => a.name.localeCompare(b.name)));
      expect(client.errors, stderr).toEqual([]);
    } finally {
      await client.close();
    }
  });
});
