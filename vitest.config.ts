import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    // ORT sessions are CPU-heavy; on a 2-core machine parallel files only thrash.
    fileParallelism: false,
    reporters: ["default"],
    projects: [
      {
        extends: true,
        test: {
          name: "unit",
          include: ["test/**/*.test.ts"],
          exclude: ["test/accuracy/**", "test/package/**"],
          // Generous: model work on the tiny pack takes seconds, and minutes on a busy machine.
          testTimeout: 600_000,
          hookTimeout: 600_000,
        },
      },
      {
        extends: true,
        test: {
          name: "accuracy",
          // The trained demo pack over fixed scenes: accuracy thresholds, no time limit (0).
          include: ["test/accuracy/**/*.test.ts"],
          testTimeout: 0,
          hookTimeout: 0,
        },
      },
      {
        extends: true,
        test: {
          name: "package",
          // npm pack, a global install from the tarball, the .mcpb bundle: each started as a user
          // would, then one segment call. npm and zipping take minutes on a busy machine.
          include: ["test/package/**/*.test.ts"],
          testTimeout: 1_800_000,
          hookTimeout: 600_000,
        },
      },
    ],
  },
});
