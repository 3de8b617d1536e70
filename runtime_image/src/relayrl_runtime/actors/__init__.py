"""Actors as rows of a vectorised pool, their trajectory buffers, and the router workers.

`pool.ActorPool` keeps every actor's state and in-progress trajectory in preallocated
columnar arrays (one row per actor) so a request for N actors is a handful of numpy
operations; `routers.RouterPool` encodes finished trajectories and hands them to a sink.
"""
