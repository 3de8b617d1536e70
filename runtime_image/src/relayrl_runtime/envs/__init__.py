"""Environment drivers: step environments against the agent, recording trajectories.

`driver.EnvDriver` runs the loop over any `driver.VecEnv`; `gym` builds one from a
gymnasium id (vector env, same-step autoreset); `python` loads a custom factory from an
entry point and batches its scalar envs. Remote environments use `transport` instead.
"""
