"""
LLaMA, written out by hand, and LaVIN: a frozen LLaMA and a frozen CLIP ViT joined by Mixture-of-Modality adapters.

Part 1, LLaMA (Touvron et al. 2023; meta-llama/llama llama/model.py, whose checkpoints load unchanged): pre-norm
RMSNorm blocks, rotary position embeddings pairing adjacent dimensions, grouped-query attention (LLaMA-2 field
n_kv_heads), a SwiGLU feed-forward, no biases, untied head. A static KV cache serves prefill and decode with one code
path (gpt-fast), and `load_llama` reads Meta's `params.json` + `consolidated.*.pth`, merging model-parallel shards.

Part 2, LaVIN (Luo et al., NeurIPS 2023, arXiv 2305.15023, §3; luogen1996/LaVIN lavin/model.py, lavin/eval_model.py,
lavin/generator.py; spec lavin-spec.md §1-2, §9, §12): the sequence is

    [modality] [BOS] "Image: " [6 visual tokens] prompt answer [EOS]      (an image sample)
    [modality] [BOS] "Image: N/A"                prompt answer [EOS]      (a text-only sample)

where the modality token (nn.Embedding(2, C), position 0) is seen by no other position and drives every layer's
router, and the 6 visual tokens are CLIP's class token after every 4th block, through a small neck. Only the adapters
(adapters.py) train. Deliberate departures from the official code, each commented where it happens: per-image CLIP
routing (§12a, in clip_vit.py), correct RoPE positions at decode (§12b), text-only samples skip CLIP (§11 quirk 10),
router softmax and loss in fp32 (quirk 15), early stop at EOS (quirk 12), re-parameterised adapters (§12e).

Used by: `python train.py`, `python sample.py`, `python bench.py`; tests: `python -m pytest test_all.py`.
"""

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from adapters import AdapterArgs, LoRALinear, fold_mma_into_qkv, inject_adapters
from clip_vit import VISION_PRESETS, VisionArgs, VisionTransformer, load_clip
from data import IGNORE, N_VISUAL


# =====================================================================================================================
# Part 1: LLaMA

@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # LLaMA-2 grouped-query attention; None = n_heads (LLaMA-1)
    vocab_size: int = 32000  # Meta's params.json says -1; load_llama takes it from the embedding's shape
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # LLaMA-2 70B / Code Llama scale the FFN width
    hidden_dim: int | None = None  # explicit FFN width (llama2.c checkpoints); overrides the rule below
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 512  # RoPE tables cover 2x this, as Meta's code does

    @property
    def ffn_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        # Meta's rule: 2/3 of 4d (SwiGLU has three matrices, so this keeps the parameter count of a 4d GELU MLP),
        # optionally scaled, rounded up to multiple_of. 7B: int(2*4*4096/3) = 10922 -> 11008.
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


LLAMA_PRESETS = {
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32),  # FFN 11008
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40),  # FFN 13824
    # The CPU quick start: 4 layers of width 128 (~0.8M parameters in the blocks). vocab_size comes from the
    # generated quiz's tokenizer. multiple_of 32 gives FFN 352.
    "tiny": ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=1024, multiple_of=32, norm_eps=1e-5),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the gain, exactly as Meta's reference: in bf16 the mean of squares
        # over 4096 channels would lose the precision that the norm exists to provide.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_tables(head_dim: int, end: int, theta: float):
    """cos and sin of the rotary angles, (end, head_dim/2) each: position t, pair i rotates by t · theta^(-2i/D)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))  # (D/2,)
    angles = torch.outer(torch.arange(end).float(), inv_freq)  # (end, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """
    Rotate adjacent pairs (2i, 2i+1) as complex numbers (x_2i + j x_2i+1) · e^{j·angle}: Meta's interleaved pairing,
    which its wq/wk rows assume (Hugging Face conversions permute the rows to use rotate_half instead; do not mix).
    Real-valued, in fp32: complex buffers cannot be broadcast by NCCL (llama2.c's note) and do not compile well.
    x: (B, T, H, D); cos, sin: (B or 1, T, D/2).
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, D/2)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2): the same angle for every head
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, T, H, D/2, 2)
    return out.flatten(-2).type_as(x)


class LayerCache(nn.Module):
    """
    Decoding state of one block: keys and values per cache slot (gpt-fast's static KV cache), and the router input
    of the block's MM-Adapter, which is read once at prefill from the modality token and reused for every decoded
    token (routing is a per-modality constant, spec §1.5 and §9.2).
    """

    def __init__(self, batch: int, slots: int, n_kv_heads: int, head_dim: int, dim: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv_heads, slots, head_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros_like(self.k), persistent=False)
        self.register_buffer("route", torch.zeros(batch, dim, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        # k, v: (B, Hkv, T, D) for slots [start_pos, start_pos + T); returns everything cached so far
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: LayerCache | None = None, start_pos: int = 0):
        # Legend: B batch, T new tokens, S attended slots, H query heads, Hkv key/value heads, D head dim.
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # (B, Hkv, S, D)
        # SDPA accumulates the softmax in fp32 (Meta's reference upcasts explicitly). LaVIN needs an explicit mask,
        # causal plus the blocked modality column (and left padding at generation); mask None means plain causal.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU (Shazeer 2020)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.adapter_attn: nn.Module | None = None  # an MMAdapter when LaVIN injects one (adapters.py)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)
        self.cache: LayerCache | None = None

    def forward(self, x, cos, sin, mask, start_pos: int = 0, first: torch.Tensor | None = None):
        # x: (B, T, C). `first` (B,) is the slot of each row's first token (its modality token in LaVIN).
        h = self.attention_norm(x)  # (B, T, C)
        if self.adapter_attn is not None:
            # h = Adapter(RMSNorm(x)): q, k and v all read the adapted input; the residual adds to the raw x (spec §1.4).
            if start_pos == 0:
                # Router input: the normalised state at the first slot. In LaVIN that is the modality token, which
                # attends only to itself, so this is a fixed function of the modality in every layer (spec §1.5).
                rows = torch.arange(x.shape[0], device=x.device)
                r = h[rows, first] if first is not None else h[:, 0]  # (B, C)
                if self.cache is not None:
                    self.cache.route.copy_(r)
            else:
                r = self.cache.route  # decode: the modality token is not in the new input; reuse the prefill's
            h = self.adapter_attn(h, r)
        x = x + self.attention(h, cos, sin, mask, self.cache, start_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.grad_ckpt = False  # activation checkpointing of every block (train.py --grad_ckpt)
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)build the RoPE tables: non-persistent buffers, so after building on the meta device and loading
        weights with assign=True they must be computed on the real device."""
        cos, sin = rope_tables(self.args.head_dim, 2 * self.args.max_seq_len, self.args.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def setup_cache(self, batch: int, slots: int):
        """Allocate a KV cache of `slots` positions for `batch` rows (in the dtype/device of the weights)."""
        if slots > self.rope_cos.shape[0]:
            raise ValueError(f"{slots} cache slots exceed the RoPE table ({self.rope_cos.shape[0]}); raise max_seq_len")
        w = self.layers[0].attention.wq.weight
        for layer in self.layers:
            layer.cache = LayerCache(batch, slots, layer.attention.n_kv_heads, self.args.head_dim, self.args.dim,
                                     w.dtype, w.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.cache = None

    def forward_embeds(self, h: torch.Tensor, start_pos: int = 0, pad: torch.Tensor | None = None,
                       mask_first: bool = False) -> torch.Tensor:
        """
        Run the blocks on input embeddings h (B, T, C) that occupy cache slots [start_pos, start_pos + T); returns the
        final-normed hidden states (B, T, C). `pad` (B,) counts each row's left padding: RoPE positions are slot - pad,
        so every row starts at position 0 however long its prompt. `mask_first` hides each row's first real slot from
        all later ones (LaVIN's modality token, spec §1.8).
        """
        cos, sin, mask = self.tables(h.shape[0], start_pos, h.shape[1], pad, mask_first)
        return self.run_blocks(h, cos, sin, mask, start_pos, pad)

    def tables(self, B: int, start_pos: int, T: int, pad: torch.Tensor | None = None, mask_first: bool = False):
        """RoPE cos, sin (B, T, D/2) and the boolean mask (B, 1, T, S) of T queries from slot start_pos on, S =
        start_pos + T. The mask is None where it is plain causal (no padding, no hidden slot, no earlier slots), so
        that SDPA takes its is_causal path, which skips the masked half instead of computing and discarding it."""
        dev = self.rope_cos.device
        plain = pad is None and not mask_first and start_pos == 0
        pad = torch.zeros(B, dtype=torch.long, device=dev) if pad is None else pad
        slots = torch.arange(start_pos, start_pos + T, device=dev)  # (T,) the query slots
        keys = torch.arange(start_pos + T, device=dev)  # (S,) every slot attended so far
        pos = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T) RoPE position of each query
        if start_pos + T > self.rope_cos.shape[0]:  # pos <= slot: checked on the host, with no device sync
            raise ValueError(f"slot {start_pos + T - 1} is beyond the RoPE table; raise max_seq_len")
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (B, T, D/2)
        if plain:
            return cos, sin, None
        q_, k_, p_ = slots[None, :, None], keys[None, None, :], pad[:, None, None]  # (1,T,1), (1,1,S), (B,1,1)
        # Causal, and no key inside the left padding; a padding query may see itself (an all-masked row is NaN).
        allowed = ((k_ <= q_) & (k_ >= p_)) | (k_ == q_)  # (B, T, S)
        if mask_first:
            allowed = allowed & ~((k_ == p_) & (q_ > p_))  # nobody after the modality token may attend to it
        return cos, sin, allowed[:, None]  # mask (B, 1, T, S), broadcast over heads

    def run_blocks(self, h, cos, sin, mask, start_pos: int = 0, pad: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            if self.grad_ckpt and self.training:
                # Non-reentrant: the reentrant variant skips the backward when its inputs do not require grad, which
                # with frozen embeddings would silently drop every adapter gradient (style guide §3.2, gotcha 5).
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, start_pos, pad, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, start_pos, pad)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) for every position, in fp32."""
        return self.output(self.forward_embeds(self.tok_embeddings(tokens), start_pos)).float()


class PackedLinear(nn.Module):
    """
    A frozen linear for CPU inference in fp32, its weight reordered once into oneDNN's blocked layout (what
    torch.compile's CPU weight-prepacking pass does): decode is a chain of matrix-vector products that read every
    weight once per token, and the blocked layout reads them faster than F.linear's plain one. Same math; sums may
    round differently in the last bit.
    """

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight, self.bias = lin.weight, lin.bias  # kept for the dtype and device that setup_cache reads
        self.packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@contextmanager
def packed_linears(llama: "Transformer", batch: int):
    """While generating a batch of several rows on CPU in fp32, swap every static linear of the LLaMA (plain, merged
    LoRA, MMA folded into q/k/v) for a PackedLinear; restore the originals afterwards. Elsewhere (GPU, bf16, unmerged
    LoRA, MixLoRA) a no-op, and for a single row too: there oneDNN's threaded kernel measured slower than F.linear's
    matrix-vector product on 2 busy cores, while at 8 rows it took about half the time."""
    w = llama.output.weight
    usable = batch > 1 and w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    swaps = [(mod, name, lin) for mod in llama.modules() for name, lin in mod.named_children()
             if usable and (type(lin) is nn.Linear or (isinstance(lin, LoRALinear) and lin.merged))]
    for mod, name, lin in swaps:
        setattr(mod, name, PackedLinear(lin))
    try:
        yield
    finally:
        for mod, name, lin in swaps:
            setattr(mod, name, lin)


# Meta's model-parallel checkpoints split each tensor across shards: column-parallel weights on dim 0, row-parallel ones
# and the embedding on dim 1, norms replicated (spec §10.1).
_SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def merge_shards(shards: list[dict]) -> dict:
    if len(shards) == 1:
        return dict(shards[0])
    out = {}
    for key in shards[0]:
        if key == "rope.freqs":
            continue  # old checkpoints store the RoPE frequencies; we compute them
        name = key.split(".")[-2]  # e.g. "wq" in layers.0.attention.wq.weight
        dim = _SHARD_DIM.get(name)
        out[key] = shards[0][key] if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return out


def load_llama(ckpt_dir, device="cpu", dtype=None, max_seq_len: int = 512) -> Transformer:
    """
    Load Meta's layout: `params.json` + `consolidated.00.pth` (+ .01 ... for model-parallel shards). Hyperparameters
    come from params.json, completed from tensor shapes where it is silent (vocab_size -1, the FFN width, n_kv_heads).
    The model is built on the meta device and the weights assigned, so nothing is allocated twice (gpt-fast).
    """
    ckpt_dir = Path(ckpt_dir)
    params_path = ckpt_dir / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path} not found: --llama_dir must be a Meta-layout folder holding "
                                f"params.json and consolidated.*.pth (e.g. .../LLaMA/7B)")
    shard_paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not shard_paths:
        raise FileNotFoundError(f"no consolidated.*.pth in {ckpt_dir}: expected Meta's checkpoint shards there")
    params = json.loads(params_path.read_text())
    shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in shard_paths]
    sd = merge_shards(shards)
    sd.pop("rope.freqs", None)
    if "tok_embeddings.weight" not in sd or "layers.0.feed_forward.w1.weight" not in sd:
        raise ValueError(f"{shard_paths[0]} does not look like a Meta LLaMA checkpoint (no tok_embeddings / w1 keys)")

    known = {f.name for f in fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in params.items() if k in known and v is not None})
    args.max_seq_len = max(max_seq_len, params.get("max_seq_len") or 0)
    args.vocab_size = sd["tok_embeddings.weight"].shape[0]  # params.json says -1 in LLaMA-1
    if args.hidden_dim is None:
        args.hidden_dim = sd["layers.0.feed_forward.w1.weight"].shape[0]  # the FFN width as stored wins
    if args.n_kv_heads is None:
        args.n_kv_heads = sd["layers.0.attention.wk.weight"].shape[0] // args.head_dim
    with torch.device("meta"):
        model = Transformer(args)
    check_shapes(model.state_dict(), sd, where=str(ckpt_dir))
    model.load_state_dict(sd, assign=True)
    model.init_rope()
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.requires_grad_(False)


def check_shapes(expected: dict, got: dict, where: str):
    """Name every missing, unexpected or mis-shaped tensor, with both shapes, before load_state_dict gives a vaguer error."""
    problems = [f"missing tensor {k} {tuple(v.shape)}" for k, v in expected.items() if k not in got]
    problems += [f"unexpected tensor {k}" for k in got if k not in expected]
    problems += [f"tensor {k}: checkpoint has {tuple(got[k].shape)}, params.json implies {tuple(v.shape)}"
                 for k, v in expected.items() if k in got and tuple(got[k].shape) != tuple(v.shape)]
    if problems:
        raise ValueError(f"checkpoint in {where} does not match its params.json:\n  " + "\n  ".join(problems[:10]))


# =====================================================================================================================
# Part 2: LaVIN

class Neck(nn.Module):
    """The visual neck `adapter_proj` (spec §1.7): 1024 -> 128 -> C with SiLU (plain SiLU, although the paper's text
    calls it SwiGLU). Xavier-uniform weights, zero biases."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)  # official adapter_proj.conv_A
        self.fc2 = nn.Linear(hidden, out_dim)  # official adapter_proj.conv_B
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, v):
        return self.fc2(F.silu(self.fc1(v)))


def visual_slots(tokens: torch.Tensor, has_image: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """The 6 placeholder slots of image rows: the first N_VISUAL `0` ids after each row's BOS (at slot `pad`, 0 without
    left padding); the "Image: " prefix never encodes to id 0, <unk>. tokens (B, T), has_image (B,) -> bool (B, T).
    Used by generation, where no collate'd vis_mask is at hand."""
    B, T = tokens.shape
    pad = torch.zeros(B, dtype=torch.long, device=tokens.device) if pad is None else pad
    idx = torch.arange(T, device=tokens.device)[None, :]  # (1, T)
    zeros = (tokens == 0) & (idx > pad[:, None])  # (B, T): placeholders, and nothing else in a well-formed prompt
    rank = zeros.long().cumsum(1)  # 1, 2, ... along each row's zeros
    return zeros & (rank <= N_VISUAL) & has_image.bool()[:, None]


class LaVIN(nn.Module):
    def __init__(self, llama: Transformer, visual: VisionTransformer, adapter_args: AdapterArgs,
                 neck_hidden: int = 128):
        super().__init__()
        self.llama, self.visual, self.adapter_args = llama, visual, adapter_args
        C = llama.args.dim
        with torch.device(llama.tok_embeddings.weight.device):
            self.adapter_proj = Neck(visual.args.width, neck_hidden, C)
            # Two entries, 0 text-only and 1 image (spec §1.8); PyTorch's default N(0, 1) init, as the official code.
            self.adapter_modality_embedding = nn.Embedding(2, C)
        inject_adapters(self, adapter_args)
        self.merged_modality: int | None = None
        self._unmerged = None  # what `merge` replaced, to restore it exactly

    # ---- configuration, for checkpoints: sample.py rebuilds the model from these without flags
    def config(self) -> dict:
        return {"llama": asdict(self.llama.args), "vision": asdict(self.visual.args),
                "adapter": asdict(self.adapter_args), "neck_hidden": self.adapter_proj.fc1.out_features}

    @classmethod
    def from_config(cls, cfg: dict, device="meta") -> "LaVIN":
        with torch.device(device):
            llama = Transformer(ModelArgs(**cfg["llama"]))
            visual = VisionTransformer(VisionArgs(**cfg["vision"]))
            return cls(llama, visual, AdapterArgs(**cfg["adapter"]), cfg["neck_hidden"])

    # ---- the input sequence
    def embed(self, tokens, has_image, vis_mask=None, images=None, pad=None) -> torch.Tensor:
        """
        tokens (B, T) in data.py's layout, has_image (B,), vis_mask (B, T) marking the placeholder slots of image rows,
        images (N_img, 3, H, W) for the image rows in batch order -> (B, 1 + T, C) with the modality token at slot 0.
        """
        h = self.llama.tok_embeddings(tokens)  # (B, T, C)
        if images is not None:
            vis_mask = visual_slots(tokens, has_image, pad) if vis_mask is None else vis_mask
            # Text-only rows never reach CLIP (the official code runs a zero image through it and throws the result
            # away, quirk 10); with per-image routing (§12a) no image can influence another, so skipping is exact.
            need_grad = any(p.requires_grad for p in self.visual.parameters())
            with torch.set_grad_enabled(need_grad and torch.is_grad_enabled()):
                feats = self.visual(images)  # (N_img, 6, W): CLS after every 4th CLIP block
            v = self.adapter_proj(feats.to(self.adapter_proj.fc1.weight.dtype))  # (N_img, 6, C)
            h = h.masked_scatter(vis_mask[..., None], v.to(h.dtype))  # fills slots row by row, in order
        m = self.adapter_modality_embedding(has_image.long())[:, None, :]  # (B, 1, C)
        return torch.cat([m.to(h.dtype), h], dim=1)  # (B, 1 + T, C)

    def forward(self, tokens, has_image, vis_mask=None, images=None, labels=None, reduction: str = "mean"):
        """
        Training / full forward. Without labels: logits (B, 1 + T, vocab) in fp32. With labels (B, T) aligned to
        tokens: the cross-entropy over the labelled positions (answer tokens and EOS), mean or sum. Slot t of the
        sequence predicts token t (slot 0, the modality token, predicts BOS, which is never labelled).
        """
        if labels is not None:
            # The head and its vocab-wide softmax only where a label is: in LaVIN's data most of a row is prompt, so
            # this skips most of the largest matmul. Slot t predicts token t, so labelled (b, t) reads slot (b, t) of
            # the (B, 1 + T) sequence. Finding them reads a count from the device: before the blocks are queued.
            where = (labels != IGNORE).nonzero()  # (N, 2) rows and columns of the labelled tokens
            flat = where[:, 0] * (labels.shape[1] + 1) + where[:, 1]  # (N,) their index in the flattened sequence
        h = self.llama.forward_embeds(self.embed(tokens, has_image, vis_mask, images), mask_first=True)
        if labels is None:
            return self.llama.output(h).float()
        logits = self.llama.output(h.flatten(0, 1)[flat])  # (N, vocab)
        # The loss in fp32 (the official code takes it on fp16 logits, quirk 15).
        loss = F.cross_entropy(logits.float(), labels[where[:, 0], where[:, 1]], reduction=reduction)
        if images is None and self.training:
            loss = loss + self.visual_touch()
        return loss

    def visual_touch(self) -> torch.Tensor:
        """
        A micro-batch without images leaves the CLIP adapters and the neck without gradients. DDP and FSDP2 need every
        rank to produce gradients for the same parameters each step (a rank-dependent set hangs the reduce), so we run
        the visual path on one zero image and add 0 x its output: exact zeros, same parameters on every rank.
        """
        if not any(p.requires_grad for p in list(self.visual.parameters()) + list(self.adapter_proj.parameters())):
            return torch.zeros((), device=self.adapter_proj.fc1.weight.device)
        s = self.visual.args.image_size
        zero = torch.zeros(1, 3, s, s, device=self.adapter_proj.fc1.weight.device)
        return 0.0 * self.adapter_proj(self.visual(zero)).float().sum()

    # ---- re-parameterisation (spec §12e)
    @torch.no_grad()
    def routing_weights(self, modality: int) -> list[torch.Tensor]:
        """Each LLaMA layer's router output for a modality: the modality token attends only to itself, so running it
        alone, as a length-1 sequence at position 0, gives the routing every sequence of that modality gets."""
        llama = self.llama
        x = self.adapter_modality_embedding.weight[modality][None, None].to(llama.tok_embeddings.weight.dtype)
        cos, sin = llama.rope_cos[:1][None], llama.rope_sin[:1][None]  # (1, 1, D/2): position 0
        weights = []
        for layer in llama.layers:
            weights.append(layer.adapter_attn.router(layer.attention_norm(x)[:, 0])[0])  # (2,)
            x = layer(x, cos, sin, None)
        return weights

    @torch.no_grad()
    def merge(self, modality: int):
        """
        Fold the LLaMA-side adapters (MMA) or the LoRA updates into the frozen weights for one modality, so inference
        pays nothing for them. MMA: q/k/v gain a bias and a rank-8 update per layer (spec §12e); the CLIP adapters
        route per image and stay as they are. `unmerge` restores the original modules exactly; the originals wait on
        the CPU meanwhile. MixLoRA's updates depend on the input, so there is nothing static to fold.
        """
        method = self.adapter_args.method
        if method == "mixlora":
            raise ValueError("MixLoRA chooses its factors per input: its updates cannot be folded into the weights")
        if self.merged_modality is not None:
            if self.merged_modality == modality:
                return
            self.unmerge()
        saved = []
        if method == "mma":
            for layer, w in zip(self.llama.layers, self.routing_weights(modality)):
                originals = fold_mma_into_qkv(layer.attention, layer.adapter_attn, w)
                saved.append((layer, layer.adapter_attn, {k: m.cpu() for k, m in originals.items()}))
                layer.adapter_attn = None
        elif method == "lora":
            for mod in self.llama.modules():
                if isinstance(mod, LoRALinear):
                    saved.append((mod, None, mod.weight.detach().cpu().clone()))
                    mod.merge()
        self._unmerged, self.merged_modality = saved, modality

    @torch.no_grad()
    def unmerge(self):
        if self.merged_modality is None:
            return
        for owner, adapter, originals in self._unmerged:
            if isinstance(owner, LoRALinear):
                owner.weight.copy_(originals.to(owner.weight.device))
                owner.merged = False
            else:
                dev = owner.attention.wo.weight.device
                for name, lin in originals.items():
                    setattr(owner.attention, name, lin.to(dev))
                owner.adapter_attn = adapter
        self._unmerged, self.merged_modality = None, None

    # ---- generation (spec §9; used by sample.py, train.py's evaluation and bench.py)
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], has_image, images=None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, eos_id: int = 2, generator=None, on_token=None):
        """
        Batched generation with a KV cache. prompts: token lists in data.encode_prompt's layout (placeholders included);
        has_image (B,) bool; images (N_img, 3, H, W) for the image rows. Returns the new tokens of each row, cut at EOS.

        Rows of different lengths are left-padded and each row's RoPE positions start at 0 on its modality token, so a
        batch gives the same tokens as each prompt alone (the official code instead forces prompt tokens into the
        sampled stream and decodes with positions one short, quirk 2 / §12b). The modality token stays in cache slot
        `pad`, hidden from later queries by the mask, so cache slot - pad = the training position. The loop stops once
        every row has produced EOS, looking every 8 steps (the official loop always runs to the end, quirk 12).
        """
        llama = self.llama
        dev = llama.tok_embeddings.weight.device
        B = len(prompts)
        has_image = torch.as_tensor(has_image, dtype=torch.bool, device=dev)
        if self.merged_modality is not None and bool((has_image.long() != self.merged_modality).any()):
            raise ValueError(f"model is merged for modality {self.merged_modality}; call unmerge() or merge() first")
        P = max(len(p) for p in prompts)
        pad = torch.tensor([P - len(p) for p in prompts], device=dev)  # (B,) left padding of each row
        tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            tokens[b, P - len(p):] = torch.tensor(p, device=dev)
        h = self.embed(tokens, has_image, None, images, pad)  # (B, 1 + P, C): [modality, pads..., prompt]
        # Move each row's modality token from slot 0 to slot pad_b, right before its BOS; the pads shift left by one.
        s = torch.arange(1 + P, device=dev)[None, :]  # (1, 1 + P)
        order = torch.where(s < pad[:, None], s + 1, torch.where(s == pad[:, None], 0, s))  # (B, 1 + P)
        h = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))

        with packed_linears(llama, B):
            rows = self.decode(h, pad, B, P, max_new_tokens, temperature, top_p, eos_id, generator, on_token)
        return [r[:r.index(eos_id)] if eos_id in r else r for r in rows]

    def decode(self, h, pad, B: int, P: int, max_new_tokens, temperature, top_p, eos_id, generator, on_token):
        """generate's loop: prefill the prompt slots h (B, 1 + P, C), then one token per step; (B, steps) lists."""
        llama, dev = self.llama, h.device
        total = 1 + P + max_new_tokens
        llama.setup_cache(B, total)
        # RoPE tables and mask for every slot of the call, built once: each step slices its row. The mask becomes an
        # additive 0/-inf one in the weights' dtype, which SDPA adds as it is instead of converting a boolean per layer.
        cos, sin, allowed = llama.tables(B, 0, total, pad, mask_first=True)  # (B, total, D/2) x2, (B, 1, total, total)
        bias = torch.zeros(allowed.shape, dtype=h.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        try:
            out = []
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            p = slice(0, 1 + P)  # prefill: every prompt slot at once; keep the last slot's state (B, 1, C)
            x = llama.run_blocks(h, cos[:, p], sin[:, p], bias[:, :, p, p], 0, pad)[:, -1:]
            start = 1 + P
            for i in range(max_new_tokens):
                logits = llama.output(x[:, -1]).float()  # (B, vocab)
                nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                out.append(nxt)
                if on_token is not None:
                    on_token(nxt)
                done |= nxt == eos_id
                # Asking whether every row is done reads a flag from the device, which makes a GPU drain its queue;
                # so ask every 8 steps. Finished rows only add EOS, which generate's cut removes: the same tokens.
                if i == max_new_tokens - 1 or (i % 8 == 7 and bool(done.all())):
                    break  # (the last token needs no forward pass of its own)
                s = slice(start, start + 1)
                x = llama.run_blocks(llama.tok_embeddings(nxt[:, None]), cos[:, s], sin[:, s],
                                     bias[:, :, s, :start + 1], start, pad)  # (B, 1, C)
                start += 1
        finally:
            llama.clear_cache()
        return torch.stack(out, 1).tolist() if out else [[] for _ in range(B)]


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Greedy at temperature 0; otherwise nucleus sampling as the official generator: drop every token whose cumulative
    probability *before* it exceeds top_p (the top token always survives), renormalise, draw."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)  # (B, V)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    sorted_p = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p > top_p, 0.0)
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    choice = torch.multinomial(sorted_p, 1, generator=generator)  # (B, 1) index into the sorted order
    return idx.gather(-1, choice)[:, 0]


# =====================================================================================================================
# Building and counting

def build_lavin(llama_preset="tiny", vision_preset="tiny", adapter_args: AdapterArgs | None = None, vocab_size=None,
                max_seq_len: int = 512, device="cpu", neck_hidden: int = 128) -> LaVIN:
    """A LaVIN from presets with random weights (meta device: shapes only, no memory)."""
    largs = replace(LLAMA_PRESETS[llama_preset], max_seq_len=max_seq_len)
    if vocab_size is not None:
        largs.vocab_size = vocab_size
    with torch.device(device):
        return LaVIN(Transformer(largs), VisionTransformer(VISION_PRESETS[vision_preset]),
                     adapter_args or AdapterArgs(), neck_hidden)


def load_lavin(llama_dir, clip_path, adapter_args: AdapterArgs, device="cpu", dtype=None, max_seq_len: int = 512,
               neck_hidden: int = 128) -> LaVIN:
    """LaVIN on pretrained backbones: Meta-layout LLaMA + OpenAI CLIP file, frozen in `dtype` (None keeps fp32), with
    fresh adapters in fp32 (their master weights; autocast computes in bf16 on GPU)."""
    llama = load_llama(llama_dir, device, dtype, max_seq_len)
    visual = load_clip(clip_path, device).requires_grad_(False)
    if dtype is not None:
        visual = visual.to(dtype)
    return LaVIN(llama, visual, adapter_args, neck_hidden)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# The rows of the method comparison: (label, AdapterArgs overrides). LoRA at two ranks of the LLaVA scaling study.
METHOD_ROWS = [("MMA (LaVIN)", dict(method="mma")), ("LoRA r=8", dict(method="lora", lora_rank=8)),
               ("LoRA r=64", dict(method="lora", lora_rank=64)),
               ("MixLoRA E=16 r=4", dict(method="mixlora", mix_pool=16, mix_rank=4)), ("Full", dict(method="full"))]
PAPER_TRAINABLE = {"7B": 3_781_296, "13B": 5_390_080}  # spec §4 (paper: 3.8M and 5.4M)


def param_table(sizes=("7B", "13B")) -> list[dict]:
    """Trainable parameters and fp32 checkpoint size by method for LaVIN at the real shapes, built on the meta device
    (no weights, no memory). tau follows the official scripts: 10 for 7B, 5 for 13B."""
    rows = []
    for size in sizes:
        for label, over in METHOD_ROWS:
            model = build_lavin(size, "ViT-L/14", AdapterArgs(tau=10.0 if size == "7B" else 5.0, **over),
                                device="meta")
            trainable, total = count_params(model)
            rows.append({"model": f"LaVIN-{size}", "method": label, "trainable": trainable, "total": total,
                         "share_%": 100 * trainable / total, "ckpt_MB": trainable * 4 / 1e6,
                         "paper": PAPER_TRAINABLE[size] if over["method"] == "mma" else None})
    return rows


def format_param_table(rows: list[dict]) -> str:
    lines = [f"{'model':<10} {'method':<18} {'trainable':>15} {'share':>8} {'ckpt (fp32)':>12} {'paper':>12}"]
    for r in rows:
        paper = f"{r['paper']:,}" if r["paper"] else "-"
        lines.append(f"{r['model']:<10} {r['method']:<18} {r['trainable']:>15,} {r['share_%']:>7.3f}% "
                     f"{r['ckpt_MB']:>9.1f} MB {paper:>12}")
    return "\n".join(lines)
