"""kube.Client.watch against a local HTTP server that sends a watch answer in pieces.

The apiserver writes one JSON event per line, but the network cuts the answer where it
likes: several lines in one read, a line over several reads, a read ending on the
newline. The server here sends such pieces with pauses between them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from relayrl_operator import kube
from support import webstub

EVENTS: list[dict[str, Any]] = [
    {"type": "ADDED", "object": {"metadata": {"name": "a", "resourceVersion": "1"}}},
    {"type": "MODIFIED", "object": {"metadata": {"name": "a", "resourceVersion": "2"}}},
    {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "3"}}},
    {"type": "DELETED", "object": {"metadata": {"name": "a", "resourceVersion": "4"}}},
]


def pieces() -> list[bytes]:
    lines = [json.dumps(e).encode() + b"\n" for e in EVENTS]
    third = lines[2]
    return [
        lines[0] + lines[1][:10],  # a whole line and the start of the next
        lines[1][10:],  # ends on the newline
        third[:5],  # one line over three pieces
        third[5:12],
        third[12:] + lines[3],
    ]


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def watch(request: web.Request) -> web.StreamResponse:
        assert request.query["watch"] == "true"
        assert request.query["resourceVersion"] == "7"
        assert request.headers["Accept"] == "application/json"
        resp = web.StreamResponse()
        await resp.prepare(request)
        for piece in pieces():
            await resp.write(piece)
            await asyncio.sleep(0.05)  # so each piece is read on its own
        return resp

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ml/configmaps", watch)
    async with webstub.serving(app) as url:
        yield url


async def test_events_are_whole_however_the_answer_is_cut(server: str) -> None:
    client = kube.Client(server, {}, False)
    try:
        events = [
            e
            async for e in client.watch(
                kube.CONFIGMAP, "ml", {"resourceVersion": "7"}, "application/json"
            )
        ]
    finally:
        await client.close()
    assert events == EVENTS
