/**
 * onnxruntime's native library records telemetry (an event store under ~/.cache/Microsoft, a
 * /tmp/mat-debug-<pid>.log, machine id reads, lookups of a Microsoft collector) unless
 * ORT_DISABLE_TELEMETRY is set in the process environment before it loads. This server promises
 * that nothing leaves the machine and nothing is written outside --out, so it is always set: this
 * module is imported before onnxruntime-node (onnx.ts), and by engine.ts before it starts the worker,
 * because only the main thread's process.env reaches the real environment that native code reads.
 */
process.env.ORT_DISABLE_TELEMETRY = "1";
