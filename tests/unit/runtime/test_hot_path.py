"""The request path's shortcuts agree with the general code: single-row records, small
log-probabilities, the small discrete sampler, bound ONNX runs, resizing env drivers,
idle remote clients (no servers)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from relayrl_runtime import agent as agent_mod
from relayrl_runtime import errors, spec
from relayrl_runtime.envs import driver, gym
from relayrl_runtime.inference import export, loader, model, onnx, policy
from relayrl_runtime.sinks import local
from relayrl_runtime.transport import endpoint, wire


def _table(sink: local.LocalFileSink) -> pa.Table:
    table = pa.concat_tables([pq.read_table(f) for f in sink.files])
    return table.sort_by(
        [("actor_id", "ascending"), ("episode_id", "ascending"), ("step", "ascending")]
    )


@pytest.mark.parametrize("n", [1, 3])
def test_single_and_batched_rows_record_the_same(
    models: dict[str, Path], tmp_path: Path, n: int
) -> None:
    # 150 steps with max length 40: horizon growth and cuts on the single-row path too.
    sink = local.LocalFileSink(tmp_path / str(n))
    a = agent_mod.Agent(models["onnx"], actor_count=n, max_length=40, seed=0, sink=sink)
    rng = np.random.default_rng(1)
    obs_seen = []
    for step in range(150):
        obs = rng.standard_normal((n, 4)).astype(np.float32)
        obs_seen.append(obs)
        a.request_action(np.arange(n), obs, reward=float(step))
    a.flag_last_action(np.arange(n), reward=-1.0)
    a.shutdown()
    table = _table(sink)
    assert table.num_rows == 150 * n
    for actor in range(n):
        mine = table.filter(pa.compute.equal(table["actor_id"], actor)).to_pylist()
        assert [r["step"] for r in mine] == list(range(150))
        assert [r["segment"] for r in mine] == [s // 40 for s in range(150)]
        # Each step's reward is the one given with the next request (the last: flagged).
        assert [r["reward"] for r in mine] == [float(s + 1) for s in range(149)] + [-1.0]
        np.testing.assert_array_equal(
            np.stack([np.asarray(r["obs"], np.float32) for r in mine]),
            np.stack([o[actor] for o in obs_seen]),
        )
        cuts = [r["step"] for r in mine if r["cut"]]
        assert cuts == [39, 79, 119]
        assert mine[-1]["terminated"]


def test_small_log_prob_matches_the_vectorised_one() -> None:
    rng = np.random.default_rng(0)
    for rows, size in [(1, 2), (3, 5), (8, 8)]:
        head = rng.standard_normal((rows, size)).astype(np.float32) * 5
        actions = rng.integers(0, size, rows)
        mask = rng.random((rows, size)) < 0.7
        mask[np.arange(rows), actions] = True
        for m in (None, mask):
            small = policy._discrete_log_prob_small(head, actions, m)
            z = head.astype(np.float64)
            if m is not None:
                z = np.where(m, z, -np.inf)
            lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
            np.testing.assert_allclose(small, z[np.arange(rows), actions] - lse, rtol=1e-5)
            big = policy.log_prob(model.ActionKind.DISCRETE, head, actions, m)
            np.testing.assert_allclose(small, big, rtol=1e-5)


def test_sampler_is_reproducible_and_samples_softmax() -> None:
    logits = np.log(np.array([[0.2, 0.8]], dtype=np.float32)).repeat(20000, axis=0)
    a = policy._discrete(logits, None, policy.Sampler(7), True)
    b = policy._discrete(logits, None, policy.Sampler(7), True)
    np.testing.assert_array_equal(a, b)
    assert abs(a.mean() - 0.8) < 0.02
    masked = policy._discrete(
        logits[:100], np.array([[True, False]] * 100), policy.Sampler(7), True
    )
    assert (masked == 0).all()


def test_driver_resize_keeps_ids_and_cuts_what_it_must(
    models: dict[str, Path], tmp_path: Path
) -> None:
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(models["onnx"], actor_count=4, actor_ids=[10, 11, 12, 13], sink=sink)

    def make(count: int) -> driver.VecEnv:
        return gym.make("CartPole-v1", count)

    drv = driver.EnvDriver(a, make(4), [10, 11, 12, 13], seed=0, make_env=make)
    first = drv.run(max_steps=200)
    drv.resize([10, 11, 12, 13, 20, 21])  # grow: a second vector env for 20, 21
    assert a.get_actor_ids() == [10, 11, 12, 13, 20, 21]
    second = drv.run(max_steps=300)
    drv.resize([11, 20])  # shrink: both vector envs lose copies and are rebuilt
    assert sorted(a.get_actor_ids()) == [11, 20]
    third = drv.run(max_steps=100)
    drv.resize([])
    assert a.get_actor_ids() == []
    drv.close()
    a.shutdown()
    table = _table(sink)
    assert table.num_rows == first.steps + second.steps + third.steps
    assert set(table["actor_id"].to_pylist()) == {10, 11, 12, 13, 20, 21}
    for row in table.to_pylist():
        if row["cut"]:
            assert row["truncated"]
            assert not row["terminated"]


def test_every_step_keeps_its_reward_across_runs_and_at_the_end(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """CartPole pays 1 a step: no recorded step may say 0 (a run picking up where the
    last one stopped, and the episodes in progress when the driver stops for good)."""
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(models["onnx"], actor_count=4, sink=sink)
    drv = driver.EnvDriver(a, gym.make("CartPole-v1", 4), [0, 1, 2, 3], seed=0)
    first = drv.run(max_steps=40)
    second = drv.run(max_steps=40)
    # Every copy whose episode did not end in the last step has one in progress.
    in_progress = drv.end_episodes()
    assert in_progress <= 4
    drv.close()
    a.shutdown()
    table = _table(sink)
    assert table.num_rows == first.steps + second.steps
    assert set(table["reward"].to_pylist()) == {1.0}
    assert sum(table["cut"].to_pylist()) == in_progress


def test_a_resize_whose_env_factory_fails_changes_nothing(
    models: dict[str, Path], tmp_path: Path
) -> None:
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(models["onnx"], actor_count=4, actor_ids=[10, 11, 12, 13], sink=sink)
    failing = {"on": False}

    def make(count: int) -> driver.VecEnv:
        if failing["on"]:
            raise RuntimeError("simulator licence server unreachable")
        return gym.make("CartPole-v1", count)

    drv = driver.EnvDriver(a, make(4), [10, 11, 12, 13], seed=0, make_env=make)
    first = drv.run(max_steps=50)
    failing["on"] = True
    # Both removes (the vector env is rebuilt without 12, 13) and adds (20): nothing
    # of it may happen when a new env cannot be made.
    with pytest.raises(errors.EnvironmentFailedError, match="licence"):
        drv.resize([10, 11, 20])
    assert a.get_actor_ids() == [10, 11, 12, 13]
    second = drv.run(max_steps=50)  # steps on with the actors it had
    failing["on"] = False
    drv.resize([10, 11, 20])  # and the same resize works once the factory does
    assert sorted(a.get_actor_ids()) == [10, 11, 20]
    third = drv.run(max_steps=50)
    drv.close()
    a.shutdown()
    assert _table(sink).num_rows == first.steps + second.steps + third.steps


def _msg(identity: bytes, op: int, request_id: int, *payload: bytes) -> list[bytes]:
    return [identity, wire.header(op, request_id), *payload]


def test_idle_clients_lose_their_actors(models: dict[str, Path], tmp_path: Path) -> None:
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(models["onnx"], actor_count=0, sink=sink)
    ep = endpoint.RemoteEndpoint(a, "tcp://127.0.0.1:0", client_idle_seconds=30)
    ids = {}
    for client in (b"idle", b"busy"):
        reply = ep._handle_one(
            _msg(client, wire.Op.NEW_ACTORS, 1, (2).to_bytes(4, "little")), time.monotonic()
        )
        ids[client] = wire.unpack_array(reply[2], "ids")
        obs = wire.pack_array(np.zeros((2, 4), np.float32))
        for step in range(5):
            reply = ep._handle_one(
                _msg(
                    client, wire.Op.REQUEST_ACTION, 2 + step, reply_ids(ids[client]), obs, b"", b""
                ),
                time.monotonic(),
            )
            assert not wire.parse_header(reply[1])[1] & wire.FLAG_ERROR
    assert ep.clients == 2
    now = time.monotonic()
    ep._sweep(now)  # nobody is idle yet
    assert ep.clients == 2
    ep._last_seen[b"busy"] = now + 100  # "busy" spoke recently, "idle" did not
    ep._sweep(now + 31)
    assert ep.clients == 1
    assert sorted(a.get_actor_ids()) == sorted(ids[b"busy"].tolist())
    idle_total = "relayrl_runtime_remote_idle_clients_total"
    assert a.metrics.registry.get_sample_value(idle_total) == 1
    a.shutdown()
    table = _table(sink)
    # The idle client's partial trajectories were flushed (cut) when its actors went.
    idle = table.filter(pa.compute.is_in(table["actor_id"], pa.array(ids[b"idle"])))
    assert idle.num_rows == 10
    assert all(r["cut"] for r in idle.to_pylist() if r["step"] == 4)


def reply_ids(ids: np.ndarray) -> bytes:
    return wire.pack_array(np.asarray(ids, np.int64))


def test_ended_is_flag_last_action_in_the_same_call(
    models: dict[str, Path], tmp_path: Path
) -> None:
    tables = []
    for combined in (False, True):
        sink = local.LocalFileSink(tmp_path / str(combined))
        a = agent_mod.Agent(models["onnx"], actor_count=3, seed=0, sink=sink)
        ids = np.arange(3)
        obs = np.zeros((3, 4), np.float32)
        a.request_action(ids, obs)
        a.request_action(ids, obs + 1, reward=np.array([1.0, 2.0, 3.0]))
        rewards = np.array([4.0, 5.0, 6.0])
        pos = np.array([1])
        term, trunc = np.array([True]), np.array([False])
        if combined:
            a.request_action(ids, obs + 2, reward=rewards, ended=(pos, term, trunc))
        else:
            a.flag_last_action(ids[pos], rewards[pos], term, trunc)
            a.request_action(ids, obs + 2, reward=rewards)
        with pytest.raises(agent_mod.errors.InvalidArgumentError):
            a.request_action(ids, obs, ended=(np.array([3]), term, trunc))
        a.shutdown()
        table = _table(sink)
        tables.append(table.drop_columns(["episode_id", "obs_time", "action_time"]))
    assert tables[0].equals(tables[1])
    rows = tables[1].to_pylist()
    ended = [r for r in rows if r["actor_id"] == 1]
    assert [(r["step"], r["reward"], r["terminated"]) for r in ended] == [
        (0, 2.0, False),
        (1, 5.0, True),
        (0, 0.0, False),
    ]


@pytest.mark.parametrize("sample", [True, False])
def test_small_discrete_path_agrees_with_the_vectorised_one(sample: bool) -> None:
    rng = np.random.default_rng(2)
    for rows, size in [(1, 2), (3, 5), (8, 8), (1, 64)]:
        for masked in (False, True):
            head = rng.standard_normal((rows, size)).astype(np.float32) * 3
            mask = None
            if masked:
                mask = rng.random((rows, size)) < 0.5
                mask[np.arange(rows), rng.integers(0, size, rows)] = True
            for seed in range(20):
                small = policy._discrete_small(head, mask, policy.Sampler(seed), sample)
                assert small is not None
                actions, logp = small
                assert actions.dtype == np.int64
                assert logp.dtype == np.float32
                big = policy._discrete(head, mask, policy.Sampler(seed), sample)
                np.testing.assert_array_equal(actions, big)
                if mask is not None:
                    assert mask[np.arange(rows), actions].all()
                expected = policy.log_prob(model.ActionKind.DISCRETE, head, actions, mask)
                np.testing.assert_allclose(logp, expected, rtol=1e-5, atol=1e-6)


def test_small_discrete_path_samples_softmax_and_leaves_non_finite_logits() -> None:
    head = np.log(np.array([[0.2, 0.5, 0.3]], dtype=np.float32))
    sampler = policy.Sampler(3)
    counts = np.zeros(3)
    for _ in range(20000):
        small = policy._discrete_small(head, None, sampler, True)
        assert small is not None
        counts[small[0][0]] += 1
    np.testing.assert_allclose(counts / counts.sum(), [0.2, 0.5, 0.3], atol=0.015)
    # NaN, +inf or no finite allowed logit: left to the vectorised code.
    for bad in ([0.0, np.nan], [np.nan, 0.0], [0.0, np.inf], [-np.inf, -np.inf]):
        logits = np.array([bad], dtype=np.float32)
        assert policy._discrete_small(logits, None, policy.Sampler(0), True) is None
    # A -inf logit is an action never taken; a masked-out NaN does not matter.
    for logits, mask in (([0.0, -np.inf], None), ([0.0, np.nan], np.array([[True, False]]))):
        small = policy._discrete_small(
            np.array([logits], np.float32), mask, policy.Sampler(0), True
        )
        assert small is not None
        np.testing.assert_array_equal(small[0], [0])
        np.testing.assert_allclose(small[1], [0.0])


def test_agent_logp_from_the_small_path_matches_log_prob(models: dict[str, Path]) -> None:
    a = agent_mod.Agent(models["onnx"], actor_count=3, seed=0)
    obs = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    mask = np.array([[True, True], [False, True], [True, True]])
    for m in (None, mask):
        result = a.request_action([0, 1, 2], obs, m)
        expected = policy.log_prob(
            model.ActionKind.DISCRETE, result.aux["logits"], result.actions, m
        )
        np.testing.assert_allclose(result.logp, expected, rtol=1e-5, atol=1e-6)
    a.shutdown()


def test_onnx_bound_runs_match_plain_runs_and_return_fresh_arrays(
    models: dict[str, Path],
) -> None:
    pol = loader.load_policy(models["onnx"])
    backend = pol.backend
    assert isinstance(backend, onnx.OnnxBackend)
    rng = np.random.default_rng(4)
    for rows in (1, 3, 1, 16, 17, 3):
        first = backend.run(rng.standard_normal((rows, 4)).astype(np.float32))
        obs = rng.standard_normal((rows, 4)).astype(np.float32)
        kept = backend.run(obs)
        again = backend.run(obs + 1)  # a bound run reuses its buffers: `kept` must not change
        for got, want in zip(kept, backend._run_plain(obs), strict=True):
            np.testing.assert_array_equal(got, want)
        assert not np.array_equal(kept[0], again[0])
        assert len(first) == len(kept) == 2
    assert backend._bound.get((1, 4)) is not None
    assert (17, 4) not in backend._bound  # too many rows to bind
    pol.close()


def test_sampler_lists_the_same_noise_as_its_arrays() -> None:
    arrays, lists = policy.Sampler(5), policy.Sampler(5)
    rng = np.random.default_rng(0)
    # Past a window and a block boundary, in uneven steps (and one larger than a window).
    for count in [*rng.integers(1, 64, 3000).tolist(), 5000, 3]:
        want = arrays.log_neg_log(count).tolist()
        assert lists.log_neg_log_list(count) == want


def test_single_row_records_continuous_actions_and_aux(tmp_path: Path) -> None:
    kind = model.ActionKind.CONTINUOUS
    export.export_mlp(tmp_path / "c", spec.ModelFormat.ONNX, obs_dim=3, action_kind=kind)
    sink = local.LocalFileSink(tmp_path / "out")
    a = agent_mod.Agent(tmp_path / "c", actor_count=1, sink=sink, seed=0)
    results = [
        a.request_action([0], np.full((1, 3), step, np.float32), reward=float(step))
        for step in range(5)
    ]
    a.flag_last_action([0])
    a.shutdown()
    rows = _table(sink).to_pylist()
    assert [r["obs"] for r in rows] == [[float(step)] * 3 for step in range(5)]
    for row, result in zip(rows, results, strict=True):
        np.testing.assert_array_equal(np.asarray(row["action"], np.float32), result.actions[0])
        np.testing.assert_array_equal(
            np.asarray(row["aux_mean"], np.float32), result.aux["mean"][0]
        )
