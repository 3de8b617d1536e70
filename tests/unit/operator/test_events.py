"""Events about Agents: what is posted, and that a failed post is only logged."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from relayrl_operator import constants, events, kube
from relayrl_operator.builders import common
from relayrl_runtime import spec

AGENT = common.AgentRef(
    name="cartpole",
    namespace="ml",
    uid="uid-1",
    generation=1,
    spec=spec.parse_spec(
        {
            "model": {"uri": "file:///m", "format": "onnx"},
            "environment": {"gymnasium": {"id": "CartPole-v1"}},
        }
    ),
)


class Client:
    """Records each request; raises `error` instead when set."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.requests: list[tuple[str, str, dict[str, Any]]] = []

    async def request(self, method: str, path: str, *, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((method, path, body))
        if self.error is not None:
            raise self.error
        return {}


async def test_an_event_names_the_agent_and_carries_a_bounded_message() -> None:
    client = Client()
    posting = events.Events(client)  # type: ignore[arg-type]
    posting.post(AGENT, "Warning", "ReconcileFailed", "x" * 5000)
    await posting.drain(within=5)
    [(method, path, body)] = client.requests
    assert (method, path) == ("POST", "/api/v1/namespaces/ml/events")
    assert body["involvedObject"] == {
        "apiVersion": spec.API_VERSION,
        "kind": spec.KIND,
        "name": "cartpole",
        "namespace": "ml",
        "uid": "uid-1",
    }
    assert (body["type"], body["reason"]) == ("Warning", "ReconcileFailed")
    assert body["message"] == "x" * 1024
    assert body["source"] == {"component": constants.OPERATOR_NAME}


@pytest.mark.parametrize(
    "error",
    [
        kube.ApiError(403, "Forbidden", "events is forbidden"),
        kube.ApiError(503, "Unavailable", "POST: ServerDisconnectedError()"),
        ConnectionResetError("reset by peer"),
        TimeoutError(),
    ],
    ids=["refused", "unavailable", "socket error", "timed out"],
)
async def test_an_event_that_cannot_be_posted_leaves_no_failed_task(error: BaseException) -> None:
    unhandled: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    try:
        client = Client(error)
        posting = events.Events(client)  # type: ignore[arg-type]
        posting.post(AGENT, "Normal", "SpecApplied", "actors 4 -> 8")
        await posting.drain(within=5)
        gc.collect()  # a task that ended in an exception nobody read is reported here
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert len(client.requests) == 1
    assert unhandled == []
