"""HolderLedger hand-overs along a chain of migrations (ATTACK10 F4): a request migrated a -> b is passed on b -> c
before b's first output reached the frontend, with the pending token b's commit gave it."""

from __future__ import annotations

import pytest

from pyllumnix.control_plane.frontend.requests import HolderLedger, StaleCapabilityError


def test_a_request_migrated_in_can_migrate_on_before_its_first_output() -> None:
    ledger = HolderLedger()
    token_a = ledger.grant("r", "a")
    token_b = ledger.hand_over(token_a, request_id="r", caller_instance_id="a", new_instance_id="b")
    assert ledger.holders("r") == ("a", "b")
    token_c = ledger.hand_over(token_b, request_id="r", caller_instance_id="b", new_instance_id="c")
    assert ledger.holders("r") == ("b", "c")
    # c's first output makes it the holder; a's and b's tokens are stale from then on
    assert ledger.check(token_c, request_id="r", caller_instance_id="c").holder_instance_id == "c"
    for caller, token in (("a", token_a), ("b", token_b)):
        with pytest.raises(StaleCapabilityError):
            ledger.check(token, request_id="r", caller_instance_id=caller)


def test_a_hand_over_by_a_holder_the_request_was_taken_from_is_refused() -> None:
    ledger = HolderLedger()
    token_a = ledger.grant("r", "a")
    token_b = ledger.hand_over(token_a, request_id="r", caller_instance_id="a", new_instance_id="b")
    ledger.check(token_b, request_id="r", caller_instance_id="b")  # b pushed: a's token is retired
    with pytest.raises(StaleCapabilityError):
        ledger.hand_over(token_a, request_id="r", caller_instance_id="a", new_instance_id="c")
    assert ledger.holders("r") == ("b",)
