/**
 * The retry rules (src/pool.ts) against fake AdminService replicas served by grpc-js: a follower's refusal is followed
 * to the leader it names, a write that was sent and then broke is never re-sent, a read is retried elsewhere, a dead
 * endpoint is skipped, and the API key travels as `authorization: Bearer`.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { Metadata, Server, ServerCredentials, status, type sendUnaryData, type ServerUnaryCall } from "@grpc/grpc-js";

import { AdminServiceService, type AdminServiceServer } from "../gen/llumnix/v1/admin";
import { InstanceState } from "../gen/llumnix/v1/common";
import { InstanceStatus } from "../gen/llumnix/v1/scheduler";
import {
  ContextError,
  GenerationResult,
  LEADER_METADATA_KEY,
  LlumnixClient,
  NoLeaderError,
  normalizeEndpoints,
  tlsFromFiles,
  UnavailableError,
} from "../src";

type Behaviour = "leader" | "follower" | "orphan" | "broken";

interface Fake {
  server: Server;
  address: string;
  calls: Record<string, number>;
  authorization: string[];
}

function fail(code: status, details: string, trailer?: string): Partial<{ code: status; details: string; metadata: Metadata }> {
  const metadata = new Metadata();
  if (trailer !== undefined) metadata.set(LEADER_METADATA_KEY, trailer);
  return { code, details, metadata };
}

async function serve(
  behaviour: Behaviour,
  leaderAddress = "",
  creds: ServerCredentials = ServerCredentials.createInsecure(),
): Promise<Fake> {
  const calls: Record<string, number> = {};
  const authorization: string[] = [];
  const answer =
    <Req, Res>(name: string, ok: (req: Req) => Res) =>
    (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>): void => {
      calls[name] = (calls[name] ?? 0) + 1;
      authorization.push(String(call.metadata.get("authorization")[0] ?? ""));
      if (behaviour === "follower") return callback(fail(status.FAILED_PRECONDITION, "not the leader", leaderAddress));
      if (behaviour === "orphan") return callback(fail(status.FAILED_PRECONDITION, "not the leader", ""));
      if (behaviour === "broken") return callback(fail(status.UNAVAILABLE, "connection reset after the request was read"));
      callback(null, ok(call.request));
    };
  const unimplemented = <Req, Res>(_call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>): void =>
    callback({ code: status.UNIMPLEMENTED, details: "fake" });
  const impl: AdminServiceServer = {
    listInstances: answer("ListInstances", () => ({
      instances: [InstanceStatus.fromPartial({ info: { instanceId: "i-1" }, state: InstanceState.INSTANCE_STATE_ACTIVE })],
    })),
    cordonInstance: answer("CordonInstance", (req: { instanceId: string }) => ({
      instance: InstanceStatus.fromPartial({ info: { instanceId: req.instanceId }, state: InstanceState.INSTANCE_STATE_CORDONED }),
    })),
    listClusterRequests: unimplemented,
    migrateRequest: unimplemented,
    drainInstance: unimplemented,
    uncordonInstance: unimplemented,
    scale: unimplemented,
    getConfig: unimplemented,
    setConfig: unimplemented,
    getLeader: unimplemented,
    resignLeader: unimplemented,
  };
  const server = new Server();
  server.addService(AdminServiceService, impl);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", creds, (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { server, address: `127.0.0.1:${port}`, calls, authorization };
}

/** An address nothing listens on (a server bound, then shut down). */
async function deadAddress(): Promise<string> {
  const fake = await serve("leader");
  fake.server.forceShutdown();
  return fake.address;
}

describe("retry rules (fake replicas)", () => {
  let leader: Fake;
  let follower: Fake;
  let orphan: Fake;
  let broken: Fake;
  const clients: LlumnixClient[] = [];
  const make = (endpoints: string[], apiKey?: string): LlumnixClient => {
    const c = new LlumnixClient({ schedulerEndpoints: endpoints, timeoutMs: 3000, apiKey });
    clients.push(c);
    return c;
  };

  before(async () => {
    leader = await serve("leader");
    follower = await serve("follower", leader.address);
    orphan = await serve("orphan");
    broken = await serve("broken");
  });
  after(() => {
    for (const c of clients) c.close();
    for (const f of [leader, follower, orphan, broken]) f.server.forceShutdown();
  });

  test("a follower's refusal is followed to the leader it names, which is then tried first", async () => {
    const c = make([follower.address], "sekret");
    const st = await c.cordon("i-1");
    assert.equal(st?.state, InstanceState.INSTANCE_STATE_CORDONED);
    assert.equal(follower.calls.CordonInstance, 1);
    assert.equal(leader.calls.CordonInstance, 1);
    assert.equal(c.schedulerPool.leaderHint, leader.address);
    await c.cordon("i-1");
    assert.equal(follower.calls.CordonInstance, 1, "the remembered leader is tried first");
    assert.deepEqual(leader.authorization.slice(-2), ["Bearer sekret", "Bearer sekret"]);
  });

  test("a write that was sent and broke is not re-sent; a read is retried elsewhere", async () => {
    const c = make([broken.address, leader.address]);
    const before = leader.calls.CordonInstance ?? 0;
    await assert.rejects(c.cordon("i-1"), (err: unknown) => {
      assert.ok(err instanceof UnavailableError, String(err));
      assert.equal(err.mayHaveStarted, true);
      return true;
    });
    assert.equal(broken.calls.CordonInstance, 1);
    assert.equal(leader.calls.CordonInstance ?? 0, before, "the write was re-sent elsewhere");
    const instances = await make([broken.address, leader.address]).listInstances();
    assert.equal(instances[0].info?.instanceId, "i-1");
    assert.ok((broken.calls.ListInstances ?? 0) >= 1);
  });

  test("an endpoint that never connects is skipped, also for writes", async () => {
    const c = make([await deadAddress(), leader.address]);
    const before = leader.calls.CordonInstance ?? 0;
    await c.cordon("i-1");
    assert.equal(leader.calls.CordonInstance, before + 1);
  });

  test("replicas that know no leader give NoLeaderError; nothing reachable gives UnavailableError", async () => {
    await assert.rejects(make([orphan.address]).cordon("i-1"), NoLeaderError);
    const dead = [await deadAddress(), await deadAddress()];
    await assert.rejects(make(dead).listInstances(), (err: unknown) => {
      assert.ok(err instanceof UnavailableError && !(err instanceof NoLeaderError), String(err));
      assert.deepEqual(err.endpoints, dead);
      return true;
    });
  });

  test("with no endpoints the client context file gives them and the API key; unsafe or unknown contexts refused", async () => {
    const dir = mkdtempSync(join(tmpdir(), "llumnix-ctx-"));
    try {
      const file = join(dir, "context.yaml");
      const yaml = [
        "current-context: dev",
        "contexts:",
        "- name: other",
        "  scheduler: [127.0.0.1:1]",
        "- name: dev",
        "  cluster: llumnix",
        `  scheduler: [${follower.address}]`,
        "  api_key: llx_from_context",
        "",
      ].join("\n");
      writeFileSync(file, yaml, { mode: 0o600 });
      const c = new LlumnixClient({ contextFile: file, timeoutMs: 3000 });
      clients.push(c);
      assert.deepEqual(c.schedulerPool.endpoints, [follower.address]);
      await c.cordon("i-1"); // through the follower's redirect, with the context's key
      assert.equal(leader.authorization[leader.authorization.length - 1], "Bearer llx_from_context");
      assert.throws(() => new LlumnixClient({ contextFile: file, contextName: "nope" }), ContextError);
      chmodSync(file, 0o644);
      assert.throws(() => new LlumnixClient({ contextFile: file }), /accessible by others/);
      assert.throws(() => new LlumnixClient({ contextFile: join(dir, "missing.yaml") }), /give endpoints/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("endpoints are normalized; duplicate tokens across a migration are dropped by index", () => {
    assert.deepEqual(normalizeEndpoints(["grpc://a:1/", "a:1,b:2"]), ["a:1", "b:2"]);
    assert.throws(() => normalizeEndpoints("nohost"), /host:port/);
    const r = new GenerationResult();
    const base = { requestId: "r", finished: false, finishReason: undefined, usage: undefined };
    r.add({ ...base, text: "ab", tokenIds: [1, 2], firstTokenIndex: 0, instanceId: "i-1" });
    r.add({ ...base, text: "b", tokenIds: [2], firstTokenIndex: 1, instanceId: "i-2" });
    r.add({ ...base, text: "c", tokenIds: [3], firstTokenIndex: 2, instanceId: "i-2", finished: true, finishReason: "length" });
    assert.deepEqual(r.tokenIds, [1, 2, 3]);
    assert.equal(r.text, "abc");
    assert.deepEqual(r.instances, ["i-1", "i-2"]);
    assert.equal(r.finishReason, "length");
  });
});

/**
 * TLS material made by the pytest wrapper with the project's CA (pyllumnix.infra.security.ca): ca.pem, a scheduler
 * certificate (server.pem, server-key.pem) and an admin client certificate (client.pem, client-key.pem).
 */
const TLS_DIR = process.env.LLUMNIX_TEST_TLS_DIR;

describe("TLS, mTLS and API key (fake replica)", { skip: TLS_DIR ? false : "LLUMNIX_TEST_TLS_DIR not set" }, () => {
  const dir = TLS_DIR ?? "";
  const file = (name: string): string => join(dir, name);
  let replica: Fake;
  const clients: LlumnixClient[] = [];
  const make = (opts: ConstructorParameters<typeof LlumnixClient>[0]): LlumnixClient => {
    const c = new LlumnixClient({ timeoutMs: 3000, ...opts });
    clients.push(c);
    return c;
  };

  before(async () => {
    const creds = ServerCredentials.createSsl(
      readFileSync(file("ca.pem")),
      [{ private_key: readFileSync(file("server-key.pem")), cert_chain: readFileSync(file("server.pem")) }],
      true, // client certificates required, as llumnix serve will with security on
    );
    replica = await serve("leader", "", creds);
  });
  after(() => {
    for (const c of clients) c.close();
    replica?.server.forceShutdown();
  });

  test("mTLS with the client certificate and the API key as a Bearer token", async () => {
    const tls = tlsFromFiles({ ca: file("ca.pem"), cert: file("client.pem"), key: file("client-key.pem") });
    const c = make({ schedulerEndpoints: replica.address, tls, apiKey: "llx-test-key" });
    assert.equal((await c.cordon("i-9"))?.state, InstanceState.INSTANCE_STATE_CORDONED);
    assert.equal(replica.authorization[replica.authorization.length - 1], "Bearer llx-test-key");
    // the server name can be given when the address is not one the certificate names
    const byName = make({
      schedulerEndpoints: replica.address,
      tls: tlsFromFiles({ ca: file("ca.pem"), cert: file("client.pem"), key: file("client-key.pem"), serverName: "localhost" }),
    });
    assert.equal((await byName.listInstances())[0].info?.instanceId, "i-1");
  });

  test("no client certificate, or no TLS at all, is a clear UnavailableError and sends nothing", async () => {
    const before = replica.calls.CordonInstance ?? 0;
    const noCert = make({ schedulerEndpoints: replica.address, tls: tlsFromFiles({ ca: file("ca.pem") }) });
    await assert.rejects(noCert.cordon("i-9"), UnavailableError);
    const plain = make({ schedulerEndpoints: replica.address });
    await assert.rejects(plain.cordon("i-9"), UnavailableError);
    assert.equal(replica.calls.CordonInstance ?? 0, before);
    assert.throws(() => tlsFromFiles({ cert: file("client.pem") }), /together/);
  });
});
