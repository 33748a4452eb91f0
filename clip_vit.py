"""
clip_vit.py: the OpenAI CLIP vision tower (a ViT), written by hand in batch-first layout, with its checkpoint
loader and the Pillow + numpy image preprocessing that LaVIN feeds it. It opens with the weight-file readers that
model.load_llama shares: a hand-written safetensors reader (no `safetensors` package) and torch checkpoints.

It follows
- openai/CLIP clip/model.py: LayerNorm (fp32), QuickGELU, ResidualAttentionBlock, VisionTransformer, and
  build_model, which infers every hyperparameter from the checkpoint's tensor shapes;
- luogen1996/LaVIN clip/model.py: the modified VisionTransformer forward, which puts a router adapter in front of
  each block's attention and returns the raw CLS token after every 4th of the 24 blocks;
- Hugging Face transformers' modeling_clip.py for the names of its CLIP checkpoints, which load_clip also reads.

Deliberate departures from the official code
- Batch-first (B, T, W) activations everywhere. OpenAI runs sequence-first (L, N, D) through nn.MultiheadAttention;
  we fuse q, k, v into one Linear with the same row layout, so its weights load unchanged, only renamed.
- Per-image routing: each block's adapter routes an image from that image's own CLS token, instead of
  from batch element 0 as the official code does (README, difference 1). See ResidualAttentionBlock.forward.
- load_clip returns fp32 weights, as the official code has them by loading CLIP on CPU.
- 16-bit greyscale images are scaled to 8 bit; Pillow's convert("RGB"), used by the official pipeline, clips them
  (any value >= 255 becomes white). ScienceQA images are 8-bit, so this changes nothing there.

Used by model.py (LaVIN wraps VisionTransformer) and data.py (preprocessing); tests:
    python -m pytest -q test_all.py -k test_clip_
"""

import json
import math
import mmap
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

# ----------------------------------------------------------------------------------------------------------------
# Reading and checking weight files (safetensors, torch), for load_clip here, model.load_llama and
# adapters.load_trainable

# safetensors' dtype strings (huggingface/safetensors, the format's README and its Rust `Dtype`) -> torch dtypes.
# The sub-byte F4 / F6_* types have no torch dtype that frombuffer can fill, so they are refused as unknown.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "BOOL": torch.bool,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
if hasattr(torch, "float8_e8m0fnu"):  # newer than the torch 2.6 that requirements.txt allows
    SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


class SafeTensors(Mapping):
    """
    A .safetensors file as a read-only {name: tensor} mapping, without the `safetensors` package (torch.load hands
    such files to it). Layout: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end)}} (plus an optional "__metadata__" of strings), then the tensors' bytes, C order.
    The whole header is checked on opening. The file is memory-mapped copy-on-write, and each tensor is made on access
    as a view of the map: nothing is read until used, and a 7B load never holds a second copy.
    """

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 8:
            raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, not even the header length)")
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 100_000_000):  # the reference reader refuses headers over 100 MB
                raise ValueError(f"{self.path}: bad safetensors header length {n} for a file of {size} bytes "
                                 f"(truncated, or not a safetensors file)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
                raise ValueError(f"{self.path}: the safetensors header is not valid JSON ({e})") from None
            # ACCESS_COPY, not ACCESS_READ: torch.frombuffer wants a writable buffer; pages are still read lazily
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: the safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start, self._entries = 8 + n, {}
        for name, e in header.items():
            self._entries[name] = self._check(name, e, size - 8 - n)
        spans = sorted((b, end, name) for name, (_, _, b, end) in self._entries.items() if end > b)
        for (_, end, a), (b, _, name) in zip(spans, spans[1:]):
            if b < end:
                raise ValueError(f"{self.path}: entry {name!r} overlaps entry {a!r} in the data section")

    def _check(self, name, e, data_size):
        """One header entry -> (dtype, shape, begin, end), or a ValueError naming the file and the entry."""
        def bad(problem):
            return ValueError(f"{self.path}: entry {name!r}: {problem} (truncated or malformed safetensors file)")
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise bad(f"expected {{dtype, shape, data_offsets}}, got {e!r}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"unknown dtype {dtype!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
        ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and x >= 0 for x in xs)
        if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise bad(f"malformed shape {shape!r} or data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise bad(f"bytes [{begin}, {end}) lie outside the data section of {data_size} bytes")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise bad(f"shape {shape} of {dtype} needs {nbytes} bytes, but data_offsets span {end - begin}")
        return SAFETENSORS_DTYPES[dtype], shape, begin, end

    def __getitem__(self, name):
        dtype, shape, begin, end = self._entries[name]
        if end == begin:  # an empty tensor: frombuffer refuses a count of 0
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=self._start + begin)
        return t.reshape(shape)  # a view of the mapped file (a 0-d shape [] gives a scalar)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def release(self, name):
        """The caller copied this tensor out: let the kernel drop its pages from memory (they are read again from
        the file if touched), so that converting a checkpoint tensor by tensor never holds it twice. Only whole
        pages inside the tensor's bytes are dropped, and nothing is ever written to the map, so no data changes."""
        _, _, begin, end = self._entries[name]
        page = mmap.PAGESIZE
        lo, hi = -(-(self._start + begin) // page) * page, (self._start + end) // page * page
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def save_safetensors(tensors: dict, path, metadata: dict | None = None):
    """Write {name: tensor} as a .safetensors file, laid out as the reference writer does: tensors largest item size
    first, then by name (which aligns each to its item size), header padded with spaces to a multiple of 8."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {"__metadata__": metadata} if metadata else {}, 0
    for k in order:
        t = tensors[k]
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for k in order:  # the raw bytes, via a uint8 view (numpy has no bfloat16 but writes bytes without a copy)
            f.write(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def torch_load(path, what: str, **kw):
    """torch.load in its safe mode (tensors and plain containers only; model.py's loaders use it too), with errors that
    name the file. A file holding other Python objects is refused without torch's advice to retry with
    weights_only=False, which would run whatever code the file carries."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except Exception as e:  # torch raises many types here (RuntimeError, UnpicklingError, EOFError...)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # torch's refusal names it
        if refused:
            raise ValueError(f"cannot read {what} {path}: it holds a pickled {refused.group(1)}, which the safe "
                             f"loader refuses (not a file of the kind expected here)") from e
        raise ValueError(f"cannot read {what} {path}: corrupt or truncated ({str(e).split('. ')[0]}); copy it again "
                         f"or use another") from e


def read_weights(path, what: str = "checkpoint") -> Mapping:
    """A weight file -> a flat {name: tensor} mapping: a .safetensors file (SafeTensors: lazy views of the mapped
    file), OpenAI's TorchScript archive, or a torch.save'd state dict (read with weights_only=True, memory-mapped
    when it is a zip archive, as every torch.save since torch 1.6 is)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return SafeTensors(path)
    try:
        with zipfile.ZipFile(path) as z:
            torchscript = any(name.endswith("/constants.pkl") for name in z.namelist())  # torch.save has none
        zipped = True
    except zipfile.BadZipFile:
        torchscript = zipped = False  # a legacy (pre-1.6) torch.save file, or not a checkpoint at all
    if torchscript:
        # OpenAI's release format. torch.jit is deprecated but remains the only reader of these archives; its
        # state_dict() has the same keys that build_model sees. Silence only that warning.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:
            raise ValueError(f"cannot read {what} {path}: {e}") from e
    obj = torch_load(path, what, mmap=zipped)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):  # common wrappers of training checkpoints
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def check_state_dict(expected: Mapping, got: Mapping, what: str, hint: str, allowed: Mapping | None = None):
    """Before load_state_dict gives a vaguer error: every tensor of `expected` must be in `got`, and every tensor of
    `got` must be in `allowed` (default `expected`) with that shape. Lists each kind of mismatch (a count, the first 8)
    in one ValueError whose first line is `what` and `hint` (how to fix it). Values: tensors, or anything with .shape."""
    allowed = expected if allowed is None else allowed
    found = {"missing": [f"{k} {tuple(v.shape)}" for k, v in expected.items() if k not in got],
             "unexpected": [k for k in got if k not in allowed],
             "wrong shape": [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(allowed[k].shape)}"
                             for k, v in got.items() if k in allowed and tuple(v.shape) != tuple(allowed[k].shape)]}
    lines = [f"  {kind} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")
             for kind, items in found.items() if items]
    if lines:
        raise ValueError("\n".join([f"{what} ({hint})"] + lines))


def hf_weight_files(folder) -> list[Path]:
    """The weight files of a Hugging Face folder as save_pretrained writes them: model.safetensors, or the shards
    that model.safetensors.index.json maps every tensor to; the same for the older pytorch_model*.bin."""
    folder = Path(folder)
    for single in ("model.safetensors", "pytorch_model.bin"):  # safetensors first: Hub repos often carry both
        if (folder / single).is_file():
            return [folder / single]
        index = folder / f"{single}.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not in {folder}: {', '.join(missing)} "
                                        f"(an incomplete download?)")
            return [folder / n for n in names]
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, or model.safetensors.index.json "
                            f"and its shards (or pytorch_model*.bin)")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks, small to big


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that computes in fp32 and casts back, as OpenAI CLIP's subclass does: fp16 statistics over
    1024 channels lose too much precision."""

    def forward(self, x):
        # The weights are upcast too, so that a tower cast wholesale to fp16/bf16 still works (OpenAI never casts
        # its LayerNorm weights, so it can pass them as they are).
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.type_as(x)


class QuickGELU(nn.Module):
    # GELU(x) = x * Phi(x), with Phi the Gaussian CDF. sigmoid(1.702 x) is the closest logistic fit to Phi(x)
    # (Hendrycks & Gimpel 2016, §2). CLIP was *trained* with this approximation, so exact GELU would shift features.
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Batch-first multi-head self-attention, without a mask: every patch sees every patch."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        # q, k, v in one matmul. The (3W, W) weight stacks the q rows, then the k rows, then the v rows: exactly
        # nn.MultiheadAttention's in_proj_weight, so OpenAI's tensors load as they are.
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        # B batch, T tokens (257 for ViT-L/14 at 224 px), C width, H heads, D head dim = C / H (64 in OpenAI ViTs)
        B, T, C = x.shape
        q, k, v = self.in_proj(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, D)
        # SDPA scales by 1/sqrt(D), as nn.MultiheadAttention does. With fp32 inputs (CPU) the softmax is fp32; on
        # GPU under autocast the fused kernels keep the softmax statistics in fp32 as well.
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again, as MHA concatenates them
        return self.out_proj(y)  # (B, T, C)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); LaVIN's adapter sits after ln_1."""

    def __init__(self, width, heads, ln_eps=1e-5):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=ln_eps)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width, eps=ln_eps)
        # OpenAI's names (c_fc, gelu, c_proj), so that checkpoint keys map one to one
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))
        # LaVIN's MM-Adapter (adapters.MMAdapter, forward(x, r)); None is plain CLIP. The model sets it.
        self.adapter_attn = None

    def forward(self, x):
        # x: (B, T, W) residual stream, token 0 = CLS
        h = self.ln_1(x)  # (B, T, W)
        if self.adapter_attn is not None:
            # Official behaviour (LaVIN clip/model.py): CLIP runs sequence-first, so h there is (L=257, N=B, D) and
            # the adapter's "row 0 of the second axis" is batch element 0 at every token position. That gives [257, 2]
            # routing weights computed from the *first image of the batch* (a zero image when sample 0 is text-only)
            # and applied to every image: the routing depends on the batch. Here each image is routed from its own
            # CLS token instead (README, difference 1).
            h = self.adapter_attn(h, h[:, 0])  # (B, T, W), router input (B, W): each image's own CLS token
        x = x + self.attn(h)  # the residual adds to the un-normalised x
        x = x + self.mlp(self.ln_2(x))  # no adapter on the MLP (LaVIN's `router` type)
        return x  # (B, T, W)


# ----------------------------------------------------------------------------------------------------------------
# Config and the tower


@dataclass
class VisionArgs:
    image_size: int = 224  # input side; 224 / 14 = a 16 x 16 grid = 256 patch tokens, + CLS = 257 tokens
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16  # = width // 64: every OpenAI ViT uses 64-dim heads, and build_model relies on it
    output_dim: int = 768  # the CLIP joint-embedding size, the output of proj (unused by LaVIN)
    # LaVIN's visual tokens: the class token after every `feature_every`-th block, as the official
    # `VisionTransformer.forward` of lavin/model.py keeps `x[:, 0]` where `(i + 1) % 4 == 0`. ViT-L/14's 24 blocks give
    # 6 tokens, a 12-block ViT-B gives 3, an 8-block tower 2. Not in the weights: load_clip takes it as an argument.
    feature_every: int = 4
    ln_eps: float = 1e-5

    @property
    def n_tokens(self) -> int:
        """How many visual tokens the tower hands to LLaMA (6 for ViT-L/14)."""
        return self.layers // self.feature_every

    @property
    def used_layers(self) -> int:
        """The blocks LaVIN runs: those after the last class token it takes feed nothing (none for ViT-L/14)."""
        return self.n_tokens * self.feature_every


VISION_PRESETS = {
    "ViT-L/14": VisionArgs(),  # the tower LaVIN uses (OpenAI's ViT-L-14.pt)
    "ViT-B/16": VisionArgs(patch_size=16, width=768, layers=12, heads=12, output_dim=512),  # 3 visual tokens
    # For the CPU quick start and the tests: 64 px images in a 4 x 4 grid of 16-px patches, 6 blocks, and the class
    # token after every block, so that it hands LLaMA 6 visual tokens like ViT-L/14 (README, difference 20). Heads of
    # 64 dims, like every OpenAI ViT, so load_clip rebuilds it from an OpenAI-layout state dict (the quick start saves
    # its pre-trained stand-in that way).
    "tiny": VisionArgs(image_size=64, patch_size=16, width=128, layers=6, heads=2, output_dim=64, feature_every=1),
}


class VisionTransformer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        if args.image_size % args.patch_size:
            raise ValueError(f"image_size {args.image_size} is not a multiple of patch_size {args.patch_size}")
        if not 1 <= args.feature_every <= args.layers:
            raise ValueError(f"a {args.layers}-block tower gives no visual token with the class token taken after every "
                             f"{args.feature_every}th block: choose --clip_every between 1 and {args.layers}")
        self.args = args
        W, grid = args.width, args.image_size // args.patch_size
        # Patchify: a conv whose kernel and stride both equal the patch size applies one linear map to each
        # non-overlapping P x P x 3 patch. No bias, as in OpenAI's checkpoints (ln_pre follows anyway).
        self.conv1 = nn.Conv2d(3, W, kernel_size=args.patch_size, stride=args.patch_size, bias=False)
        # OpenAI's init: N(0, 1/W) for the CLS and position embeddings and the projection. Weights are normally
        # loaded, so the init only matters for the tiny preset and the tests.
        scale = W ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(W))  # (W,)
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, W))  # (grid² + 1, W)
        self.ln_pre = LayerNorm(W, eps=args.ln_eps)  # not in a standard ViT; CLIP normalises before block 0
        self.blocks = nn.ModuleList(ResidualAttentionBlock(W, args.heads, args.ln_eps) for _ in range(args.layers))
        self.ln_post = LayerNorm(W, eps=args.ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(W, args.output_dim))  # (W, output_dim)
        # nn.MultiheadAttention's own init, which OpenAI's visual blocks keep: Xavier in_proj, zero biases
        for block in self.blocks:
            nn.init.xavier_uniform_(block.attn.in_proj.weight)
            nn.init.zeros_(block.attn.in_proj.bias)
            nn.init.zeros_(block.attn.out_proj.bias)

    def tokens(self, images):
        """images (B, 3, S, S), any float dtype -> (B, grid² + 1, W): patches + CLS + positions, after ln_pre."""
        # B batch, S image side, G grid side = S / P, N = G² patches, W width
        S = self.args.image_size
        if images.shape[-3:] != (3, S, S):
            raise ValueError(f"expected images of shape (B, 3, {S}, {S}), got {tuple(images.shape)}")
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, W, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, N, W): patches in row-major order, as OpenAI's reshape + permute
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1)  # (B, N + 1, W): CLS is token 0
        x = x + self.positional_embedding.to(x.dtype)  # (N + 1, W) broadcast over B
        return self.ln_pre(x)  # (B, N + 1, W)

    def forward(self, images):
        """LaVIN's visual tokens: (B, 3, S, S) -> (B, n_tokens, W), the class token after blocks feature_every,
        2 * feature_every, ... (blocks 4, 8, ..., 24 of ViT-L/14, 1-indexed; paper §3.2 and lavin/model.py)."""
        x = self.tokens(images)  # (B, T, W)
        feats = []
        for i, block in enumerate(self.blocks[:self.args.used_layers]):
            x = block(x)  # (B, T, W)
            if (i + 1) % self.args.feature_every == 0:
                feats.append(x[:, 0])  # (B, W): the raw residual-stream CLS, without ln_post or proj
        return torch.stack(feats, dim=1)  # (B, n_tokens, W)

    def encode_image(self, images):
        """The standard CLIP image embedding: (B, 3, S, S) -> (B, output_dim). LaVIN does not use it."""
        x = self.tokens(images)  # (B, T, W)
        for block in self.blocks:
            x = block(x)  # (B, T, W)
        return self.ln_post(x[:, 0]) @ self.proj  # (B, W) @ (W, output_dim) -> (B, output_dim)


# ----------------------------------------------------------------------------------------------------------------
# Loading OpenAI's checkpoint (clip/clip.py load, clip/model.py build_model)

VIT_L14_SHA256 = "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"
VIT_L14_URL = f"https://openaipublic.azureedge.net/clip/models/{VIT_L14_SHA256}/ViT-L-14.pt"  # as in clip/clip.py


def convert_openai_state_dict(sd):
    """OpenAI CLIP state dict (full model with `visual.` keys, or the vision tower alone) -> our key names.
    Tensors are passed through untouched: the layouts already agree, only the names differ."""
    # A full CLIP state dict also holds the text tower, whose keys (transformer.resblocks.*, positional_embedding)
    # collide with the visual ones once the prefix is gone: when `visual.` keys exist, keep only those.
    prefix = "visual." if any(k.startswith("visual.") for k in sd) else ""
    out = {}
    for key, value in sd.items():
        # skip other keys and the scalar entries (input_resolution, context_length, vocab_size), as build_model does
        if not key.startswith(prefix) or not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        key = key[len(prefix):]
        key = key.replace("transformer.resblocks.", "blocks.")  # OpenAI wraps the blocks in a Transformer module
        key = key.replace("attn.in_proj_weight", "attn.in_proj.weight")  # MHA's raw parameters -> our nn.Linear
        key = key.replace("attn.in_proj_bias", "attn.in_proj.bias")
        out[key] = value  # attn.out_proj.*, ln_*, mlp.c_fc.*, mlp.c_proj.* and the rest keep their names
    return out


def to_openai_state_dict(sd):
    """Our key names -> OpenAI's (with the `visual.` prefix), the inverse of convert_openai_state_dict: how the quick
    start saves its CLIP stand-in, so that it is read back through the very path OpenAI's weights take."""
    out = {}
    for key, value in sd.items():
        key = key.replace("blocks.", "transformer.resblocks.", 1) if key.startswith("blocks.") else key
        key = key.replace("attn.in_proj.weight", "attn.in_proj_weight").replace("attn.in_proj.bias", "attn.in_proj_bias")
        out["visual." + key] = value
    return out


# Hugging Face's CLIP names (transformers' modeling_clip.py) -> ours, applied in order to what follows `vision_model.`
_HF_CLIP_NAMES = [("embeddings.patch_embedding.", "conv1."), ("embeddings.class_embedding", "class_embedding"),
                  ("embeddings.position_embedding.weight", "positional_embedding"),
                  ("pre_layrnorm.", "ln_pre."),  # sic: HF's spelling
                  ("post_layernorm.", "ln_post."), ("encoder.layers.", "blocks."), (".self_attn.", ".attn."),
                  (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
                  (".mlp.fc2.", ".mlp.c_proj.")]


def convert_hf_state_dict(sd):
    """Hugging Face CLIPModel or CLIPVisionModelWithProjection tensors -> our key names. The text tower and the
    legacy position_ids buffer are left out; q, k and v (weights and biases) are fused into in_proj."""
    out = {}
    for key, value in sd.items():
        if key == "visual_projection.weight":
            out["proj"] = value.t()  # HF: a bias-free Linear(W, out), weight (out, W); OpenAI: x @ proj, (W, out)
        elif key.startswith("vision_model.") and not key.endswith("position_ids"):
            key = key[len("vision_model."):]
            for old, new in _HF_CLIP_NAMES:
                key = key.replace(old, new)
            out[key] = value
    for key in [k for k in out if ".attn.q_proj." in k]:
        parts = [out.pop(key.replace("q_proj", p), None) for p in ("q_proj", "k_proj", "v_proj")]
        if all(p is not None for p in parts):  # else in_proj is reported missing below
            out[key.replace("q_proj", "in_proj")] = torch.cat(parts)  # (3W, W) or (3W,): q, k, v rows as MHA
    return out


def load_clip(path, device="cpu", feature_every: int = 4) -> VisionTransformer:
    """Build the vision tower, in fp32, from OpenAI's TorchScript archive (ViT-L-14.pt) or a state dict in OpenAI's
    layout, or from Hugging Face's: a CLIP folder (config.json + model.safetensors, e.g. openai/clip-vit-large-patch14)
    or a lone .safetensors file, of a CLIPModel (its text tower is ignored) or a CLIPVisionModelWithProjection.
    The weights fix every hyperparameter but `feature_every` (which blocks' class tokens LaVIN takes): an argument."""
    path, config, cfg = Path(path), Path(path) / "config.json", {}
    if path.is_dir():
        cfg = json.loads(config.read_text()) if config.is_file() else {}
        raw = {}
        for file in hf_weight_files(path):
            raw.update(read_weights(file, "CLIP checkpoint"))  # lazy views: nothing is read yet
    elif path.is_file():
        raw = read_weights(path, "CLIP checkpoint")
    else:
        raise FileNotFoundError(
            f"CLIP checkpoint not found: {path}. Expected OpenAI's ViT-L-14.pt TorchScript archive "
            f"(sha256 {VIT_L14_SHA256}, from {VIT_L14_URL}), a state dict of a CLIP vision tower, or a Hugging Face "
            f"CLIP folder or .safetensors file (e.g. openai/clip-vit-large-patch14)")
    vision = cfg.get("vision_config", cfg)  # CLIPModel nests it; CLIPVisionModelWithProjection's is top-level
    hf = any(k.startswith("vision_model.") for k in raw)
    sd = convert_hf_state_dict(raw) if hf else convert_openai_state_dict(raw)
    if vision.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"{config} says hidden_act {vision['hidden_act']!r}, but this tower computes QuickGELU, "
                         f"as OpenAI's CLIP was trained: it would load, and give other features")
    shapes_needed = {"conv1.weight": 4, "positional_embedding": 2, "class_embedding": 1, "proj": 2,
                     "blocks.0.attn.in_proj.weight": 2}
    missing = [k for k, ndim in shapes_needed.items() if k not in sd or sd[k].dim() != ndim]
    if missing:
        raise ValueError(f"{path} is not a CLIP ViT vision checkpoint: missing or malformed {missing} (names "
                         f"after convert_{'hf' if hf else 'openai'}_state_dict)")
    # Infer the architecture from shapes, as OpenAI's build_model does
    width, _, patch, _ = sd["conv1.weight"].shape  # (W, 3, P, P)
    grid = round((sd["positional_embedding"].shape[0] - 1) ** 0.5)  # (G² + 1, W)
    layers = sum(k.endswith(".attn.in_proj.weight") for k in sd)
    # Heads: HF's config says; OpenAI's build_model assumes 64-dim heads, as every OpenAI ViT has
    args = VisionArgs(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                      heads=vision.get("num_attention_heads") or max(1, width // 64), output_dim=sd["proj"].shape[1],
                      ln_eps=vision.get("layer_norm_eps", 1e-5), feature_every=feature_every)
    # Build on the meta device: no memory and no random init for weights that are about to be overwritten
    with torch.device("meta"):
        model = VisionTransformer(args)
    check_state_dict(model.state_dict(), sd, f"{path} does not match {args}, the CLIP ViT its shapes describe",
                     "an incomplete or edited file? Use OpenAI's ViT-L-14.pt or a Hugging Face CLIP download")
    # fp32 masters (OpenAI stores fp16); assign=True adopts the tensors instead of copying into meta storage
    model.load_state_dict({k: v.detach().float().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------------
# Image preprocessing (LaVIN's util/datasets.py transforms), Pillow + numpy only

# ImageNet statistics: LaVIN normalises with these, not CLIP's, and its released adapters were trained on that
# input distribution, so they are the default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CLIP's own training statistics (openai/CLIP clip/clip.py _transform), offered as norm="clip"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is dropped, not composited, as the official convert('RGB') does."""
    mode = img.mode
    if mode == "I" or mode.startswith("I;16"):
        # 16-bit data (Pillow also reads 16-bit PNGs as mode "I"). Pillow's own conversion clips at 255, so a
        # 16-bit image would come out nearly all white; scale instead: 65535 / 257 = 255 exactly.
        arr = np.asarray(img, dtype=np.float64)  # (H, W); numpy handles the I;16B byte order
        img = Image.fromarray(np.rint(np.clip(arr, 0, 65535) / 257).astype(np.uint8))  # mode L
    elif mode == "F":
        # Float images: Pillow's convention (and its own F -> L conversion) is a 0..255 scale; clip and round.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        img = Image.fromarray(np.rint(np.clip(arr, 0, 255)).astype(np.uint8))  # mode L
    elif mode == "P" and "transparency" in img.info:
        # Same RGB result as a direct convert, minus Pillow's warning about palette transparency
        img = img.convert("RGBA")
    try:
        return img.convert("RGB")
    except ValueError as e:  # e.g. mode "La" has no conversion path
        raise ValueError(f"cannot convert an image of mode {mode} to RGB: {e}") from e


def load_image(path) -> Image.Image:
    """Open an image file as RGB. Decodes it fully now, so broken files fail here with their path."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # Image.open only reads the header; a truncated PNG fails at decode time
            return to_rgb(img)  # a new image, independent of the file handle closed by `with`
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error, zlib.error...
        raise ValueError(f"cannot read image {path}: {e}") from e


def preprocess(img: Image.Image, size=224, norm="imagenet", crop=False) -> torch.Tensor:
    """PIL image -> normalised FloatTensor (3, size, size).

    crop=False (default): LaVIN's geometry, a bicubic squash to size x size ignoring the aspect ratio.
    crop=True: CLIP's geometry, short side to `size` (bicubic), then a centre crop.
    norm picks the constants only: "imagenet" (LaVIN, default) or "clip"."""
    if norm not in _NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {sorted(_NORMS)}")
    img = to_rgb(img)  # LaVIN converts before resizing (CLIP after; only matters for palette images)
    # Image.Resampling.BICUBIC is Image.BICUBIC: what torchvision's Resize calls on a PIL image, so this is
    # bit-exact with the official transforms.
    if crop:
        w, h = img.size
        # torchvision Resize(int): short side -> size, long side -> int(size * long / short), truncated
        new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        # torchvision CenterCrop rounds the offsets
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3); np.array copies (PIL buffers are read-only)
    x = x.permute(2, 0, 1).float().div(255)  # (3, H, W) in [0, 1], as torchvision's ToTensor
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in _NORMS[norm])  # (3, 1, 1) each, broadcast over H, W
    return (x - mean) / std  # (3, size, size), as torchvision's Normalize
