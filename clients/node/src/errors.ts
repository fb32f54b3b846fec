/**
 * Errors of the client library: one class per gRPC status a caller may want to handle (the same classes as the
 * Python client's `pyllumnix.clients.errors`), so callers never need to inspect grpc-js errors.
 */
import { status, type ServiceError } from "@grpc/grpc-js";

/** Base of every client error; `code` is the gRPC status name ("NOT_FOUND", ...) or "" for local errors. */
export class LlumnixError extends Error {
  code: string = "";
  readonly details: string;
  readonly endpoint: string;

  constructor(message: string, opts: { details?: string; endpoint?: string } = {}) {
    super(message);
    this.name = new.target.name;
    this.details = opts.details || message;
    this.endpoint = opts.endpoint ?? "";
  }
}

export class InvalidArgumentError extends LlumnixError {
  override code = "INVALID_ARGUMENT";
}
export class NotFoundError extends LlumnixError {
  override code = "NOT_FOUND";
}
export class AlreadyExistsError extends LlumnixError {
  override code = "ALREADY_EXISTS";
}
export class FailedPreconditionError extends LlumnixError {
  override code = "FAILED_PRECONDITION";
}
export class ResourceExhaustedError extends LlumnixError {
  override code = "RESOURCE_EXHAUSTED";
}
/** E.g. a config write whose expected revision is stale. */
export class AbortedError extends LlumnixError {
  override code = "ABORTED";
}
export class CancelledError extends LlumnixError {
  override code = "CANCELLED";
}
export class InternalError extends LlumnixError {
  override code = "INTERNAL";
}
export class UnauthenticatedError extends LlumnixError {
  override code = "UNAUTHENTICATED";
}
export class PermissionDeniedError extends LlumnixError {
  override code = "PERMISSION_DENIED";
}

/** The call's deadline passed; a write may or may not have been applied (`mayHaveStarted`). */
export class DeadlineExceededError extends LlumnixError {
  override code = "DEADLINE_EXCEEDED";
  readonly mayHaveStarted: boolean;

  constructor(message: string, opts: { details?: string; endpoint?: string; mayHaveStarted?: boolean } = {}) {
    super(message, opts);
    this.mayHaveStarted = opts.mayHaveStarted ?? true;
  }
}

/**
 * No endpoint could serve the call; `endpoints` lists every address tried. `mayHaveStarted` is true when a call that
 * is never re-sent (a write, a Generate) was sent before the connection broke: the server may have acted on it.
 */
export class UnavailableError extends LlumnixError {
  override code = "UNAVAILABLE";
  readonly endpoints: string[];
  readonly mayHaveStarted: boolean;

  constructor(
    message: string,
    opts: { endpoints?: string[]; details?: string; endpoint?: string; mayHaveStarted?: boolean } = {},
  ) {
    super(message, opts);
    this.endpoints = [...(opts.endpoints ?? [])];
    this.mayHaveStarted = opts.mayHaveStarted ?? false;
  }
}

/** Every scheduler replica reached refused the call as a follower and none named a reachable leader. */
export class NoLeaderError extends UnavailableError {}

const BY_CODE: Partial<Record<status, new (message: string, opts: { details?: string; endpoint?: string }) => LlumnixError>> = {
  [status.INVALID_ARGUMENT]: InvalidArgumentError,
  [status.OUT_OF_RANGE]: InvalidArgumentError,
  [status.NOT_FOUND]: NotFoundError,
  [status.ALREADY_EXISTS]: AlreadyExistsError,
  [status.FAILED_PRECONDITION]: FailedPreconditionError,
  [status.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [status.ABORTED]: AbortedError,
  [status.CANCELLED]: CancelledError,
  [status.INTERNAL]: InternalError,
  [status.UNKNOWN]: InternalError,
  [status.DATA_LOSS]: InternalError,
  [status.UNAUTHENTICATED]: UnauthenticatedError,
  [status.PERMISSION_DENIED]: PermissionDeniedError,
};

/** True for an error thrown by grpc-js for a call that ended with a status. */
export function isServiceError(err: unknown): err is ServiceError {
  return err instanceof Error && typeof (err as Partial<ServiceError>).code === "number" && "metadata" in err;
}

/** Maps a grpc-js error to the library's error (the server's details become the message). */
export function fromServiceError(
  err: ServiceError,
  opts: { endpoint?: string; endpoints?: string[]; mayHaveStarted?: boolean } = {},
): LlumnixError {
  const endpoint = opts.endpoint ?? "";
  const details = err.details ?? "";
  const where = endpoint ? ` (${endpoint})` : "";
  const mayHaveStarted = opts.mayHaveStarted ?? true;
  if (err.code === status.UNAVAILABLE) {
    return new UnavailableError(`unavailable${where}: ${details}`, {
      endpoints: opts.endpoints ?? (endpoint ? [endpoint] : []),
      details,
      endpoint,
      mayHaveStarted,
    });
  }
  if (err.code === status.DEADLINE_EXCEEDED) {
    return new DeadlineExceededError(`deadline exceeded${where}: ${details}`, { details, endpoint, mayHaveStarted });
  }
  const cls = BY_CODE[err.code];
  if (cls === undefined) {
    const out = new LlumnixError(details || status[err.code] || String(err.code), { details, endpoint });
    out.code = status[err.code] ?? String(err.code);
    return out;
  }
  return new cls(details || status[err.code], { details, endpoint });
}
