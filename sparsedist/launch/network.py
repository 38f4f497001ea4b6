"""Which network interface the collectives use on a Ray node.

Gloo (and NCCL's bootstrap) pick their address from the host name when no interface is named, and on
stock Debian/Ubuntu images, containers and namespaces the host name resolves to a loopback address
(127.0.1.1, 127.0.0.1): each rank would then advertise its own loopback and the ranks on other hosts
could never connect. The interface that carries the node's Ray address is the one the other nodes
reach, so every Ray Train worker binds its collectives there before its process group is made.
`GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME` set by the user (cluster config, runtime env) win.

Imported by the driver only once Ray's environment is set (`launch.cluster`): it imports Ray.
"""

from __future__ import annotations

import ipaddress
import os

import ray.util
from ray.train.torch.config import TorchConfig, _TorchBackend

INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def interface_with_address(address: str) -> str | None:
    """The name of the local interface holding `address` (IPv4 or IPv6), or None."""
    import psutil

    wanted = ipaddress.ip_address(address)
    for name, addresses in psutil.net_if_addrs().items():
        for entry in addresses:
            try:
                if ipaddress.ip_address(entry.address.split("%")[0]) == wanted:
                    return name
            except ValueError:  # a MAC address
                continue
    return None


def bind_collectives_to_node_interface() -> dict[str, str]:
    """Set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the interface of this Ray node's address, each
    unless already set; returns what it set. Nothing when the address is on no local interface (a NAT'd
    address): the libraries' own choice is then the best there is."""
    interface = interface_with_address(ray.util.get_node_ip_address())
    if interface is None:
        return {}
    chosen = {name: interface for name in INTERFACE_VARIABLES if not os.environ.get(name)}
    os.environ.update(chosen)
    return chosen


class _NodeInterfaceBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config) -> None:
        worker_group.execute(bind_collectives_to_node_interface)
        super().on_start(worker_group, backend_config)


class NodeInterfaceTorchConfig(TorchConfig):
    """Ray Train's torch backend, with every worker bound to its node's interface before the process
    group is made (Ray Train's extension point for backends: `BackendConfig.backend_cls`)."""

    @property
    def backend_cls(self):
        return _NodeInterfaceBackend
