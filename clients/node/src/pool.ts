/**
 * Leader-aware, failover-aware calls over a set of gRPC endpoints: the same retry rules as the Python client
 * (`pyllumnix/clients/channel.py`), decided in this one place:
 *
 * - READ calls (ListInstances, ListClusterRequests, GetConfig, GetLeader, Abort) are idempotent: on UNAVAILABLE or
 *   DEADLINE_EXCEEDED they are retried at the next endpoint until the call's deadline or attempt budget is spent.
 * - WRITE calls (MigrateRequest, DrainInstance, Cordon/Uncordon, Scale, SetConfig, ResignLeader) move to another
 *   endpoint only when they certainly did not start: the channel never became READY (nothing was sent), or a replica
 *   refused them as a follower (FAILED_PRECONDITION with the `llumnix-leader` trailer), which applies nothing. An
 *   UNAVAILABLE or DEADLINE_EXCEEDED after sending is raised with `mayHaveStarted: true` and never re-sent.
 * - Generate streams (`readyEndpoint`) fail over only while looking for a READY frontend; once opened, a stream is
 *   never re-submitted (the request may already be running).
 *
 * A follower's refusal that names the leader is followed once at that address, which is then remembered and tried
 * first by later leader calls.
 */
import { Channel, connectivityState, credentials, Metadata, status, type ChannelCredentials } from "@grpc/grpc-js";
import { readFileSync } from "node:fs";

import { fromServiceError, isServiceError, NoLeaderError, UnavailableError } from "./errors";

export const LEADER_METADATA_KEY = "llumnix-leader";
export const DEFAULT_TIMEOUT_MS = 10_000;
export const DEFAULT_CONNECT_TIMEOUT_MS = 1_000;

/** Channel options, as the Python client's CHANNEL_OPTIONS. */
const CHANNEL_OPTIONS: Record<string, number> = {
  // Notice a restarted replica quickly; grpc's default backoff grows to 120 s.
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.min_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 1000,
  // The retry rules here are ours; grpc's transparent retries must not re-send a write behind our back.
  "grpc.enable_retries": 0,
  "grpc.max_receive_message_length": 64 << 20,
};

const SCHEMES = ["grpc://", "grpcs://", "http://", "https://"];

/** How a failed call may be retried (module comment). */
export enum CallKind {
  READ = "read",
  WRITE = "write",
}

/** TLS material for the channels; every field optional (no `ca`: the system trust store). */
export interface TlsOptions {
  /** PEM root certificates. */
  ca?: Buffer;
  /** PEM client certificate chain (mTLS); needs `key`. */
  cert?: Buffer;
  /** PEM client private key (mTLS); needs `cert`. */
  key?: Buffer;
  /** Expected server name when it differs from the address's host. */
  serverName?: string;
}

/** Reads PEM files into TlsOptions; a client certificate needs its key and vice versa. */
export function tlsFromFiles(files: { ca?: string; cert?: string; key?: string; serverName?: string }): TlsOptions {
  if ((files.cert === undefined) !== (files.key === undefined)) {
    throw new Error("a client certificate and its key must be given together");
  }
  return {
    ca: files.ca ? readFileSync(files.ca) : undefined,
    cert: files.cert ? readFileSync(files.cert) : undefined,
    key: files.key ? readFileSync(files.key) : undefined,
    serverName: files.serverName || undefined,
  };
}

/** `"a:1,b:2"` or `["grpc://a:1", "b:2"]` -> `["a:1", "b:2"]` (order kept, duplicates dropped). */
export function normalizeEndpoints(endpoints: string | readonly string[]): string[] {
  const items = typeof endpoints === "string" ? [endpoints] : [...endpoints];
  const out: string[] = [];
  for (const item of items) {
    for (const raw of item.split(",")) {
      let ep = raw.trim();
      for (const scheme of SCHEMES) {
        if (ep.startsWith(scheme)) ep = ep.slice(scheme.length);
      }
      ep = ep.replace(/\/+$/, "");
      if (!ep) continue;
      if (!ep.includes(":")) throw new Error(`endpoint must be host:port, got ${JSON.stringify(raw.trim())}`);
      if (!out.includes(ep)) out.push(ep);
    }
  }
  return out;
}

/** The leader named by a follower's refusal: undefined when this is not such a refusal, "" when it names none. */
export function leaderFromError(err: unknown): string | undefined {
  if (!isServiceError(err) || err.code !== status.FAILED_PRECONDITION) return undefined;
  const values = err.metadata?.get(LEADER_METADATA_KEY) ?? [];
  if (values.length === 0) return undefined;
  const value = values[0];
  return typeof value === "string" ? value : value.toString("utf8");
}

function describe(err: unknown): string {
  if (isServiceError(err)) return `${status[err.code]}: ${err.details}`;
  return String(err);
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, Math.max(ms, 0)));

/** An attempt failed in a way that is safe to retry elsewhere. */
class TryNext extends Error {
  constructor(
    readonly address: string,
    readonly reason: string,
    readonly noLeader = false,
  ) {
    super(`${address}: ${reason}`);
  }
}

/** One attempt's view of the pool: the target's channel and the call's absolute deadline. */
export type Invoke<R> = (channel: Channel, address: string, deadline: Date) => Promise<R>;

export interface PoolOptions {
  tls?: TlsOptions;
  timeoutMs?: number;
  connectTimeoutMs?: number;
  rounds?: number;
  role?: string;
}

/** Channels to a fixed list of endpoints (plus leader addresses learned from redirects), opened lazily. */
export class EndpointPool {
  readonly timeoutMs: number;
  readonly connectTimeoutMs: number;
  readonly rounds: number;
  readonly role: string;
  private readonly endpointList: string[];
  private readonly creds: ChannelCredentials;
  private readonly channelOptions: Record<string, string | number>;
  private index = 0;
  private leader: string | undefined;
  private readonly channels = new Map<string, Channel>();
  private closed = false;

  constructor(endpoints: string | readonly string[], opts: PoolOptions = {}) {
    this.role = opts.role ?? "scheduler";
    this.endpointList = normalizeEndpoints(endpoints);
    if (this.endpointList.length === 0) throw new Error(`at least one ${this.role} endpoint is required`);
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.connectTimeoutMs = opts.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    this.rounds = opts.rounds ?? 2;
    if (this.timeoutMs <= 0 || this.connectTimeoutMs <= 0 || this.rounds < 1) {
      throw new Error("timeoutMs and connectTimeoutMs must be positive, rounds >= 1");
    }
    this.channelOptions = { ...CHANNEL_OPTIONS };
    if (opts.tls) {
      this.creds = credentials.createSsl(opts.tls.ca ?? null, opts.tls.key ?? null, opts.tls.cert ?? null);
      if (opts.tls.serverName) this.channelOptions["grpc.ssl_target_name_override"] = opts.tls.serverName;
    } else {
      this.creds = credentials.createInsecure();
    }
  }

  get endpoints(): string[] {
    return [...this.endpointList];
  }

  get current(): string {
    return this.endpointList[this.index];
  }

  /** The leader address learned from the latest redirect (undefined when unknown). */
  get leaderHint(): string | undefined {
    return this.leader;
  }

  /** The channel to `address` (opened on first use). */
  channel(address: string): Channel {
    if (this.closed) throw new Error("the client is closed");
    let ch = this.channels.get(address);
    if (ch === undefined) {
      ch = new Channel(address, this.creds, this.channelOptions);
      this.channels.set(address, ch);
    }
    return ch;
  }

  /** Connects to `address`; resolves "READY" or why not (a connectivity state name or "timeout"). */
  async waitReady(address: string, timeoutMs: number): Promise<string> {
    const ch = this.channel(address);
    const deadline = Date.now() + Math.max(timeoutMs, 0);
    let state = ch.getConnectivityState(true);
    while (state !== connectivityState.READY) {
      if (state === connectivityState.TRANSIENT_FAILURE || state === connectivityState.SHUTDOWN) {
        return connectivityState[state];
      }
      if (Date.now() >= deadline) return "timeout";
      const changed = await new Promise<boolean>((resolve) =>
        ch.watchConnectivityState(state, deadline, (err?: Error) => resolve(err === undefined)),
      );
      if (!changed) return "timeout";
      state = ch.getConnectivityState(true);
    }
    return "READY";
  }

  private failed(address: string): void {
    if (address === this.leader) this.leader = undefined;
    if (this.endpointList[this.index] === address) this.index = (this.index + 1) % this.endpointList.length;
  }

  private nextTarget(preferLeader: boolean, skip: Set<string>): string {
    if (preferLeader && this.leader !== undefined && !skip.has(this.leader)) return this.leader;
    return this.endpointList[this.index];
  }

  /** Runs `invoke` under the retry rules of `kind`; rejects with a LlumnixError. */
  async call<R>(
    invoke: Invoke<R>,
    opts: { what: string; kind: CallKind; preferLeader?: boolean; timeoutMs?: number },
  ): Promise<R> {
    const preferLeader = opts.preferLeader ?? false;
    const deadline = Date.now() + (opts.timeoutMs ?? this.timeoutMs);
    const perRound = this.endpointList.length + (preferLeader ? 1 : 0);
    const maxAttempts = perRound * this.rounds;
    const failures: TryNext[] = [];
    const skip = new Set<string>();
    for (let attempt = 1; ; attempt++) {
      const target = this.nextTarget(preferLeader, skip);
      try {
        return await this.attempt(invoke, target, opts.kind, deadline);
      } catch (err) {
        if (!(err instanceof TryNext)) throw err;
        failures.push(err);
        skip.add(err.address);
        this.failed(err.address);
      }
      if (attempt >= maxAttempts || Date.now() >= deadline) break;
      if (attempt % perRound === 0) {
        // No pause while other endpoints are left to try; a short backoff between rounds.
        skip.clear();
        const backoff = Math.min(50 * 2 ** (attempt / perRound - 1), 500);
        await sleep(Math.min(backoff, deadline - Date.now()));
      }
    }
    const tried = [...new Set([...this.endpointList, ...failures.map((f) => f.address)])];
    const last = failures.length ? failures[failures.length - 1].reason : "deadline exceeded";
    if (failures.length && failures.every((f) => f.noLeader)) {
      throw new NoLeaderError(`${opts.what}: no ${this.role} leader reachable via [${tried.join(", ")}] (last: ${last})`, {
        endpoints: tried,
        details: last,
      });
    }
    throw new UnavailableError(`${opts.what}: no ${this.role} reachable at [${tried.join(", ")}] (last error: ${last})`, {
      endpoints: tried,
      details: last,
    });
  }

  private async attempt<R>(invoke: Invoke<R>, target: string, kind: CallKind, deadline: number): Promise<R> {
    const remaining = deadline - Date.now();
    if (remaining <= 0) throw new TryNext(target, "deadline exceeded before the call was sent");
    const ready = await this.waitReady(target, Math.min(this.connectTimeoutMs, remaining));
    // A READ may go out on a failed channel: grpc fails it at once without sending, with the cause in its details.
    if (ready !== "READY" && !(kind === CallKind.READ && ready === "TRANSIENT_FAILURE")) {
      throw new TryNext(target, `could not connect (${ready})`);
    }
    try {
      return await invoke(this.channel(target), target, new Date(Math.max(deadline, Date.now() + 1)));
    } catch (err) {
      const leader = leaderFromError(err);
      if (leader !== undefined) return await this.follow(invoke, target, leader, kind, deadline);
      throw this.classify(err, target, kind);
    }
  }

  /** One retry at the leader a follower named (a refused call applied nothing, so this is always safe). */
  private async follow<R>(
    invoke: Invoke<R>,
    follower: string,
    leader: string,
    kind: CallKind,
    deadline: number,
  ): Promise<R> {
    if (!leader || leader === follower) {
      throw new TryNext(follower, "replica is not the leader and knows no leader", true);
    }
    this.leader = leader;
    const ready = await this.waitReady(leader, Math.min(this.connectTimeoutMs, Math.max(deadline - Date.now(), 0)));
    if (ready !== "READY") {
      throw new TryNext(leader, `could not connect to the leader named by ${follower} (${ready})`, true);
    }
    try {
      return await invoke(this.channel(leader), leader, new Date(Math.max(deadline, Date.now() + 1)));
    } catch (err) {
      const moved = leaderFromError(err);
      if (moved !== undefined) {
        // Leadership moved again; the next attempt starts from the newly named leader (if any).
        this.leader = moved || undefined;
        throw new TryNext(leader, `leader moved to ${moved || "unknown"}`, true);
      }
      throw this.classify(err, leader, kind);
    }
  }

  private classify(err: unknown, address: string, kind: CallKind): Error {
    if (!isServiceError(err)) return err instanceof Error ? err : new Error(String(err));
    if ((err.code === status.UNAVAILABLE || err.code === status.DEADLINE_EXCEEDED) && kind === CallKind.READ) {
      return new TryNext(address, describe(err));
    }
    return fromServiceError(err, { endpoint: address, endpoints: [address], mayHaveStarted: true });
  }

  /**
   * A READY endpoint, for calls that must not be re-sent once started (Generate): only the connection is retried
   * here, so a caller that then starts its stream on the returned channel sends it exactly once.
   */
  async readyEndpoint(timeoutMs?: number): Promise<{ address: string; channel: Channel }> {
    const deadline = Date.now() + (timeoutMs ?? this.timeoutMs);
    const reasons: string[] = [];
    for (let round = 0; round < this.rounds; round++) {
      for (let i = 0; i < this.endpointList.length; i++) {
        const address = this.current;
        const remaining = deadline - Date.now();
        if (remaining <= 0) break;
        const ready = await this.waitReady(address, Math.min(this.connectTimeoutMs, remaining));
        if (ready === "READY") return { address, channel: this.channel(address) };
        reasons.push(`${address}: ${ready}`);
        this.failed(address);
      }
      if (round + 1 < this.rounds && deadline - Date.now() > 0) {
        await sleep(Math.min(100 * 2 ** round, deadline - Date.now()));
      }
    }
    throw new UnavailableError(
      `no ${this.role} reachable at [${this.endpointList.join(", ")}] (${reasons.slice(-3).join("; ") || "timeout"})`,
      { endpoints: this.endpoints, details: reasons.join("; "), mayHaveStarted: false },
    );
  }

  close(): void {
    this.closed = true;
    for (const ch of this.channels.values()) ch.close();
    this.channels.clear();
  }
}

/** Per-call metadata: the API key as `authorization: Bearer <key>` when one is set. */
export function callMetadata(apiKey: string | undefined): Metadata {
  const md = new Metadata();
  if (apiKey) md.set("authorization", `Bearer ${apiKey}`);
  return md;
}
