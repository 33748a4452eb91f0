"""
Parameter-efficient modules that go inside the frozen backbones, and the plain functions that put them there,
freeze everything else, save and load them, and fold them away for inference.

- `MMAdapter`: LaVIN's Mixture-of-Modality adapter (paper §3.2; luogen1996/LaVIN lavin/mm_adapter.py
  `RepAdapter_Router`; spec lavin-spec.md §1.4-1.5). A shared down-projection C->8, two grouped up-projections
  8->C, mixed by a soft modality router (router.py):

      Y = X + s · [ w0 · up0(Z) + w1 · up1(Z) ],   Z = dropout(down(X)),   w = softmax(W_r r / tau)

  It sits between `attention_norm` and wq/wk/wv in every LLaMA block, and between `ln_1` and the attention in every
  CLIP block. There is no non-linearity, so in eval mode it is an affine map that `fold_mma_into_qkv` merges into
  the q/k/v projections (the "Rep" of RepAdapter, which the official code never implements; spec §12e).
- `LoRALinear` (Hu et al. 2021, configured as in the LLaVA scaling study, peers-spec §1) and `MixLoRALinear`
  (conditional mixture of LoRA, Shen et al. 2024, peers-spec §3): frozen linears with a trainable low-rank update.
- `AdapterArgs`, `inject_adapters`, `mark_trainable`, `trainable_state_dict`, `load_trainable`,
  `convert_official_lavin`: one `method` value picks MMA (default), LoRA, MixLoRA or full fine-tuning.

model.py calls these when it assembles LaVIN; train.py / sample.py / bench.py reach them through model.py.
Tests: `python -m pytest test_all.py -k "adapter or lora or merge or official"`.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from router import FactorRouter, Router

METHODS = ("mma", "lora", "mixlora", "full")


@dataclass
class AdapterArgs:
    method: str = "mma"  # mma | lora | mixlora | full
    # MM-Adapter (spec §1.5 and §5.2: adapter dim 8, scale 1, dropout 0.1, tau 10 for 7B / 5 for 13B)
    adapter_dim: int = 8
    adapter_scale: float = 1.0
    adapter_dropout: float = 0.1
    tau: float = 10.0
    # LoRA, LLaVA scaling study defaults (peers-spec §1.2): alpha = 2 * rank, dropout 0.05, every LLM linear but the head
    lora_rank: int = 64
    lora_alpha: float | None = None  # None -> 2 * rank
    lora_dropout: float = 0.05
    lora_targets: str = "q,k,v,o,gate,up,down"
    # MixLoRA (peers-spec §3.5-3.6): pool E, r chosen per instance, alpha = 2E in the released script
    mix_pool: int = 16
    mix_rank: int = 4
    mix_alpha: float | None = None  # None -> 2 * pool (released script; a confound against LoRA's 2r, see peers-spec)
    mix_cfs: str = "dot"  # dot (paper) | separable (released code) | none (IFS only)
    mix_mode: str = "weighted"  # weighted (routers learn; project decision) | hard (released: routers get no gradient)
    mix_lambda: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        bad = set(self.lora_targets.split(",")) - set(LORA_TARGETS)
        if bad:
            raise ValueError(f"unknown LoRA target(s) {sorted(bad)}; choose among {','.join(LORA_TARGETS)}")


# LoRA target names of the LLaVA code (q_proj, ..., down_proj) -> where they live in a Meta-layout LLaMA block
LORA_TARGETS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
                "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}


# ---------------------------------------------------------------------------------------------------------------------
# The MM-Adapter

class GroupedLinear(nn.Module):
    """
    A 1x1 grouped convolution written as a linear map: hidden (.., h) -> (.., C) with `groups` blocks.
    Output channels [g·C/G, (g+1)·C/G) read only hidden units [g·h/G, (g+1)·h/G). The weight is stored (C, h/G),
    which is the official Conv1d weight [C, h/G, 1] without its kernel axis (spec §1.5, "grouped up-projection").
    """

    def __init__(self, hidden: int, out: int, groups: int):
        super().__init__()
        self.groups = groups
        # Zero init (official): the up-projections start at zero, so the adapter starts as the exact identity.
        self.weight = nn.Parameter(torch.zeros(out, hidden // groups))
        self.bias = nn.Parameter(torch.zeros(out))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        G = self.groups
        C, k = self.weight.shape
        zg = z.unflatten(-1, (G, k))  # (B, T, G, k)
        w = self.weight.view(G, C // G, k)  # (G, C/G, k)
        y = torch.einsum("btgk,gok->btgo", zg, w.to(zg.dtype))  # (B, T, G, C/G)
        return y.flatten(-2) + self.bias.to(y.dtype)  # (B, T, C)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense, block-diagonal (C, h) matrix B̃ of spec §1.5."""
        G = self.groups
        C, k = self.weight.shape
        dense = self.weight.new_zeros(C, G * k)
        for g in range(G):
            dense[g * C // G:(g + 1) * C // G, g * k:(g + 1) * k] = self.weight[g * C // G:(g + 1) * C // G]
        return dense


class MMAdapter(nn.Module):
    """x (B, T, C), r (B, C) router input -> (B, T, C). 20·C + 10 parameters (spec §4)."""

    def __init__(self, dim: int, hidden: int = 8, groups: int = 2, scale: float = 1.0, dropout: float = 0.1,
                 tau: float = 10.0):
        super().__init__()
        self.down = nn.Linear(dim, hidden)  # official conv_A: shared by both paths
        nn.init.xavier_uniform_(self.down.weight)  # official init: Xavier-uniform A, zero bias
        nn.init.zeros_(self.down.bias)
        self.up0 = GroupedLinear(hidden, dim, groups)  # official conv_B
        self.up1 = GroupedLinear(hidden, dim, groups)  # official conv_D
        self.router = Router(dim, 2, tau)  # official expert_weights
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        dt = self.down.weight.dtype  # fp32 masters; under autocast the matmuls still run in bf16, outside it in fp32
        w = self.router(r.to(dt)).to(x.dtype)[:, None, :]  # (B, 1, 2): one pair per sample, shared by all its tokens
        z = self.dropout(self.down(x.to(dt)))  # (B, T, h); no non-linearity follows, which is what makes it foldable
        delta = w[..., 0:1] * self.up0(z) + w[..., 1:2] * self.up1(z)  # (B, T, C)
        return x + self.scale * delta.to(x.dtype)

    @torch.no_grad()
    def affine(self, w: torch.Tensor):
        """
        In eval mode, for fixed routing w = (w0, w1), the adapter is x -> M x + c with M = I + U A (spec §12e):
        U = s (w0 B̃ + w1 D̃) (C, h), A (h, C), c = U a + s (w0 b_B + w1 b_D). Returns (U, A, c) in fp32.
        """
        w0, w1 = w.float().tolist()
        s = self.scale
        U = s * (w0 * self.up0.dense_weight().float() + w1 * self.up1.dense_weight().float())  # (C, h)
        A, a = self.down.weight.float(), self.down.bias.float()  # (h, C), (h,)
        c = U @ a + s * (w0 * self.up0.bias.float() + w1 * self.up1.bias.float())  # (C,)
        return U, A, c


@torch.no_grad()
def fold_mma_into_qkv(attention: nn.Module, adapter: MMAdapter, w: torch.Tensor) -> dict:
    """
    Re-parameterisation (spec §12e): q = W_q (M x + c) = (W_q + (W_q U) A) x + W_q c, likewise k and v. Replaces
    attention.wq/wk/wv with biased linears (the bias is added before RoPE, exactly where the adapter output entered)
    and returns the original modules so the caller can restore them bit-exactly.
    """
    U, A, c = adapter.affine(w)
    originals = {}
    for name in ("wq", "wk", "wv"):
        lin = getattr(attention, name)
        W = lin.weight.float()  # (out, C); fold in fp32, then store in the frozen weight's dtype
        merged = nn.Linear(lin.in_features, lin.out_features, bias=True, device=lin.weight.device,
                           dtype=lin.weight.dtype)
        merged.weight.copy_(W + (W @ U) @ A)  # rank-h update of the frozen weight
        merged.bias.copy_(W @ c)
        merged.requires_grad_(False)
        originals[name] = lin
        setattr(attention, name, merged)
    return originals


# ---------------------------------------------------------------------------------------------------------------------
# LoRA and MixLoRA: frozen linear + trainable low-rank update. They subclass nn.Linear and adopt the frozen weight, so
# the base keys (`...attention.wq.weight`) are unchanged and Meta checkpoints load before or after injection.

class LoRALinear(nn.Linear):
    """y = W0 x + (alpha / r) · B A dropout(x). A: Kaiming-uniform (a=√5), B: zero, so it starts as W0."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # adopt the frozen parameters (the meta ones are dropped)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # U(±1/sqrt(d_in)), like a default Linear
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # Apply A first, then B: (.., d_in) -> (.., r) -> (.., d_out), never forming the d_out x d_in product. The
        # scaling and the sum ride in B's matmul (addmm's alpha and its added input): no extra (.., d_out) passes.
        z = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (.., r)
        out = torch.addmm(y.flatten(0, -2), z.flatten(0, -2), self.lora_B.to(x.dtype).t(), alpha=self.scaling)
        return out.view_as(y)

    @torch.no_grad()
    def merge(self):
        """W = W0 + (alpha/r) B A: no inference overhead afterwards (one way: the frozen weight is overwritten)."""
        if not self.merged:
            self.weight.add_((self.scaling * self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype))
            self.merged = True


class MixLoRALinear(nn.Linear):
    """
    y = W0 x + (alpha / r) · Σ_i g_i b_{j_i} a_{k_i}ᵀ dropout(x), with the r factors (k_i, j_i) chosen per instance
    by a FactorRouter from the mean of this layer's own input over the sequence (peers-spec §3.2).

    Open choices, labelled: we pool over every position, padding included, as the released code does; and at
    decode time the layer re-routes on the single new token, also as the released code does.
    """

    def __init__(self, base: nn.Linear, pool: int, rank: int, alpha: float, dropout: float, cfs: str, mode: str,
                 lam: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(pool, base.in_features, device=dev))  # a-pool, rows a_e ∈ R^{d_in}
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # released code's init (the summary's "Gaussian" is not)
        self.lora_B = nn.Parameter(torch.zeros(pool, base.out_features, device=dev))  # b-pool, rows b_e ∈ R^{d_out}
        with torch.device(dev):
            self.router = FactorRouter(base.in_features, pool, rank, cfs, mode, lam)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Legend: B batch, T time, d d_in, o d_out, r chosen factors.
        y = F.linear(x, self.weight, self.bias)
        idx_a, idx_b, g = self.router(x.mean(1).to(self.lora_A.dtype), self.lora_A)  # (B, r) each; g may be None
        a = self.lora_A[idx_a].to(x.dtype)  # (B, r, d): gathering gives the whole pool a (mostly zero) gradient, so
        b = self.lora_B[idx_b].to(x.dtype)  # (B, r, o)  every rank produces gradients for the same parameters (FSDP2)
        z = torch.einsum("btd,brd->btr", self.dropout(x), a)  # (B, T, r): apply A(x) first, then B(x)
        if g is not None:
            z = z * g.to(z.dtype)[:, None, :]
        return y + self.scaling * torch.einsum("btr,bro->bto", z, b)


# ---------------------------------------------------------------------------------------------------------------------
# Injection, freezing, saving and loading

def inject_adapters(model: nn.Module, args: AdapterArgs):
    """
    Put the method's modules into a LaVIN model (model.py) in place. MMA: an MM-Adapter in every LLaMA block and every
    CLIP block (spec §1.4). LoRA / MixLoRA: wrap the chosen LLaMA linears; CLIP stays frozen and un-adapted
    (peers-spec §1.4). Full: nothing to add. New modules are created fp32 on the device of the weights they adapt
    (the meta device included, so 7B/13B shapes can be counted without memory).
    """
    llama, visual = model.llama, model.visual
    if args.method == "mma":
        for layer in llama.layers:
            with torch.device(layer.attention.wq.weight.device):
                layer.adapter_attn = MMAdapter(llama.args.dim, args.adapter_dim, 2, args.adapter_scale,
                                               args.adapter_dropout, args.tau)
        for block in visual.blocks:
            with torch.device(block.attn.in_proj.weight.device):
                block.adapter_attn = MMAdapter(visual.args.width, args.adapter_dim, 2, args.adapter_scale,
                                               args.adapter_dropout, args.tau)
    elif args.method in ("lora", "mixlora"):
        for layer in llama.layers:
            for target in args.lora_targets.split(","):
                parent_name, attr = LORA_TARGETS[target].split(".")
                parent = getattr(layer, parent_name)
                base = getattr(parent, attr)
                if args.method == "lora":
                    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_rank
                    new = LoRALinear(base, args.lora_rank, alpha, args.lora_dropout)
                else:
                    alpha = args.mix_alpha if args.mix_alpha is not None else 2 * args.mix_pool
                    new = MixLoRALinear(base, args.mix_pool, args.mix_rank, alpha, args.lora_dropout, args.mix_cfs,
                                        args.mix_mode, args.mix_lambda)
                setattr(parent, attr, new)
    mark_trainable(model, args)


def is_trainable(name: str, args: AdapterArgs) -> bool:
    """The one rule that says which LaVIN parameters train, by name."""
    if args.method == "mma":
        # The official rule (spec §3): trainable iff the name contains "adapter" — the LLaMA and CLIP adapters, the
        # neck `adapter_proj` and `adapter_modality_embedding`. No bias or norm tuning.
        return "adapter" in name
    if args.method in ("lora", "mixlora"):
        # LoRA factors (+ MixLoRA routers, which only learn in the score-weighted mode) and the visual neck, kept from
        # LaVIN for a like-for-like ScienceQA baseline (peers-spec §1.4). The modality token has no router to feed
        # here, so it would get no gradient: frozen.
        if ".router." in name:
            return args.method == "mixlora" and args.mix_mode == "weighted"
        return ".lora_" in name or name.startswith("adapter_proj.")
    # full: everything on the loss path. CLIP's ln_post/proj are unused by LaVIN (spec §1.3) and the modality token
    # reaches the loss only through MM-Adapter routers, so these would get no gradient (and break DDP/FSDP).
    return not (name.startswith("visual.ln_post") or name == "visual.proj" or "modality" in name)


def mark_trainable(model: nn.Module, args: AdapterArgs):
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, args))


def trainable_state_dict(model: nn.Module) -> dict:
    """The trainable tensors only, fp32 on CPU: an MMA checkpoint of LaVIN-7B is 3.78M x 4 B ≈ 15 MB (paper Table 6).
    FSDP2 parameters are DTensor shards: `.full_tensor()` all-gathers them, so call this on every rank."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = t.detach().float().cpu().clone()
    return out


def load_trainable(model: nn.Module, sd: dict):
    """Load a trainable state dict (ours, or the official LaVIN format converted by `convert_official_lavin`).
    Missing, unexpected and mis-shaped keys are all listed in one error."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # DDP checkpoints carry a `module.` prefix
    if any(".conv_A." in k or ".expert_weights." in k for k in sd):
        sd = convert_official_lavin(sd)
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(expected - sd.keys())
    unexpected = sorted(sd.keys() - params.keys())
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(params[k].shape)}"
                    for k in sd.keys() & params.keys() if tuple(sd[k].shape) != tuple(params[k].shape))
    if missing or unexpected or shapes:
        lines = ["adapter checkpoint does not match the model (wrong --method, model size or adapter flags?)"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise ValueError("\n".join(lines))
    with torch.no_grad():
        for k, v in sd.items():
            p = params[k]
            if isinstance(p, DTensor):  # FSDP2 shard: scatter the full tensor the way the parameter is laid out
                p.copy_(distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(v.to(device=p.device, dtype=p.dtype))


def convert_official_lavin(sd: dict) -> dict:
    """
    Official LaVIN adapter keys (spec §10.3) -> ours. The official modules are 1x1 Conv1d, so their weights carry a
    trailing kernel axis of size 1 that we drop; names map as:
      layers.{i}.adapter_attn.conv_A / conv_B / conv_D / expert_weights -> llama.layers.{i}.adapter_attn.down/up0/up1/router.proj
      backbone.visual.transformer.resblocks.{j}.adapter_attn.*         -> visual.blocks.{j}.adapter_attn.*
      adapter_proj.conv_A / conv_B (plain linears despite the name)      -> adapter_proj.fc1 / fc2
      adapter_modality_embedding.weight                                 -> unchanged
    """
    parts = {"conv_A": "down", "conv_B": "up0", "conv_D": "up1", "expert_weights": "router.proj"}
    out = {}
    for key, v in sd.items():
        k = key.removeprefix("module.")
        if k.startswith("adapter_proj."):
            k = k.replace("conv_A", "fc1").replace("conv_B", "fc2")
        elif k.startswith("adapter_modality_embedding."):
            pass
        else:
            m = re.fullmatch(r"(layers\.\d+|backbone\.visual\.transformer\.resblocks\.\d+)\.adapter_attn\."
                             r"(conv_A|conv_B|conv_D|expert_weights)\.(weight|bias)", k)
            if m is None:
                out[k] = v  # not an adapter key: kept as is, so load_trainable reports it as unexpected
                continue
            where, part, kind = m.groups()
            where = ("llama." + where) if where.startswith("layers") else where.replace(
                "backbone.visual.transformer.resblocks", "visual.blocks")
            k = f"{where}.adapter_attn.{parts[part]}.{kind}"
            if v.dim() == 3:
                v = v.squeeze(-1)  # Conv1d [out, in/groups, 1] -> [out, in/groups]
        out[k] = v
    return out
