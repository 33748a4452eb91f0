"""
Parameter-efficient modules that go inside the frozen backbones, and the plain functions that put them there,
freeze everything else, save and load them, and fold them away for inference.

- `MMAdapter`: LaVIN's Mixture-of-Modality adapter (paper §3.2; luogen1996/LaVIN lavin/mm_adapter.py
  `RepAdapter_Router`). A shared down-projection C->8, two grouped up-projections
  8->C, mixed by a soft modality router (router.py):

      Y = X + s · [ w0 · up0(Z) + w1 · up1(Z) ],   Z = dropout(down(X)),   w = softmax(W_r r / tau)

  It sits between `attention_norm` and wq/wk/wv in every LLaMA block, and between `ln_1` and the attention in every
  CLIP block. There is no non-linearity, so in eval mode it is an affine map that `fold_mma_into_qkv` merges into
  the q/k/v projections (the "Rep" of RepAdapter, which the official code never implements; README, difference 6).
- `LoRALinear` (Hu et al. 2021, configured as in the LLaVA scaling study, Lu et al. 2023) and `MixLoRALinear`
  (conditional mixture of LoRA, Shen et al. 2024): frozen linears with a trainable low-rank update.
- `quantize_nf4`, `NF4Linear`, `quantize_llama_`: a frozen base in 4-bit NormalFloat with double quantization
  (QLoRA, Dettmers et al. 2023), bit-exact with bitsandbytes' storage; LoRA, MixLoRA and MMA sit on it unchanged
  (QLoRA, and the official LaVIN "lite" mode).
- The routing ablation (`AdapterArgs.router = "none"`, train.py --router none): every MM-Adapter keeps one
  up-projection and no router, Y = X + s · up0(Z), so both modalities share one path.
- `AdapterArgs`, `inject_adapters`, `mark_trainable`, `trainable_state_dict`, `load_trainable` (official LaVIN files
  too, their names converted by weights.py): one `method` value picks MMA (default), LoRA, MixLoRA or full fine-tuning.

model.py calls these when it assembles LaVIN; train.py / sample.py / bench.py reach them through model.py.
Tests: `python -m pytest -q test_all.py -k test_adapters_`.
"""

import math
import struct
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from router import FactorRouter, Router, default_tau
from weights import check_state_dict, convert_official_lavin, strip_module_prefix

METHODS = ("mma", "lora", "mixlora", "full")
ROUTERS = ("modality", "none")  # AdapterArgs.router: the MM-Adapter with its modality router, or the ablation without


@dataclass
class AdapterArgs:
    method: str = "mma"  # mma | lora | mixlora | full
    # MM-Adapter, as the official finetuning_sqa_*.sh: adapter dim 8, scale 1, dropout 0.1
    adapter_dim: int = 8
    adapter_scale: float = 1.0
    adapter_dropout: float = 0.1
    tau: float | None = None  # router temperature; None: router.default_tau of the LLaMA width (10 for 7B, 5 for 13B)
    # modality: the MM-Adapter's two up-projection paths mixed by the soft modality router (paper §3.2). none: the
    # routing ablation (the paper's ablation table, "+ MM-Adapter" row against the plain adapters below it): one path
    # for both modalities, Y = X + s · up0(dropout(down(X))), the official RepAdapter (lavin/mm_adapter.py); no second
    # up-projection, no router, and the modality token, which reaches the loss only through routers, stays frozen.
    router: str = "modality"
    # LoRA, the LLaVA scaling study's defaults: alpha = 2 * rank, dropout 0.05, every LLM linear but the head
    lora_rank: int = 64
    lora_alpha: float | None = None  # None -> 2 * rank
    lora_dropout: float = 0.05
    lora_targets: str = "q,k,v,o,gate,up,down"
    # MixLoRA (Shen et al. 2024): pool E, r chosen per instance, alpha = 2E in the released script
    mix_pool: int = 16
    mix_rank: int = 4
    mix_alpha: float | None = None  # None -> 2 * pool (the released script; note LoRA's is 2r)
    mix_cfs: str = "dot"  # dot (paper) | separable (released code) | none (IFS only)
    mix_mode: str = "weighted"  # weighted (routers learn; project decision) | hard (released: routers get no gradient)
    mix_lambda: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.router == "none" and self.method != "mma":
            raise ValueError(f"router 'none' is the MM-Adapter's routing ablation: it needs method 'mma', not "
                             f"{self.method!r}")
        bad = set(self.lora_targets.split(",")) - set(LORA_TARGETS)
        if bad:
            raise ValueError(f"unknown LoRA target(s) {sorted(bad)}; choose among {','.join(LORA_TARGETS)}")


# LoRA target names of the LLaVA code (q_proj, ..., down_proj) -> where they live in a Meta-layout LLaMA block
LORA_TARGETS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
                "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}


# ---------------------------------------------------------------------------------------------------------------------
# 4-bit NormalFloat (QLoRA, Dettmers et al. 2023)
#
# QLoRA and LaVIN's "lite" mode store the frozen LLaMA block linears as NF4 with double quantization and dequantize
# them on the fly to the compute dtype. The format is bitsandbytes' quantize_4bit(quant_type="nf4",
# compress_statistics=True) as its CUDA kernels store it for Hugging Face / LLaVA QLoRA, reproduced bit for bit.
# A weight with n elements is flattened row-major and cut into blocks of 64 (the last one may be shorter):
#   absmax_b = max|x| over the block;  code = #{k : x · fp32(1/absmax_b) > T_k}   (T: fp32 midpoints of the 16 levels)
#   double quantization: v = absmax - mean(absmax), coded to 8 bits with bnb's signed dynamic map in groups of 256
#   blocks, one fp32 scale per group: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight (4.5 bits without)
#   dequantize: â = fp32(fp32(DYN[q] · absmax2) + offset), then Ŵ = fp32(NF4[code] · â), rounded once to the dtype.

def _fp32(hexes: str) -> torch.Tensor:
    """fp32 values from their IEEE bit patterns: the tables below are exact, not decimal roundings."""
    return torch.tensor(struct.unpack(f">{len(hexes.split())}f", bytes.fromhex(hexes.replace(" ", ""))))


# bnb's get_4bit_type("nf4"): normal quantiles scaled to [-1, 1]; 7 negative levels, an exact 0 at code 7, 8 positive
NF4_LEVELS = _fp32("bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 "
                   "3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000")
NF4_THRESHOLDS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) * 0.5  # (15,) fp32, the literals of bnb's CUDA dQuantizeNF4
# The positive half of bnb's create_dynamic_map(signed=True): 10^(i-6) times the midpoints of torch's fp32
# linspace(0.1, 1, 2^i + 1), i = 0..6. Hardcoded, so the format does not hang on torch's linspace algorithm (a float64
# evaluation differs in 72 values); test_adapters_nf4_tables rebuilds it the way bnb does.
_DYN_POS = _fp32(
    "3513a3b7 365a1a94 370205ff 37b24206 38378034 388aefb3 38ba1f4b 3923d70b 398ce705 39c7e283 3a016f01 3a1eecc1 "
    "3a3c6a80 3a59e83e 3a7765ff 3aa7ef9d 3af1a9fc 3b1db22d 3b428f5c 3b676c8a 3b8624dd 3b989374 3bab020d 3bbd70a4 "
    "3bcfdf3b 3be24dd3 3bf4bc6a 3c039581 3c0ccccd 3c160418 3c1f3b64 3c3ae148 3c68f5c3 3c8b851f 3ca28f5d 3cb9999a "
    "3cd0a3d7 3ce7ae15 3cfeb852 3d0ae148 3d166667 3d21eb85 3d2d70a3 3d38f5c3 3d447ae1 3d500000 3d5b851f 3d670a3d "
    "3d728f5d 3d7e147b 3d84cccd 3d8a8f5d 3d9051eb 3d96147b 3d9bd70a 3da1999a 3da75c2a 3dad1eb8 3db2e148 3db8a3d7 "
    "3dbe6667 3dc428f7 3dc9eb85 3ddb3334 3df80000 3e0a6666 3e18cccd 3e273333 3e35999a 3e440000 3e526666 3e60cccd "
    "3e6f3333 3e7d9999 3e860000 3e8d3334 3e946666 3e9b999a 3ea2cccc 3eaa0000 3eb13333 3eb86666 3ebf999a 3ec6cccc "
    "3ece0000 3ed53333 3edc6666 3ee3999a 3eeacccc 3ef20000 3ef93332 3f003333 3f03cccc 3f076666 3f0b0000 3f0e999a "
    "3f123334 3f15cccd 3f196666 3f1d0000 3f20999a 3f243334 3f27cccd 3f2b6666 3f2f0000 3f32999a 3f363334 3f39cccd "
    "3f3d6666 3f410000 3f44999a 3f483333 3f4bcccd 3f4f6666 3f530000 3f56999a 3f5a3333 3f5dcccd 3f616666 3f650000 "
    "3f68999a 3f6c3333 3f6fcccd 3f736666 3f770000 3f7a999a 3f7e3333")
# (256,) sorted: 127 negatives (mirror images), 0 at index 127, 127 positives, 1.0 at 255. There is no -1.0.
DYN_MAP = torch.cat([-_DYN_POS.flip(0), torch.zeros(1), _DYN_POS, torch.ones(1)])
DYN_MIDPOINTS = (DYN_MAP[:-1] + DYN_MAP[1:]) * 0.5  # (255,) fp32
# Byte b holds two codes, the earlier element in the high nibble: (NF4[b >> 4], NF4[b & 15]) as one 8-byte entry, so a
# single gather over the packed bytes yields every level in order.
_NF4_PAIRS = torch.stack([NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)], 1).view(torch.int64).flatten()


def _reciprocal(a: torch.Tensor) -> torch.Tensor:
    """fp32 1/a, multiplied rather than divided by as bnb's kernels do; 0 for an all-zero block, whose codes are then
    those of 0 (bnb's CPU path; its CUDA kernel gives NaN -> code 0 there, knowingly not followed: zeros stay zero)."""
    return torch.where(a > 0, a.reciprocal(), 0.0)


def dynamic_codes(y: torch.Tensor) -> torch.Tensor:
    """The nearest DYN_MAP index of y in [-1, 1], an exact tie going to the even index (bnb's CUDA dQuantize<0>)."""
    j = torch.bucketize(y, DYN_MIDPOINTS.to(y.device))  # midpoints strictly below y: the nearest, ties to the lower
    return j + ((j % 2 == 1) & (y == DYN_MIDPOINTS.to(y.device)[j.clamp(max=254)]))


def nf4_nbytes(shape, blocksize: int = 64, double_quant: bool = True) -> int:
    """Exact bytes of an NF4 weight of this shape: packed codes, block statistics and the offset. The 16 levels and
    the 256-entry map are format constants (bnb also writes them into every state dict: 1,088 bytes more a tensor)."""
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    return (n + 1) // 2 + (blocks + 4 * -(-blocks // 256) + 4 if double_quant else 4 * blocks)


class NF4Weight(nn.Module):
    """
    A frozen weight in NF4, buffers only. Under a linear the keys read `...wq.weight.packed`, `.absmax`,
    `.nested_absmax`, `.nested_offset`: bnb's `weight`, `weight.absmax`, `weight.nested_absmax` and the
    `nested_offset` of its quant-state JSON.
    `device`, `dtype` (the quantized weight's dtype, dequantize's default) and `shape` answer like the tensor it
    replaces, for code that asks a linear's weight where and what it is.
    """

    def __init__(self, packed, absmax, nested_absmax, nested_offset, shape, dtype, blocksize: int):
        super().__init__()
        self.register_buffer("packed", packed)  # ((n+1)//2, 1) uint8, two codes a byte
        self.register_buffer("absmax", absmax)  # (blocks,) uint8 8-bit codes with double quantization, else fp32
        self.register_buffer("nested_absmax", nested_absmax)  # (groups,) fp32, or None without double quantization
        self.register_buffer("nested_offset", nested_offset)  # () fp32, or None
        self.register_buffer("pairs", _NF4_PAIRS.clone(), persistent=False)  # lookup tables on the weight's device
        self.register_buffer("dyn_map", DYN_MAP.clone(), persistent=False)
        self.shape, self.dtype, self.blocksize = torch.Size(shape), dtype, blocksize

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return nf4_nbytes(self.shape, self.blocksize, self.nested_absmax is not None)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would round the fp32 statistics, and the weight would no longer be the one that
        # was quantized: a cast moves them to the new device but keeps their dtype.
        def keep_dtype(t):
            u = fn(t)
            return t.to(u.device) if u.dtype != t.dtype else u
        return super()._apply(keep_dtype, recurse)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in `dtype` (default: the quantized weight's): one gather and one multiply over the whole
        tensor, in fp32, then one rounding."""
        n, b = self.shape.numel(), self.blocksize
        scale = self.absmax  # (blocks,) fp32
        if self.nested_absmax is not None:  # two separate fp32 ops, as bnb: dequantize_blockwise, then += offset
            group_scale = self.nested_absmax.repeat_interleave(256)[:len(self.absmax)]  # (blocks,)
            scale = self.dyn_map.index_select(0, self.absmax.int()) * group_scale
            scale = scale + self.nested_offset
        packed = self.packed.view(-1)
        if n % b:  # a partial last block: pad with bytes of two zero codes (0x77) so every block is whole
            packed = F.pad(packed, (0, len(scale) * b // 2 - len(packed)), value=0x77)
        levels = self.pairs.index_select(0, packed.int()).view(torch.float32)  # (blocks·b,) fp32: NF4[code]
        w = levels.view(-1, b).mul_(scale[:, None])  # (blocks, b): NF4[code] · â
        return w.view(-1)[:n].view(self.shape).to(dtype or self.dtype)


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a weight of any shape and float dtype as bnb's quantize_4bit(quant_type="nf4") does on its exact fp32
    widening (quantize a checkpoint in the dtype it is stored in to reproduce Hugging Face's codes)."""
    x = weight.detach().reshape(-1).float()
    n = x.numel()
    blocks = F.pad(x, (0, -n % blocksize)).view(-1, blocksize)  # (blocks, 64); zero padding leaves each max as it is
    absmax = blocks.abs().amax(1)  # (blocks,) over the real elements
    codes = torch.bucketize(blocks * _reciprocal(absmax)[:, None], NF4_THRESHOLDS.to(x.device), out_int32=True)
    codes = codes.view(-1)[:2 * ((n + 1) // 2)]  # an odd n keeps one padding zero: code 7 in the last low nibble
    packed = (codes[0::2] << 4 | codes[1::2]).to(torch.uint8).view(-1, 1)  # ((n+1)//2, 1)
    nested = offset = None
    if double_quant:
        offset = absmax.mean()  # torch's fp32 mean, as bnb (its summation order depends on device and thread count)
        v = absmax - offset
        groups = F.pad(v, (0, -len(v) % 256)).view(-1, 256)  # (groups, 256)
        nested = groups.abs().amax(1)  # (groups,)
        q = dynamic_codes(groups * _reciprocal(nested)[:, None])
        q = torch.where(nested[:, None] > 0, q, 0)  # a group of equal absmax values: code 0, as both bnb back ends
        absmax = q.view(-1)[:len(v)].to(torch.uint8)
    return NF4Weight(packed, absmax, nested, offset, weight.shape, weight.dtype, blocksize)


class _NF4Matmul(torch.autograd.Function):
    """x Ŵᵀ, dequantizing Ŵ in forward and again in backward: only the packed weight, which lives anyway, is kept for
    backward, never a dequantized copy (bnb's MatMul4Bit does the same). Frozen: no weight gradient."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight):
        dev = x.device.type
        ctx.weight, ctx.dtype = weight, torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return F.linear(x.to(ctx.dtype), weight.dequantize(ctx.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype) @ ctx.weight.dequantize(ctx.dtype), None  # (.., out) @ (out, in) -> (.., in)


def frozen_linear(x: torch.Tensor, weight, bias=None) -> torch.Tensor:
    """x Wᵀ + b for a frozen weight held as a tensor or as an NF4Weight (which comes without a bias, as in LLaMA)."""
    if isinstance(weight, NF4Weight):
        return _NF4Matmul.apply(x, weight)
    return F.linear(x, weight, bias)


class NF4Linear(nn.Module):
    """A frozen, bias-free linear with a 4-bit weight (bnb's Linear4bit). It holds no parameter at all."""

    def __init__(self, weight: NF4Weight):
        super().__init__()
        self.weight, self.bias = weight, None
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        if linear.bias is not None:
            raise ValueError("NF4Linear is bias-free, like every LLaMA linear; keep a biased linear unquantized")
        return cls(quantize_nf4(linear.weight, blocksize, double_quant))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight)


FULL_NF4_ERROR = ("--method full trains the base weights, which a 4-bit base cannot: drop --quant nf4, or use "
                  "--method mma, lora or mixlora")


def quantize_llama_(model: nn.Module, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """
    In place, the LLaMA block linears (wq, wk, wv, wo, w1, w2, w3) of a Transformer or a LaVIN become NF4, layer by
    layer; each full-precision weight is dropped as soon as it is quantized, so peak memory stays near the 4-bit size
    plus one layer. Embeddings, norms, the output head and CLIP stay as they are (the official lite mode). Works before
    `inject_adapters` (LoRA/MixLoRA then adopt the 4-bit weight) and after it (their adopted weight is swapped).

    Distributed: the packed weights are buffers, not parameters, so FSDP2 leaves them whole and every rank holds the
    full 4-bit base (LLaMA-7B 3.34 GB, 13B 6.55 GB) while it shards the trainable adapters and the rest; there is then
    no all-gather of the base per forward and backward, and uint8 codes never meet FSDP2's one-dtype-per-unit rule or
    its mixed-precision cast. It is the layout LLaVA trains QLoRA with (ZeRO-2: replicated base). DDP broadcasts rank
    0's copy once when it wraps the model; its per-forward buffer broadcast (broadcast_buffers=True) resends every
    buffer, the whole base included, so wrap with broadcast_buffers=False (nothing here changes its buffers).
    """
    if getattr(getattr(model, "adapter_args", None), "method", None) == "full":
        raise ValueError(FULL_NF4_ERROR)
    for layer in getattr(model, "llama", model).layers:
        quantize_block_(layer, blocksize, double_quant)
    return model


def quantize_block_(layer: nn.Module, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """One LLaMA block's seven linears become NF4, in place (model.load_llama streams a checkpoint through this)."""
    for path in LORA_TARGETS.values():
        parent_name, attr = path.split(".")
        parent = getattr(layer, parent_name)
        lin = getattr(parent, attr)
        if type(lin) is nn.Linear:
            setattr(parent, attr, NF4Linear.from_linear(lin, blocksize, double_quant))
        else:  # a LoRA / MixLoRA linear: it keeps its factors and adopts the 4-bit weight
            adopt_frozen(lin, NF4Linear(quantize_nf4(lin.weight, blocksize, double_quant)))
    return layer


def adopt_frozen(lin: nn.Linear, base: nn.Module):
    """Take over base's frozen weight (a Parameter, or an NF4Weight module) and bias under the same names, so the
    base's state-dict keys are unchanged by wrapping it."""
    del lin.weight  # nn.Linear registered a Parameter under this name; an NF4Weight registers as a submodule instead
    lin.weight, lin.bias = base.weight, base.bias


# ---------------------------------------------------------------------------------------------------------------------
# The MM-Adapter

class GroupedLinear(nn.Module):
    """
    A 1x1 grouped convolution written as a linear map: hidden (.., h) -> (.., C) with `groups` blocks.
    Output channels [g·C/G, (g+1)·C/G) read only hidden units [g·h/G, (g+1)·h/G). The weight is stored (C, h/G),
    which is the official Conv1d weight [C, h/G, 1] without its kernel axis (lavin/mm_adapter.py, `groups=2`).
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
        """The equivalent dense, block-diagonal (C, h) matrix B̃ (for folding)."""
        G = self.groups
        C, k = self.weight.shape
        dense = self.weight.new_zeros(C, G * k)
        for g in range(G):
            dense[g * C // G:(g + 1) * C // G, g * k:(g + 1) * k] = self.weight[g * C // G:(g + 1) * C // G]
        return dense


class MMAdapter(nn.Module):
    """x (B, T, C), r (B, C) router input -> (B, T, C). 20·C + 10 parameters (paper Table 6: 3.8M for 7B).
    routed=False is the routing ablation (AdapterArgs.router "none"): up0 alone, r ignored, 13·C + 8 parameters."""

    def __init__(self, dim: int, hidden: int = 8, groups: int = 2, scale: float = 1.0, dropout: float = 0.1,
                 tau: float = 10.0, routed: bool = True):
        super().__init__()
        self.down = nn.Linear(dim, hidden)  # official conv_A: shared by both paths
        nn.init.xavier_uniform_(self.down.weight)  # official init: Xavier-uniform A, zero bias
        nn.init.zeros_(self.down.bias)
        self.up0 = GroupedLinear(hidden, dim, groups)  # official conv_B
        self.up1 = GroupedLinear(hidden, dim, groups) if routed else None  # official conv_D
        self.router = Router(dim, 2, tau) if routed else None  # official expert_weights
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def forward(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        dt = self.down.weight.dtype  # fp32 masters; under autocast the matmuls still run in bf16, outside it in fp32
        z = self.dropout(self.down(x.to(dt)))  # (B, T, h); no non-linearity follows, which is what makes it foldable
        if self.router is None:  # the ablation: one path, whatever the modality
            return x + self.scale * self.up0(z).to(x.dtype)
        w = self.router(r.to(dt)).to(x.dtype)[:, None, :]  # (B, 1, 2): one pair per sample, shared by all its tokens
        delta = w[..., 0:1] * self.up0(z) + w[..., 1:2] * self.up1(z)  # (B, T, C)
        return x + self.scale * delta.to(x.dtype)

    @torch.no_grad()
    def affine(self, w: torch.Tensor | None):
        """
        In eval mode, for fixed routing w = (w0, w1), the adapter is x -> M x + c with M = I + U A:
        U = s (w0 B̃ + w1 D̃) (C, h), A (h, C), c = U a + s (w0 b_B + w1 b_D). Returns (U, A, c) in fp32.
        Without a router (w None) the same with w = (1, 0) and no D̃.
        """
        w0, w1 = (1.0, 0.0) if self.router is None else w.float().tolist()
        s = self.scale
        U = s * w0 * self.up0.dense_weight().float()  # (C, h)
        c_up = s * w0 * self.up0.bias.float()
        if self.up1 is not None:
            U = U + s * w1 * self.up1.dense_weight().float()
            c_up = c_up + s * w1 * self.up1.bias.float()
        A, a = self.down.weight.float(), self.down.bias.float()  # (h, C), (h,)
        c = U @ a + c_up  # (C,)
        return U, A, c


@torch.no_grad()
def fold_mma_into_qkv(attention: nn.Module, adapter: MMAdapter, w: torch.Tensor) -> dict:
    """
    Re-parameterisation (README, difference 6): q = W_q (M x + c) = (W_q + (W_q U) A) x + W_q c, likewise k and v.
    Replaces attention.wq/wk/wv with biased linears (the bias is added before RoPE, exactly where the adapter output
    entered) and returns the original modules so the caller can restore them bit-exactly.
    """
    U, A, c = adapter.affine(w)
    originals = {}
    for name in ("wq", "wk", "wv"):
        lin = getattr(attention, name)
        # (out, C); fold in fp32, then store in the frozen weight's dtype (a 4-bit one is dequantized once)
        W = lin.weight.dequantize(torch.float32) if isinstance(lin, NF4Linear) else lin.weight.float()
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
        adopt_frozen(self, base)  # the frozen weight, full-precision or 4-bit (the meta one is dropped)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # U(±1/sqrt(d_in)), like a default Linear
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.original = None  # W0 while merged, so unmerge restores it bit-exactly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_linear(x, self.weight, self.bias)
        if self.merged:  # the update is already inside self.weight
            return y
        # Apply A first, then B: (.., d_in) -> (.., r) -> (.., d_out), never forming the d_out x d_in product. The
        # scaling and the sum ride in B's matmul (addmm's alpha and its added input): no extra (.., d_out) passes.
        z = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (.., r)
        out = torch.addmm(y.flatten(0, -2), z.flatten(0, -2), self.lora_B.to(x.dtype).t(), alpha=self.scaling)
        return out.view_as(y)

    @property
    def merged(self) -> bool:
        return self.original is not None

    @torch.no_grad()
    def merge(self):
        """W = W0 + (alpha/r) B A: no inference overhead afterwards. W0 waits meanwhile, for unmerge: on the CPU, since
        subtracting the update again would not give W0 back bit for bit in bf16; or, for a 4-bit base, as it is, while
        the merge folds into a dequantized copy of it, made once."""
        if not self.merged:
            if isinstance(self.weight, NF4Weight):
                self.original, w = self.weight, self.weight.dequantize()
                del self.weight
                self.weight = nn.Parameter(w, requires_grad=False)
            else:
                self.original = self.weight.detach().cpu().clone()
            self.weight.add_((self.scaling * self.lora_B.float() @ self.lora_A.float()).to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self):
        if isinstance(self.original, NF4Weight):
            del self.weight  # the dequantized, merged copy
            self.weight, self.original = self.original, None
        elif self.original is not None:
            self.weight.copy_(self.original.to(self.weight.device))
            self.original = None


class MixLoRALinear(nn.Linear):
    """
    y = W0 x + (alpha / r) · Σ_i g_i b_{j_i} a_{k_i}ᵀ dropout(x), with the r factors (k_i, j_i) chosen per instance
    by a FactorRouter from the mean of this layer's own input over the sequence (Shen et al. 2024, §3).

    Open choices, labelled: we pool over every position, padding included, as the released code does; and at
    decode time the layer re-routes on the single new token, also as the released code does.
    """

    def __init__(self, base: nn.Linear, pool: int, rank: int, alpha: float, dropout: float, cfs: str, mode: str,
                 lam: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        adopt_frozen(self, base)
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
        y = frozen_linear(x, self.weight, self.bias)
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
    CLIP block (paper §3.2, Fig. 2). LoRA / MixLoRA: wrap the chosen LLaMA linears; CLIP stays frozen and un-adapted
    (as in LLaVA). Full: nothing to add. New modules are created fp32 on the device of the weights they adapt
    (the meta device included, so 7B/13B shapes can be counted without memory).
    """
    llama, visual = model.llama, model.visual
    if args.method == "full" and any(isinstance(m, NF4Weight) for m in llama.modules()):
        raise ValueError(FULL_NF4_ERROR)
    if args.method == "mma":
        tau = args.tau if args.tau is not None else default_tau(llama.args.dim)  # one temperature for both towers
        for layer in llama.layers:
            with torch.device(layer.attention.wq.weight.device):
                layer.adapter_attn = MMAdapter(llama.args.dim, args.adapter_dim, 2, args.adapter_scale,
                                               args.adapter_dropout, tau, args.router == "modality")
        for block in visual.blocks[:visual.args.used_layers]:  # not the blocks whose output LaVIN never reads
            with torch.device(block.attn.in_proj.weight.device):
                block.adapter_attn = MMAdapter(visual.args.width, args.adapter_dim, 2, args.adapter_scale,
                                               args.adapter_dropout, tau, args.router == "modality")
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
        # The official rule (train.py of luogen1996/LaVIN): trainable iff the name contains "adapter" — the LLaMA and
        # CLIP adapters, the neck `adapter_proj` and `adapter_modality_embedding`. No bias or norm tuning. Without
        # routers the modality token reaches the loss nowhere (it is masked from every other position), so it would
        # get no gradient: frozen.
        return "adapter" in name and not (args.router == "none" and "modality" in name)
    if args.method in ("lora", "mixlora"):
        # LoRA factors (+ MixLoRA routers, which only learn in the score-weighted mode) and the visual neck, kept from
        # LaVIN for a like-for-like ScienceQA baseline. The modality token has no router to feed
        # here, so it would get no gradient: frozen.
        if ".router." in name:
            return args.method == "mixlora" and args.mix_mode == "weighted"
        return ".lora_" in name or name.startswith("adapter_proj.")
    # full: everything on the loss path. CLIP's ln_post/proj are unused by LaVIN and the modality token
    # reaches the loss only through MM-Adapter routers, so these would get no gradient (and break DDP/FSDP).
    return not (name.startswith("visual.ln_post") or name == "visual.proj" or "modality" in name)


def mark_trainable(model: nn.Module, args: AdapterArgs):
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, args))
    # CLIP blocks after the last class token LaVIN takes never reach the loss: nothing there may train (DDP and FSDP2
    # need a gradient for every trainable parameter). ViT-L/14 has none such.
    model.visual.blocks[model.visual.args.used_layers:].requires_grad_(False)


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
    """Load a trainable state dict (ours, or the official LaVIN format converted by weights.convert_official_lavin).
    Missing, unexpected and mis-shaped keys are all listed in one error."""
    sd = strip_module_prefix(sd)  # DDP checkpoints carry a `module.` prefix
    if any(".conv_A." in k or ".expert_weights." in k for k in sd):
        sd = convert_official_lavin(sd)
    params = dict(model.named_parameters())
    # Every trainable tensor must be there; frozen ones may be too (they load like the rest), nothing else.
    check_state_dict({n: p for n, p in params.items() if p.requires_grad}, sd, "adapter checkpoint does not match "
                     "the model", "wrong --method, model size or adapter flags?", allowed=params)
    with torch.no_grad():
        for k, v in sd.items():
            p = params[k]
            if isinstance(p, DTensor):  # FSDP2 shard: scatter the full tensor the way the parameter is laid out
                p.copy_(distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(v.to(device=p.device, dtype=p.dtype))

