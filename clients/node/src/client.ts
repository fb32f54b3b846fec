/**
 * Node.js client of a Llumnix cluster: streaming Generate and Abort at the frontends, the operator API (AdminService)
 * at the scheduler replicas. Retry rules: `./pool.ts` (the same as the Python client's).
 */
import { randomUUID } from "node:crypto";
import { credentials, type CallOptions, type Channel, type ClientUnaryCall, type Metadata, type ServiceError } from "@grpc/grpc-js";

import {
  AdminServiceClient,
  GetConfigResponse,
  GetLeaderResponse,
  ResignLeaderResponse,
  ScaleResponse,
  SetConfigResponse,
  type ClusterRequest,
} from "../gen/llumnix/v1/admin";
import { FinishReason, Priority } from "../gen/llumnix/v1/common";
import { ClusterConfig } from "../gen/llumnix/v1/config";
import { AbortRequest, FrontendServiceClient, GenerateRequest, type GenerateResponse } from "../gen/llumnix/v1/frontend";
import type { MigrationResult } from "../gen/llumnix/v1/llumlet";
import type { InstanceStatus } from "../gen/llumnix/v1/scheduler";
import { contextPath, loadContext, tlsFromContext } from "./context";
import { fromServiceError, InvalidArgumentError, isServiceError, LlumnixError, NotFoundError, UnavailableError } from "./errors";
import { callMetadata, CallKind, EndpointPool, type TlsOptions } from "./pool";

export const FINISH_REASONS: Partial<Record<FinishReason, string>> = {
  [FinishReason.FINISH_REASON_STOP]: "stop",
  [FinishReason.FINISH_REASON_LENGTH]: "length",
  [FinishReason.FINISH_REASON_ABORT]: "abort",
  [FinishReason.FINISH_REASON_ERROR]: "error",
};

export interface Usage {
  promptTokens: number;
  completionTokens: number;
}

/** One streamed message: the new tokens (and their text) since the previous chunk. */
export interface GenerationChunk {
  requestId: string;
  text: string;
  tokenIds: number[];
  firstTokenIndex: number;
  finished: boolean;
  finishReason: string | undefined;
  usage: Usage | undefined;
  instanceId: string;
}

function chunkFrom(msg: GenerateResponse): GenerationChunk {
  return {
    requestId: msg.requestId,
    text: msg.text,
    tokenIds: [...msg.tokenIds],
    firstTokenIndex: msg.firstTokenIndex,
    finished: msg.finished,
    finishReason: FINISH_REASONS[msg.finishReason],
    usage: msg.usage ? { promptTokens: msg.usage.promptTokens, completionTokens: msg.usage.completionTokens } : undefined,
    instanceId: msg.instanceId,
  };
}

/** A whole completion; `instances` lists, in order, every instance that produced tokens (several after a migration). */
export class GenerationResult {
  text = "";
  tokenIds: number[] = [];
  finishReason: string | undefined;
  usage: Usage | undefined;
  instances: string[] = [];

  constructor(public requestId: string = "") {}

  /** Appends a chunk; tokens already held (a duplicate across a migration) are dropped by index. */
  add(chunk: GenerationChunk): void {
    this.requestId = chunk.requestId || this.requestId;
    const skip = chunk.tokenIds.length ? Math.max(this.tokenIds.length - chunk.firstTokenIndex, 0) : 0;
    if (skip < chunk.tokenIds.length || chunk.tokenIds.length === 0) {
      this.tokenIds.push(...chunk.tokenIds.slice(skip));
      this.text += chunk.text;
    }
    if (chunk.instanceId && this.instances[this.instances.length - 1] !== chunk.instanceId) {
      this.instances.push(chunk.instanceId);
    }
    if (chunk.finished) this.finishReason = chunk.finishReason;
    if (chunk.usage) this.usage = chunk.usage;
  }
}

export type PriorityLike = "normal" | "high" | string | number;

/** "normal"/"high" (any case, with or without the PRIORITY_ prefix) or the enum number. */
export function parsePriority(priority: PriorityLike): Priority {
  if (typeof priority === "number") {
    if (priority === Priority.PRIORITY_NORMAL || priority === Priority.PRIORITY_HIGH) return priority;
    throw new InvalidArgumentError(`bad priority ${priority}`);
  }
  const name = priority.trim().toUpperCase().replace(/^PRIORITY_/, "");
  if (name === "NORMAL") return Priority.PRIORITY_NORMAL;
  if (name === "HIGH") return Priority.PRIORITY_HIGH;
  throw new InvalidArgumentError(`bad priority ${JSON.stringify(priority)}: expected one of normal, high`);
}

export interface GenerateOptions {
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  seed?: number | bigint | string;
  stop?: string | string[];
  stopTokenIds?: number[];
  ignoreEos?: boolean;
  priority?: PriorityLike;
  /** Defaults to a fresh `req-<uuid>`. */
  requestId?: string;
  model?: string;
  /** Deadline of the whole stream (default: the client's `generateTimeoutMs`; none when both are unset). */
  timeoutMs?: number;
  /** Aborting the signal cancels the stream, which aborts the request. */
  signal?: AbortSignal;
}

export function buildGenerateRequest(prompt: string | number[], opts: GenerateOptions = {}): GenerateRequest {
  const stop = opts.stop === undefined ? [] : typeof opts.stop === "string" ? [opts.stop] : [...opts.stop];
  return GenerateRequest.fromPartial({
    requestId: opts.requestId || `req-${randomUUID().replace(/-/g, "")}`,
    prompt: typeof prompt === "string" ? { $case: "text", value: prompt } : { $case: "tokenIds", value: { ids: prompt } },
    sampling: {
      maxTokens: opts.maxTokens ?? 16,
      temperature: opts.temperature ?? 0,
      topP: opts.topP ?? 1,
      topK: opts.topK ?? 0,
      seed: opts.seed === undefined ? undefined : String(opts.seed),
      stop,
      stopTokenIds: opts.stopTokenIds ?? [],
      ignoreEos: opts.ignoreEos ?? false,
    },
    priority: parsePriority(opts.priority ?? "normal"),
    model: opts.model ?? "",
  });
}

export interface ClientOptions {
  /**
   * With no endpoints at all, the client context file says where the cluster is and with which credentials (TLS,
   * client certificate, API key): this path, else `$LLUMNIX_CONTEXT` or `~/.config/llumnix/context.yaml`.
   */
  contextFile?: string;
  /** The context to use from that file (default: its current-context). */
  contextName?: string;
  /** Used for a role whose own list is not given (e.g. one address serving both). */
  endpoints?: string | string[];
  frontendEndpoints?: string | string[];
  schedulerEndpoints?: string | string[];
  /** TLS (and mTLS with cert + key); plaintext when absent. */
  tls?: TlsOptions;
  /** Sent as `authorization: Bearer <apiKey>` on every call. */
  apiKey?: string;
  /** Bound of each unary call, all retries included (default 10 s). */
  timeoutMs?: number;
  connectTimeoutMs?: number;
  /** Bound of a whole Generate stream (default: none). */
  generateTimeoutMs?: number;
}

type Unary<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

function unary<Req, Res>(method: Unary<Req, Res>, self: object, request: Req, metadata: Metadata, deadline: Date): Promise<Res> {
  return new Promise((resolve, reject) => {
    method.call(self, request, metadata, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

/** A partial ClusterConfig, as ClusterConfig.fromPartial takes it. */
export type ClusterConfigPatch = Parameters<typeof ClusterConfig.fromPartial>[0];

/**
 * Generate/Abort at the frontends, admin calls at the scheduler replicas. Admin writes go to the leader; reads prefer
 * it (followers lack load reports) but any replica may answer.
 */
export class LlumnixClient {
  readonly timeoutMs: number | undefined;
  readonly generateTimeoutMs: number | undefined;
  private readonly frontends: EndpointPool | undefined;
  private readonly schedulers: EndpointPool | undefined;
  private readonly apiKey: string | undefined;
  /** request id -> the frontend that owns its stream (Abort must reach that frontend). */
  private readonly owners = new Map<string, string>();
  private readonly admins = new WeakMap<Channel, AdminServiceClient>();
  private readonly fronts = new WeakMap<Channel, FrontendServiceClient>();

  constructor(opts: ClientOptions = {}) {
    let fe = opts.frontendEndpoints ?? opts.endpoints;
    let se = opts.schedulerEndpoints ?? opts.endpoints;
    let tls = opts.tls;
    let apiKey = opts.apiKey;
    if (!fe?.length && !se?.length) {
      // No endpoints: the client context file (written by `llumnix serve`) says where and with what.
      const ctx = loadContext(opts.contextFile, opts.contextName);
      if (ctx === undefined) {
        throw new Error(
          "give endpoints, frontendEndpoints or schedulerEndpoints (or run `llumnix serve`, which writes the client " +
            `context file ${opts.contextFile ?? contextPath()})`,
        );
      }
      fe = ctx.frontend;
      se = ctx.scheduler;
      tls = tls ?? tlsFromContext(ctx);
      apiKey = apiKey ?? (ctx.apiKey || undefined);
    }
    this.timeoutMs = opts.timeoutMs;
    this.generateTimeoutMs = opts.generateTimeoutMs;
    this.apiKey = apiKey;
    const common = { tls, timeoutMs: opts.timeoutMs, connectTimeoutMs: opts.connectTimeoutMs };
    this.frontends = fe?.length ? new EndpointPool(fe, { ...common, role: "frontend" }) : undefined;
    this.schedulers = se?.length ? new EndpointPool(se, { ...common, role: "scheduler" }) : undefined;
  }

  get frontendPool(): EndpointPool {
    if (!this.frontends) throw new LlumnixError("no frontend endpoints configured");
    return this.frontends;
  }

  get schedulerPool(): EndpointPool {
    if (!this.schedulers) throw new LlumnixError("no scheduler endpoints configured");
    return this.schedulers;
  }

  private frontendStub(address: string, channel: Channel): FrontendServiceClient {
    let stub = this.fronts.get(channel);
    if (!stub) {
      stub = new FrontendServiceClient(address, credentials.createInsecure(), { channelOverride: channel });
      this.fronts.set(channel, stub);
    }
    return stub;
  }

  private adminStub(address: string, channel: Channel): AdminServiceClient {
    let stub = this.admins.get(channel);
    if (!stub) {
      stub = new AdminServiceClient(address, credentials.createInsecure(), { channelOverride: channel });
      this.admins.set(channel, stub);
    }
    return stub;
  }

  // --- generation -------------------------------------------------------------------------------------------

  /**
   * Streams a completion. Leaving the loop early (or `signal`) cancels the stream, which aborts the request. Only the
   * connection is retried (another frontend when this one is unreachable); once the stream is open the request is
   * never re-sent, and a broken stream rejects with UnavailableError(mayHaveStarted: true).
   */
  async *generate(prompt: string | number[], opts: GenerateOptions = {}): AsyncGenerator<GenerationChunk, void, undefined> {
    const request = buildGenerateRequest(prompt, opts);
    const pool = this.frontendPool;
    const { address, channel } = await pool.readyEndpoint();
    const timeoutMs = opts.timeoutMs ?? this.generateTimeoutMs;
    const options: Partial<CallOptions> = timeoutMs === undefined ? {} : { deadline: new Date(Date.now() + timeoutMs) };
    const call = this.frontendStub(address, channel).generate(request, callMetadata(this.apiKey), options);
    const onAbort = (): void => call.cancel();
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    this.owners.set(request.requestId, address);
    try {
      for await (const msg of call as AsyncIterable<GenerateResponse>) {
        yield chunkFrom(msg);
      }
    } catch (err) {
      if (isServiceError(err)) throw fromServiceError(err, { endpoint: address, endpoints: [address], mayHaveStarted: true });
      throw err;
    } finally {
      opts.signal?.removeEventListener("abort", onAbort);
      this.owners.delete(request.requestId);
      call.cancel();
    }
  }

  /** Runs `generate` to the end and collects text, token ids, finish reason, usage and the instances seen. */
  async generateText(prompt: string | number[], opts: GenerateOptions = {}): Promise<GenerationResult> {
    const result = new GenerationResult(opts.requestId ?? "");
    for await (const chunk of this.generate(prompt, opts)) result.add(chunk);
    return result;
  }

  /** Aborts a request at the frontend that owns it (the one this client streamed it through, else each one). */
  async abort(requestId: string): Promise<void> {
    const pool = this.frontendPool;
    const owner = this.owners.get(requestId);
    const targets = [...(owner ? [owner] : []), ...pool.endpoints.filter((a) => a !== owner)];
    const unreachable: string[] = [];
    for (const address of targets) {
      if ((await pool.waitReady(address, pool.connectTimeoutMs)) !== "READY") {
        unreachable.push(address);
        continue;
      }
      const stub = this.frontendStub(address, pool.channel(address));
      try {
        await unary(
          stub.abort as Unary<AbortRequest, unknown>,
          stub,
          AbortRequest.fromPartial({ requestId }),
          callMetadata(this.apiKey),
          new Date(Date.now() + (this.timeoutMs ?? pool.timeoutMs)),
        );
        return;
      } catch (err) {
        if (!isServiceError(err)) throw err;
        const e = fromServiceError(err, { endpoint: address });
        if (e instanceof NotFoundError) continue;
        if (e.code === "UNAVAILABLE" || e.code === "DEADLINE_EXCEEDED") {
          unreachable.push(address);
          continue;
        }
        throw e;
      }
    }
    if (unreachable.length) {
      throw new UnavailableError(`abort ${JSON.stringify(requestId)}: frontends unreachable: [${unreachable.join(", ")}]`, {
        endpoints: unreachable,
      });
    }
    throw new NotFoundError(`unknown request ${JSON.stringify(requestId)}`);
  }

  // --- operator API -----------------------------------------------------------------------------------------

  private admin<Req, Res>(
    what: string,
    pick: (stub: AdminServiceClient) => Unary<Req, Res>,
    request: Req,
    kind: CallKind,
  ): Promise<Res> {
    return this.schedulerPool.call(
      (channel, address, deadline) => {
        const stub = this.adminStub(address, channel);
        return unary(pick(stub), stub, request, callMetadata(this.apiKey), deadline);
      },
      { what, kind, preferLeader: true },
    );
  }

  async listInstances(): Promise<InstanceStatus[]> {
    const reply = await this.admin("ListInstances", (s) => s.listInstances, {}, CallKind.READ);
    return reply.instances;
  }

  /** Requests of one instance, or of every instance when `instanceId` is empty. */
  async listRequests(instanceId = ""): Promise<ClusterRequest[]> {
    const reply = await this.admin("ListClusterRequests", (s) => s.listClusterRequests, { instanceId }, CallKind.READ);
    return reply.requests;
  }

  /** Live-migrates a request; the result's `outcome` says whether it moved (MIGRATION_OUTCOME_COMMITTED). */
  async migrate(requestId: string, to: string): Promise<MigrationResult> {
    const reply = await this.admin(
      "MigrateRequest",
      (s) => s.migrateRequest,
      { requestId, destinationInstanceId: to },
      CallKind.WRITE,
    );
    if (!reply.result) throw new LlumnixError("MigrateRequest: the reply carries no result");
    return reply.result;
  }

  async drain(instanceId: string): Promise<InstanceStatus | undefined> {
    return (await this.admin("DrainInstance", (s) => s.drainInstance, { instanceId }, CallKind.WRITE)).instance;
  }

  async cordon(instanceId: string): Promise<InstanceStatus | undefined> {
    return (await this.admin("CordonInstance", (s) => s.cordonInstance, { instanceId }, CallKind.WRITE)).instance;
  }

  async uncordon(instanceId: string): Promise<InstanceStatus | undefined> {
    return (await this.admin("UncordonInstance", (s) => s.uncordonInstance, { instanceId }, CallKind.WRITE)).instance;
  }

  async scale(targetInstances: number): Promise<ScaleResponse> {
    return this.admin("Scale", (s) => s.scale, { targetInstances }, CallKind.WRITE);
  }

  /** The cluster config (defaults applied) and its etcd revision. */
  async getConfig(): Promise<GetConfigResponse> {
    return this.admin("GetConfig", (s) => s.getConfig, {}, CallKind.READ);
  }

  /**
   * Writes the fields of `config` named by `paths` (dotted, e.g. "migration.migrate_out_threshold"); no `paths`
   * replaces the whole config. `expectedRevision` makes it a compare-and-swap (AbortedError when stale).
   */
  async setConfig(
    config: ClusterConfigPatch,
    opts: { paths?: string[]; expectedRevision?: number | string } = {},
  ): Promise<SetConfigResponse> {
    const request = {
      config: ClusterConfig.fromPartial(config),
      updateMask: opts.paths ? [...opts.paths] : undefined,
      expectedRevision: String(opts.expectedRevision ?? 0),
    };
    return this.admin("SetConfig", (s) => s.setConfig, request, CallKind.WRITE);
  }

  async leader(): Promise<GetLeaderResponse> {
    return this.admin("GetLeader", (s) => s.getLeader, {}, CallKind.READ);
  }

  /** The current leader steps down (a standby takes over at once); with no leader: NoLeaderError. */
  async resignLeader(): Promise<ResignLeaderResponse> {
    return this.admin("ResignLeader", (s) => s.resignLeader, {}, CallKind.WRITE);
  }

  close(): void {
    this.frontends?.close();
    this.schedulers?.close();
  }
}
