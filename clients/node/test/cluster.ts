/**
 * The live cluster the tests run against: a secure `llumnix serve` (mutual TLS, API keys), reached through the client
 * context file it writes. The pytest wrapper (integration/test_node_client.py) starts it and passes
 * LLUMNIX_FRONTENDS / LLUMNIX_SCHEDULERS / LLUMNIX_SERVE_STATUS / LLUMNIX_CONTEXT_FILE; run alone (`npm test`), the
 * tests start `llumnix serve` themselves (LLUMNIX_SERVE_BIN, default the repository's .venv/bin/llumnix) in its own
 * process group, with its context file in a temporary folder (never the user's), and stop that group when done.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";

export interface Cluster {
  frontends: string[];
  schedulers: string[];
  /** serve.json: every component with its pid (the failover test kills the leader by that pid). */
  statusFile: string;
  /** The client context file serve wrote (endpoints, CA, admin certificate, API key). */
  contextFile: string;
  stop(): Promise<void>;
}

export interface ServeComponent {
  name: string;
  kind: string;
  pid: number;
  address: string | null;
  instance_id: string | null;
  restarts: number;
}

export function serveStatus(cluster: Cluster): { components: ServeComponent[] } {
  return JSON.parse(readFileSync(cluster.statusFile, "utf8"));
}

function split(value: string): string[] {
  return value
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
}

export async function startCluster(): Promise<Cluster> {
  const env = process.env;
  if (env.LLUMNIX_FRONTENDS && env.LLUMNIX_SCHEDULERS && env.LLUMNIX_SERVE_STATUS && env.LLUMNIX_CONTEXT_FILE) {
    return {
      frontends: split(env.LLUMNIX_FRONTENDS),
      schedulers: split(env.LLUMNIX_SCHEDULERS),
      statusFile: env.LLUMNIX_SERVE_STATUS,
      contextFile: env.LLUMNIX_CONTEXT_FILE,
      stop: async () => {},
    };
  }
  const bin = env.LLUMNIX_SERVE_BIN ?? resolve(__dirname, "../../../../.venv/bin/llumnix");
  const dir = mkdtempSync(join(tmpdir(), "llumnix-node-"));
  const contextFile = join(dir, "context.yaml");
  const args = ["serve", "--http-port", "0", "--grpc-port", "0", "--transport", "tcp", "--log-dir", join(dir, "logs")];
  args.push("--context", contextFile);
  const childEnv = { ...env, LLUMNIX_INSECURE: "" }; // secure, as a user's serve is by default
  const child = spawn(bin, args, { detached: true, stdio: ["ignore", "pipe", "inherit"], env: childEnv });
  const stop = async (): Promise<void> => {
    await stopGroup(child);
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const ready = await readyLine(child, 180_000);
    return {
      frontends: [String(ready.grpc)],
      schedulers: (ready.schedulers as string[]).map(String),
      statusFile: String(ready.status_file),
      contextFile,
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

function readyLine(child: ChildProcess, timeoutMs: number): Promise<Record<string, unknown>> {
  return new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error(`llumnix serve not ready within ${timeoutMs} ms`)), timeoutMs);
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`llumnix serve exited (${code}) before it was ready`));
    });
    child.once("error", (err) => {
      clearTimeout(timer);
      reject(err);
    });
    const lines = createInterface({ input: child.stdout! });
    lines.on("line", (line) => {
      try {
        const msg = JSON.parse(line);
        if (msg && msg.event === "ready") {
          clearTimeout(timer);
          resolvePromise(msg);
        }
      } catch {
        // not the ready line
      }
    });
  });
}

/** SIGTERM to the serve process group we created, SIGKILL after a grace period. */
async function stopGroup(child: ChildProcess): Promise<void> {
  if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  try {
    process.kill(-child.pid, "SIGTERM");
  } catch {
    return; // already gone
  }
  const timeout = new Promise<"timeout">((r) => setTimeout(() => r("timeout"), 30_000).unref());
  if ((await Promise.race([exited, timeout])) === "timeout") {
    try {
      process.kill(-child.pid, "SIGKILL");
    } catch {
      // gone meanwhile
    }
    await exited;
  }
}
