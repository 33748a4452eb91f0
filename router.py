"""
Routers: the soft modality router of LaVIN's MM-Adapter, and the factor-selection router of MixLoRA.

A router looks at a summary of its input and decides how to mix a few parameter-efficient paths.

1. `Router`, LaVIN's soft modality router (paper §3.2, eq. for w; luogen1996/LaVIN lavin/mm_adapter.py,
   `RepAdapter_Router.expert_weights`):

       w = softmax( (W_r r + b_r) / tau ) ∈ R^2

   r is one vector per sample: on the LLaMA side the normalised hidden state of the modality token (position 0),
   on the CLIP side each image's own class token (README, difference 1). tau = 10 for 7B and 5 for 13B. The routing
   is *soft*: both up-projection paths always contribute, so every router weight gets a gradient.

2. `FactorRouter`, MixLoRA's instance-conditioned choice of r rank-1 factors out of a pool of E (Shen et al. 2024,
   "Multimodal Instruction Tuning with Conditional Mixture of LoRA"; VT-NLP/MixLoRA llava/peft_cmoa/mixture/selector.py;
   Shen et al. §3.2). Independent Factor Selection (IFS) picks the a-factors from the pooled input;
   Conditional Factor Selection (CFS) picks the b-factors from the pooled input *and* the chosen a-factors.
   Hard top-r has no gradient, so to let the routers learn we scale the chosen factors by their renormalised
   scores (README, difference 21); `mode="hard"` keeps the released code's dynamics.

Used by adapters.py (MMAdapter, MixLoRALinear); `routing_table`, the router's weights per layer and modality, by
train.py and demo.py; tests: `python -m pytest -q test_all.py -k "test_router_ or
mixlora"`.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def default_tau(dim: int) -> float:
    """The router temperature for a LLaMA of width `dim`: 10 for LaVIN-7B (4096) and 5 for 13B (5120), as the official
    finetuning_sqa_{7b,13b}.sh set it. Other widths take the nearer of the two rules (README, difference 19): 10 up
    to 4096, 5 from 5120 on. train.py, sample.py, evaluate.py and bench.py all ask this function."""
    return 5.0 if dim >= 5120 else 10.0


class Router(nn.Module):
    """Soft router over `n_paths` adapter paths: (B, C) -> (B, n_paths), rows sum to 1."""

    def __init__(self, dim: int, n_paths: int = 2, tau: float = 10.0):
        super().__init__()
        # PyTorch's default Linear init (kaiming-uniform a=sqrt(5), i.e. U(±1/sqrt(C)), bias U(±1/sqrt(C))),
        # exactly as the official `expert_weights = nn.Linear(C, 2)`.
        self.proj = nn.Linear(dim, n_paths)
        self.tau = tau  # temperature: 10 for LaVIN-7B, 5 for 13B (finetuning_sqa_{7b,13b}.sh); high tau = soft mix

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        # r: (B, C). The softmax runs in fp32 even under bf16 autocast (the official code casts the probabilities to
        # fp16; README, difference 7; we keep them fp32 and let the caller cast at the point of use).
        logits = self.proj(r).float()  # (B, n_paths)
        return F.softmax(logits / self.tau, dim=-1)


class FactorRouter(nn.Module):
    """
    MixLoRA's selection of r rank-1 factors out of pools of E, for one adapted linear layer.

    Given the pooled input h̄ (B, d_in) and the a-factor pool (E, d_in), returns per instance the indices of the
    chosen a- and b-factors, (B, r) each, and per-factor weights (B, r) that multiply the rank-1 updates.

    Legend: B batch, d input width, E pool size, r chosen factors.
    """

    def __init__(self, d_in: int, pool: int, rank: int, cfs: str = "dot", mode: str = "weighted", lam: float = 1.0):
        super().__init__()
        if cfs not in ("dot", "separable", "none"):
            raise ValueError(f"MixLoRA cfs must be 'dot', 'separable' or 'none', got {cfs!r}")
        if mode not in ("weighted", "hard"):
            raise ValueError(f"MixLoRA mode must be 'weighted' or 'hard', got {mode!r}")
        if not 1 <= rank <= pool:
            raise ValueError(f"MixLoRA needs 1 <= rank <= pool, got rank={rank}, pool={pool}")
        self.rank, self.cfs, self.mode, self.lam = rank, cfs, mode, lam
        # IFS routers W_A, W_B ∈ R^{E×d_in}, no bias (released code). Default Linear init.
        self.route_a = nn.Linear(d_in, pool, bias=False)
        self.route_b = nn.Linear(d_in, pool, bias=False)
        # CFS weight W_AB ∈ R^{E×(r·d_in)} in the released code, viewed here as r slices W_AB[i] ∈ R^{d_in×E}.
        self.route_ab = nn.Parameter(torch.empty(rank, d_in, pool)) if cfs != "none" else None
        if self.route_ab is not None:
            nn.init.uniform_(self.route_ab, -1 / math.sqrt(d_in), 1 / math.sqrt(d_in))  # same scale as a Linear

    def forward(self, h: torch.Tensor, a_pool: torch.Tensor):
        # h: (B, d) pooled input; a_pool: (E, d) the a-factors (parameters, not activations)
        r = self.rank
        p_a = F.softmax(self.route_a(h).float(), dim=-1)  # (B, E)
        # Top-r over the logits picks the same indices as top-r over the softmax. Sorted by score: the i-th chosen
        # a-factor pairs with the i-th chosen b-factor, so pairing depends on score order (as in the released code).
        g_a, idx_a = p_a.topk(r, dim=-1)  # (B, r), (B, r)

        p_b = F.softmax(self.route_b(h).float(), dim=-1)  # (B, E): p_IFS for the b-pool
        if self.route_ab is not None:
            a_sel = a_pool[idx_a].float()  # (B, r, d): the chosen a-factors
            if self.cfs == "dot":
                # Paper form: logit_i[e] = A_sel[i] · W_AB[i][:, e], a dot product over d, then p_CFS = Σ_i softmax.
                logits = torch.einsum("brd,rde->bre", a_sel, self.route_ab.float())  # (B, r, E)
                p_cfs = F.softmax(logits, dim=-1).sum(1)  # (B, E), each entry in [0, r]
            else:
                # The released code's einsum gives the d axis different letters in its two operands, so each side is
                # summed separately: logit_i[e] = (Σ_d A_sel[i,d]) · (Σ_f W_AB[i,f,e]), a rank-1 separable product,
                # followed by a *second* softmax before fusion. Reproduced here behind cfs="separable".
                logits = a_sel.sum(-1, keepdim=True) * self.route_ab.float().sum(1)[None]  # (B, r, E)
                p_cfs = F.softmax(F.softmax(logits, dim=-1).sum(1), dim=-1)  # (B, E)
            p_b = p_b + self.lam * p_cfs  # fused score (λ is the released `ifs_weight`, which in fact weighs CFS)
        g_b, idx_b = p_b.topk(r, dim=-1)  # (B, r), (B, r)

        if self.mode == "hard":
            # Released behaviour: factors are gathered by index only, the scores never touch the update, so the routers
            # receive no gradient. adapters.py freezes them in this mode.
            return idx_a, idx_b, None
        # Score-weighted (README, difference 21): renormalise over the chosen set and multiply by r, so that
        # uniform scores reproduce the unweighted update exactly (without the factor r the update would shrink ~r² and
        # α/r would change meaning). This is a deliberate departure from the released code; it lets gradients reach
        # W_A, W_B, W_AB and, through p_CFS, the chosen a-factors. The top-r choice itself stays non-differentiable.
        w = (g_a / g_a.sum(-1, keepdim=True)) * (g_b / g_b.sum(-1, keepdim=True)) * (r * r)  # (B, r)
        return idx_a, idx_b, w


def routing_table(model) -> dict[int, list[list[float]]]:
    """
    What LaVIN's router gives each modality (0 text-only, 1 image) in every LLaMA layer: {modality: [[w0, w1] per
    layer]}, the w of paper §3.2 (luogen1996/LaVIN lavin/mm_adapter.py, RepAdapter_Router). In eval mode (no adapter
    dropout) the router reads only the modality token, which sees only itself, so w is one constant per modality
    (LaVIN.routing_weights). train.py prints the table after training, demo.py shows it beside each answer. `model`
    is a LaVIN with its MM-Adapters not folded (merge() removes them); other methods, and the routing ablation
    (AdapterArgs.router "none"), have no router: {}.
    """
    if model.adapter_args.method != "mma" or model.adapter_args.router == "none":
        return {}
    was = model.training
    model.eval()
    table = {m: [w.float().tolist() for w in model.routing_weights(m)] for m in (0, 1)}
    model.train(was)
    return table
