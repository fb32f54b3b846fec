/**
 * The client context file (kubectl-style) that `llumnix serve` writes: where a cluster is and which credentials reach
 * it (CA, client certificate and key, API key). The same file and rules as the Python `pyllumnix.infra.security.context`:
 * `$LLUMNIX_CONTEXT`, else `$XDG_CONFIG_HOME/llumnix/context.yaml` (`~/.config/llumnix/context.yaml`); a file that
 * others may read is refused (it holds an API key and names a private key), as ssh does with keys.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, isAbsolute, join, resolve } from "node:path";

import { parse } from "yaml";

import { tlsFromFiles, type TlsOptions } from "./pool";

export const CONTEXT_ENV_VAR = "LLUMNIX_CONTEXT";

/** A context file that cannot be used (unreadable, malformed, unknown context, too open permissions). */
export class ContextError extends Error {
  override name = "ContextError";
}

/** One named context: endpoints plus credentials (every field optional but the name). */
export interface ClientContext {
  name: string;
  cluster: string;
  scheduler: string[];
  frontend: string[];
  http: string;
  ca?: string;
  cert?: string;
  key?: string;
  apiKey: string;
  serverName: string;
}

/** Where the context file is (whether or not it exists). */
export function contextPath(env: NodeJS.ProcessEnv = process.env): string {
  if (env[CONTEXT_ENV_VAR]) return resolve(env[CONTEXT_ENV_VAR].replace(/^~(?=$|\/)/, homedir()));
  const base = env.XDG_CONFIG_HOME || join(homedir(), ".config");
  return join(base, "llumnix", "context.yaml");
}

function strList(value: unknown, what: string): string[] {
  if (value === undefined || value === null) return [];
  if (typeof value === "string") {
    return value
      .split(",")
      .map((v) => v.trim())
      .filter(Boolean);
  }
  if (Array.isArray(value) && value.every((v) => typeof v === "string")) return [...value];
  throw new ContextError(`${what} must be a list of host:port strings`);
}

const KNOWN = new Set(["name", "cluster", "scheduler", "frontend", "http", "etcd", "ca", "cert", "key", "api_key", "server_name"]);

function fromDict(data: Record<string, unknown>, base: string): ClientContext {
  if (typeof data.name !== "string" || !data.name) throw new ContextError("every context needs a name");
  const unknown = Object.keys(data).filter((k) => !KNOWN.has(k));
  if (unknown.length) throw new ContextError(`context '${data.name}': unknown keys ${unknown.sort().join(", ")}`);
  const path = (key: string): string | undefined => {
    const value = data[key];
    if (value === undefined || value === null) return undefined;
    const p = String(value).replace(/^~(?=$|\/)/, homedir());
    return isAbsolute(p) ? p : join(base, p);
  };
  const ctx: ClientContext = {
    name: data.name,
    cluster: String(data.cluster ?? ""),
    scheduler: strList(data.scheduler, "scheduler"),
    frontend: strList(data.frontend, "frontend"),
    http: String(data.http ?? ""),
    ca: path("ca"),
    cert: path("cert"),
    key: path("key"),
    apiKey: String(data.api_key ?? ""),
    serverName: String(data.server_name ?? ""),
  };
  if ((ctx.cert === undefined) !== (ctx.key === undefined)) {
    throw new ContextError(`context '${ctx.name}': cert and key must be given together`);
  }
  return ctx;
}

/** The named (else the current) context; undefined when the file does not exist; ContextError when unusable. */
export function loadContext(path?: string, name?: string): ClientContext | undefined {
  const p = path ?? contextPath();
  if (!existsSync(p)) return undefined;
  let text: string;
  let mode: number;
  try {
    mode = statSync(p).mode;
    text = readFileSync(p, "utf8");
  } catch (err) {
    throw new ContextError(`cannot read the context file ${p}: ${(err as Error).message}`);
  }
  if (mode & 0o077) {
    throw new ContextError(
      `the context file ${p} is accessible by others (mode ${(mode & 0o777).toString(8).padStart(4, "0")}); run: chmod 600 ${p}`,
    );
  }
  let data: unknown;
  try {
    data = parse(text) ?? {};
  } catch (err) {
    throw new ContextError(`the context file ${p} is not valid YAML: ${(err as Error).message}`);
  }
  const doc = data as Record<string, unknown>;
  if (typeof data !== "object" || Array.isArray(data) || !Array.isArray(doc.contexts ?? [])) {
    throw new ContextError(`the context file ${p} must map 'contexts' to a list`);
  }
  const contexts = ((doc.contexts as unknown[]) ?? []).map((c) => fromDict(c as Record<string, unknown>, dirname(p)));
  const wanted = name ?? (doc["current-context"] as string | undefined);
  if (wanted === undefined) {
    if (contexts.length === 1) return contexts[0];
    throw new ContextError(`${p}: no current-context and ${contexts.length} contexts; name one`);
  }
  const found = contexts.find((c) => c.name === wanted);
  if (!found) {
    throw new ContextError(`${p}: no context named '${wanted}' (have: ${contexts.map((c) => c.name).join(", ") || "none"})`);
  }
  return found;
}

/** The context's CA, client certificate and key as TlsOptions (undefined: a plaintext context). */
export function tlsFromContext(ctx: ClientContext): TlsOptions | undefined {
  if (ctx.ca === undefined) return undefined;
  return tlsFromFiles({ ca: ctx.ca, cert: ctx.cert, key: ctx.key, serverName: ctx.serverName || undefined });
}
