"""The path watcher over real models (no servers)."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

import pytest

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import reload
from relayrl_runtime.inference import model


def test_a_pinned_path_never_loads_another_version(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory is replaced between the watcher's look at its metadata (the pinned
    version 3) and the load (version 2 by then): the pin holds, the model stays."""
    agent = agent_mod.Agent(models["onnx"], actor_count=1)
    try:
        watcher = reload.PathWatcher(agent, models["onnx_v2"], poll_seconds=60, version=3)
        real = model.read_metadata(models["onnx_v2"])
        # What the watcher reads; the loader reads the directory as it is.
        seen = types.SimpleNamespace(
            METADATA_FILE=model.METADATA_FILE,
            read_metadata=lambda path: real.model_copy(update={"version": 3}),
        )
        monkeypatch.setattr(reload, "model", seen)
        asyncio.run(watcher.check())
        assert agent.get_model_version() == 1
        assert watcher.refused is not None
        assert "version: expected 3, got 2" in watcher.refused.reason
    finally:
        agent.shutdown()
