/**
 * The Node client against a live `llumnix serve` cluster (sim engines): a streamed completion, a live migration
 * followed token-exact, the admin calls, and leader changes (a graceful resign and a SIGKILLed leader).
 *
 * The sim engine's tokens are a deterministic function of seed, position and previous token, so a migrated stream
 * with a gap or a duplicate cannot equal the undisturbed reference run.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  common,
  GenerationResult,
  llumlet,
  LlumnixClient,
  LlumnixError,
  NoLeaderError,
  NotFoundError,
  UnavailableError,
  type GenerationChunk,
} from "../src";
import { serveStatus, startCluster, type Cluster } from "./cluster";

let cluster: Cluster;
let client: LlumnixClient;

before(async () => {
  cluster = await startCluster();
  // No endpoints: everything (addresses, CA, admin certificate, API key) comes from serve's context file.
  client = new LlumnixClient({ contextFile: cluster.contextFile, timeoutMs: 10_000, generateTimeoutMs: 120_000 });
  assert.deepEqual(client.schedulerPool.endpoints, cluster.schedulers);
  assert.deepEqual(client.frontendPool.endpoints, cluster.frontends);
});

after(async () => {
  client?.close();
  await cluster?.stop();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls `check` until it returns a value; fails naming `what` after `timeoutMs`. */
async function waitFor<T>(check: () => Promise<T | undefined>, timeoutMs: number, what: string): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

/** The instances once the leader has a load report of each (a new leader lists them as STARTING until then). */
async function allActive(): Promise<Awaited<ReturnType<LlumnixClient["listInstances"]>>> {
  return waitFor(
    async () => {
      const found = await client.listInstances();
      return found.length === 4 && found.every((i) => i.state === common.InstanceState.INSTANCE_STATE_ACTIVE)
        ? found
        : undefined;
    },
    20_000,
    "4 active instances",
  );
}

async function stateOf(instanceId: string): Promise<common.InstanceState | undefined> {
  return (await client.listInstances()).find((i) => i.info?.instanceId === instanceId)?.state;
}

describe("llumnix node client (live cluster)", () => {
  test("streams a completion chunk by chunk", async () => {
    const chunks: GenerationChunk[] = [];
    for await (const chunk of client.generate("The quick brown fox", { maxTokens: 24, seed: 7, requestId: "node-stream-1" })) {
      chunks.push(chunk);
    }
    assert.ok(chunks.length > 1, `expected several chunks, got ${chunks.length}`);
    const last = chunks[chunks.length - 1];
    assert.equal(last.finished, true);
    assert.equal(last.finishReason, "length");
    assert.equal(last.usage?.completionTokens, 24);
    assert.ok(chunks.every((c) => c.requestId === "node-stream-1"));
    // indices are contiguous: each chunk starts where the previous ones ended
    let next = 0;
    for (const c of chunks) {
      if (c.tokenIds.length === 0) continue;
      assert.equal(c.firstTokenIndex, next);
      next += c.tokenIds.length;
    }
    assert.equal(next, 24);
    // the same prompt and seed give the same tokens (the reference the migration test relies on)
    const again = await client.generateText("The quick brown fox", { maxTokens: 24, seed: 7 });
    assert.deepEqual(again.tokenIds, chunks.flatMap((c) => c.tokenIds));
    assert.equal(again.text, chunks.map((c) => c.text).join(""));
  });

  test("the secure cluster refuses a client without credentials, clearly", async () => {
    const plain = new LlumnixClient({
      frontendEndpoints: cluster.frontends,
      schedulerEndpoints: cluster.schedulers,
      timeoutMs: 3_000,
    });
    try {
      await assert.rejects(plain.listInstances(), UnavailableError);
      await assert.rejects(plain.generateText("hello", { maxTokens: 2 }), UnavailableError);
    } finally {
      plain.close();
    }
  });

  test("bad input gets a clear error and abort of an unknown request is NOT_FOUND", async () => {
    await assert.rejects(client.generateText("hello", { maxTokens: 0 }), (err: unknown) => {
      assert.ok(err instanceof LlumnixError && err.code === "INVALID_ARGUMENT", String(err));
      return true;
    });
    await assert.rejects(client.abort("node-no-such-request"), NotFoundError);
  });

  test("aborting a running stream ends it with finish reason abort", async () => {
    const stream = client.generate("abort me please", { maxTokens: 400, seed: 3, requestId: "node-abort-1" });
    const first = await stream.next();
    assert.equal(first.done, false);
    await client.abort("node-abort-1");
    let reason: string | undefined;
    for await (const chunk of stream) if (chunk.finished) reason = chunk.finishReason;
    assert.equal(reason, "abort");
  });

  test("lists instances and requests; admin reads and writes", async () => {
    const instances = await allActive();
    const ids = instances.map((i) => i.info?.instanceId).sort();
    assert.deepEqual(ids, ["instance-0", "instance-1", "instance-2", "instance-3"]);
    assert.ok(instances.every((i) => i.state === common.InstanceState.INSTANCE_STATE_ACTIVE));

    const cordoned = await client.cordon("instance-3");
    assert.equal(cordoned?.state, common.InstanceState.INSTANCE_STATE_CORDONED);
    const back = await client.uncordon("instance-3");
    assert.equal(back?.state, common.InstanceState.INSTANCE_STATE_ACTIVE);
    await assert.rejects(client.cordon("instance-404"), NotFoundError);

    const leader = await client.leader();
    assert.ok(leader.leaderId && cluster.schedulers.includes(leader.leaderAddress), JSON.stringify(leader));

    const before = await client.getConfig();
    const threshold = before.config?.migration?.migrateOutThreshold ?? 0;
    const set = await client.setConfig(
      { migration: { migrateOutThreshold: threshold + 1.5 } },
      { paths: ["migration.migrate_out_threshold"] },
    );
    assert.equal(set.config?.migration?.migrateOutThreshold, threshold + 1.5);
    assert.ok(BigInt(set.revision) > BigInt(before.revision));
    const restored = await client.setConfig(
      { migration: { migrateOutThreshold: threshold } },
      { paths: ["migration.migrate_out_threshold"], expectedRevision: set.revision },
    );
    assert.equal(restored.config?.migration?.migrateOutThreshold, threshold);
    // a compare-and-swap against a stale revision is refused and applies nothing
    await assert.rejects(
      client.setConfig(
        { migration: { migrateOutThreshold: 99 } },
        { paths: ["migration.migrate_out_threshold"], expectedRevision: set.revision },
      ),
      (err: unknown) => err instanceof LlumnixError && err.code === "ABORTED",
    );
    assert.equal((await client.getConfig()).config?.migration?.migrateOutThreshold, threshold);
  });

  test("follows a live migration token-exact", async () => {
    const prompt = "The quick brown fox jumps";
    const reference = await client.generateText(prompt, { maxTokens: 250, seed: 42 });
    assert.equal(reference.tokenIds.length, 250);

    const stream = client.generate(prompt, { maxTokens: 250, seed: 42, requestId: "node-mig-1" });
    const chunks: GenerationChunk[] = [];
    const first = await stream.next();
    assert.equal(first.done, false);
    chunks.push(first.value as GenerationChunk);
    const source = await waitFor(
      async () => (await client.listRequests()).find((r) => r.request?.requestId === "node-mig-1")?.instanceId,
      10_000,
      "node-mig-1 in the cluster's request list",
    );
    const target = (await client.listInstances()).map((i) => i.info!.instanceId).find((id) => id !== source)!;
    // consume concurrently so the stream keeps flowing while the migration runs
    const consumed = (async () => {
      for await (const chunk of stream) chunks.push(chunk);
    })();
    const moved = await client.migrate("node-mig-1", target);
    assert.equal(moved.outcome, llumlet.MigrationOutcome.MIGRATION_OUTCOME_COMMITTED, JSON.stringify(moved));
    assert.equal(moved.sourceInstanceId, source);
    await consumed;

    const result = new GenerationResult();
    for (const c of chunks) result.add(c);
    assert.equal(result.finishReason, "length");
    assert.deepEqual(result.instances, [source, target]);
    assert.deepEqual(result.tokenIds, reference.tokenIds);
    assert.equal(result.text, reference.text);
  });

  test("survives leader changes: a graceful resign and a SIGKILLed leader", async () => {
    const old = await client.leader();
    const resigned = await client.resignLeader();
    assert.equal(resigned.resigned?.replicaId, old.leaderId);
    const next = await waitFor(
      async () => {
        const l = await client.leader().catch(() => undefined);
        return l && l.leaderId && l.leaderId !== old.leaderId ? l : undefined;
      },
      15_000,
      "a new leader after the resign",
    );
    assert.ok(BigInt(next.term) > BigInt(old.term));
    await allActive();
    // a write goes to the new leader (directly or through a follower's redirect)
    assert.equal((await client.cordon("instance-2"))?.state, common.InstanceState.INSTANCE_STATE_CORDONED);
    assert.equal((await client.uncordon("instance-2"))?.state, common.InstanceState.INSTANCE_STATE_ACTIVE);
    // the resigned replica stays out of the election for hold_off_ms: wait it out so it is a standby again
    await sleep(resigned.holdOffMs + 500);

    // hard failover: SIGKILL the leader by the pid serve reports, with a stream running through the frontend
    const victim = serveStatus(cluster).components.find((c) => c.name === next.leaderId);
    assert.ok(victim, `leader ${next.leaderId} not in serve.json`);
    const streaming = client.generateText("streaming through a failover", { maxTokens: 120, seed: 5 });
    const killedAt = Date.now();
    process.kill(victim.pid, "SIGKILL");
    // until a standby takes over, calls fail with a clear error (never a hang); then they succeed again
    const errors: string[] = [];
    await waitFor(
      async () => {
        try {
          return await client.cordon("instance-1");
        } catch (err) {
          assert.ok(err instanceof NoLeaderError || err instanceof UnavailableError, `unexpected error: ${err}`);
          errors.push((err as Error).constructor.name);
          return undefined;
        }
      },
      20_000,
      "a write to succeed after the leader was killed",
    );
    const tookMs = Date.now() - killedAt;
    const after = await client.leader();
    assert.ok(BigInt(after.term) > BigInt(next.term), `term ${after.term} after ${next.term}`);
    await waitFor(
      async () => ((await stateOf("instance-1")) === common.InstanceState.INSTANCE_STATE_CORDONED ? true : undefined),
      20_000,
      "instance-1 cordoned under the new leader",
    );
    await client.uncordon("instance-1");
    await allActive();
    const done = await streaming;
    assert.equal(done.finishReason, "length");
    assert.equal(done.tokenIds.length, 120);
    console.log(
      `leader ${next.leaderId} killed: writes succeeded again after ${tookMs} ms (${errors.length} failed tries), ` +
        `leader now ${after.leaderId} (term ${after.term})`,
    );
  });
});
