"""Whose a stream is: by its subjects (streams.check_owner)."""

from __future__ import annotations

import nats.js.api
import pytest

from relayrl_runtime import streams


def test_a_stream_under_the_agents_subjects_is_its_own_in_any_form() -> None:
    want = streams.stream_config("ml", "cartpole")
    for subjects in (
        ["relayrl.ml.cartpole.>"],
        ["relayrl.ml.cartpole.trajectories", "relayrl.ml.cartpole.deadletter"],
        [],
    ):
        have = nats.js.api.StreamConfig(name=want.name, subjects=subjects)
        streams.check_owner(want, have)


def test_another_agents_subjects_make_it_theirs() -> None:
    want = streams.stream_config("ml", "cartpole", override="shared")
    for other in ("relayrl.ml.cartpole2.>", "relayrl.ml.>", "relayrl.ml.cartpolex.trajectories"):
        have = nats.js.api.StreamConfig(name="shared", subjects=["relayrl.ml.cartpole.>", other])
        assert streams.foreign_subjects(want, have) == [other]
        with pytest.raises(streams.StreamConflictError, match="give this Agent a"):
            streams.check_owner(want, have)
