"""`PackedPanels`: a read-only view of one `ExpertLayer`'s packed experts in the engine's own memory.

The engine packs each projection of every expert into panels of 16 output columns (csrc/common.h, the format's
`panel` layout), padded to the engine's hidden / intermediate sizes; quantized formats keep fp32 scales beside
them on a grid of scale blocks (per output channel: a grid of one column; fp8 / int4: the format's `scale_block`).
The engine's packer describes both itself (`MoELayer.layout()`, csrc/packing.h); the view carries that
description, so no reader re-derives the layout. Code outside the engine that reads the weights (the GPU share
streams them to a GPU) takes this view from `ExpertLayer.panels()` instead of reaching into the engine object.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional

import torch

from .formats import ExpertFormat

# The engine's projection indices (set_weights, panel_storage, scale_storage).
PROJECTIONS = {"gate": 0, "up": 1, "down": 2}


def _host_bytes(address: int, nbytes: int) -> torch.Tensor:
    """uint8 tensor over engine-owned memory (no copy); valid while the engine layer lives."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)


@dataclass(frozen=True)
class ProjectionPanels:
    """One projection of every expert: expert e's panels are bytes [e * n, (e + 1) * n) of `raw`, n =
    layout["expert_bytes"] (padded rows x padded columns x the format's bytes per weight)."""

    raw: torch.Tensor               # uint8, the engine's storage itself (no copy); empty for a projection the layer
                                    # does not have (layout["stored"] False: an ungated layer's gate)
    scales: Optional[torch.Tensor]  # fp32 [experts][grid rows][grid cols] of a quantized format, else None (a view
                                    # of the engine's grid, which it stores column by column)
    layout: dict                    # the engine's description of both (MoELayer.layout(), csrc/packing.h): sizes,
                                    # panel kind and group, bytes, scale kind, block and grid


@dataclass(frozen=True)
class PackedPanels:
    """The packed experts of one layer; the tensors alias the engine's memory and are valid while the layer lives
    (the view does not keep it alive)."""

    format: ExpertFormat
    padded_hidden: int
    padded_intermediate: int
    projections: tuple[ProjectionPanels, ProjectionPanels, ProjectionPanels]  # gate, up, down


def bias_views(engine_layer, num_experts: int, hidden: int, intermediate: int) -> Optional[dict]:
    """{gate, up, down: fp32 [experts, I or H]} views of a layer's biases in the engine's memory (gate None for an
    ungated layer), or None without biases."""
    if not engine_layer.has_bias:
        return None
    gate_up = _host_bytes(*engine_layer.bias_storage(False)).view(torch.float32).view(num_experts, -1)
    down = _host_bytes(*engine_layer.bias_storage(True)).view(torch.float32).view(num_experts, -1)
    ip = gate_up.shape[1] // 2 if engine_layer.layout()["gate"]["stored"] else 0  # where up starts
    return {"gate": gate_up[:, :intermediate] if ip else None, "up": gate_up[:, ip:ip + intermediate],
            "down": down[:, :hidden]}


def packed_panels(engine_layer, fmt: ExpertFormat, num_experts: int) -> PackedPanels:
    """The view of an `_engine.MoELayer` holding `num_experts` experts in format `fmt`."""
    layouts, projections = engine_layer.layout(), []
    for name, which in PROJECTIONS.items():
        layout, scales = layouts[name], None
        if layout["scales"] != "none" and layout["stored"]:  # stored by grid column (common.h): [experts][rows][cols]
            rows, cols = layout["scale_grid"]
            scales = (_host_bytes(*engine_layer.scale_storage(which)).view(torch.float32)
                      .view(num_experts, cols, rows).transpose(1, 2))
        projections.append(ProjectionPanels(_host_bytes(*engine_layer.panel_storage(which)), scales, layout))
    return PackedPanels(fmt, layouts["down"]["padded_rows"], layouts["gate"]["padded_rows"], tuple(projections))
