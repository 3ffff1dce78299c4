"""LoRA (Hu et al. 2021): low-rank updates W + (alpha / r) B A of chosen projections, the rest of the model frozen.

`model.lora.rank > 0` makes every projection named in `model.lora.targets` a LoRALinear and freezes every other
parameter (requires_grad=False), when the LM is built: so the one-process engine, FSDP2 and DeepSpeed ZeRO all
see frozen base weights and trainable A and B through their ordinary build (parallel/materialize.py), the
optimizer gets only A and B (training/optim.py skips frozen parameters), and checkpoints hold both. A LoRALinear
is the nn.Linear it replaces plus `lora_A` [r, in] and `lora_B` [out, r]: the base weight keeps its name
(`...q_proj.weight`), so a Transformer's weights load into it unchanged and only A, B are new. B starts at 0, so a
fresh LoRA model computes exactly what its base weights compute.

Exports merge: `merge_lora(lm)` is the same model without LoRA, W <- W + (alpha / r) B A
(checkpoints/export.py calls it for both formats). Targets: the attention-family mixers' q_proj, k_proj, v_proj,
o_proj (attention, sliding window, Liger) and the MLPs' gate_proj, up_proj: the projections whose modules are
called as modules (the recurrent mixers read their output projection's weight inside a fused function, and the
MLP's down projection is fused with the SiLU product, so a LoRA there would be bypassed: they are refused).
`teacher` (set by model.liger.teacher_mode) switches the update off: the frozen base model, the distillation teacher.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs.errors import ConfigError
from model.attention import Attention  # the attention family: A, W and Liger (its subclass)
from model.config import LORA_MIXER_TARGETS, LORA_MLP_TARGETS, LoRAConfig

LORA_PARAMETERS = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """y = x W^T + b + (alpha / r) (x A^T) B^T; with `teacher` set, the base linear alone."""

    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float):
        self.rank, self.scaling, self.teacher = rank, alpha / rank, False
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_lora()

    def reset_lora(self) -> None:
        """A as nn.Linear's default (Kaiming-uniform, as peft), B = 0: the update starts at exactly zero. In place,
        so it also runs on sharded parameters after a meta-device build (LM.init_weights)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.teacher:
            return y
        return y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A in fp32 (then the weight's dtype)."""
        update = self.lora_B.float() @ self.lora_A.float() * self.scaling
        return (self.weight.float() + update).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}, lora_scaling={self.scaling:g}"


def is_lora_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_PARAMETERS


def apply_lora(lm: nn.Module, cfg: LoRAConfig) -> None:
    """Replace the targeted projections of `lm` (freshly built, before init_weights) by LoRALinears and freeze
    every other parameter. A target that names no projection of this model is a ConfigError."""
    replaced = set()
    for block in lm.blocks:
        owners = [(block.mlp, LORA_MLP_TARGETS)]
        if isinstance(block.mixer, Attention):
            owners.append((block.mixer, LORA_MIXER_TARGETS))
        for owner, allowed in owners:
            for name in cfg.targets:
                base = getattr(owner, name, None) if name in allowed else None
                if isinstance(base, nn.Linear) and not isinstance(base, LoRALinear):
                    setattr(owner, name, LoRALinear(base.in_features, base.out_features, base.bias is not None,
                                                    cfg.rank, cfg.alpha).to(base.weight.device))
                    replaced.add(name)
    missing = [name for name in cfg.targets if name not in replaced]
    if missing:
        raise ConfigError(f"model.lora.targets: {', '.join(missing)} names no projection of this model (q/k/v/o_proj "
                          "are those of attention and Liger layers)")
    for name, param in lm.named_parameters():
        param.requires_grad_(is_lora_parameter(name))


def lora_modules(lm: nn.Module) -> list[LoRALinear]:
    return [m for m in lm.modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_lora(lm: nn.Module) -> nn.Module:
    """The same model without LoRA (model.lora.rank 0, every parameter trainable): each LoRALinear's weight
    replaced by W + (alpha / r) B A. `lm` is returned unchanged when it has no LoRA. Built on lm's device and dtype."""
    if lm.config.lora.rank == 0:
        return lm
    merged_names = {name for name, module in lm.named_modules() if isinstance(module, LoRALinear)}
    config = dataclasses.replace(lm.config, lora=LoRAConfig())
    weight = lm.embed.weight
    with torch.device(weight.device):
        merged = type(lm)(config).to(weight.dtype)  # the LM class, without importing model.lm (it imports this)
    state = {}
    for name, tensor in lm.state_dict().items():
        if is_lora_parameter(name):
            continue
        owner = name.rsplit(".", 1)[0]
        if owner in merged_names and name.endswith(".weight"):
            tensor = lm.get_submodule(owner).merged_weight()
        state[name] = tensor
    merged.load_state_dict(state)
    return merged.train(lm.training)
