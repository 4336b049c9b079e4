#!/usr/bin/env node
/**
 * `node stdio-tap.mjs LOG COMMAND [ARGS...]`: runs COMMAND with this process's stdio passed through,
 * and appends every line it reads (`> `) and writes (`< `) on stdin/stdout to LOG. Lets a test see
 * what an MCP client it does not control (the MCP Inspector) sends a stdio server, and what it gets.
 */

import { spawn } from "node:child_process";
import { appendFileSync } from "node:fs";

const [log, command, ...args] = process.argv.slice(2);
const child = spawn(command, args, { stdio: ["pipe", "pipe", "inherit"] });

function tee(prefix) {
  let pending = "";
  return (chunk) => {
    pending += chunk.toString("utf8");
    const lines = pending.split("\n");
    pending = lines.pop() ?? "";
    for (const line of lines) appendFileSync(log, `${prefix}${line}\n`);
  };
}

process.stdin.on("data", tee("> "));
process.stdin.pipe(child.stdin);
child.stdout.on("data", tee("< "));
child.stdout.pipe(process.stdout);
child.on("exit", (code, signal) => {
  process.exitCode = code ?? (signal ? 1 : 0);
});
for (const signal of ["SIGINT", "SIGTERM"]) process.on(signal, () => child.kill(signal));
