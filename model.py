"""
LLaMA, written out by hand, and LaVIN: a frozen LLaMA and a frozen CLIP ViT joined by Mixture-of-Modality adapters.

Part 1, LLaMA (Touvron et al. 2023; meta-llama/llama llama/model.py, whose checkpoints load unchanged): pre-norm
RMSNorm blocks, RoPE on adjacent pairs, grouped-query attention, SwiGLU, one static KV cache path for prefill and
decode (gpt-fast), and `load_llama` for Meta's and Hugging Face's layouts (the files are weights.py's).

Part 2, LaVIN (Luo et al., NeurIPS 2023, arXiv 2305.15023, §3; luogen1996/LaVIN lavin/model.py, lavin/eval_model.py),
on the sequence that data.sequence_head lays out:

    [modality] [BOS] "Image: " [6 visual tokens] prompt answer [EOS]      (an image sample)
    [modality] [BOS] "Image: N/A"                prompt answer [EOS]      (a text-only sample)

The modality token (position 0) is seen by no other position and drives every layer's router; the visual tokens are
CLIP's class token after every 4th block, through a small neck. Only the adapters (adapters.py) train. Departures
(README, "Differences from the official code"): per-image CLIP routing (1, clip_vit.py), text-only samples skip CLIP
(2), re-parameterised adapters (6), fp32 loss (7); decoding (3-5) is generate.generate's. Part 3: building and
loading, from presets, pretrained backbones or a checkpoint (weights.load_checkpoint's): the one place every script gets
a model from.

Used by `python train.py`, `python sample.py`, `python evaluate.py`, `python bench.py`; tests: `python -m pytest -q
test_all.py -k test_model_`.
"""

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from adapters import AdapterArgs, LoRALinear, fold_mma_into_qkv, inject_adapters, load_trainable, quantize_block_
from clip_vit import VISION_PRESETS, VisionArgs, VisionTransformer, load_clip
from weights import check_state_dict, read_llama, strip_module_prefix


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
        # Meta's rule: 2/3 of 4d (SwiGLU's 3 matrices keep a 4d MLP's size), scaled, rounded up; 7B: 10922 -> 11008
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
    # The CPU quick start: ~0.8M parameters in the blocks, FFN 352; vocab_size comes from the quiz's tokenizer.
    "tiny": ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=1024, multiple_of=32, norm_eps=1e-5),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32, cast back before the gain (Meta's reference): a bf16 mean of 4096 squares loses the precision needed
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, end: int, theta: float):
    """cos and sin of the rotary angles, (end, head_dim/2) each: position t, pair i rotates by t · theta^(-2i/D)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))  # (D/2,)
    angles = torch.outer(torch.arange(end).float(), inv_freq)  # (end, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) as complex numbers by e^{j·angle}, Meta's pairing (load_llama un-permutes HF's), real
    and fp32 (NCCL cannot broadcast complex buffers; llama2.c's note). x: (B, T, H, D); cos, sin: (B or 1, T, D/2)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, D/2) each: the pairs' two halves
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2): the same angle for every head
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (B, T, H, D/2, 2)
    return out.flatten(-2).type_as(x)


class LayerCache(nn.Module):
    """Decoding state of one block: keys and values per cache slot (gpt-fast's static KV cache), and its MM-Adapter's
    router input, read at prefill from the modality token and reused by every decoded token (paper §3.2)."""

    def __init__(self, batch: int, slots: int, n_kv_heads: int, head_dim: int, dim: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv_heads, slots, head_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros_like(self.k), persistent=False)
        self.register_buffer("route", torch.zeros(batch, dim, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        end = start_pos + k.shape[2]  # k, v: (B, Hkv, T, D) for slots [start_pos, end)
        self.k[:, :, start_pos:end], self.v[:, :, start_pos:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]  # everything cached so far


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads or args.n_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        # q, k and v as one product over their stacked weights (gpt-fast's wqkv), set only while generate.generate runs
        # on CPU (generate.packed_linears, which stacks and packs them once and keeps them). Only there: stacking in
        # every forward would copy the weights each time (at decode, reading them three times instead of once), and in
        # training the stacked products measured no faster on CPU (README, Benchmark).
        self.wqkv: nn.Module | None = None

    def forward(self, x, cos, sin, mask, cache: LayerCache | None = None, start_pos: int = 0):
        B, T, _ = x.shape  # B batch, T new tokens; S attended slots, H query heads, Hkv key/value heads, D head dim
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is None:
            q, k, v = (w(x).view(B, T, -1, D) for w in (self.wq, self.wk, self.wv))  # (B, T, H|Hkv, D)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:  # one product, and one RoPE pass over q's and k's heads together (the same angles): fewer small ops
            qk, v = self.wqkv(x).view(B, T, H + 2 * Hkv, D).split([H + Hkv, Hkv], dim=2)
            q, k = apply_rope(qk, cos, sin).split([H, Hkv], dim=2)  # (B, T, H|Hkv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)  # (B, Hkv, S, D)
        # SDPA accumulates the softmax in fp32 (Meta's reference upcasts explicitly); mask None is plain causal.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.ffn_dim, bias=False)  # up
        self.w13: nn.Module | None = None  # w1 and w3 as one product while generating on CPU, as Attention.wqkv

    def forward(self, x):
        if self.w13 is None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU (Shazeer 2020)
        gate, up = self.w13(x).chunk(2, dim=-1)  # (B, T, F) each
        return self.w2(F.silu(gate) * up)


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
        h = self.attention_norm(x)  # (B, T, C); `first` (B,): each row's first slot (LaVIN's modality token)
        if self.adapter_attn is not None:
            # h = Adapter(RMSNorm(x)): q, k and v read the adapted input; the residual adds to the raw x (paper Fig. 2).
            if start_pos == 0:
                # Router input: the first slot, LaVIN's modality token, which sees only itself: fixed per modality
                r = h[:, 0] if first is None else h[torch.arange(x.shape[0], device=x.device), first]  # (B, C)
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
        self.packed: dict = {}  # CPU generation's prepacked weights, kept between calls (generate.packed_linears)
        self.init_rope()

    def init_rope(self, device=None):
        """(Re)build the RoPE tables on `device`: non-persistent buffers, which a meta-device build leaves empty."""
        cos, sin = rope_tables(self.args.head_dim, 2 * self.args.max_seq_len, self.args.rope_theta)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(dtype), .half(), .to_empty() reach buffers here: RoPE stays fp32 (Meta's freqs_cis; bf16 is 2e-3 off)
        super()._apply(fn, recurse)
        self.init_rope(self.rope_cos.device)
        return self

    def setup_cache(self, batch: int, slots: int):
        """Allocate a KV cache of `slots` positions for `batch` rows (in the dtype/device of the weights)."""
        if slots > self.rope_cos.shape[0]:
            raise ValueError(f"{slots} cache slots exceed the RoPE table ({self.rope_cos.shape[0]}); raise max_seq_len")
        w, a = self.layers[0].attention.wq.weight, self.args
        for layer in self.layers:
            layer.cache = LayerCache(batch, slots, layer.attention.n_kv_heads, a.head_dim, a.dim, w.dtype, w.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.cache = None

    def forward_embeds(self, h: torch.Tensor, start_pos: int = 0, mask_first: bool = False) -> torch.Tensor:
        """The blocks on input embeddings h (B, T, C) at cache slots [start_pos, start_pos + T) -> the final-normed
        hidden states (B, T, C). mask_first hides slot 0 from later ones (the modality token, lavin/model.py's mask)."""
        cos, sin, mask = self.tables(h.shape[0], start_pos, h.shape[1], mask_first=mask_first)
        return self.run_blocks(h, cos, sin, mask, start_pos)

    def tables(self, B: int, start_pos: int, T: int, pad: torch.Tensor | None = None, mask_first: bool = False):
        """RoPE cos, sin (B, T, D/2) and the boolean mask (B, 1, T, S) of T queries from slot start_pos on, S =
        start_pos + T. Row b's RoPE positions start at 0 after its `pad[b]` left pads; `mask_first` hides its first real
        slot (the modality token) from later ones. None where plain causal: SDPA's is_causal skips the masked half."""
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
                # with frozen embeddings would silently drop every adapter gradient.
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, start_pos, pad, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask, start_pos, pad)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) for every position, in fp32."""
        return self.output(self.forward_embeds(self.tok_embeddings(tokens), start_pos)).float()


def load_llama(ckpt_dir, device="cpu", dtype=None, max_seq_len: int = 512, quant: str | None = None) -> Transformer:
    """Meta's layout (params.json + consolidated.*.pth, shards merged) or, given config.json, Hugging Face's (LLaMA-1/2,
    Vicuna) -> a frozen Transformer, built on the meta device and assigned the weights (gpt-fast: nothing allocated
    twice). quant="nf4": block by block to 4-bit NormalFloat (QLoRA) on the device: the peak is 4-bit plus a block."""
    ckpt_dir = Path(ckpt_dir)
    params, sd = read_llama(ckpt_dir, {f.name for f in fields(ModelArgs)}, max_seq_len, device, dtype)  # weights.py
    args = ModelArgs(**params)
    args.vocab_size = sd["tok_embeddings.weight"].shape[0]  # params.json says -1 in LLaMA-1
    args.hidden_dim = args.hidden_dim or sd["layers.0.feed_forward.w1.weight"].shape[0]  # the FFN width as stored
    args.n_kv_heads = args.n_kv_heads or sd["layers.0.attention.wk.weight"].shape[0] // args.head_dim
    with torch.device("meta"):
        model = Transformer(args)
    check_state_dict(model.state_dict(), sd, f"the checkpoint in {ckpt_dir} does not match its config",
                     "a config.json / params.json from another model, or an incomplete download?")
    model.load_state_dict(sd, assign=True)
    model.init_rope()
    if quant == "nf4":  # quantized in the checkpoint's own dtype, as Hugging Face's QLoRA loading does
        for layer in model.layers:
            quantize_block_(layer.to(device))
    return model.to(device=device, dtype=dtype).requires_grad_(False)  # dtype None keeps the checkpoint's


# =====================================================================================================================
# Part 2: LaVIN

IGNORE = -100  # the label of positions without a loss, PyTorch's default ignore_index (README, difference 8)


class Neck(nn.Module):
    """The visual neck `adapter_proj` (lavin/model.py): 1024 -> 128 -> C, plain SiLU (the paper's text says SwiGLU)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)  # official adapter_proj.conv_A
        self.fc2 = nn.Linear(hidden, out_dim)  # official adapter_proj.conv_B
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, v):
        return self.fc2(F.silu(self.fc1(v)))


class LaVIN(nn.Module):
    def __init__(self, llama: Transformer, visual: VisionTransformer, adapter_args: AdapterArgs):
        super().__init__()
        self.llama, self.visual, self.adapter_args = llama, visual, adapter_args
        C = llama.args.dim
        with torch.device(llama.tok_embeddings.weight.device):
            self.adapter_proj = Neck(visual.args.width, 128, C)  # hidden 128, as the official adapter_proj
            # Two entries, 0 text-only and 1 image (paper §3.2); PyTorch's default N(0, 1) init, as the official code.
            self.adapter_modality_embedding = nn.Embedding(2, C)
        inject_adapters(self, adapter_args)
        self.merged_modality, self._unmerged = None, None  # the modality merged for, and what `merge` replaced

    # ---- configuration, for checkpoints: sample.py rebuilds the model from these without flags
    def config(self) -> dict:
        return {"llama": asdict(self.llama.args), "vision": asdict(self.visual.args),
                "adapter": asdict(self.adapter_args)}

    # ---- the input sequence
    def embed(self, tokens, has_image, vis_mask=None, images=None) -> torch.Tensor:
        """tokens (B, T) in data.sequence_head's layout, has_image (B,), vis_mask (B, T): the image rows' placeholders,
        images (N_img, 3, H, W) for the image rows in order -> (B, 1 + T, C), the modality token at slot 0."""
        h = self.llama.tok_embeddings(tokens)  # (B, T, C)
        if images is not None and vis_mask is None:
            raise ValueError("images need vis_mask, their placeholder slots: data.collate or data.visual_slots")
        # Text-only rows never reach CLIP (the official code runs a zero image through it and throws the result away);
        # with per-image routing no image can influence another, so skipping is exact (README, 1 and 2). But a
        # training micro-batch with no image at all still runs the tower, on one zero image, here: under FSDP2 CLIP's
        # forward all-gathers its shards (and its backward reduce-scatters), collectives every rank must issue at the
        # same point of every step whatever images its micro-batch holds, or they pair up wrongly and abort or hang;
        # under DDP every trainable parameter needs its gradient on every rank.
        dummy = images is None and self.training
        if images is not None or dummy:
            s = self.visual.args.image_size
            pixels = images if images is not None else torch.zeros(1, 3, s, s, device=h.device)  # (N_img, 3, S, S)
            need_grad = any(p.requires_grad for p in self.visual.parameters())
            with torch.set_grad_enabled(need_grad and torch.is_grad_enabled()):
                feats = self.visual(pixels)  # (N_img, V, W): V = 6 class tokens, after every 4th CLIP block
            v = self.adapter_proj(feats.to(self.adapter_proj.fc1.weight.dtype))  # (N_img, V, C)
            if dummy:  # weight zero: h + 0 is h bit for bit, and the tower's parameters get zero gradients
                h = h + 0.0 * v.sum().to(h.dtype)
            else:
                h = h.masked_scatter(vis_mask[..., None], v.to(h.dtype))  # fills slots row by row, in order
        m = self.adapter_modality_embedding(has_image.long())[:, None, :]  # (B, 1, C)
        return torch.cat([m.to(h.dtype), h], dim=1)  # (B, 1 + T, C)

    def forward(self, tokens, has_image, vis_mask=None, images=None, labels=None, reduction: str = "mean"):
        """Logits (B, 1 + T, vocab) in fp32; with labels (B, T) aligned to tokens, the cross-entropy (mean or sum) over
        the labelled ones (answer and EOS). Slot t predicts token t (slot 0, the modality token, predicts BOS)."""
        if labels is not None:
            # The head and its vocab-wide softmax only where a label is (most of a row is prompt): labelled (b, t)
            # reads slot (b, t) of the (B, 1 + T) sequence. Finding them syncs with the device: before the blocks run.
            where = (labels != IGNORE).nonzero()  # (N, 2) rows and columns of the labelled tokens
            flat = where[:, 0] * (labels.shape[1] + 1) + where[:, 1]  # (N,) their index in the flattened sequence
        h = self.llama.forward_embeds(self.embed(tokens, has_image, vis_mask, images), mask_first=True)
        if labels is None:
            return self.llama.output(h).float()
        logits = self.llama.output(h.flatten(0, 1)[flat]).float()  # (N, vocab) in fp32, not fp16 (README, difference 7)
        return F.cross_entropy(logits, labels[where[:, 0], where[:, 1]], reduction=reduction)

    # ---- re-parameterisation (README, difference 6)
    @torch.no_grad()
    def routing_weights(self, modality: int) -> list[torch.Tensor]:
        """Each LLaMA layer's router output for a modality: the modality token attends only to itself, so running it
        alone, as a length-1 sequence at position 0, gives the routing every sequence of that modality gets."""
        llama = self.llama
        x = self.adapter_modality_embedding.weight[modality][None, None].to(llama.tok_embeddings.weight.dtype)
        cos, sin = llama.rope_cos[:1][None], llama.rope_sin[:1][None]  # (1, 1, D/2): position 0
        weights = []
        for layer in llama.layers:
            router = layer.adapter_attn.router  # None in the routing ablation (AdapterArgs.router "none"): no weights
            # the router reads in its own (fp32) dtype, as MMAdapter.forward feeds it, whatever the base's dtype (bf16)
            r = layer.attention_norm(x)[:, 0]  # (1, C)
            weights.append(router(r.to(router.proj.weight.dtype))[0] if router is not None else None)  # (2,)
            x = layer(x, cos, sin, None)
        return weights

    @torch.no_grad()
    def merge(self, modality: int):
        """Fold the LLaMA-side MMA adapters (into q/k/v: adapters.fold_mma_into_qkv) or LoRA updates into the frozen
        weights for one modality, free at inference (README, difference 6); the CLIP adapters route per image and stay.
        `unmerge` restores the originals exactly (they wait on the CPU). MixLoRA's depend on the input: no folding."""
        if self.adapter_args.method == "mixlora":
            raise ValueError("MixLoRA chooses its factors per input: its updates cannot be folded into the weights")
        if self.merged_modality == modality:
            return
        self.unmerge()
        if self.adapter_args.method == "mma":
            self._unmerged = []
            for layer, w in zip(self.llama.layers, self.routing_weights(modality)):
                originals = fold_mma_into_qkv(layer.attention, layer.adapter_attn, w)
                self._unmerged.append((layer.adapter_attn, {k: m.cpu() for k, m in originals.items()}))
                layer.adapter_attn = None
        for mod in self.llama.modules():
            if isinstance(mod, LoRALinear):
                mod.merge()  # it keeps W0 itself, for its own unmerge
        self.merged_modality = modality

    @torch.no_grad()
    def unmerge(self):
        if self.merged_modality is None:
            return
        for layer, (adapter, originals) in zip(self.llama.layers, self._unmerged or []):  # MMA
            for name, lin in originals.items():
                setattr(layer.attention, name, lin.to(layer.attention.wo.weight.device))
            layer.adapter_attn = adapter
        for mod in self.llama.modules():
            if isinstance(mod, LoRALinear):
                mod.unmerge()
        self._unmerged, self.merged_modality = None, None


# =====================================================================================================================
# Part 3: building and loading (the one place train.py, sample.py, evaluate.py and bench.py get a model)

def build_lavin(llama_preset="tiny", vision_preset="tiny", adapter_args: AdapterArgs | None = None, vocab_size=None,
                max_seq_len: int = 512, device="cpu") -> LaVIN:
    """A LaVIN from presets with random weights (meta device: shapes only, no memory)."""
    largs = replace(LLAMA_PRESETS[llama_preset], max_seq_len=max_seq_len)
    largs.vocab_size = vocab_size or largs.vocab_size
    with torch.device(device):
        visual = VisionTransformer(VISION_PRESETS[vision_preset])
        return LaVIN(Transformer(largs), visual, adapter_args or AdapterArgs())


def load_lavin(llama_dir, clip_path, adapter_args: AdapterArgs, device="cpu", dtype=None, max_seq_len: int = 512,
               clip_every: int = 4, quant: str | None = None) -> LaVIN:
    """LaVIN on pretrained backbones: LLaMA and CLIP in Meta's / OpenAI's layouts or Hugging Face's, frozen in `dtype`
    (None keeps fp32), with fresh adapters in fp32 (their master weights; autocast computes in bf16 on GPU)."""
    llama = load_llama(llama_dir, device, dtype, max_seq_len, quant)
    return LaVIN(llama, load_clip(clip_path, device, clip_every).requires_grad_(False).to(dtype), adapter_args)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())


def warmup_cosine(t: float, warmup: float, total: float, peak: float, floor: float = 0.0) -> float:
    """The learning rate at t (fractional epochs in train.py, steps in quiz.py): linear warmup to `peak`, then a
    half-cycle cosine to `floor` at `total` (util/lr_sched.py adjust_learning_rate)."""
    if t < warmup:
        return peak * t / warmup
    progress = min(1.0, (t - warmup) / max(1e-8, total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def load_trained(ckpt: dict, device, dtype=None, overrides: dict | None = None) -> tuple[LaVIN, dict]:
    """load_checkpoint's dict -> (the trained LaVIN in eval mode, how it was trained: {llama_dir, clip_path, tokenizer
    (None: LLaMA's), norm, prompt_format, data_dir, chat, clip_every, quant}). `overrides` (None values ignored) win
    over the record, e.g. moved base weights or quant="nf4". An official file holds only adapters: give the
    base weights; the rest is the official pipeline's (MMA at the width's tau, 4th CLIP blocks, ImageNet, QCM-ALE)."""
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "config" in ckpt:
        a, cfg = ckpt["args"], ckpt["config"]
        info = dict(llama_dir=a["llama_dir"], clip_path=a["clip_path"], tokenizer=a.get("tokenizer"), norm=a["norm"],
                    prompt_format=a["prompt_format"], data_dir=a.get("data_dir"), quant=a.get("quant"),
                    chat="instruction" if a.get("instruction_json") else "scienceqa",
                    clip_every=cfg["vision"]["feature_every"])
        adapter_args, max_seq_len, sd = AdapterArgs(**cfg["adapter"]), cfg["llama"]["max_seq_len"], ckpt["model"]
    else:
        sd = strip_module_prefix(ckpt["model"])  # saved from inside DDP
        if "layers.0.adapter_attn.conv_B.weight" not in sd:
            raise ValueError("the file is neither a train.py checkpoint (no 'config') nor an official LaVIN adapter "
                             "file (no layers.0.adapter_attn.conv_B.weight)")
        if "llama_dir" not in over or "clip_path" not in over:
            raise ValueError("an official LaVIN adapter file records no base weights: pass --llama_dir (e.g. "
                             "/data/LLaMA/7B) and --clip_path (ViT-L-14.pt)")
        info = dict(llama_dir=None, clip_path=None, tokenizer=None, norm="imagenet", prompt_format="QCM-ALE",
                    data_dir=None, quant=None, chat="scienceqa", clip_every=4)
        adapter_args, max_seq_len = AdapterArgs(method="mma", tau=over.get("tau")), 512
    info.update({k: v for k, v in over.items() if k in info})
    model = load_lavin(info["llama_dir"], info["clip_path"], adapter_args, device, dtype, max_seq_len,
                       info["clip_every"], info["quant"])
    if "config" in ckpt:
        check_base(ckpt["config"], model, info)
    load_trainable(model, sd)  # converts the official conv_A/B/D, expert_weights names (adapters.py)
    return model.eval(), info


def check_base(config: dict, model: LaVIN, info: dict):
    """The base weights must be those the adapters were trained on: shapes, and what they hide (heads, eps, RoPE)."""
    def summary(la: ModelArgs, va: VisionArgs) -> dict:
        llama = dict(dim=la.dim, n_layers=la.n_layers, n_heads=la.n_heads, n_kv_heads=la.n_kv_heads or la.n_heads,
                     vocab_size=la.vocab_size, ffn_dim=la.ffn_dim, norm_eps=la.norm_eps, rope_theta=la.rope_theta)
        return {**{f"llama {k}": v for k, v in llama.items()}, **{f"vision {k}": v for k, v in asdict(va).items()}}
    trained = summary(ModelArgs(**config["llama"]), VisionArgs(**config["vision"]))
    loaded = summary(model.llama.args, model.visual.args)
    diff = [f"{k} {loaded[k]} (trained with {trained[k]})" for k in trained if loaded[k] != trained[k]]
    if diff:
        raise ValueError(f"the base weights {info['llama_dir']} + {info['clip_path']} are not those the adapters were "
                         f"trained on: {', '.join(diff)}; pass the training run's --llama_dir / --clip_path")
