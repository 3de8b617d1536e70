"""RelayRL Fleet's local Kubernetes stack for tests and the demo (a dev/test tool).

- :mod:`relayrl_localstack.binaries`: the pinned binaries built by ``hack/k8s/build.sh``;
- :mod:`relayrl_localstack.cluster`: :class:`LocalCluster`, etcd + apiserver +
  controller-manager + scheduler on loopback;
- :mod:`relayrl_localstack.kwok`: kwok and fake CPU/GPU nodes;
- :mod:`relayrl_localstack.processnode`: a Node whose pods run as host processes;
- :mod:`relayrl_localstack.cli`: ``relayrl-localstack up|down|status``.
"""

from relayrl_localstack.cluster import ClusterError, LocalCluster
from relayrl_localstack.kwok import Kwok, create_nodes
from relayrl_localstack.processnode import ProcessNode

__all__ = ["ClusterError", "Kwok", "LocalCluster", "ProcessNode", "create_nodes"]
