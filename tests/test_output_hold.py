"""#20 lean token path, llumlet side: fewer, fuller stream messages per engine step.

Each message a llumlet writes on its output stream costs it and the frontend a fixed amount of CPU (gRPC, TLS, a
wake-up on each side), more than the tokens in it. Checked here: decode-only steps are held for the next step and go
out together (a held batch waits at most its hold, and a flush or the next submit sends it at once), first tokens
and finishes are never held, tokens stay exact; and a stream with outputs flowing carries its acknowledgement
requests on those outputs instead of on extra empty batches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from pyllumnix.data_plane.llumlet import output_push
from pyllumnix.data_plane.llumlet.llumlet import Llumlet
from pyllumnix.data_plane.llumlet.output_push import OutputPusher, PushSettings, QueuedOutput
from pyllumnix.protos.llumnix.v1 import common_pb2, frontend_pb2
from pyllumnix.tools.recording_sink import RecordingSink
from tests.test_llumlet_output_push import engine_request, slow_engine, until


class MessageSink(RecordingSink):
    """Records each stream message's outputs (empty ones too) and when it arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[float, list[common_pb2.RequestOutput]]] = []

    async def StreamOutputs(
        self,
        request_iterator: AsyncIterator[frontend_pb2.StreamOutputsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[frontend_pb2.StreamOutputsResponse]:
        async def recorded() -> AsyncIterator[frontend_pb2.StreamOutputsRequest]:
            async for message in request_iterator:
                if message.seq:  # (seq 0: a new stream's question, not a batch)
                    self.messages.append((time.monotonic(), list(message.batch.outputs)))
                yield message

        async for reply in super().StreamOutputs(recorded(), context):
            yield reply

    @property
    def empty(self) -> int:
        return sum(1 for _, outs in self.messages if not outs)


def output(rid: str, index: int) -> QueuedOutput:
    return QueuedOutput(rid, [100 + index], index)


async def test_decode_steps_share_a_message_while_first_tokens_and_finishes_go_at_once() -> None:
    """Old behaviour: one message per engine step (41 steps, ~41 messages)."""
    sink = MessageSink()
    address = await sink.start()
    llumlet = Llumlet(slow_engine(step_ms=20.0), "i", push=PushSettings(ack_interval_s=0.25))
    llumlet.start()
    try:
        await llumlet.add_request(engine_request("r", address, max_tokens=41))
        outs = await sink.wait("r", timeout=30)
        await llumlet.pusher.flush(address, timeout=5)
        assert sink.raw_indices("r") == list(range(41)), "every token once, in order"
        assert outs[0].first_token_index == 0 and len(outs[0].token_ids) == 1, "the first token was not held"
        assert outs[-1].finished and outs[-1].first_token_index + len(outs[-1].token_ids) == 41
        data = [outs for _, outs in sink.messages if outs]
        assert len(data) <= 25, f"{len(data)} messages for 41 steps: decode steps were not paired"
        assert llumlet.pusher.held >= 15
        # A finish is never held: the last message ends with it, and the message before it carried no later token.
        last = [o for o in data[-1] if o.request_id == "r"]
        assert last and last[-1].finished
    finally:
        await llumlet.stop()
        await sink.stop()


async def test_a_held_batch_goes_out_at_its_deadline_or_at_once_with_the_next_submit_or_a_flush() -> None:
    """Old behaviour: ``submit`` took no hold (TypeError)."""
    sink = MessageSink()
    address = await sink.start()
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(ack_interval_s=60.0, stream_interval=2))
    try:
        pusher.submit(address, [output("r", 0)])
        await until(lambda: len(sink.messages) == 1, 5, "the unheld first output")
        # Alone, a held batch waits for its deadline (no next step came), then goes.
        start = time.monotonic()
        pusher.submit(address, [output("r", 1)], hold_s=0.3)
        await asyncio.sleep(0.1)
        assert len(sink.messages) == 1, "sent before its hold ended"
        await until(lambda: len(sink.messages) == 2, 5, "the held output after its deadline")
        assert sink.messages[1][0] - start >= 0.29
        # The next submit sends both together, long before the hold would end.
        start = time.monotonic()
        pusher.submit(address, [output("r", 2)], hold_s=30.0)
        pusher.submit(address, [output("r", 3)], hold_s=30.0)
        await until(lambda: len(sink.messages) == 3, 5, "the pair")
        assert time.monotonic() - start < 5
        (merged,) = sink.messages[2][1]
        assert merged.first_token_index == 2 and list(merged.token_ids) == [102, 103]
        # A flush (a migration's, a shutdown's) sends a held batch at once.
        pusher.submit(address, [output("r", 4)], hold_s=30.0)
        await pusher.flush(address, timeout=5)
        assert sink.raw_indices("r") == [0, 1, 2, 3, 4]
    finally:
        await pusher.close()
        await sink.stop()


async def test_a_flush_waits_for_held_outputs_an_empty_ask_went_out_before() -> None:
    """REVIEW19-1: the quiet gap's empty ask was marked with every submit so far, held outputs still unsent included;
    its answer settled them, so a flush (the migration's barrier before its commit) returned before they were even
    written, and they reached the frontend after the request had moved on (a gap in its stream)."""
    sink = MessageSink()
    address = await sink.start()
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(ack_interval_s=0.05))
    try:
        pusher.submit(address, [output("r", 0)])
        await until(lambda: len(sink.messages) == 1, 5, "the first output")
        pusher.submit(address, [output("r", 1)], hold_s=30.0)  # held: a slow decode step's
        await until(lambda: len(sink.messages) == 2 and sink.empty == 1, 5, "the quiet gap's empty ask")
        await pusher.flush(address, timeout=5)
        assert sink.raw_indices("r") == [0, 1], "the flush returned before the held output was delivered"
    finally:
        await pusher.close()
        await sink.stop()


async def test_a_flowing_stream_asks_for_answers_on_its_outputs_not_on_empty_batches() -> None:
    """Old behaviour: the ask's timer rang between two batches, and an empty batch asked (here ~1 per 0.5 s, so ~5
    over the 2.4 s stream). The 0.5 s interval is ~16 times the 30 ms gap between outputs: a loaded CI stalls the
    loop for far less, so a quiet gap (and an honest empty ask) does not open mid-stream."""
    sink = MessageSink()
    address = await sink.start()
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(ack_interval_s=0.5))
    try:
        for i in range(80):
            pusher.submit(address, [output("r", i)])
            await asyncio.sleep(0.03)
        await pusher.flush(address, timeout=5)
        assert sink.raw_indices("r") == list(range(80))
        assert sink.empty <= 1, f"{sink.empty} empty asking batches on a flowing stream"
        assert pusher.pushed == 80, "every batch was acknowledged"
        # A quiet stream still asks: an output, then nothing; the batch is answered without a flush.
        pusher.submit(address, [output("r", 80)])
        await until(lambda: pusher.pushed == 81, 5, "the quiet stream's answer")
    finally:
        await pusher.close()
        await sink.stop()


async def test_stream_interval_steps_share_one_message_and_the_hold_moves_with_each_step() -> None:
    """Old behaviour: at most two steps per message (the second submit always sent), no ``stream_interval``."""
    sink = MessageSink()
    address = await sink.start()
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(ack_interval_s=60.0, stream_interval=4))
    try:
        pusher.submit(address, [output("r", 0)])
        await until(lambda: len(sink.messages) == 1, 5, "the unheld first output")
        # Three held steps 0.8 s apart, each held 2 s: together longer than one hold, so the deadline must move with
        # each step (a deadline kept from the first would send the first three at 2 s, before the fourth).
        for i in (1, 2, 3):
            pusher.submit(address, [output("r", i)], hold_s=2.0)
            await asyncio.sleep(0.8)
        assert len(sink.messages) == 1, "a held step went out before the fourth"
        pusher.submit(address, [output("r", 4)], hold_s=2.0)  # the fourth step sends the four together
        await until(lambda: len(sink.messages) == 2, 5, "the four steps")
        (merged,) = sink.messages[1][1]
        assert merged.first_token_index == 1 and list(merged.token_ids) == [101, 102, 103, 104]
        # A submit without a hold (a first token, a finish) sends what is held with it at once.
        pusher.submit(address, [output("r", 5)], hold_s=30.0)
        pusher.submit(address, [output("r", 6)], hold_s=30.0)
        pusher.submit(address, [output("r", 7)])
        await until(lambda: len(sink.messages) == 3, 5, "the held steps with the unheld one")
        assert [list(o.token_ids) for o in sink.messages[2][1]] == [[105, 106, 107]]
        assert sink.raw_indices("r") == list(range(8))
    finally:
        await pusher.close()
        await sink.stop()


async def test_stream_interval_one_holds_nothing() -> None:
    sink = MessageSink()
    address = await sink.start()
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(ack_interval_s=60.0, stream_interval=1))
    try:
        for i in range(3):
            pusher.submit(address, [output("r", i)], hold_s=30.0)
            await until(lambda i=i: len(sink.messages) == i + 1, 5, f"step {i} on its own")
        assert pusher.held == 0 and sink.raw_indices("r") == [0, 1, 2]
    finally:
        await pusher.close()
        await sink.stop()
    with pytest.raises(ValueError, match="stream_interval"):
        PushSettings(stream_interval=0)


async def test_a_llumlet_sends_stream_interval_steps_per_message_by_default() -> None:
    """Old behaviour: two decode steps per message (41 steps: ~21 messages)."""
    sink = MessageSink()
    address = await sink.start()
    llumlet = Llumlet(slow_engine(step_ms=20.0), "i", push=PushSettings(ack_interval_s=0.25))
    llumlet.start()
    try:
        await llumlet.add_request(engine_request("r", address, max_tokens=41))
        outs = await sink.wait("r", timeout=30)
        await llumlet.pusher.flush(address, timeout=5)
        assert sink.raw_indices("r") == list(range(41)), "every token once, in order"
        assert outs[0].first_token_index == 0 and len(outs[0].token_ids) == 1, "the first token was not held"
        assert outs[-1].finished
        data = [outs for _, outs in sink.messages if outs]
        # 1 first token + 40 decode steps in groups of 4 = 11; a few groups cut short by a late step are fine.
        assert len(data) <= 15, f"{len(data)} messages for 41 steps: not stream_interval steps per message"
    finally:
        await llumlet.stop()
        await sink.stop()


async def test_a_flowing_stream_sets_no_timer_that_rings_between_its_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """While outputs flow, the empty ask waits for a quiet gap: no timer of the sender rings between batches. Old
    behaviour: a timer at each answer's ``ack_interval_s`` rang mid-flow (~8 times in 2.4 s at 0.25 s) only to
    re-arm for the quiet gap, an event-loop wake-up each."""
    rings = 0
    ring = output_push._ring

    def counted(sink: Any) -> None:
        nonlocal rings
        rings += 1
        ring(sink)

    monkeypatch.setattr(output_push, "_ring", counted)
    sink = MessageSink()
    address = await sink.start()
    pusher = OutputPusher("i", lambda _: None, settings=PushSettings(ack_interval_s=0.25))
    try:
        for i in range(80):
            pusher.submit(address, [output("r", i)])
            await asyncio.sleep(0.03)
        flowing = rings
        await pusher.flush(address, timeout=5)
        assert sink.raw_indices("r") == list(range(80))
        assert pusher.pushed == 80, "every batch was acknowledged (the asks rode on the outputs)"
        assert flowing <= 1, f"the sender's timer rang {flowing} times while outputs flowed"
        # A quiet stream still asks: an output, then nothing; its timer rings and the batch is answered.
        pusher.submit(address, [output("r", 80)])
        await until(lambda: pusher.pushed == 81, 5, "the quiet stream's answer")
        assert rings > flowing
    finally:
        await pusher.close()
        await sink.stop()
