import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // ORT sessions are CPU-heavy; on a 2-core machine parallel files only thrash.
    fileParallelism: false,
    reporters: ["default"],
  },
});
