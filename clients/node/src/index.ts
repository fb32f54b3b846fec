/** Public API of the Llumnix Node.js client. */
export * from "./client";
export * from "./context";
export * from "./errors";
export { CallKind, EndpointPool, LEADER_METADATA_KEY, leaderFromError, normalizeEndpoints, tlsFromFiles } from "./pool";
export type { PoolOptions, TlsOptions } from "./pool";
export * as admin from "../gen/llumnix/v1/admin";
export * as common from "../gen/llumnix/v1/common";
export * as config from "../gen/llumnix/v1/config";
export * as frontend from "../gen/llumnix/v1/frontend";
export * as llumlet from "../gen/llumnix/v1/llumlet";
export * as scheduler from "../gen/llumnix/v1/scheduler";
