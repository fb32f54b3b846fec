"""Capability tokens (who holds a request), one-time transfer tokens (data plane) and leader-term fencing (pure)."""

from __future__ import annotations

import pytest

from pyllumnix.infra.security.fencing import (
    StaleTermError,
    TermFence,
    check_term,
    term_from_metadata,
    term_metadata,
)
from pyllumnix.infra.security.tokens import (
    CapabilityTokens,
    TokenError,
    TransferTokens,
    new_secret,
)

SECRET = new_secret()


def caps(cluster: str = "c1", secret: bytes = SECRET) -> CapabilityTokens:
    return CapabilityTokens(secret, cluster)


def test_capability_accepts_its_holder_and_request() -> None:
    token = caps().issue("r-1", "i-1")
    cap = caps().verify(token, request_id="r-1", holder_instance_id="i-1")
    assert (cap.request_id, cap.holder_instance_id, cap.generation) == ("r-1", "i-1", 0)


@pytest.mark.parametrize(
    ("request_id", "holder", "message"),
    [
        ("r-2", "i-1", "is for request 'r-1', not 'r-2'"),
        ("r-1", "i-2", "was issued to 'i-1', not to the caller 'i-2'"),
    ],
)
def test_capability_rejects_wrong_request_or_holder(request_id: str, holder: str, message: str) -> None:
    token = caps().issue("r-1", "i-1")
    with pytest.raises(TokenError, match=message):
        caps().verify(token, request_id=request_id, holder_instance_id=holder)


def tamper(token: str) -> list[str]:
    """Variants of ``token`` an attacker could make: payload rewritten (holder swapped), MAC flipped, truncated."""
    version, payload, mac = token.split(".")
    import base64

    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).replace(b"i-1", b"i-9")
    forged = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    flipped = mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")
    return [f"{version}.{forged}.{mac}", f"{version}.{payload}.{flipped}", f"{version}.{payload}", "garbage", ""]


@pytest.mark.parametrize("index", range(5))
def test_capability_rejects_tampering(index: int) -> None:
    bad = tamper(caps().issue("r-1", "i-1"))[index]
    with pytest.raises(TokenError):
        caps().verify(bad, request_id="r-1", holder_instance_id="i-9" if index == 0 else "i-1")


def test_capability_rejects_other_secret_other_cluster_and_other_kind() -> None:
    token = caps().issue("r-1", "i-1")
    with pytest.raises(TokenError, match="signature is invalid"):
        caps(secret=new_secret()).verify(token, request_id="r-1", holder_instance_id="i-1")
    with pytest.raises(TokenError, match="belongs to cluster 'c1', not 'c2'"):
        caps("c2").verify(token, request_id="r-1", holder_instance_id="i-1")
    transfer = TransferTokens(SECRET, "c1").issue("m-1", source_instance_id="i-1")
    with pytest.raises(TokenError, match="not a cap token"):
        caps().verify(transfer, request_id="r-1", holder_instance_id="i-1")
    with pytest.raises(ValueError):
        CapabilityTokens(b"short", "c1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_transfer_token_is_one_time_and_bound() -> None:
    clock = Clock()
    tokens = TransferTokens(SECRET, "c1", ttl=10, clock=clock)
    token = tokens.issue("m-1", source_instance_id="i-1")
    with pytest.raises(TokenError, match="for migration 'm-1', not 'm-2'"):
        tokens.consume(token, migration_id="m-2", source_instance_id="i-1")
    with pytest.raises(TokenError, match="issued to source 'i-1', not 'i-3'"):
        tokens.consume(token, migration_id="m-1", source_instance_id="i-3")
    tokens.consume(token, migration_id="m-1", source_instance_id="i-1")
    with pytest.raises(TokenError, match="already used"):
        tokens.consume(token, migration_id="m-1", source_instance_id="i-1")
    late = tokens.issue("m-1", source_instance_id="i-1")
    clock.now += 10.5
    with pytest.raises(TokenError, match=r"expired 0\.5 s ago"):
        tokens.consume(late, migration_id="m-1", source_instance_id="i-1")
    with pytest.raises(TokenError, match="signature"):
        TransferTokens(new_secret(), "c1", clock=clock).consume(
            tokens.issue("m-1", source_instance_id="i-1"), migration_id="m-1", source_instance_id="i-1"
        )


def test_check_term() -> None:
    assert check_term(5, 0) == 5
    assert check_term(5, 5) == 5
    assert check_term(7, 5) == 7
    with pytest.raises(StaleTermError, match="term 4 < 5"):
        check_term(4, 5)
    for missing in (None, 0, -1):
        with pytest.raises(StaleTermError, match="carries no leader term"):
            check_term(missing, 5)


def test_term_fence_and_metadata() -> None:
    fence = TermFence()
    assert fence.admit(term_from_metadata(term_metadata(12))) == 12
    assert fence.admit(term_from_metadata([("x", "y"), ("llumnix-term", b"13")])) == 13
    with pytest.raises(StaleTermError):
        fence.admit(term_from_metadata(term_metadata(12)))
    assert fence.highest_seen == 13
    assert term_from_metadata([("llumnix-term", "abc")]) is None
    assert term_from_metadata(None) is None
    with pytest.raises(ValueError):
        term_metadata(0)
