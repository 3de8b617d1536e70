"""A remote environment client process for the tests: CartPole over the wire.

Usage: python remote_client.py ADDRESS STEPS OUT_JSON [--abandon]
Creates 2 actors, steps two CartPole envs for STEPS steps through the runtime and
writes {"steps", "episodes", "versions", "ids"} to OUT_JSON. With --abandon it exits
without removing its actors (a client that crashed or forgot REMOVE_ACTORS).
"""

from __future__ import annotations

import json
import sys

import gymnasium
import numpy as np

from relayrl_runtime.transport import client


def main() -> None:
    address, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    abandon = "--abandon" in sys.argv[4:]
    envs = [gymnasium.make("CartPole-v1") for _ in range(2)]
    obs = np.stack([e.reset(seed=i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    episodes = 0
    versions = set()
    with client.RemoteClient(address) as c:
        ids = c.new_actors(2)
        rewards = np.zeros(2)
        for _ in range(steps):
            result = c.request_action(ids, obs, reward=rewards)
            versions.add(result.version)
            for i, env in enumerate(envs):
                o, r, term, trunc, _ = env.step(int(result.actions[i]))
                rewards[i] = r
                if term or trunc:
                    c.flag_last_action([ids[i]], reward=float(r), terminated=term, truncated=trunc)
                    episodes += 1
                    o, _ = env.reset()
                obs[i] = o
        if not abandon:
            c.remove_actors(ids)
    summary = {"steps": steps, "episodes": episodes, "versions": sorted(versions), "ids": ids}
    with open(out, "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main()
