"""Clusters: how GPUs are wired together (``ClusterSpec``, read from ``models_catalog/clusters.json``
with a source for every figure).

A cluster says how many GPUs share a node's intra-node link (NVLink / NVSwitch or PCIe), how
fast that link is per GPU, and how fast each GPU reaches the other nodes (InfiniBand, RoCE, EFA
or Omni-Path bandwidth per GPU, one direction). Collectives never run at line rate: each link
has an achieved share (NCCL's ring "bus bandwidth" over the line rate, cited per entry).

With no cluster named, ``default_cluster(gpu)`` answers: ``DEFAULT_GPUS_PER_NODE`` GPUs per node
on the GPU's own interconnect, and ``DEFAULT_INTER_NODE_BANDWIDTH_BYTES_PER_S`` per GPU between
nodes (one 400 Gb/s adapter per GPU, DGX/HGX H100 class), an assumption the estimate states.
"""

from __future__ import annotations

import difflib
import json
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

from planner.errors import PlannerError
from planner.specs.hardware import GpuSpec

CLUSTERS_FILE = "clusters.json"
DEFAULT_GPUS_PER_NODE = 8
"""GPUs that share the intra-node interconnect on an HGX/DGX baseboard."""
DEFAULT_INTER_NODE_BANDWIDTH_BYTES_PER_S = 50e9
"""Per GPU, one direction: one 400 Gb/s adapter per GPU (NVIDIA DGX H100: 8x ConnectX-7 400 Gb/s)."""
DEFAULT_INTRA_NODE_BUSBW_FRACTION = 370.0 / 450.0
"""NCCL's achieved ring bus bandwidth over the NVLink line rate: 370 of 450 GB/s on H100 ("~20%
protocol overhead", S. Jeaugey, NVIDIA/nccl-tests issue #212, 2024-05-06)."""
DEFAULT_INTER_NODE_BUSBW_FRACTION = 47.0 / 50.0
"""Achieved share of a 400 Gb/s NDR adapter through NCCL: 46-48 GB/s per NIC (NVIDIA, nccl-tests
issue #290, 2025-03-03)."""


class ClusterSpec(BaseModel):
    """One kind of cluster, every figure with its source (see models_catalog/clusters.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    gpu: str | None = Field(None, description="the catalog GPU it is built with, when it has one")
    gpus_per_node: int = Field(gt=0, le=1024)
    intra_node_link: str
    intra_node_bandwidth_bytes_per_s: float | None = Field(
        None, gt=0, description="per GPU, one direction; None: the GPU's own interconnect figure")
    intra_node_busbw_fraction: float = Field(DEFAULT_INTRA_NODE_BUSBW_FRACTION, gt=0, le=1)
    inter_node_link: str
    inter_node_bandwidth_bytes_per_s: float = Field(gt=0, description="per GPU, one direction")
    inter_node_busbw_fraction: float = Field(DEFAULT_INTER_NODE_BUSBW_FRACTION, gt=0, le=1)
    sources: dict[str, str] = Field(description="figure name -> where it comes from")

    def intra_bytes_per_s(self, gpu: GpuSpec) -> float:
        """Achieved ring bandwidth per GPU inside a node (line rate x achieved share)."""
        line = self.intra_node_bandwidth_bytes_per_s or gpu.interconnect_bandwidth_bytes_per_s
        return line * self.intra_node_busbw_fraction

    def inter_bytes_per_s(self, gpu: GpuSpec, members_per_node: int = 1) -> float:
        """Achieved bandwidth per GPU of a collective that spans nodes with ``members_per_node`` of
        its GPUs in each node: NCCL runs one ring per NIC, and a ring crosses each node boundary
        once, so the group's members share the node's NICs (bus bandwidth = the node's NICs when
        all 8 GPUs of a node are in the group, one NIC's when one is: nccl-tests
        doc/PERFORMANCE.md, busbw; the per-NIC share from NVIDIA/nccl-tests issue #290), never
        above the intra-node link."""
        network = self.inter_node_bandwidth_bytes_per_s * self.inter_node_busbw_fraction * max(members_per_node, 1)
        return min(network, self.intra_bytes_per_s(gpu))

    def group_bytes_per_s(self, gpu: GpuSpec, group: int, stride: int = 1) -> float:
        """Achieved per-GPU bandwidth of a collective over ``group`` GPUs whose ranks are
        ``stride`` apart (tensor parallel: stride 1; data parallel: stride tp x pp x cp): inside
        a node while ``group x stride <= gpus_per_node``."""
        if group * stride <= self.gpus_per_node:
            return self.intra_bytes_per_s(gpu)
        members = max(1, min(group, self.gpus_per_node // max(stride, 1)))
        return self.inter_bytes_per_s(gpu, members)


def default_cluster(gpu: GpuSpec) -> ClusterSpec:
    """The cluster assumed when none is named: 8 GPUs per node on ``gpu``'s interconnect, 400 Gb/s
    per GPU between nodes (the figures and their sources are the module constants)."""
    return ClusterSpec(
        name="default", description=f"assumed: {DEFAULT_GPUS_PER_NODE} x {gpu.name} per node, 400 Gb/s per GPU",
        gpu=gpu.name, gpus_per_node=DEFAULT_GPUS_PER_NODE, intra_node_link=gpu.interconnect,
        inter_node_link="assumed 400 Gb/s per GPU",
        inter_node_bandwidth_bytes_per_s=DEFAULT_INTER_NODE_BANDWIDTH_BYTES_PER_S,
        sources={"inter_node_bandwidth_bytes_per_s": "assumption: NVIDIA DGX H100 user guide, 8x ConnectX-7 "
                 "400 Gb/s (one per GPU)", "intra_node_busbw_fraction": "NVIDIA/nccl-tests issue #212",
                 "inter_node_busbw_fraction": "NVIDIA/nccl-tests issue #290"},
    )


def _key(text: str) -> str:
    return str(text).strip().lower().replace("_", "-").replace(" ", "-")


@lru_cache(maxsize=1)
def _clusters() -> tuple[ClusterSpec, ...]:
    from planner.specs.catalog import catalog_root, validated_list

    file = catalog_root() / CLUSTERS_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlannerError(f"cannot read the cluster catalog {file}: {exc}") from exc
    return validated_list(raw, ClusterSpec, "cluster catalog", file)


def list_clusters() -> list[ClusterSpec]:
    """Every cluster of ``models_catalog/clusters.json``."""
    return list(_clusters())


def load_cluster(name: str) -> ClusterSpec:
    """A cluster by name or alias, case-insensitively (``dgx-h100``, ``p5``)."""
    wanted = _key(name)
    for cluster in _clusters():
        if wanted == _key(cluster.name) or wanted in {_key(a) for a in cluster.aliases}:
            return cluster
    names = [c.name for c in _clusters()]
    close = difflib.get_close_matches(wanted, names, n=3, cutoff=0.0) or names[:3]
    raise PlannerError(f"unknown cluster {name!r}: closest catalog names are {', '.join(close)} "
                       "(planner catalog clusters lists them)")


def resolve_cluster(name: str | None, gpu: GpuSpec) -> ClusterSpec:
    """``--cluster NAME`` or, without one, ``default_cluster(gpu)``."""
    return default_cluster(gpu) if not name else load_cluster(name)


def other_gpu_note(cluster: ClusterSpec, gpu: GpuSpec) -> str | None:
    """A note when a named cluster was described with another GPU than the one priced: its links are used
    as described (a deliberate what-if, or a slip the user should see)."""
    if cluster.gpu is None or cluster.gpu == gpu.name:
        return None
    return (f"cluster: {cluster.name} is described with {cluster.gpu} GPUs, not {gpu.name}: its links "
            f"({cluster.intra_node_link} inside a node, {cluster.inter_node_link} between nodes) are used as described")
