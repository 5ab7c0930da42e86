"""Per-expert LoRA factors for the engine, in PEFT 0.18's flat layout (docs/expert_lora_format.md).

For E experts, hidden H, intermediate I and ranks r_gu / r_d:
    A_gu [r_gu*E, 2I]  B_gu [H, r_gu*E]   (PEFT's lora_A / lora_B .weight of `gate_up_proj`)
    A_d  [r_d*E,  H]   B_d  [I, r_d*E]    (of `down_proj`)
expert e uses A rows e*r..(e+1)*r and B columns e::E; z = x W_gu[e]^T + scale_gu * (x B_gu,e) A_gu,e, and the same
for down on h. A projection without LoRA has both factors None. The engine reads the tensors through raw pointers
on every call and never keeps them, so an optimizer may update them in place between steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


@dataclass
class ExpertLoRA:
    A_gu: Optional[torch.Tensor]
    B_gu: Optional[torch.Tensor]
    A_d: Optional[torch.Tensor]
    B_d: Optional[torch.Tensor]
    scale_gu: float = 1.0
    scale_d: float = 1.0

    def ranks(self, num_experts: int) -> tuple[int, int]:
        """(r_gu, r_d) for a layer of `num_experts` experts; 0 for a projection without LoRA."""
        return tuple(0 if B is None else B.shape[1] // num_experts for B in (self.B_gu, self.B_d))

    def factors(self) -> tuple:
        return self.A_gu, self.B_gu, self.A_d, self.B_d


class ExpertLoRAGrads(NamedTuple):
    """Gradients of the four factors (same shapes/layouts; None for a projection without LoRA)."""
    A_gu: Optional[torch.Tensor]
    B_gu: Optional[torch.Tensor]
    A_d: Optional[torch.Tensor]
    B_d: Optional[torch.Tensor]
