"""The sink's counters exist at 0 from the start, for every label value.

A counter series that appears only at its first increment shows up already at 1, and
`increase()` over it stays 0: the chart's alerts on the first stream-tail loss, dead
letter or retried error would not fire.
"""

from __future__ import annotations

import inspect
import re

import prometheus_client as prom

from relayrl_runtime.sinks import service


def test_every_error_place_and_dead_letter_reason_is_exported_at_zero() -> None:
    registry = prom.CollectorRegistry()
    service.SinkMetrics("arrow", registry)
    for where in service.ERROR_PLACES:
        value = registry.get_sample_value(
            "relayrl_sink_errors_total", {"sink": "arrow", "where": where}
        )
        assert value == 0.0, where
    for reason in service.DeadLetterReason.ALL:
        value = registry.get_sample_value(
            "relayrl_sink_dead_letters_total", {"sink": "arrow", "reason": reason}
        )
        assert value == 0.0, reason


def test_every_place_the_service_counts_an_error_is_listed() -> None:
    source = inspect.getsource(service)
    used = set(re.findall(r'_retry\(\s*"([a-z-]+)"', source))
    used |= set(re.findall(r'errors\.labels\(self\.writer\.kind, "([a-z-]+)"\)', source))
    assert {"commit", "fetch", "stream-tail-lost", "storage"} <= used  # the patterns match
    assert used <= set(service.ERROR_PLACES)
