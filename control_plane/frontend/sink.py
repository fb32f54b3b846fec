"""The OutputSinkService servicer: llumlets push outputs here; they go to the requests this frontend tracks."""

from __future__ import annotations

from typing import Any

import grpc

from pyllumnix.control_plane.frontend.requests import RequestTracker
from pyllumnix.protos.llumnix.v1 import frontend_pb2, frontend_pb2_grpc

SERVICE_NAME = "llumnix.v1.OutputSinkService"


class OutputSinkServicer(frontend_pb2_grpc.OutputSinkServiceServicer):
    """Unknown request ids go back to the pusher so it aborts them (the client left, or another frontend owns them)."""

    def __init__(self, tracker: RequestTracker) -> None:
        self.tracker = tracker
        self.pushes = 0

    async def PushOutputs(
        self, request: frontend_pb2.PushOutputsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> frontend_pb2.PushOutputsResponse:
        self.pushes += 1
        unknown = self.tracker.route(request.instance_id, request.outputs)
        return frontend_pb2.PushOutputsResponse(unknown_request_ids=unknown)
