"""
clip_vit.py: the OpenAI CLIP vision tower (a ViT), written by hand in batch-first layout, with its checkpoint
loader (a short front door: the file formats, OpenAI's and Hugging Face's, are weights.read_clip's) and the
Pillow + numpy image preprocessing that LaVIN feeds it.

It follows
- openai/CLIP clip/model.py: LayerNorm (fp32), QuickGELU, ResidualAttentionBlock, VisionTransformer, and
  build_model, which infers every hyperparameter from the checkpoint's tensor shapes;
- luogen1996/LaVIN clip/model.py: the modified VisionTransformer forward, which puts a router adapter in front of
  each block's attention and returns the raw CLS token after every 4th of the 24 blocks;
- Hugging Face transformers' modeling_clip.py for its CLIP checkpoints, which load_clip also reads (weights.py maps
  their names).

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

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from weights import check_state_dict, read_clip

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
            raise ValueError(f"a {args.layers}-block tower gives no visual token with the class token taken after "
                             f"every {args.feature_every}th block: choose --clip_every between 1 and {args.layers}")
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
# Loading a checkpoint (clip/model.py build_model; the file formats are weights.read_clip's)

def load_clip(path, device="cpu", feature_every: int = 4) -> VisionTransformer:
    """Build the vision tower, in fp32, from OpenAI's TorchScript archive (ViT-L-14.pt) or a state dict in OpenAI's
    layout, or from Hugging Face's: a CLIP folder (config.json + model.safetensors, e.g. openai/clip-vit-large-patch14)
    or a lone .safetensors file, of a CLIPModel (its text tower is ignored) or a CLIPVisionModelWithProjection.
    The weights fix every hyperparameter but `feature_every` (which blocks' class tokens LaVIN takes): an argument."""
    vision, sd = read_clip(path)  # Hugging Face's vision config ({} for OpenAI's), tensors under our names
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
