"""The agent API over real models and the local Parquet sink (no servers)."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors, spec, trajectory
from relayrl_runtime.inference import export, loader, model, policy
from relayrl_runtime.sinks import local


def _obs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def _read(sink: local.LocalFileSink) -> pa.Table:
    assert sink.files, "no trajectory files were written"
    table = pa.concat_tables([pq.read_table(f) for f in sink.files])
    return table.sort_by(
        [("actor_id", "ascending"), ("episode_id", "ascending"), ("step", "ascending")]
    )


@pytest.fixture
def sink(tmp_path: Path) -> local.LocalFileSink:
    return local.LocalFileSink(tmp_path / "out")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_request_action_records_trajectories(
    models: dict[str, Path], sink: local.LocalFileSink, fmt: str
) -> None:
    a = agent_mod.Agent(models[fmt], actor_count=3, router_scale=2, sink=sink, name="t")
    for t in range(5):
        result = a.request_action([0, 1, 2], _obs(3, t), reward=float(t))
        assert result.actions.shape == (3,)
        assert result.actions.dtype == np.int64
        assert result.logp.shape == (3,)
        assert set(result.aux) == {"logits", "value"}
        assert result.version == 1
    assert a.flag_last_action([1], reward=[10.0]) == 1
    a.shutdown()
    table = _read(sink)
    assert table.num_rows == 15
    rows = table.filter(pa.compute.equal(table["actor_id"], 1)).to_pylist()
    assert [r["reward"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 10.0]
    assert [r["terminated"] for r in rows] == [False] * 4 + [True]
    assert not any(r["cut"] for r in rows)
    rows0 = table.filter(pa.compute.equal(table["actor_id"], 0)).to_pylist()
    # Actor 0's episode was still running at shutdown: flushed, cut and truncated.
    assert rows0[-1]["truncated"]
    assert rows0[-1]["cut"]
    assert rows0[-1]["reward"] == 0.0
    assert table.schema.metadata[trajectory.META_SCHEMA_VERSION] == b"1"
    assert set(table["agent"].to_pylist()) == {"t"}


def test_max_length_cuts_and_continues_the_episode(
    models: dict[str, Path], sink: local.LocalFileSink
) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=1, sink=sink, max_length=4)
    for t in range(10):
        a.request_action([0], _obs(1, t), reward=1.0)
    a.flag_last_action([0], reward=1.0)
    a.shutdown()
    rows = _read(sink).to_pylist()
    assert len(rows) == 10
    assert len({r["episode_id"] for r in rows}) == 1
    assert [r["step"] for r in rows] == list(range(10))
    assert [r["segment"] for r in rows] == [0] * 4 + [1] * 4 + [2] * 2
    assert [i for i, r in enumerate(rows) if r["cut"]] == [3, 7]
    assert [i for i, r in enumerate(rows) if r["truncated"]] == [3, 7]
    assert rows[-1]["terminated"]
    assert all(r["reward"] == 1.0 for r in rows)


def test_bad_input_leaves_state_unchanged(models: dict[str, Path]) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=2)
    a.request_action([0, 1], _obs(2))
    before = a._pool.in_progress_steps()
    with pytest.raises(errors.UnknownActorError, match=r"unknown actor id\(s\) \[7\]"):
        a.request_action([0, 7], _obs(2))
    with pytest.raises(
        errors.InvalidArgumentError, match=r"obs.shape: expected \[2, 4\], got \[2, 3\]"
    ):
        a.request_action([0, 1], np.zeros((2, 3), np.float32))
    with pytest.raises(
        errors.InvalidArgumentError, match=r"obs\.dtype: expected float32, got float64"
    ):
        a.request_action([0, 1], np.zeros((2, 4)))
    with pytest.raises(errors.InvalidArgumentError, match="at most once"):
        a.request_action([0, 0], _obs(2))
    with pytest.raises(errors.InvalidArgumentError, match=r"reward.shape"):
        a.request_action([0, 1], _obs(2), reward=[1.0, 2.0, 3.0])
    with pytest.raises(errors.UnknownActorError):
        a.flag_last_action([5])
    assert a._pool.in_progress_steps() == before
    assert a.get_actor_ids() == [0, 1]
    a.shutdown()


def test_actor_ids_far_from_zero_take_the_dense_lookup(models: dict[str, Path]) -> None:
    """A remote endpoint's ids start at pod_index << 32: the dense id -> row table starts
    at the smallest id, so they do not fall back to a dict lookup per id."""
    a = agent_mod.Agent(models["onnx"], actor_count=0)
    first = 5 << 32
    ids = a.new_actors(3, range(first, first + 3))
    a.request_action(ids[::-1], _obs(3))
    base, dense = a._pool._dense_rows()
    assert (base, len(dense)) == (first, 3)
    pool = a._pool
    assert pool.rows_for(np.asarray([first + 2, first])).tolist() == [
        pool.row_of(first + 2),
        pool.row_of(first),
    ]
    with pytest.raises(errors.UnknownActorError, match=str(first + 7)):
        a.request_action([first, first + 7], _obs(2))
    with pytest.raises(errors.UnknownActorError, match=str(first - 1)):
        a.request_action([first - 1, first], _obs(2))
    with pytest.raises(errors.InvalidArgumentError, match="at most once"):
        a.request_action([first + 1, first + 1], _obs(2))
    a.shutdown()


def test_actor_lifecycle(models: dict[str, Path], sink: local.LocalFileSink) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=2, sink=sink)
    assert a.new_actor() == 2
    assert a.new_actors(2) == [3, 4]
    assert a.new_actor(100) == 100
    with pytest.raises(errors.DuplicateActorError, match="already taken"):
        a.new_actors(1, [3])
    a.request_action([3, 100], _obs(2))
    a.set_actor_id(3, 30)
    with pytest.raises(errors.DuplicateActorError):
        a.set_actor_id(30, 100)
    with pytest.raises(errors.UnknownActorError):
        a.set_actor_id(3, 31)
    a.request_action([30, 100], _obs(2))
    a.remove_actor(100)
    with pytest.raises(errors.UnknownActorError):
        a.remove_actor(100)
    assert sorted(a.get_actor_ids()) == [0, 1, 2, 4, 30]
    a.shutdown()
    rows = _read(sink).to_pylist()
    assert {r["actor_id"] for r in rows} == {30, 100}
    assert [r["step"] for r in rows if r["actor_id"] == 30] == [0, 1]


def test_router_scaling(models: dict[str, Path]) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="router_scale"):
        agent_mod.Agent(models["onnx"], router_scale=0)
    a = agent_mod.Agent(models["onnx"], router_scale=2)
    assert a.scale_throughput(+3) == 5
    assert a.scale_throughput(-4) == 1
    with pytest.raises(errors.InvalidArgumentError, match="between 1 and 64 routers, got 0"):
        a.scale_throughput(-1)
    assert a.router_scale == 1
    a.shutdown()
    with pytest.raises(errors.AgentClosedError):
        a.request_action([0], _obs(1))


def test_independent_mode_matches_shared(models: dict[str, Path]) -> None:
    shared = agent_mod.Agent(models["onnx"], actor_count=3, sample=False)
    own = agent_mod.Agent(
        models["onnx"], actor_count=3, sample=False, model_mode=spec.ModelMode.INDEPENDENT
    )
    own.new_actor()
    obs = _obs(3)
    np.testing.assert_array_equal(
        shared.request_action([0, 1, 2], obs).actions, own.request_action([0, 1, 3], obs).actions
    )
    assert own.reload_model(models["onnx_v2"]) == 2
    assert own.request_action([0, 1, 2], obs).version == 2
    shared.shutdown()
    own.shutdown()


@pytest.mark.parametrize("fmt", list(spec.ModelFormat))
def test_independent_copies_come_from_the_model_loaded_not_the_file_now(
    models: dict[str, Path], tmp_path: Path, fmt: spec.ModelFormat
) -> None:
    """A model file rewritten in place (a pinned version, or before the watcher sees
    it): actors added later still run the version the agent runs."""
    live = tmp_path / "model"
    shutil.copytree(models[fmt.value], live)
    newer = tmp_path / "newer"
    export.export_mlp(newer, fmt, seed=1, version=2)
    own = agent_mod.Agent(live, actor_count=8, sample=False, model_mode=spec.ModelMode.INDEPENDENT)
    graph = model.read_metadata(live).graph_file()
    obs = _obs(8)
    before = own.request_action(list(range(8)), obs).aux["logits"]
    (live / graph).write_bytes((newer / graph).read_bytes())
    added = [own.new_actor() for _ in range(8)]
    after = own.request_action(added, obs)
    assert after.version == 1
    np.testing.assert_array_equal(after.aux["logits"], before)
    own.shutdown()
    other = agent_mod.Agent(newer, actor_count=8, sample=False)
    assert not np.array_equal(other.request_action(list(range(8)), obs).aux["logits"], before)
    other.shutdown()


def test_independent_reload_takes_actors_added_and_removed_meanwhile(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-actor copies load off the lock: actors may come and go meanwhile."""
    own = agent_mod.Agent(
        models["onnx"], actor_count=3, sample=False, model_mode=spec.ModelMode.INDEPENDENT
    )
    real_copy = loader.copy_policy
    loading, release = threading.Event(), threading.Event()
    copies: list[object] = []

    def slow_copy(*args: object, **kwargs: object) -> object:
        if threading.current_thread().name == "reload":
            copies.append(args)
            if len(copies) == 1:  # the first per-actor copy
                loading.set()
                assert release.wait(10)
        return real_copy(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loader, "copy_policy", slow_copy)
    versions: list[int] = []
    reload = threading.Thread(
        target=lambda: versions.append(own.reload_model(models["onnx_v2"])), name="reload"
    )
    reload.start()
    assert loading.wait(10)
    added = own.new_actor()  # while the reload loads its copies
    own.remove_actor(0)
    release.set()
    reload.join(10)
    assert versions == [2]
    result = own.request_action([1, 2, added], _obs(3))
    assert result.version == 2
    assert len(own._own) == 3
    own.shutdown()


def test_an_independent_reload_whose_copy_fails_leaves_every_actor_on_the_old_model(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy for an actor added while the others loaded fails (out of GPU memory,
    say): no swap, the version reported is the one the actors run, nothing leaks."""
    own = agent_mod.Agent(
        models["onnx"], actor_count=2, sample=False, model_mode=spec.ModelMode.INDEPENDENT
    )
    real_copy = loader.copy_policy
    made: list[Any] = []

    def failing_copy(source: Any, *args: Any, **kwargs: Any) -> Any:
        if source.version != 2:
            return real_copy(source, *args, **kwargs)  # a new actor's, of the old model
        if len(made) == 0:
            own.new_actor()  # added while the copies load: its copy comes under the lock
        if len(made) == 2:
            raise MemoryError("out of device memory")
        made.append(real_copy(source, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(loader, "copy_policy", failing_copy)
    closed: list[Any] = []
    monkeypatch.setattr(policy.Policy, "close", lambda self: closed.append(self))
    with pytest.raises(MemoryError):
        own.reload_model(models["onnx_v2"])
    assert own.get_model_version() == 1
    assert own.request_action([0, 1, 2], _obs(3)).version == 1
    assert all(p.version == 1 for p in own._own.values())
    assert len(closed) == len(made) + 1  # every copy made, and the new model
    assert all(p.version == 2 for p in closed)
    monkeypatch.undo()
    own.shutdown()


@pytest.mark.parametrize("mode", list(spec.ModelMode))
def test_a_version_that_fails_at_run_time_is_replaced_by_the_one_before(
    models: dict[str, Path], sink: local.LocalFileSink, mode: spec.ModelMode
) -> None:
    """Version 2 loads (its check runs 1 and 3 rows) and then fails on a request: the
    request is answered by version 1, which runs from then on; nothing is lost."""
    a = agent_mod.Agent(models["onnx"], actor_count=4, sink=sink, model_mode=mode)
    a.request_action([0, 1, 2, 3], _obs(4))
    assert a.reload_model(models["failing_v2"]) == 2
    assert a.request_action([0, 1, 2], _obs(3)).version == 2  # fine on 3 rows
    big = _obs(4)
    big[3, 0] = 1000.0  # over the limit in either mode (independent: one row a pass)
    result = a.request_action([0, 1, 2, 3], big)
    assert result.version == 1
    assert a.get_model_version() == 1
    why = a.run_failure(2)
    assert why is not None
    assert why.startswith("failed at run time, so the agent went back to version 1:")
    assert "model version 2" in why
    assert "the forward pass of" in why
    assert a.run_failure(1) is None
    reloads = a.metrics.model_reloads
    assert reloads.labels("rolled_back")._value.get() == 1
    assert a.metrics.model_version._value.get() == 1
    assert a.request_action([0, 1, 2, 3], big).version == 1
    if mode is spec.ModelMode.INDEPENDENT:
        assert {p.version for p in a._own.values()} == {1}
    a.flag_last_action([0, 1, 2, 3])
    a.shutdown()
    table = _read(sink)
    assert table.num_rows == 4 + 3 + 4 + 4
    assert table["policy_version"].to_pylist().count(2) == 3


def test_a_failure_with_no_version_before_records_nothing_and_can_be_held(
    models: dict[str, Path], sink: local.LocalFileSink
) -> None:
    """The version the agent started with has none before it: a request it fails on
    raises `ModelRunNoFallbackError` and records no step (the episodes it ended stay
    ended), so it can be made again without `ended`. Held (`hold`, what the env driver
    does), the version is reported failed until another is loaded; the failed version
    is not kept to go back to."""
    a = agent_mod.Agent(models["failing_v2"], actor_count=4, sink=sink)
    assert a.request_action([0, 1, 2], _obs(3)).version == 2  # fine on 3 rows
    ended = (np.array([1]), np.array([True]), np.array([False]))
    with pytest.raises(
        errors.ModelRunNoFallbackError, match=r"model version 2 .*forward pass of 4"
    ):
        a.request_action([0, 1, 2, 3], _obs(4), reward=[1.0, 2.0, 3.0, 4.0], ended=ended)
    assert a.metrics.request_errors.labels("model_run")._value.get() == 1
    assert a.stalled is None  # not held: a request alone cannot tell whose fault it is
    assert a.run_failure(2) is None
    with pytest.raises(errors.ModelRunNoFallbackError) as failed:
        a.request_action([0, 1, 2, 3], _obs(4))
    assert failed.value.version == 2
    assert not a.hold(1, failed.value)  # not the version that runs
    assert a.hold(2, failed.value)
    assert a.stalled == 2
    why = a.run_failure(2)
    assert why is not None
    assert why.startswith("failed at run time, with no version before it to go back to")
    assert a.get_model_version() == 2
    assert a.request_action([0, 1, 2], _obs(3)).version == 2  # what it answers, it answers
    assert a.reload_model(models["onnx"]) == 1
    assert a.stalled is None
    assert a.previous_version is None  # version 2 is never gone back to
    why = a.run_failure(2)
    assert why is not None
    assert why.startswith("failed at run time, so the agent went back to version 1:")
    result = a.request_action([0, 1, 2, 3], _obs(4), reward=[1.0, 2.0, 3.0, 4.0])
    assert result.version == 1
    a.flag_last_action([0, 1, 2, 3])
    a.shutdown()
    rows = _read(sink).to_pylist()
    # Actors 0-2: two steps of version 2, one of version 1; actor 3: one of version 1.
    assert [r["policy_version"] for r in rows if r["actor_id"] == 0] == [2, 2, 1]
    assert [r["policy_version"] for r in rows if r["actor_id"] == 3] == [1]
    # Actor 1's first episode ended once, with the reward of the failed request; its
    # second by the flag_last_action above.
    ends = [r for r in rows if r["actor_id"] == 1 and r["terminated"]]
    assert [(r["policy_version"], r["reward"]) for r in ends] == [(2, 2.0), (1, 0.0)]
    assert len(rows) == 3 + 3 + 4


def test_a_version_loaded_after_a_hold_keeps_nothing_before_it(models: dict[str, Path]) -> None:
    """Version 1 came back in a replacement, so it has none before it; its own failure
    (faked here) is held, and a newer version ends the hold."""
    b = agent_mod.Agent(models["onnx"], actor_count=4)
    b.reload_model(models["failing_v2"])
    b.request_action([0, 1, 2, 3], _obs(4))  # back to 1
    assert b.reload_model(models["failing_v2"]) == 2  # the agent loads it if told to
    b.request_action([0, 1, 2, 3], _obs(4))  # back to 1 again
    assert b.metrics.model_reloads.labels("rolled_back")._value.get() == 2
    b.current_policy.backend.run = lambda obs: 1 / 0  # type: ignore[method-assign]
    with pytest.raises(
        errors.ModelRunNoFallbackError, match=r"model version 1 .*ZeroDivision"
    ) as e:
        b.request_action([0, 1, 2, 3], _obs(4))
    assert b.hold(1, e.value)
    assert b.stalled == 1
    assert b.reload_model(models["onnx_v3"]) == 3
    assert b.stalled is None
    assert b.previous_version is None
    why = b.run_failure(1)
    assert why is not None
    assert why.startswith("failed at run time, with no version before it")
    assert b.request_action([0, 1, 2, 3], _obs(4)).version == 3
    b.shutdown()


def test_a_reload_that_fails_keeps_the_version_to_go_back_to(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Version 2 runs (after 1); a corrupt and an incompatible version are refused;
    version 2 then fails on a request: version 1 is still there to answer it."""
    a = agent_mod.Agent(models["onnx"], actor_count=4)
    assert a.reload_model(models["failing_v2"]) == 2
    corrupt = tmp_path / "corrupt"
    shutil.copytree(models["onnx_v2"], corrupt)
    (corrupt / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(errors.ModelLoadError, match="not a loadable ONNX model"):
        a.reload_model(corrupt)
    with pytest.raises(errors.ModelIncompatibleError):
        a.reload_model(models["onnx_wide"])
    assert a.request_action([0, 1, 2, 3], _obs(4)).version == 1
    a.shutdown()


def test_a_request_the_version_before_fails_too_replaces_nothing(
    models: dict[str, Path],
) -> None:
    """Both versions fail on it: the request is to blame, and version 2 stays."""
    a = agent_mod.Agent(models["onnx"], actor_count=4)
    a.reload_model(models["failing_v2"])
    previous = a._previous
    assert previous is not None
    previous.backend.run = lambda obs: 1 / 0  # type: ignore[method-assign]
    with pytest.raises(errors.ModelRunError, match=r"model version 2 .*the forward pass of 4"):
        a.request_action([0, 1, 2, 3], _obs(4))
    assert a.get_model_version() == 2
    assert a.run_failure(2) is None
    assert a.metrics.model_reloads.labels("rolled_back")._value.get() == 0
    assert a.request_action([0, 1, 2], _obs(3)).version == 2
    a.shutdown()


def test_reload_records_versions_and_refuses_other_layouts(
    models: dict[str, Path], sink: local.LocalFileSink
) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=1, sink=sink)
    a.request_action([0], _obs(1))
    assert a.reload_model(models["onnx_v2"]) == 2
    a.request_action([0], _obs(1))
    with pytest.raises(
        errors.ModelIncompatibleError, match=r"inputs: expected \[4\] float32, got \[6\]"
    ):
        a.reload_model(models["onnx_wide"])
    assert a.get_model_version() == 2
    a.flag_last_action([0])
    a.shutdown()
    assert [r["policy_version"] for r in _read(sink).to_pylist()] == [1, 2]


def test_hot_reload_under_load_fails_no_request(models: dict[str, Path]) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=8, max_length=50)
    failures: list[BaseException] = []
    # (reloads finished before the request started, version that answered it)
    answers: list[tuple[int, int]] = []
    reloads = 0
    cond = threading.Condition()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            with cond:
                started_after = reloads
            try:
                version = a.request_action(np.arange(8), _obs(8)).version
            except BaseException as err:
                with cond:
                    failures.append(err)
                    cond.notify_all()
                return
            with cond:
                answers.append((started_after, version))
                cond.notify_all()

    expected = [1]  # version after 0, 1, 2, ... finished reloads
    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        for i in range(6):
            want = 2 if i % 2 == 0 else 1
            assert a.reload_model(models["onnx_v2"] if want == 2 else models["onnx"]) == want
            expected.append(want)
            with cond:
                reloads += 1
                done = reloads
                # Wait (no sleep loop) until a request that started after this reload
                # finished has been answered; the deadline only guards a hang.
                assert cond.wait_for(
                    lambda done=done: failures or any(n >= done for n, _ in answers),
                    timeout=120,
                ), "no request was answered after the reload"
    finally:
        stop.set()
        thread.join()
        a.shutdown()
    assert failures == []
    # A request that started after a reload finished is answered by that version (or a
    # later one, if another reload finished while it ran).
    for started_after, version in answers:
        assert version in expected[started_after:], (started_after, version)
    assert {v for _, v in answers} == {1, 2}


async def test_asyncio_api(models: dict[str, Path], sink: local.LocalFileSink) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=4, sink=sink)
    results = await asyncio.gather(
        *(a.arequest_action([i], _obs(1, i), reward=1.0) for i in range(4))
    )
    assert [r.actions.shape for r in results] == [(1,)] * 4
    assert await a.aflag_last_action([0, 1, 2, 3], reward=2.0) == 4
    assert await a.areload_model(models["onnx_v2"]) == 2
    await a.ashutdown()
    assert _read(sink).num_rows == 4


def test_masks_are_recorded(models: dict[str, Path], sink: local.LocalFileSink) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=2, sink=sink)
    a.request_action([0, 1], _obs(2))
    r = a.request_action([0, 1], _obs(2), mask=np.array([[True, False], [False, True]]))
    np.testing.assert_array_equal(r.actions, [0, 1])
    a.flag_last_action([0, 1])
    a.shutdown()
    rows = _read(sink).to_pylist()
    assert [row["mask"] for row in rows] == [
        [True, True],
        [True, False],
        [True, True],
        [False, True],
    ]


def test_long_episodes_keep_every_step(models: dict[str, Path], sink: local.LocalFileSink) -> None:
    # Buffers start short and grow; steps recorded across a growth must all survive.
    a = agent_mod.Agent(models["onnx"], actor_count=3, sink=sink, max_length=1000)
    for t in range(300):
        a.request_action([0, 1, 2], _obs(3, t), reward=1.0)
        if t == 100:
            a.flag_last_action([1])
    a.flag_last_action([0, 1, 2])
    a.shutdown()
    table = _read(sink)
    assert table.num_rows == 900
    steps = [r["step"] for r in table.to_pylist() if r["actor_id"] == 0]
    assert steps == list(range(300))


def test_ids_are_not_recycled(models: dict[str, Path]) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=2)
    a.remove_actor(0)
    a.remove_actor(1)
    assert a.new_actors(2) == [2, 3]
    a.shutdown()


def test_a_batch_that_cannot_be_encoded_does_not_stop_the_router(
    models: dict[str, Path], sink: local.LocalFileSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An encoding bug of any kind must cost that batch only: a router thread that died
    # would leave the queue full and block every actor (and the drain) for good.
    from relayrl_runtime.actors import routers

    encode = routers.trajectory.encode
    calls = 0

    def fails_once(*args: object) -> pa.RecordBatch:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TypeError("an encoder bug")
        return encode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(routers.trajectory, "encode", fails_once)
    a = agent_mod.Agent(models["onnx"], actor_count=1, router_scale=1, sink=sink)
    a.request_action([0], _obs(1))
    a.flag_last_action([0])
    a.flush()
    assert a.metrics.sink_errors._value.get() == 1
    a.request_action([0], _obs(1, 1))
    a.request_action([0], _obs(1, 2))
    a.flag_last_action([0])
    done = threading.Thread(target=a.shutdown)
    done.start()
    done.join(30)
    assert not done.is_alive(), "the drain blocked: the router thread is gone"
    assert _read(sink).num_rows == 2


class _Refusing:
    """A local file sink whose writes fail `refusals` times, then for good if `final`."""

    def __init__(self, inner: local.LocalFileSink, refusals: int, final: str | None = None):
        self.inner = inner
        self.refusals = refusals
        self.final = final
        self.attempts = 0

    @property
    def connected(self) -> bool:
        return self.inner.connected

    @property
    def waiting(self) -> str | None:
        return self.inner.waiting

    @property
    def failure(self) -> str | None:
        return self.final if self.attempts > self.refusals else None

    def write(self, batch: pa.RecordBatch) -> None:
        self.attempts += 1
        if self.attempts <= self.refusals or self.final is not None:
            raise OSError("no space left on device")
        self.inner.write(batch)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


class _Recording:
    """A sink that keeps what it is given."""

    connected = True
    failure = None

    def __init__(self) -> None:
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_finished_episode_reaches_the_sink_though_no_call_follows(
    models: dict[str, Path],
) -> None:
    """A client's last episode does not wait in the outbox for a call that never comes."""
    recording = _Recording()
    a = agent_mod.Agent(models["onnx"], actor_count=1, router_scale=1, sink=recording)
    a.request_action([0], _obs(1))
    a.flag_last_action([0])
    deadline = time.monotonic() + 5
    while recording.rows == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recording.rows == 1
    a.shutdown()


def test_a_sink_that_refuses_for_a_while_loses_nothing(
    models: dict[str, Path], sink: local.LocalFileSink
) -> None:
    # Four refusals take 0.05 + 0.1 + 0.2 + 0.4 s: the router keeps the batch meanwhile.
    refusing = _Refusing(sink, refusals=4)
    a = agent_mod.Agent(models["onnx"], actor_count=1, router_scale=1, sink=refusing)
    a.request_action([0], _obs(1))
    a.request_action([0], _obs(1, 1))
    a.flag_last_action([0])
    a.shutdown()
    assert refusing.attempts == 5
    assert _read(sink).num_rows == 2
    assert a.metrics.sink_errors._value.get() == 1  # one refused batch, however many tries
    assert a.metrics.trajectories_written._value.get() == 1


def test_a_sink_failed_for_good_does_not_hold_the_router(
    models: dict[str, Path], sink: local.LocalFileSink
) -> None:
    refusing = _Refusing(sink, refusals=1, final="stream refuses every message")
    a = agent_mod.Agent(models["onnx"], actor_count=1, router_scale=1, sink=refusing)
    a.request_action([0], _obs(1))
    a.flag_last_action([0])
    done = threading.Thread(target=a.shutdown)
    done.start()
    done.join(30)
    assert not done.is_alive(), "the router kept trying a sink that failed for good"
    assert refusing.attempts == 2
    assert a.metrics.sink_errors._value.get() == 1
    assert a.metrics.trajectories_written._value.get() == 0


def test_a_local_sink_whose_write_failed_is_done_and_says_why(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    sink = local.LocalFileSink(out)
    out.rmdir()
    out.write_text("a file where the directory was")  # every open now fails
    a = agent_mod.Agent(models["onnx"], actor_count=1, router_scale=1, sink=sink)
    a.request_action([0], _obs(1))
    a.flag_last_action([0])
    done = threading.Thread(target=a.shutdown)
    done.start()
    done.join(30)
    assert not done.is_alive(), "the router kept trying a file that cannot be written"
    assert "NotADirectoryError" in str(sink.failure)
    assert a.metrics.sink_errors._value.get() == 1
    assert sink.files == []


def test_no_reward_is_zero_and_none_among_rewards_is_refused(
    models: dict[str, Path], sink: local.LocalFileSink
) -> None:
    """RelayRL's last reward is optional: None is no reward (0.0), never a NaN row."""
    a = agent_mod.Agent(models["onnx"], actor_count=2, sink=sink)
    a.request_action([0, 1], _obs(2))
    a.request_action([0, 1], _obs(2, 1), reward=None)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgumentError, match=r"^reward: .*None at positions \[1\]"):
        a.request_action([0, 1], _obs(2, 2), reward=[1.0, None])  # type: ignore[list-item]
    with pytest.raises(errors.InvalidArgumentError, match=r"^reward: .*None at positions \[0\]"):
        a.flag_last_action([0, 1], [None, 2.0])  # type: ignore[list-item]
    assert a.flag_last_action([0, 1], None) == 2  # type: ignore[arg-type]
    a.shutdown()
    rewards = _read(sink)["reward"].to_pylist()
    assert rewards == [0.0, 0.0, 0.0, 0.0]


def test_a_batch_handed_on_while_another_thread_shuts_down_is_written(
    models: dict[str, Path], sink: local.LocalFileSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished trajectory leaves the lock before it reaches the routers' queue; a
    shutdown in between waits for it instead of stopping the routers ahead of it."""
    monkeypatch.setattr(agent_mod, "_OUTBOX_ROWS", 1)  # every finished episode goes on
    a = agent_mod.Agent(models["onnx"], actor_count=2, router_scale=1, sink=sink)
    submit = a._routers.submit
    entered, go = threading.Event(), threading.Event()

    def slow_submit(chunks: list[Any]) -> None:
        if not entered.is_set():  # the first hand-off only: the shutdown's own goes on
            entered.set()
            assert go.wait(10)
        submit(chunks)

    monkeypatch.setattr(a._routers, "submit", slow_submit)
    a.request_action([0, 1], _obs(2))
    a.request_action([0, 1], _obs(2, 1))
    errors_seen: list[BaseException] = []

    def finish() -> None:
        try:
            a.flag_last_action([0])
        except BaseException as err:
            errors_seen.append(err)

    ender = threading.Thread(target=finish)
    ender.start()
    assert entered.wait(10)
    stopper = threading.Thread(target=a.shutdown)
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive(), "shutdown did not wait for the batch being handed on"
    go.set()
    ender.join(10)
    stopper.join(10)
    assert not ender.is_alive()
    assert not stopper.is_alive()
    assert errors_seen == []
    table = _read(sink)
    # Actor 0's finished episode (2 steps) and actor 1's, cut by the shutdown (2 steps).
    assert table.num_rows == 4
    assert table.filter(pa.compute.equal(table["actor_id"], 0))["terminated"].to_pylist() == [
        False,
        True,
    ]


def test_renamed_ids_are_not_handed_out_again(models: dict[str, Path]) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=2)
    a.set_actor_id(1, 5)
    a.remove_actor(5)
    assert a.new_actors(4) == [6, 7, 8, 9]
    a.shutdown()


def test_actor_ids_come_in_the_order_actors_were_added(models: dict[str, Path]) -> None:
    """A new actor takes a freed row but is listed last: callers pair obs rows with it."""
    a = agent_mod.Agent(models["onnx"], actor_count=4)
    a.remove_actor(0)
    assert a.new_actor() == 4
    assert a.get_actor_ids() == [1, 2, 3, 4]
    a.set_actor_id(2, 20)  # a renamed actor keeps its place
    a.new_actors(2, [0, 50])
    assert a.get_actor_ids() == [1, 20, 3, 4, 0, 50]
    a.shutdown()


def test_flush_writes_finished_episodes_and_leaves_running_ones_whole(
    models: dict[str, Path], sink: local.LocalFileSink
) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=2, sink=sink)
    a.request_action([0, 1], _obs(2), reward=0.0)
    a.request_action([0, 1], _obs(2, 1), reward=1.0)
    a.flag_last_action([1], 5.0)
    a.flush()
    assert _read(sink)["actor_id"].to_pylist() == [1, 1]  # the finished one, no cut
    a.request_action([0], _obs(1, 2), reward=2.0)
    a.flag_last_action([0], 3.0)
    a.shutdown()
    table = _read(sink)
    rows = table.filter(pa.compute.equal(table["actor_id"], 0)).to_pylist()
    assert len({r["episode_id"] for r in rows}) == 1
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["reward"] for r in rows] == [1.0, 2.0, 3.0]
    assert not any(r["cut"] for r in rows)
    with pytest.raises(errors.AgentClosedError):
        a.flush()


def test_list_observations_and_empty_id_lists(models: dict[str, Path]) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=1)
    assert a.request_action([0], [[0.0, 0.1, 0.2, 0.3]]).actions.shape == (1,)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgumentError, match=r"^obs.shape: expected \[1, 4\]"):
        a.request_action([0], [[0.0, 0.1, 0.2]])  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidArgumentError, match=r"^obs: expected an array"):
        a.request_action([0], [[0.0, 0.1], [0.2]])  # type: ignore[arg-type]
    empty = agent_mod.Agent(models["onnx"], actor_count=0)
    assert empty.request_action(
        empty.get_actor_ids(), np.zeros((0, 4), np.float32)
    ).actions.shape == (0,)
    assert empty.flag_last_action([]) == 0
    assert empty.has_actors([])
    a.shutdown()
    empty.shutdown()


def test_stopped_routers_refuse_a_batch(models: dict[str, Path]) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=1)
    a.shutdown()
    with pytest.raises(errors.AgentClosedError, match="shut down"):
        a._routers.submit([])


def test_routers_scaled_down_and_up_at_once_end_at_the_asked_number(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A router that has just retired is alive for a moment more: it must not be counted
    as running, or the next scale-up starts one router too few."""
    a = agent_mod.Agent(models["onnx"], router_scale=4)
    routers = a._routers
    task_done = routers._queue.task_done

    def slow_task_done() -> None:  # a retired router stays alive a while after it
        time.sleep(0.3)
        task_done()

    monkeypatch.setattr(routers._queue, "task_done", slow_task_done)
    a.scale_throughput(-3)
    deadline = time.monotonic() + 5
    while routers._retiring and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.scale_throughput(+3) == 4
    time.sleep(1.0)  # the retired ones are gone by now
    assert len([t for t in routers._threads if t.is_alive()]) == 4
    assert a.router_scale == 4
    a.shutdown()
    assert a.router_scale == 0


def test_scaling_routers_down_never_waits_for_a_busy_sink(models: dict[str, Path]) -> None:
    """Every router holds a batch its sink has not taken and the queue is full (NATS
    away, say): a scale-down must not wait for a router (it held the agent's lock, so
    every request waited too). The busy routers stop after their writes."""
    release = threading.Event()
    written: list[int] = []

    class HeldSink:
        failure = None

        def write(self, record: pa.RecordBatch) -> None:
            release.wait(60)
            written.append(record.num_rows)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    a = agent_mod.Agent(
        models["onnx"], actor_count=1, router_scale=2, sink=HeldSink(), queue_size=1
    )
    routers = a._routers
    stop = threading.Event()
    produced: list[int] = []

    def produce() -> None:  # one-step trajectories until stopped (blocks on a full queue)
        while not stop.is_set():
            a.request_action([0], _obs(1))
            a.flag_last_action([0])
            produced.append(1)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        deadline = time.monotonic() + 30
        while not routers._queue.full() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert routers._queue.full()
        scaled = threading.Event()
        scaler = threading.Thread(target=lambda: (a.scale_throughput(-1), scaled.set()))
        scaler.start()
        assert scaled.wait(20), "the scale-down waited for the sink"
        assert a.router_scale == 1
    finally:
        stop.set()
        release.set()
    producer.join(30)
    a.shutdown()
    assert a.router_scale == 0
    assert sum(written) == len(produced)  # every trajectory written, once
    assert len([t for t in routers._threads if t.is_alive()]) == 0


def test_a_single_graph_file_reloads_under_a_version_given_with_it(
    models: dict[str, Path],
) -> None:
    """An agent built from one graph file and explicit metadata: a new file without a
    version would record its steps under the old one, so it is refused by name; with a
    version, or as a model directory (its own metadata), it loads."""
    meta = model.read_metadata(models["onnx"])
    a = agent_mod.Agent(models["onnx"] / meta.graph_file(), actor_count=1, model_metadata=meta)
    try:
        v2 = models["onnx_v2"] / model.read_metadata(models["onnx_v2"]).graph_file()
        with pytest.raises(errors.InvalidArgumentError, match="version: expected the version"):
            a.reload_model(v2)
        assert a.get_model_version() == 1
        assert a.reload_model(v2, version=2) == 2
        assert a.reload_model(models["onnx"]) == 1  # a directory: its metadata's version
    finally:
        a.shutdown()


def test_a_reward_as_a_0d_array_is_a_scalar_and_text_is_refused_by_name(
    models: dict[str, Path], sink: local.LocalFileSink
) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=2, sink=sink)
    a.request_action([0, 1], _obs(2))
    a.request_action([0, 1], _obs(2, 1), reward=np.asarray(2.5))
    for bad in ("x", object(), [1.0, "x"]):
        with pytest.raises(errors.InvalidArgumentError, match=r"^reward: expected a float64"):
            a.request_action([0, 1], _obs(2, 2), reward=bad)  # type: ignore[arg-type]
        with pytest.raises(errors.InvalidArgumentError, match=r"^reward: expected a float64"):
            a.flag_last_action([0, 1], bad)  # type: ignore[arg-type]
    assert a.flag_last_action([0, 1], 1.0) == 2
    a.shutdown()
    assert _read(sink)["reward"].to_pylist() == [2.5, 1.0, 2.5, 1.0]
