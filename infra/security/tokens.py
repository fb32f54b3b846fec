"""Per-request capability tokens and one-time data-plane transfer tokens (HMAC-SHA256 with a cluster secret).

mTLS proves *which* llumlet is calling; a capability proves it *holds the request* it talks about. The frontend (the
only issuer: it keeps the secret, llumlets never see it) grants a token bound to (cluster, request, holder,
generation) with AddRequest; the llumlet sends it with every PushOutputs; the frontend's ledger
(``HolderLedger`` in ``control_plane/frontend/requests.py``) accepts an output only from the holder of the request's
current grant. A migration hands the request over: the source, still holding the current token, asks the frontend for
the destination's token (a new generation), which makes the source's token stale, so after the commit only the
destination can push. Generations are never reused, not even by a later request with the same id.

Transfer tokens guard the data plane: the destination issues one per migration when it reserves blocks and accepts
a data-plane connection only with an unused, unexpired token for that migration and source. Tokens are
``v1.<base64url payload>.<base64url mac>``; the payload is readable (for clear error messages) but not forgeable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

VERSION = "v1"
SECRET_BYTES = 32
_DOMAIN = b"llumnix-token-v1\0"


class TokenError(ValueError):
    """A token that does not authorize what it was shown for; the message says why."""


def new_secret() -> bytes:
    """A fresh 256-bit cluster secret."""
    return secrets.token_bytes(SECRET_BYTES)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class _Signer:
    def __init__(self, secret: bytes, cluster: str) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes (use new_secret())")
        self._secret = secret
        self.cluster = cluster

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, _DOMAIN + payload, hashlib.sha256).digest()

    def sign(self, fields: dict[str, Any]) -> str:
        payload = json.dumps({"c": self.cluster, **fields}, separators=(",", ":"), sort_keys=True).encode()
        return f"{VERSION}.{_b64(payload)}.{_b64(self._mac(payload))}"

    def open(self, token: str, kind: str) -> dict[str, Any]:
        """The payload of a genuine token of ``kind`` for this cluster; TokenError otherwise."""
        parts = token.split(".") if isinstance(token, str) else []
        if len(parts) != 3 or parts[0] != VERSION:
            raise TokenError(f"malformed {kind} token (expected {VERSION}.<payload>.<mac>)")
        try:
            payload, mac = _unb64(parts[1]), _unb64(parts[2])
        except (binascii.Error, ValueError):
            raise TokenError(f"malformed {kind} token (bad base64)") from None
        # Constant-time: the MAC is checked before anything in the payload is believed.
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise TokenError(f"{kind} token signature is invalid (tampered, or signed with another secret)")
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("k") != kind:
            raise TokenError(f"not a {kind} token")
        if data.get("c") != self.cluster:
            raise TokenError(f"{kind} token belongs to cluster {data.get('c')!r}, not {self.cluster!r}")
        return data


@dataclass(frozen=True)
class Capability:
    """What a genuine capability token says."""

    request_id: str
    holder_instance_id: str
    generation: int


class CapabilityTokens:
    """Issues and verifies per-request capability tokens (stateless: the frontend's ``HolderLedger`` keeps grants)."""

    KIND = "cap"

    def __init__(self, secret: bytes, cluster: str) -> None:
        self._signer = _Signer(secret, cluster)

    def issue(self, request_id: str, holder_instance_id: str, *, generation: int = 0) -> str:
        if not request_id or not holder_instance_id or generation < 0:
            raise ValueError("request_id and holder_instance_id must be non-empty, generation >= 0")
        return self._signer.sign({"k": self.KIND, "r": request_id, "h": holder_instance_id, "g": generation})

    def verify(self, token: str, *, request_id: str, holder_instance_id: str) -> Capability:
        """The token's capability if it is genuine and names this request and holder; TokenError saying why not."""
        data = self._signer.open(token, self.KIND)
        cap = Capability(str(data["r"]), str(data["h"]), int(data["g"]))
        if cap.request_id != request_id:
            raise TokenError(f"capability token is for request {cap.request_id!r}, not {request_id!r}")
        if cap.holder_instance_id != holder_instance_id:
            raise TokenError(
                f"capability token for request {request_id!r} was issued to {cap.holder_instance_id!r}, "
                f"not to the caller {holder_instance_id!r}"
            )
        return cap


class TransferTokens:
    """One-time data-plane tokens bound to a migration and its source, valid for ``ttl`` seconds.

    The destination issues (with its PreAllocate answer) and consumes (when the source's data connection opens or
    its first stage arrives); a token works once, so a replayed connection is refused.
    """

    KIND = "xfer"

    def __init__(
        self, secret: bytes, cluster: str, *, ttl: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._signer = _Signer(secret, cluster)
        self.ttl = ttl
        self._clock = clock
        self._used: dict[str, float] = {}  # nonce -> expiry, pruned as they expire

    def issue(self, migration_id: str, *, source_instance_id: str) -> str:
        if not migration_id or not source_instance_id:
            raise ValueError("migration_id and source_instance_id must be non-empty")
        expiry = self._clock() + self.ttl
        fields = {"k": self.KIND, "m": migration_id, "s": source_instance_id, "e": expiry, "n": _b64(os_nonce())}
        return self._signer.sign(fields)

    def consume(self, token: str, *, migration_id: str, source_instance_id: str) -> None:
        """Accepts ``token`` once for this migration and source; TokenError (why) otherwise."""
        data = self._signer.open(token, self.KIND)
        now = self._clock()
        self._prune(now)
        if data["m"] != migration_id:
            raise TokenError(f"transfer token is for migration {data['m']!r}, not {migration_id!r}")
        if data["s"] != source_instance_id:
            raise TokenError(f"transfer token was issued to source {data['s']!r}, not {source_instance_id!r}")
        if float(data["e"]) <= now:
            late = now - float(data["e"])
            raise TokenError(f"transfer token for migration {migration_id!r} expired {late:.1f} s ago")
        nonce = str(data["n"])
        if nonce in self._used:
            raise TokenError(f"transfer token for migration {migration_id!r} was already used")
        self._used[nonce] = float(data["e"])

    def _prune(self, now: float) -> None:
        for nonce in [n for n, e in self._used.items() if e <= now]:
            del self._used[nonce]


def os_nonce() -> bytes:
    return secrets.token_bytes(12)
