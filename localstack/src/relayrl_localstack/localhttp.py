"""HTTP to servers on this machine, without the user's proxy settings.

``urllib.request.urlopen`` sends requests through ``http_proxy``/``https_proxy`` unless
``no_proxy`` lists the host, and a ``no_proxy`` of ``localhost,127.0.0.1`` does not
cover the pods' 127.1.x.y addresses. Probes (:mod:`relayrl_localstack.probes`) and the
cluster's health checks (:mod:`relayrl_localstack.cluster`) only ever talk to loopback,
so they never use a proxy.
"""

from __future__ import annotations

import ssl
import urllib.request
from typing import Any


def urlopen(
    request: urllib.request.Request, *, timeout: float, context: ssl.SSLContext | None = None
) -> Any:
    """``urllib.request.urlopen`` with no proxy (the response, a context manager)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers).open(request, timeout=timeout)
