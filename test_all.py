"""
The test suite: every test runs on CPU in seconds, asserts behaviour (equivalences, exact counts, round trips, error
messages) and never timings; speed lives in bench.py. Tests that read the real ScienceQA records, images and LLaMA
checkpoints in ../shared skip cleanly where that folder is absent.

    python -m pytest -q test_all.py                 # everything (what CI runs)
    python -m pytest -q test_all.py -k "clip"       # one part
"""

import dataclasses
import json
import math
import os
import random
import socket
import subprocess
import sys
import warnings
from argparse import Namespace
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import bench
import data
import evaluate
import quiz as quizgen
import sample
import train
from adapters import AdapterArgs, MMAdapter, convert_official_lavin, load_trainable, trainable_state_dict
from clip_vit import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VISION_PRESETS, VisionArgs, VisionTransformer,
                      convert_openai_state_dict, load_clip, load_image, preprocess, to_openai_state_dict)
from model import (IGNORE, LLAMA_PRESETS, LaVIN, ModelArgs, Transformer, apply_rope, build_lavin, count_params,
                   load_checkpoint, load_llama, rope_tables, save_checkpoint)
from bench import param_table
from train import wrap_model

NV = VISION_PRESETS["ViT-L/14"].n_tokens  # 6 visual tokens, as ViT-L/14 and the tiny preset give


# =====================================================================================================================
# LLaMA backbone and LaVIN assembly (model.py, adapters.py, router.py)
# =====================================================================================================================

SHARED = Path(__file__).resolve().parent.parent / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (real checkpoints and data) is absent")


# ---------------------------------------------------------------------------------------------------------------------
# An independent transcription of Meta's reference LLaMA (meta-llama/llama llama/model.py, inference path without
# fairscale): complex RoPE, explicit fp32 softmax, repeat_kv for grouped-query attention.

def meta_reference_logits(sd: dict, args: ModelArgs, tokens: torch.Tensor) -> torch.Tensor:
    def rmsnorm(x, w):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + args.norm_eps)).type_as(x) * w

    hd = args.dim // args.n_heads
    n_kv = args.n_kv_heads or args.n_heads
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(tokens.shape[1], hd // 2), torch.outer(torch.arange(tokens.shape[1]), freqs))

    def rope(x):  # (B, T, H, D)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)

    B, T = tokens.shape
    h = sd["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = rmsnorm(h, sd[p + "attention_norm.weight"])
        q = (x @ sd[p + "attention.wq.weight"].T).view(B, T, args.n_heads, hd)
        k = (x @ sd[p + "attention.wk.weight"].T).view(B, T, n_kv, hd)
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, n_kv, hd)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(args.n_heads // n_kv, dim=2)
        v = v.repeat_interleave(args.n_heads // n_kv, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
        att = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        h = h + att.transpose(1, 2).reshape(B, T, -1) @ sd[p + "attention.wo.weight"].T
        x = rmsnorm(h, sd[p + "ffn_norm.weight"])
        ff = (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T))
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return (rmsnorm(h, sd["norm.weight"]) @ sd["output.weight"].T).float()


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_llama_matches_meta_reference(n_kv_heads):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, multiple_of=16)
    model = Transformer(args).eval()
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours = model(tokens)
    ref = meta_reference_logits(model.state_dict(), args, tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_rope_equals_complex_reference():
    D, T = 16, 9
    cos, sin = rope_tables(D, T, 10000.0)
    x = torch.randn(2, T, 3, D)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    cis = torch.polar(torch.ones(T, D // 2), torch.outer(torch.arange(T).float(), inv))
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, T, 3, D // 2, 2)) * cis[None, :, None]).flatten(3)
    torch.testing.assert_close(apply_rope(x, cos[None], sin[None]), ref, rtol=1e-6, atol=1e-6)


def test_kv_cache_equals_full_recompute():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)).eval()
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 12)
        parts = [model(tokens[:, :7], 0)] + [model(tokens[:, t:t + 1], t) for t in range(7, 12)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_ffn_width_rule():
    assert LLAMA_PRESETS["7B"].ffn_dim == 11008 and LLAMA_PRESETS["13B"].ffn_dim == 13824
    assert ModelArgs(dim=64, multiple_of=4).ffn_dim == 172  # stories260K's hidden_dim


def test_meta_device_build_costs_nothing():
    with torch.device("meta"):
        model = Transformer(LLAMA_PRESETS["13B"])
    assert sum(p.numel() for p in model.parameters()) == 13_015_864_320  # LLaMA-13B
    assert all(p.is_meta for p in model.parameters())


def save_meta_layout(path: Path, sd: dict, params: dict, shards: int = 1):
    """Write a checkpoint the way Meta ships it, split into model-parallel shards by the spec §10.1 rules."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    dims = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
    for s in range(shards):
        part = {}
        for k, v in sd.items():
            d = dims.get(k.split(".")[-2])
            part[k] = v.clone() if d is None else v.chunk(shards, dim=d)[s].clone()
        torch.save(part, path / f"consolidated.{s:02d}.pth")


def test_shard_merge(tmp_path):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=16)
    sd = Transformer(args).state_dict()
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 16, "norm_eps": 1e-6, "vocab_size": -1}
    save_meta_layout(tmp_path / "one", sd, params, 1)
    save_meta_layout(tmp_path / "two", sd, params, 2)
    a, b = load_llama(tmp_path / "one"), load_llama(tmp_path / "two")
    assert a.args.vocab_size == 96  # completed from the embedding, params.json says -1
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_load_llama_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_llama(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1}))
    with pytest.raises(FileNotFoundError, match="consolidated"):
        load_llama(tmp_path)
    sd = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=16)).state_dict()
    sd["layers.1.attention.wq.weight"] = torch.zeros(32, 64)  # disagrees with params.json
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wq\.weight.*\(32, 64\).*\(64, 64\)"):
        load_llama(tmp_path)


@needs_shared
def test_real_checkpoint_generates_fluent_text():
    model = load_llama(SHARED / "models" / "stories260K").eval()
    tok = data.Tokenizer(SHARED / "models" / "stories260K" / "tokenizer.model")
    ids = tok.encode("Once upon a time", bos=True, eos=False)
    assert ids == [1, 403, 407, 261, 378]
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    text = tok.decode(ids)
    # Greedy decoding of Karpathy's stories260K, as llama2.c's run.c produces it with -t 0.
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text


# ---------------------------------------------------------------------------------------------------------------------
# LaVIN

def test_trainable_counts_at_real_shapes():
    rows = {(r["model"], r["method"]): r["trainable"] for r in param_table()}
    assert rows[("LaVIN-7B", "MMA (LaVIN)")] == 3_781_296
    assert rows[("LaVIN-13B", "MMA (LaVIN)")] == 5_390_080
    assert rows[("LaVIN-7B", "LoRA r=8")] == 2_498_560 * 8 + 659_584  # peers-spec §1.3 + the neck


def test_mm_adapter_param_count_and_identity():
    ad = MMAdapter(64)
    assert sum(p.numel() for p in ad.parameters()) == 20 * 64 + 10  # spec §4
    x, r = torch.randn(2, 5, 64), torch.randn(2, 64)
    assert torch.equal(ad.eval()(x, r), x)  # zero-initialised up-projections: the exact identity


def tiny_lavin(method="mma", randomize=True, **kw):
    torch.manual_seed(0)
    model = build_lavin(adapter_args=AdapterArgs(method=method, lora_rank=4, **kw), vocab_size=64, max_seq_len=64)
    if randomize:  # move the zero-initialised output paths away from zero, as training does
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.ndim >= 1:
                    p.add_(0.05 * torch.randn_like(p))
    return model


def make_batch(B=3, T=14, vocab=64):
    torch.manual_seed(1)
    tokens = torch.randint(3, vocab, (B, T))
    tokens[:, 0] = 1
    has_image = torch.tensor([0, 1, 1])[:B]
    vis_mask = torch.zeros(B, T, dtype=torch.bool)
    vis_mask[1:, 4:10] = True
    tokens[vis_mask] = 0
    labels = torch.full((B, T), IGNORE)
    labels[:, 10:] = tokens[:, 10:]
    images = torch.randn(int(has_image.sum()), 3, 64, 64)
    return tokens, has_image, vis_mask, images, labels


@pytest.mark.parametrize("method", ["mma", "lora", "mixlora", "full"])
def test_fresh_adapters_keep_llama_logits(method):
    """Freshly injected adapters (any method): LaVIN's text-only logits on the text positions equal plain LLaMA's."""
    model = tiny_lavin(method, randomize=False).eval()
    tokens = torch.randint(3, 64, (2, 10))
    tokens[:, 0] = 1
    with torch.no_grad():
        ours = model(tokens, torch.zeros(2, dtype=torch.long))[:, 1:]  # drop the modality slot
        plain = Transformer(model.llama.args)
        plain.load_state_dict({k: v for k, v in model.llama.state_dict().items()
                               if "adapter" not in k and "lora" not in k and "router" not in k})
        ref = plain.eval()(tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_modality_token_hidden_from_other_positions():
    """With no routers to read it (LoRA), the modality embedding cannot change any other position."""
    model = tiny_lavin("lora").eval()
    tokens, has_image, vis_mask, images, _ = make_batch()
    with torch.no_grad():
        a = model(tokens, has_image, vis_mask, images)
        model.adapter_modality_embedding.weight.add_(3.0)
        b = model(tokens, has_image, vis_mask, images)
    torch.testing.assert_close(a[:, 1:], b[:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 0], b[:, 0])


@pytest.mark.parametrize("method", ["mma", "lora"])
def test_merged_equals_unmerged(method):
    model = tiny_lavin(method).eval()
    tokens, has_image, vis_mask, images, _ = make_batch()
    with torch.no_grad():
        ref = model(tokens, has_image, vis_mask, images)
        for m in (0, 1):
            rows = (has_image == m).nonzero()[:, 0]
            imgs = images[(has_image[has_image == 1].cumsum(0) - 1)[: int(m) * len(rows)]] if m else None
            model.merge(m)
            got = model(tokens[rows], has_image[rows], vis_mask[rows], imgs)
            model.unmerge()
            torch.testing.assert_close(got, ref[rows], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(tokens, has_image, vis_mask, images), ref, rtol=0, atol=0)  # exact restore


def test_gradients_reach_every_trainable_parameter():
    model = tiny_lavin("mma", randomize=False).train()
    tokens, has_image, vis_mask, images, labels = make_batch()
    # At init the up-projections are zero, so conv_A (down), the routers and the modality embedding get exactly zero
    # gradient on the first backward (spec §1.5); the up-projections and the neck do learn.
    model(tokens, has_image, vis_mask, images, labels=labels).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif ".up0." in name or ".up1." in name or name.startswith("adapter_proj"):
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad.abs().sum() == 0, name
    # After the up-projections move away from zero, one backward on a mixed batch reaches every trainable parameter.
    model = tiny_lavin("mma").train()
    model(tokens, has_image, vis_mask, images, labels=labels).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if p.requires_grad else p.grad is None, name


def test_text_only_batch_still_touches_visual_parameters():
    model = tiny_lavin("mma").train()
    tokens, has_image, _, _, labels = make_batch()
    model(tokens[:1], has_image[:1], None, None, labels=labels[:1]).backward()
    for name, p in model.visual.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() == 0, name  # zeros, but present on every rank


@pytest.mark.parametrize("mode,router_grad", [("weighted", True), ("hard", False)])
def test_mixlora_router_gradients(mode, router_grad):
    model = tiny_lavin("mixlora", mix_mode=mode).train()
    tokens, has_image, vis_mask, images, labels = make_batch()
    model(tokens, has_image, vis_mask, images, labels=labels).backward()
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    assert routers
    if router_grad:
        assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    else:
        assert all(not p.requires_grad and p.grad is None for p in routers)


def test_mixlora_uniform_scores_reproduce_unweighted_update():
    from router import FactorRouter
    fr = FactorRouter(8, pool=6, rank=3, cfs="dot", mode="weighted")
    with torch.no_grad():
        fr.route_a.weight.zero_()
        fr.route_b.weight.zero_()
        fr.route_ab.zero_()
    _, _, w = fr(torch.randn(2, 8), torch.randn(6, 8))
    torch.testing.assert_close(w, torch.ones(2, 3))


def official_state_dict(model: LaVIN) -> dict:
    """Our trainable tensors renamed and reshaped into the official LaVIN checkpoint layout (spec §10.3)."""
    out = {}
    for k, v in trainable_state_dict(model).items():
        k = k.replace("llama.layers", "module.layers").replace("visual.blocks", "backbone.visual.transformer.resblocks")
        k = (k.replace(".down.", ".conv_A.").replace(".up0.", ".conv_B.").replace(".up1.", ".conv_D.")
             .replace(".router.proj.", ".expert_weights.").replace("adapter_proj.fc1", "adapter_proj.conv_A")
             .replace("adapter_proj.fc2", "adapter_proj.conv_B"))
        if ("conv_A" in k and "adapter_proj" not in k) or ".conv_B." in k and "adapter_proj" not in k or ".conv_D." in k:
            v = v[..., None] if k.endswith("weight") else v  # Conv1d weights carry a kernel axis of 1
        out[k] = v
    return out


def test_official_checkpoint_loads():
    src = tiny_lavin("mma")
    sd = official_state_dict(src)
    assert sd["module.layers.0.adapter_attn.conv_A.weight"].shape == (8, 128, 1)
    assert sd["module.layers.0.adapter_attn.conv_B.weight"].shape == (128, 4, 1)
    dst = tiny_lavin("mma", randomize=False)
    load_trainable(dst, sd)
    for k, v in trainable_state_dict(src).items():
        assert torch.equal(v, trainable_state_dict(dst)[k]), k
    bad = dict(sd)
    bad.pop("module.layers.1.adapter_attn.conv_D.bias")
    bad["module.layers.0.adapter_attn.conv_B.weight"] = torch.zeros(128, 8, 1)
    bad["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_trainable(dst, bad)
    msg = str(e.value)
    assert "missing (1): llama.layers.1.adapter_attn.up1.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "llama.layers.0.adapter_attn.up0.weight: checkpoint (128, 8) vs model (128, 4)" in msg
    assert convert_official_lavin({"adapter_modality_embedding.weight": torch.zeros(2, 4)}).keys() == {
        "adapter_modality_embedding.weight"}


def test_generation_batched_equals_alone_and_cache_equals_recompute():
    model = tiny_lavin("mma").eval()
    tokens, has_image, vis_mask, images, _ = make_batch()
    prompts = [tokens[0, :7].tolist(), tokens[1].tolist(), tokens[2, :12].tolist()]
    batched = model.generate(prompts, has_image, images, max_new_tokens=5, eos_id=-1)
    for b in range(3):
        img = images[b - 1:b] if has_image[b] else None
        assert model.generate([prompts[b]], has_image[b:b + 1], img, max_new_tokens=5, eos_id=-1)[0] == batched[b]
        seq = list(prompts[b])
        for _ in range(5):  # full recomputation, no cache
            t = torch.tensor([seq])
            vm = torch.zeros_like(t, dtype=torch.bool)
            if has_image[b]:
                vm[0, 4:10] = True
            seq.append(int(model(t, has_image[b:b + 1], vm, img)[0, -1].argmax()))
        assert seq[len(prompts[b]):] == batched[b]


def test_checkpoint_round_trip():
    a, b = tiny_lavin("mma"), tiny_lavin("mma", randomize=False)
    load_trainable(b, trainable_state_dict(a))
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    assert count_params(a) == count_params(b)


# =====================================================================================================================
# CLIP ViT (clip_vit.py): parity with OpenAI, per-image routing, preprocessing
# =====================================================================================================================

# ----------------------------------------------------------------------------------------------------------------
# A faithful minimal copy of openai/CLIP clip/model.py (LayerNorm, QuickGELU, ResidualAttentionBlock, Transformer,
# VisionTransformer), sequence-first with nn.MultiheadAttention, as the reference.


class RefLayerNorm(nn.LayerNorm):
    def forward(self, x):
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class RefQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = RefLayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", RefQuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = RefLayerNorm(d_model)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=None)[0]
        x = x + self.mlp(self.ln_2(x))
        return x


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefVisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = RefLayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.ln_post = RefLayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)  # shape = [*, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1)  # shape = [*, width, grid ** 2]
        x = x.permute(0, 2, 1)  # shape = [*, grid ** 2, width]
        x = torch.cat([self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype),
                       x], dim=1)  # shape = [*, grid ** 2 + 1, width]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_post(x[:, 0, :])
        return x @ self.proj


class RefCLIP(nn.Module):
    """Just enough of OpenAI's CLIP for the archive's real key layout: `visual.*`, text-tower keys that collide
    with the visual ones once the prefix is stripped, and a scalar entry."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.positional_embedding = nn.Parameter(torch.randn(7, 32))
        self.transformer = RefTransformer(32, 1, 1)
        self.register_buffer("input_resolution", torch.tensor(32))

    def forward(self, image):
        return self.visual(image)


# Small reference: 128 wide so that OpenAI's heads = width // 64 rule gives 2 heads (exercises the head split);
# 12 layers so that the 6 features come from every 2nd block, not every block.
REF = dict(input_resolution=32, patch_size=8, width=128, layers=12, heads=2, output_dim=48)


def _ref_clip():
    torch.manual_seed(0)
    ref = RefCLIP(RefVisionTransformer(**REF)).eval()
    with torch.no_grad():  # perturb everything, so zero biases and unit LayerNorm weights are tested too
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def test_parity_with_openai_reference(tmp_path):
    ref = _ref_clip()
    images = torch.randn(3, 3, 32, 32)
    # both formats: a plain state dict (wrapped, with a Python scalar like OpenAI's) and a TorchScript archive
    sd = dict(ref.state_dict(), vocab_size=49408)
    torch.save({"state_dict": sd}, tmp_path / "sd.pt")
    with warnings.catch_warnings():
        # torch.jit is deprecated, yet it is OpenAI's format; tracing nn.MultiheadAttention also emits TracerWarnings
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(ref, images, check_trace=False), str(tmp_path / "ts.pt"))
    with torch.no_grad():
        want = ref(images)  # (3, 48)
        # CLS after each reference block, through hooks: the output is (L, N, D), so row 0 is the CLS of every image
        cls = []
        hooks = [b.register_forward_hook(lambda m, i, o: cls.append(o[0].clone())) for b in ref.visual.transformer.resblocks]
        ref(images)
        for h in hooks:
            h.remove()
        want_feats = torch.stack(cls[3::4], dim=1)  # blocks 4, 8, 12 (1-indexed), the official rule: (3, 3, 128)
    for name in ("sd.pt", "ts.pt"):
        model = load_clip(tmp_path / name)
        assert model.args == VisionArgs(image_size=32, patch_size=8, width=128, layers=12, heads=2, output_dim=48)
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), want, atol=1e-5, rtol=1e-5)
            feats = model(images)
        assert feats.shape == (3, 3, 128)
        torch.testing.assert_close(feats, want_feats, atol=1e-5, rtol=1e-5)


def test_vit_l14_keys_and_shapes_match_openai():
    # On the meta device: no memory, no compute. Every OpenAI ViT-L/14 tensor has a counterpart of the same shape.
    with torch.device("meta"):
        ref = RefVisionTransformer(224, 14, 1024, 24, 16, 768)
        ours = VisionTransformer(VISION_PRESETS["ViT-L/14"])
    theirs = {k: v.shape for k, v in convert_openai_state_dict(ref.state_dict()).items()}
    assert theirs == {k: v.shape for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("layers,n_tokens", [(8, 2), (12, 3), (24, 6)])
def test_visual_tokens_follow_the_official_every_4th_block_rule(tmp_path, layers, n_tokens):
    """Any CLIP tower loads; its visual tokens are the class token after blocks 4, 8, ... of a plain loop."""
    torch.manual_seed(layers)
    args = VisionArgs(image_size=32, patch_size=16, width=64, layers=layers, heads=1, output_dim=16)
    tower = VisionTransformer(args).eval()
    torch.save(to_openai_state_dict(tower.state_dict()), tmp_path / "clip.pt")
    loaded = load_clip(tmp_path / "clip.pt")
    assert loaded.args.n_tokens == n_tokens
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x, want = loaded.tokens(images), []
        for i, block in enumerate(loaded.blocks):
            x = block(x)
            if i + 1 in (4, 8, 12, 16, 20, 24):
                want.append(x[:, 0])
        got = loaded(images)
    assert got.shape == (2, n_tokens, 64)
    torch.testing.assert_close(got, torch.stack(want, dim=1), rtol=0, atol=0)


def test_tiny_preset_shapes():
    torch.manual_seed(0)
    model = VisionTransformer(VISION_PRESETS["tiny"])
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # any float dtype is accepted
    with torch.no_grad():
        assert model(x).shape == (2, 6, 128)
        assert model.encode_image(x).shape == (2, 64)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------------------------
# Per-image routing (spec §12a)


class StubAdapter(nn.Module):
    """forward(x, r) with an output that depends on the router input r (B, W)."""

    def __init__(self, width, official=False):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.official = official  # route from batch element 0, as official LaVIN effectively does

    def forward(self, x, r):
        if self.official:
            r = r[:1].expand_as(r)
        return x + 0.5 * torch.tanh(self.lin(r))[:, None, :]  # (B, T, W)


def _routing_case(make_adapter):
    torch.manual_seed(0)
    model = VisionTransformer(VISION_PRESETS["tiny"]).eval()
    image = torch.randn(1, 3, 64, 64)
    batch = torch.cat([torch.zeros(1, 3, 64, 64), image, torch.randn(1, 3, 64, 64)])  # zero image first
    with torch.no_grad():
        plain = model(image)
        for block in model.blocks:
            block.adapter_attn = make_adapter(model.args.width)
        alone, in_batch = model(image), model(batch)[1:2]
    return plain, alone, in_batch


def test_per_image_routing_stub():
    plain, alone, in_batch = _routing_case(StubAdapter)
    assert not torch.allclose(plain, alone, atol=1e-3)  # the adapters do act
    assert torch.allclose(alone, in_batch, atol=1e-6)
    # control: official-style routing from batch element 0 (the zero image) would fail the check above
    _, alone, in_batch = _routing_case(lambda w: StubAdapter(w, official=True))
    assert not torch.allclose(alone, in_batch, atol=1e-3)


def test_per_image_routing_mmadapter():
    adapters = pytest.importorskip("adapters")

    def make(width):
        ad = adapters.MMAdapter(width).eval()  # eval: no dropout
        with torch.no_grad():  # leave the identity init, so the routing matters
            for p in ad.parameters():
                p.normal_(0, 0.2)
        return ad

    plain, alone, in_batch = _routing_case(make)
    assert not torch.allclose(plain, alone, atol=1e-3)
    assert torch.allclose(alone, in_batch, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing (spec §6.4, §12c)


def _expected(rgb, mean, std):
    # (c / 255 - mean) / std per channel, in fp32 like torchvision's ToTensor + Normalize
    c = torch.tensor(rgb, dtype=torch.float32) / 255
    return (c - torch.tensor(mean)) / torch.tensor(std)  # (3,)


def test_preprocess_all_modes():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    grey16 = rng.integers(0, 65536, (30, 40))
    pt = base.convert("P")
    pt.info["transparency"] = bytes(range(256))  # palette transparency: Pillow warns unless handled
    images = {m: base.convert(m) for m in ("RGB", "RGBA", "P", "L", "1", "CMYK", "LA")}
    images.update({"P+transparency": pt, "I;16": Image.fromarray(grey16.astype(np.uint16)),
                   "I": Image.fromarray(grey16.astype(np.int32)), "F": Image.fromarray(grey16.astype(np.float32) / 257)})
    assert images["I;16"].mode == "I;16" and images["I"].mode == "I" and images["F"].mode == "F"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = {m: preprocess(img) for m, img in images.items()}
    for m, x in out.items():
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all(), m
    # alpha is dropped, not composited; the 16-bit and float versions of one grey image agree
    assert torch.equal(out["RGBA"], out["RGB"])
    assert torch.equal(out["I;16"], out["I"]) and torch.equal(out["I;16"], out["F"])


def test_preprocess_uniform_pixel_values():
    img = Image.new("RGB", (50, 30), (10, 128, 250))  # non-square on purpose
    for norm, mean, std in (("imagenet", IMAGENET_MEAN, IMAGENET_STD), ("clip", CLIP_MEAN, CLIP_STD)):
        x = preprocess(img, norm=norm)
        want = _expected((10, 128, 250), mean, std)[:, None, None].expand(3, 224, 224)
        torch.testing.assert_close(x, want, atol=1e-6, rtol=0)
    # the CLIP constants shift every value the expected way: x_clip = (x_in * std_in + mean_in - mean_c) / std_c
    x_in, x_clip = preprocess(img), preprocess(img, norm="clip")
    m_in, s_in, m_c, s_c = (torch.tensor(v)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD, CLIP_MEAN, CLIP_STD))
    torch.testing.assert_close(x_clip, (x_in * s_in + m_in - m_c) / s_c, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="imagenet"):
        preprocess(img, norm="openai")


def test_preprocess_geometry_squash_vs_crop():
    # 300 x 100: three 100-px vertical bands, red | green | blue
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100, 0] = arr[:, 100:200, 1] = arr[:, 200:, 2] = 255
    img = Image.fromarray(arr)
    red, green, blue = (_expected(c, IMAGENET_MEAN, IMAGENET_STD) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    squash = preprocess(img, size=60)  # the whole image, squashed: all three bands, 20 columns each
    for col, want in ((5, red), (30, green), (55, blue)):
        torch.testing.assert_close(squash[:, 30, col], want, atol=1e-6, rtol=0)
    crop = preprocess(img, size=60, crop=True)  # resized to 180 x 60, centre 60 x 60 crop = the green band only
    assert crop.shape == (3, 60, 60)
    torch.testing.assert_close(crop[:, 30, 30], green, atol=1e-6, rtol=0)
    torch.testing.assert_close(crop[:, 10, 5], green, atol=0.05, rtol=0)  # only a bicubic ring at the band edge


def test_preprocess_is_pil_bicubic_squash():
    # The official transform is torchvision Resize((224, 224), BICUBIC) on a PIL image, i.e. PIL's bicubic resize
    # to exactly 224 x 224 whatever the aspect ratio; then ToTensor and Normalize (spec §6.4).
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 91, 3), dtype=np.uint8))
    ref = np.asarray(img.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255  # (224, 224, 3)
    ref = (torch.from_numpy(ref) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(preprocess(img), ref.permute(2, 0, 1), atol=1e-6, rtol=0)


def test_16bit_full_range(tmp_path):
    for v16, v8 in ((65535, 255), (255, 1), (32896, 128)):  # scaled by 257, not clipped at 255
        img = Image.fromarray(np.full((20, 20), v16, dtype=np.uint16))
        torch.testing.assert_close(preprocess(img)[:, 0, 0], _expected((v8,) * 3, IMAGENET_MEAN, IMAGENET_STD),
                                   atol=1e-6, rtol=0)
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(tmp_path / "grey16.png")
    img = load_image(tmp_path / "grey16.png")
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (255, 255, 255)


def test_scienceqa_images():
    paths = sorted((Path(__file__).resolve().parent.parent / "shared" / "data" / "scienceqa" / "images" / "test")
                   .glob("*/image.png"))[:4]
    if not paths:
        pytest.skip("ScienceQA test images not found")
    for p in paths:
        img = load_image(p)
        assert img.mode == "RGB"
        x = preprocess(img)
        assert x.shape == (3, 224, 224) and torch.isfinite(x).all()


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_image_errors(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ValueError, match="cannot read image .*junk.png"):
        load_image(junk)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # valid header, truncated pixel data
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_load_clip_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)missing\.pt.*ViT-L-14\.pt.*b8cca3fd"):
        load_clip(tmp_path / "missing.pt")
    sd = _ref_clip().state_dict()
    sd["visual.ln_pre.weight"] = torch.ones(129)
    torch.save(sd, tmp_path / "bad_shape.pt")
    with pytest.raises(ValueError, match=r"ln_pre\.weight.*\(129,\).*\(128,\)"):
        load_clip(tmp_path / "bad_shape.pt")
    sd = _ref_clip().visual.state_dict()  # no prefix: the vision tower alone
    del sd["transformer.resblocks.3.mlp.c_fc.bias"]
    torch.save(sd, tmp_path / "missing_key.pt")
    with pytest.raises(ValueError, match=r"blocks\.3\.mlp\.c_fc\.bias"):
        load_clip(tmp_path / "missing_key.pt")
    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CLIP ViT vision checkpoint.*conv1.weight"):
        load_clip(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match="cannot read CLIP checkpoint"):
        load_clip(tmp_path / "junk.pt")


def test_openai_key_round_trip(tmp_path):
    model = VisionTransformer(VISION_PRESETS["tiny"])
    sd = model.state_dict()
    openai = to_openai_state_dict(sd)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in openai and "visual.conv1.weight" in openai
    assert convert_openai_state_dict(openai).keys() == sd.keys()
    torch.save(openai, tmp_path / "clip.pt")
    loaded = load_clip(tmp_path / "clip.pt")
    assert loaded.args == dataclasses.replace(model.args, feature_every=4)  # the stride is not in the weights
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


# =====================================================================================================================
# Data (data.py): ScienceQA prompts, tokenisation, batching, scoring, the generated quiz
# =====================================================================================================================

SHARED = Path(__file__).resolve().parent.parent / "shared"
SQA = SHARED / "data" / "scienceqa"
LLAMA_TOK = SHARED / "models" / "llama-tokenizer" / "tokenizer.model"
needs_sqa = pytest.mark.skipif(not (SQA / "problems_sample150.json").is_file(), reason="shared ScienceQA data absent")
needs_llama = pytest.mark.skipif(not LLAMA_TOK.is_file(), reason="LLaMA tokenizer absent")


@pytest.fixture(scope="module")
def data_small_quiz(tmp_path_factory):
    """A small generated quiz (+ its tokenizer) shared by the tests of this module."""
    out = quizgen.ensure_quiz(tmp_path_factory.mktemp("quiz"), n_train=60, n_val=10, n_test=30, image_size=32)
    return out, data.Tokenizer(out / "tokenizer.model")


# -----------------------------------------------------------------------------
# Prompts


def _official_prompt(problem, fmt):
    """An independent transcription of util/base_prompt.py's build_prompt (use_caption=False).

    Built from the format letters instead of data.py's template tables: Q/C/M name the input lines, the L/E letters
    of the input make one "BECAUSE:" line at their position; the output is letter-driven too, with the official
    swap for the single-letter AL/AE outputs (AL -> solution, AE -> lecture).
    """
    # get_*_text
    question = problem["question"]
    context = " ".join([problem["hint"] or "", ""]).strip() or "N/A"
    choice = " ".join("({}) {}".format("ABCDE"[i], c) for i, c in enumerate(problem["choices"]))
    answer = "ABCDE"[problem["answer"]]
    lecture = (problem["lecture"] or "").replace("\n", "\\n")
    solution = (problem["solution"] or "").replace("\n", "\\n")
    text_of = {"L": lecture, "E": solution}
    # create_training_example: inputs
    in_fmt, out_fmt = fmt.split("-")
    lines, because_done = [], False
    for letter in in_fmt:
        if letter == "Q":
            lines.append(f"Question: {question}")
        elif letter == "C":
            lines.append(f"Context: {context}")
        elif letter == "M":
            lines.append(f"Options: {choice}")
        elif not because_done:
            because_done = True
            lines.append("BECAUSE: " + " ".join(text_of[x] for x in in_fmt if x in "LE"))
    inp = "\n" + "\n".join(lines) + "\n" + "Response:"
    # outputs
    explain = [x for x in out_fmt if x in "LE"]
    if out_fmt in ("AL", "AE"):
        explain = ["E" if out_fmt == "AL" else "L"]
    expl = " ".join(text_of[x] for x in explain)
    if out_fmt.startswith("A"):
        out = f"The answer is {answer}." + (f" BECAUSE: {expl}" if explain else "")
    else:
        out = f"{expl} The answer is {answer}."
    return inp.replace("  ", " ").strip(), out.replace("  ", " ").strip()


@needs_sqa
def test_build_prompt_matches_official_on_sample150():
    problems = json.loads((SQA / "problems_sample150.json").read_text())
    assert len(problems) == 150
    for pid, rec in problems.items():
        for fmt in ("QCM-ALE", "CQM-A"):
            assert data.build_prompt(rec, fmt) == _official_prompt(rec, fmt), (pid, fmt)
    # The whole official family on a handful of records (empty lecture/solution, hint with newlines, ...).
    for pid in ("1", "11", "33", "58"):
        for fmt in data.PROMPT_FORMATS:
            assert data.build_prompt(problems[pid], fmt) == _official_prompt(problems[pid], fmt), (pid, fmt)


@needs_sqa
def test_build_prompt_golden_strings():
    p = json.loads((SQA / "problems_sample150.json").read_text())
    # pid 1: lecture with newlines -> the two-character escape; empty hint -> N/A (spec §6.2's example).
    assert data.build_prompt(p["1"]) == (
        "Question: Which of these states is farthest north?\nContext: N/A\n"
        "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma\nResponse:",
        "The answer is A. BECAUSE: Maps have four cardinal directions, or main directions. Those directions are "
        "north, south, east, and west.\\nA compass rose is a set of arrows that point to the cardinal directions. "
        "A compass rose usually shows only the first letter of each cardinal direction.\\nThe north arrow points to "
        "the North Pole. On most maps, north is at the top of the map. To find the answer, look at the compass rose. "
        "Look at which way the north arrow is pointing. West Virginia is farthest north.",
    )
    # pid 58: lecture and solution both empty -> the residual "BECAUSE:" stays (quirk 8).
    assert data.build_prompt(p["58"])[1] == "The answer is D. BECAUSE:"
    # pid 11: empty lecture -> "BECAUSE:  {solution}" folds to one space.
    assert data.build_prompt(p["11"])[1] == (
        "The answer is B. BECAUSE: The colony is New Hampshire.\\nDuring the colonial era, New Hampshire and New York "
        "both claimed the territory that would later become the state of Vermont. Vermont was never its own colony."
    )
    # pid 33: hint with a real newline (kept), empty solution (trailing space stripped).
    prompt, answer = data.build_prompt(p["33"])
    assert prompt == (
        "Question: What information supports the conclusion that Logan inherited this trait?\n"
        "Context: Read the description of a trait.\nLogan has blue eyes.\n"
        "Options: (A) Logan's mother has blue eyes. She passed this trait down to Logan. "
        "(B) Logan likes to wear a blue sweater to match his blue eyes.\nResponse:"
    )
    assert answer.endswith("such as scars, are caused by the environment.")
    # CQM-A, the CLI default nobody trained with.
    assert data.build_prompt(p["58"], "CQM-A") == (
        "Context: N/A\nQuestion: Which organ controls the function of other body organs?\n"
        "Options: (A) skeleton (B) lungs (C) heart (D) brain\nResponse:",
        "The answer is D.",
    )


def test_build_prompt_fold_and_nulls():
    rec = dict(question="Pick   one.", choices=["x", "y", "z"], answer=2, hint="  Some  text \n", image=None,
               lecture=None, solution="Line 1\nLine 2")  # fmt: skip
    prompt, answer = data.build_prompt(rec)
    # A single pass of "  " -> " ": three spaces become two. The hint is stripped. Null lecture reads as "".
    assert prompt == "Question: Pick  one.\nContext: Some text\nOptions: (A) x (B) y (C) z\nResponse:"
    assert answer == "The answer is C. BECAUSE: Line 1\\nLine 2"
    assert data.build_instruction("Say hi.", "") == "Instruction: Say hi. \nResponse:"
    assert data.build_instruction("Say hi.", "Bob") == "Instruction: Say hi. Bob\nResponse:"
    assert data.build_instruction("Say hi.", None) == "Instruction: Say hi.\nResponse:"
    with pytest.raises(ValueError, match="QCM-ALE"):
        data.build_prompt(rec, "QMC-X")


# -----------------------------------------------------------------------------
# Real tokenizer and real data


@needs_llama
@needs_sqa
def test_llama_prefixes_and_label_boundary():
    tok = data.Tokenizer(LLAMA_TOK)
    assert tok.encode(data.IMAGE_PREFIX, bos=False, eos=False) == [7084, 29901, 29871]
    assert tok.encode(data.TEXT_PREFIX, bos=False, eos=False) == [7084, 29901, 405, 29914, 29909]
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (1, 2, 32000)
    problems = json.loads((SQA / "problems_sample150.json").read_text())
    for pid, rec in problems.items():
        prompt, answer = data.build_prompt(rec)
        has_image = rec["image"] is not None
        enc = data.encode_example(tok, prompt, answer, has_image, max_seq_len=10**6, n_visual=NV)
        tokens, labels = enc["tokens"], enc["labels"]
        head = 1 + (3 + 6 if has_image else 5)
        lab = labels != IGNORE
        assert lab.sum() > 0 and lab[-1] and tokens[-1] == tok.eos_id, pid
        start = int(lab.nonzero()[0])
        assert lab[start:].all(), pid  # one contiguous labelled run: answer + EOS
        assert tok.decode(tokens[start:]) == answer, pid
        assert tok.decode(tokens[head:start]) == prompt, pid
        assert tokens[head:start].tolist() == tok.encode(prompt, bos=False, eos=False), pid  # no boundary shift
        assert enc["vis_mask"].sum() == (6 if has_image else 0)


@needs_llama
@needs_sqa
def test_scienceqa_test_split_prompts_lengths_and_images(tmp_path):
    tok = data.Tokenizer(LLAMA_TOK)
    test = json.loads((SQA / "problems_test_reconstructed.json").read_text())
    full = json.loads((SQA / "problems_sample150.json").read_text())
    assert len(test) == 4241
    for name, probs in (("test split (4,241, most without lecture/solution)", test), ("150 full records", full)):
        L = np.array(data.prompt_lengths(probs, tok, n_visual=NV))
        print(f"\n{name}: mean {L.mean():.1f} median {np.median(L):.0f} p90 {np.percentile(L, 90):.0f} "
              f"max {L.max()} >512: {(L > 512).sum()}")  # fmt: skip
        assert L.min() > 10
    # The real images through the dataset: the 50 sample test records in the official layout.
    pids = [pid for pid, r in full.items() if r["split"] == "test"]
    (tmp_path / "problems.json").symlink_to(SQA / "problems_sample150.json")
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": pids}))
    (tmp_path / "images").symlink_to(SQA / "images")
    ds = data.ScienceQADataset(tmp_path, "test", tok, n_visual=NV)
    too_long = sum(n > 512 for n in data.prompt_lengths([full[p] for p in pids], tok, n_visual=NV))
    assert len(ds) == 50 and ds.n_truncated == too_long > 0 and max(ds.lengths) == 511
    n_img = 0
    for i in range(len(ds)):
        item = ds[i]
        if item["has_image"]:
            n_img += 1
            assert item["image"].shape == (3, 224, 224) and torch.isfinite(item["image"]).all()
    assert n_img == 24


@needs_llama
@needs_sqa
def test_scienceqa_length_percentiles():
    """Recomputes data.SCIENCEQA_TRAIN_LENGTH_PERCENTILES (see its comment); prints the values on failure."""
    tok = data.Tokenizer(LLAMA_TOK)
    test = json.loads((SQA / "problems_test_reconstructed.json").read_text())
    full = json.loads((SQA / "problems_sample150.json").read_text())
    prompt_side = [1 + len(data.encode_prompt(tok, data.build_prompt(r)[0], bool(r["image"]), n_visual=NV)) for r in test.values()]
    answer_side = []
    for r in full.values():
        prompt, answer = data.build_prompt(r)
        answer_side.append(int((data.encode_example(tok, prompt, answer, False, 10**6, n_visual=NV)["labels"] != IGNORE).sum()))
    pairs = np.add.outer(np.array(prompt_side), np.array(answer_side)).ravel()  # every prompt with every answer
    got = {q: int(round(np.percentile(pairs, q))) for q in data.SCIENCEQA_TRAIN_LENGTH_PERCENTILES}
    print("\nSCIENCEQA_TRAIN_LENGTH_PERCENTILES =", got, f"(> 512: {(pairs > 512).mean():.2%})")
    assert got == data.SCIENCEQA_TRAIN_LENGTH_PERCENTILES


# -----------------------------------------------------------------------------
# The quiz: round trip through dataset -> collate, determinism, design


def test_quiz_round_trip(data_small_quiz):
    folder, tok = data_small_quiz
    records = {r["pid"]: r for r in data.load_scienceqa(folder, "train")}
    ds = data.ScienceQADataset(folder, "train", tok, image_size=32, max_seq_len=256, n_visual=NV)
    assert len(ds) == 60 and ds.n_truncated == 0 and ds.lengths == [len(s["tokens"]) for s in ds.samples]
    seen_img = seen_txt = 0
    for start in range(0, len(ds), 16):
        items = [ds[i] for i in range(start, min(start + 16, len(ds)))]
        batch = data.collate(items)
        B, T = batch["tokens"].shape
        assert T == max(len(it["tokens"]) for it in items)  # padded to the batch's longest, not max_seq_len
        assert batch["images"] is None or batch["images"].shape == (int(batch["has_image"].sum()), 3, 32, 32)
        img_rows = [b for b in range(B) if batch["has_image"][b]]
        for k, b in enumerate(img_rows):  # images stacked in batch order of the image rows
            assert torch.equal(batch["images"][k], items[b]["image"])
        for b in range(B):
            rec = records[batch["pids"][b]]
            prompt, answer = data.build_prompt(rec)
            n = len(items[b]["tokens"])
            tokens, labels, vis = batch["tokens"][b], batch["labels"][b], batch["vis_mask"][b]
            assert (tokens[n:] == 0).all() and (labels[n:] == IGNORE).all() and not vis[n:].any()
            prefix = data.IMAGE_PREFIX if rec["image"] else data.TEXT_PREFIX
            assert tokens[0] == tok.bos_id and tokens[n - 1] == tok.eos_id
            # The body is encoded on its own, so SentencePiece's dummy-prefix space ("▁Question") sits between
            # prefix and prompt, as in the official layout; decode drops BOS/EOS and the 0 placeholders.
            assert tok.decode(tokens[:n]) == prefix + " " + prompt + answer
            lab = labels != IGNORE
            start_ans = int(lab.nonzero()[0])
            assert lab[start_ans:n].all() and not lab[:start_ans].any()
            assert tok.decode(tokens[start_ans:n]) == answer and labels[n - 1] == tok.eos_id
            assert tok.decode(tokens[:start_ans]).endswith(prompt)
            if rec["image"]:
                seen_img += 1
                assert vis.sum() == 6 and (tokens[vis] == 0).all()
                assert vis.nonzero().squeeze(1).tolist() == list(range(*data.image_slots(tok, NV).indices(T)))
            else:
                seen_txt += 1
                assert not vis.any()
    assert seen_img > 0 and seen_txt > 0


def test_quiz_decodes_exactly(data_small_quiz):
    """Without the image placeholders, the decoded row is exactly prefix + prompt + answer."""
    folder, tok = data_small_quiz
    for rec in data.load_scienceqa(folder, "test"):
        prompt, answer = data.build_prompt(rec)
        enc = data.encode_example(tok, prompt, answer, bool(rec["image"]), 512, n_visual=NV)
        prefix = data.IMAGE_PREFIX if rec["image"] else data.TEXT_PREFIX
        assert tok.decode(enc["tokens"]) == prefix + " " + prompt + answer, rec["pid"]  # see test_quiz_round_trip
        n_prompt = len(tok.encode(prompt, bos=False, eos=False))
        body = tok.encode(prompt + answer, bos=False, eos=True)
        assert body[:n_prompt] == tok.encode(prompt, bos=False, eos=False), rec["pid"]  # stable boundary


def test_quiz_deterministic(tmp_path, data_small_quiz):
    kw = dict(seed=3, n_train=40, n_val=5, n_test=10, image_size=32)
    a, b = quizgen.make_quiz(tmp_path / "a", **kw), quizgen.make_quiz(tmp_path / "b", **kw)
    quizgen.train_quiz_tokenizer(a), quizgen.train_quiz_tokenizer(b)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) > 10 and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = quizgen.make_quiz(tmp_path / "c", **dict(kw, seed=4))
    assert (c / "problems.json").read_bytes() != (a / "problems.json").read_bytes()
    # ensure_quiz reuses a complete folder with a matching stamp (no rewrite) ...
    folder, _ = data_small_quiz
    mtime = (folder / "problems.json").stat().st_mtime_ns
    quizgen.ensure_quiz(folder, n_train=60, n_val=10, n_test=30, image_size=32)
    assert (folder / "problems.json").stat().st_mtime_ns == mtime
    with pytest.raises(TypeError, match="n_trian"):
        quizgen.ensure_quiz(folder, n_trian=5)


def test_quiz_design(tmp_path):
    folder = quizgen.make_quiz(tmp_path, n_train=1500, n_val=50, n_test=400, image_size=16)
    problems = json.loads((folder / "problems.json").read_text())
    splits = json.loads((folder / "pid_splits.json").read_text())
    captions = json.loads((folder / "captions.json").read_text())["captions"]
    fields = {"question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic", "category",
              "skill", "lecture", "solution", "split"}  # fmt: skip
    assert all(set(r) == fields for r in problems.values())
    recs = list(problems.values())
    img = [r for r in recs if r["image"]]
    no = [r for r in recs if not r["image"] and not r["hint"]]
    assert 0.40 < len(img) / len(recs) < 0.50 and 0.20 < len(no) / len(recs) < 0.30
    assert any(r["hint"] for r in img)  # TXT and IMG overlap
    assert {r["subject"] for r in recs} == {"natural science", "social science", "language science"}
    grades = {int(r["grade"][5:]) for r in recs}
    assert min(grades) <= 6 < max(grades)
    assert set(captions) == {pid for pid, r in problems.items() if r["image"]}
    for pid in splits["train"][:50]:
        r = problems[pid]
        if r["image"]:
            assert (folder / "images" / "train" / pid / "image.png").is_file()
            assert all(w in captions[pid] for w in ("shape", "at the"))
    # Image questions: >= 4 choices, and the text alone carries no signal. Majority vote of the correct *choice
    # text* per (question, choice set) seen in train scores near chance on test.
    assert all(len(r["choices"]) >= 4 for r in img)
    votes = {}
    for pid in splits["train"]:
        r = problems[pid]
        if r["image"]:
            key = (r["question"], frozenset(r["choices"]))
            votes.setdefault(key, []).append(r["choices"][r["answer"]])
    rng = random.Random(0)
    hits = trials = 0
    for pid in splits["test"]:
        r = problems[pid]
        if r["image"]:
            seen = votes.get((r["question"], frozenset(r["choices"])))
            guess = max(set(seen), key=seen.count) if seen else rng.choice(r["choices"])
            hits += guess == r["choices"][r["answer"]]
            trials += 1
    assert hits / trials < 0.35, hits / trials  # chance is 1/4 or 1/5
    for n in (4, 5):  # every option of an image question is the right answer about equally often
        letters = [r["answer"] for r in img if len(r["choices"]) == n]
        assert letters and min(np.bincount(letters, minlength=n)) > 0.6 * len(letters) / n
    # Held-out text problems are new (hint, question) pairs; held-out pictures are new drawings (jitter and size).
    def key(pid):
        return problems[pid]["hint"], problems[pid]["question"]

    text = [p for p in splits["train"] + splits["test"] if problems[p]["hint"] and not problems[p]["image"]]
    train_keys = {key(p) for p in text if problems[p]["split"] == "train"}
    assert not any(key(p) in train_keys for p in text if problems[p]["split"] == "test")
    # The answer of a text problem is in its hint, once, and nowhere in the question
    for p in text:
        r = problems[p]
        answer = r["choices"][r["answer"]]
        assert sum(c in r["hint"].replace(".", "").split() for c in r["choices"]) == 1, r
        assert answer in r["hint"].replace(".", "").split(), r


# -----------------------------------------------------------------------------
# Encoding details


def test_truncation_keeps_answer_start(data_small_quiz):
    _, tok = data_small_quiz
    prompt = "Question: What color is the circle?\nContext: N/A\nOptions: (A) red (B) blue (C) green\nResponse:"
    answer = "The answer is B. BECAUSE: " + "The circle is blue. " * 20
    full = data.encode_example(tok, prompt, answer, True, 10**6, n_visual=NV)
    n_head = 1 + len(tok.encode(data.IMAGE_PREFIX, False, False)) + 6
    n_prompt = len(tok.encode(prompt, False, False))
    # 1. Cut the answer's tail (EOS first) ...
    enc = data.encode_example(tok, prompt, answer, True, max_seq_len=n_head + n_prompt + 12 + 1, n_visual=NV)
    assert enc["truncated"] and len(enc["tokens"]) == n_head + n_prompt + 12
    assert torch.equal(enc["tokens"], full["tokens"][: len(enc["tokens"])]) and enc["tokens"][-1] != tok.eos_id
    # 2. ... but keep 8 answer tokens, cutting the prompt from its start (BOS, prefix, placeholders stay).
    enc = data.encode_example(tok, prompt, answer, True, max_seq_len=n_head + 10 + 1, n_visual=NV)
    assert len(enc["tokens"]) == n_head + 10 and (enc["labels"] != IGNORE).sum() == data.MIN_ANSWER_TOKENS
    assert torch.equal(enc["tokens"][:n_head], full["tokens"][:n_head]) and enc["vis_mask"].sum() == 6
    assert tok.decode(enc["tokens"][-8:]).startswith("The answer is B.")
    assert tok.decode(enc["tokens"][n_head:-8]) == "Response:"
    with pytest.raises(ValueError):
        data.encode_example(tok, prompt, answer, True, max_seq_len=n_head + 3, n_visual=NV)
    assert data.encode_prompt(tok, prompt, True, n_visual=NV) == full["tokens"][: n_head + n_prompt].tolist()


def test_encode_dialogue(data_small_quiz):
    _, tok = data_small_quiz
    turns = [("What color is the circle?", "The circle is red."), ("Where is the circle?", "It is at the top left.")]
    enc = data.encode_dialogue(tok, turns, has_image=True, max_seq_len=512, n_visual=NV)
    tokens, labels = enc["tokens"], enc["labels"]
    lab = labels != IGNORE
    # Exactly two labelled runs: each answer + its EOS.
    runs, i = [], 0
    while i < len(lab):
        if lab[i]:
            j = i
            while j < len(lab) and lab[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    assert len(runs) == 2
    for (s, e), (_, answer) in zip(runs, turns):
        assert tokens[e - 1] == tok.eos_id and tok.decode(tokens[s:e]) == answer
    assert torch.equal(labels[lab], tokens[lab])
    assert tok.decode(tokens[runs[0][1] : runs[1][0]]) == "Instruction: Where is the circle?\nResponse:"
    # One turn == encode_example with the LLaVA-form instruction; inference ends at "Response:" with no labels.
    one = data.encode_dialogue(tok, turns[:1], False, 512, n_visual=NV)
    ref = data.encode_example(tok, data.build_instruction(turns[0][0], None), turns[0][1], False, 512, n_visual=NV)
    assert torch.equal(one["tokens"], ref["tokens"]) and torch.equal(one["labels"], ref["labels"])
    inf = data.encode_dialogue(tok, turns + [("How many shapes are there?", None)], True, 512, n_visual=NV)
    assert tok.decode(inf["tokens"]).endswith("Response:") and inf["tokens"][-1] != tok.eos_id
    assert (inf["labels"] != IGNORE).sum() == lab.sum()
    # Too long for inference: the oldest turns go, the new question stays.
    short = data.encode_dialogue(tok, turns + [("How many shapes are there?", None)], True, len(inf["tokens"]) - 3, n_visual=NV)
    assert short["truncated"] and tok.decode(short["tokens"]).endswith("How many shapes are there?\nResponse:")


def test_instruction_dataset(tmp_path, data_small_quiz):
    folder, tok = data_small_quiz
    image = next((folder / "images" / "train").rglob("image.png"))
    recs = [
        {"id": "x1", "image": image.name, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "It is red."},
            {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "At the top left."}]},
        {"instruction": "Which word is a noun?", "input": "", "output": "The word apple is a noun."},
    ]  # fmt: skip
    (tmp_path / "mix.json").write_text(json.dumps(recs))
    ds = data.InstructionDataset(tmp_path / "mix.json", tok, image_dir=image.parent, image_size=32, n_visual=NV)
    a, b = ds[0], ds[1]
    assert a["has_image"] and a["image"].shape == (3, 32, 32) and not b["has_image"] and b["image"] is None
    assert "<image>" not in tok.decode(a["tokens"]) and "Instruction: What color is the circle?\nResponse:" in tok.decode(a["tokens"])
    assert tok.decode(b["tokens"]).endswith("Instruction: Which word is a noun? \nResponse:The word apple is a noun.")
    batch = data.collate([a, b])
    assert batch["images"].shape == (1, 3, 32, 32) and batch["has_image"].tolist() == [1, 0]


def test_length_grouped_order():
    lengths = [random.Random(i).randint(10, 500) for i in range(1000)]
    order = data.length_grouped_order(lengths, batch_size=8, seed=0)
    assert sorted(order) == list(range(1000)) and order == data.length_grouped_order(lengths, 8, 0)
    assert order != data.length_grouped_order(lengths, 8, 1)
    spread = np.mean([np.ptp([lengths[i] for i in order[j : j + 8]]) for j in range(0, 1000, 8)])
    assert spread < 40  # random batches of 8 would spread ~380


# -----------------------------------------------------------------------------
# Scoring


def test_parse_answer():
    rng = random.Random(0)
    assert evaluate.parse_answer("...Response:The answer is B. BECAUSE: x", 3, rng) == (1, False)
    assert evaluate.parse_answer("The answer is C? The answer is A.", 3, rng) == (2, False)  # first match; "." is any char
    assert evaluate.parse_answer("The answer is B", 3, rng)[1]  # needs a character after the letter
    idx, fb = evaluate.parse_answer("The answer is D.", 3, rng)  # letter beyond the choices
    assert fb and 0 <= idx < 3
    draws = [evaluate.parse_answer("no idea", 4, random.Random(7))[0] for _ in range(3)]
    assert len(set(draws)) == 1  # seeded


def test_score_table():
    def rec(answer, subject, hint, image, grade):
        return dict(answer=answer, subject=subject, hint=hint, image=image, grade=grade, choices=["a", "b", "c"])

    problems = {
        "1": rec(0, "natural science", "", "image.png", "grade1"),  # IMG
        "2": rec(1, "natural science", "ctx", None, "grade8"),  # TXT
        "3": rec(2, "social science", "ctx", "image.png", "grade3"),  # TXT + IMG
        "4": rec(0, "social science", "", None, "grade12"),  # NO
        "5": rec(1, "language science", "", None, "grade5"),  # NO
        "6": rec(2, "language science", "ctx", None, "grade7"),  # TXT
        "7": rec(0, None, "", "image.png", None),  # IMG, no subject/grade (reconstructed test record)
        "8": rec(1, "natural science", "", None, "grade2"),  # NO, answered by the random fallback
    }
    texts = {"1": "The answer is A.", "2": "The answer is B.", "3": "The answer is A.", "4": "The answer is A.",
             "5": "The answer is C.", "6": "The answer is C.", "7": "The answer is B.", "8": "I do not know"}  # fmt: skip
    rng = random.Random(0)
    preds, n_fb = {}, 0
    for pid, t in texts.items():
        preds[pid], fb = evaluate.parse_answer(t, 3, rng)
        n_fb += fb
    preds["8"] = 0  # pin the fallback's draw to a wrong answer for the hand computation
    s = evaluate.score_table(problems, preds, n_fb)
    # correct: 1, 2, 4, 6  (3, 5, 7, 8 wrong)
    expect = {"NAT": 2 / 3, "SOC": 1 / 2, "LAN": 1 / 2, "TXT": 2 / 3, "IMG": 1 / 3, "NO": 1 / 3,
              "G1-6": 1 / 4, "G7-12": 3 / 3, "Avg": 4 / 8}  # fmt: skip
    for col, v in expect.items():
        assert s[col] == pytest.approx(100 * v), col
    assert s["counts"] == {"NAT": 3, "SOC": 2, "LAN": 2, "TXT": 3, "IMG": 3, "NO": 3, "G1-6": 4, "G7-12": 3, "Avg": 8}
    assert s["n_fallback"] == 1
    table = evaluate.format_table(s)
    assert "G7-12" in table and "100.00" in table and "50.00" in table and "fallback): 1" in table
    with pytest.raises(ValueError, match="no prediction"):
        evaluate.score_table(problems, {"1": 0}, 0)


# -----------------------------------------------------------------------------
# Bad input


def test_bad_inputs(tmp_path, data_small_quiz):
    folder, tok = data_small_quiz
    with pytest.raises(FileNotFoundError, match="problems.json"):
        data.load_scienceqa(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        data.Tokenizer(tmp_path / "tokenizer.model")
    # A copy of the quiz with one malformed record, one missing image, one corrupt PNG.
    problems = json.loads((folder / "problems.json").read_text())
    splits = json.loads((folder / "pid_splits.json").read_text())
    img_pids = [p for p in splits["train"] if problems[p]["image"]]
    missing, corrupt = img_pids[:2]
    root = tmp_path / "sqa"
    for p in img_pids[2:]:
        (root / "images" / "train" / p).mkdir(parents=True)
        (root / "images" / "train" / p / "image.png").write_bytes((folder / "images" / "train" / p / "image.png").read_bytes())
    (root / "images" / "train" / corrupt).mkdir(parents=True)
    (root / "images" / "train" / corrupt / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "pid_splits.json").write_text(json.dumps(splits))
    bad = dict(problems)
    bad[splits["train"][5]] = dict(bad[splits["train"][5]], answer=7)
    (root / "problems.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"pid {splits['train'][5]}: field 'answer'"):
        data.load_scienceqa(root, "train")
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(ValueError, match=rf"problem {missing}: .*{missing}/image.png"):
        data.ScienceQADataset(root, "train", tok, image_size=32, n_visual=NV)
    with pytest.raises(ValueError, match="split 'dev'"):
        data.load_scienceqa(root, "dev")
    ds = data.ScienceQADataset(root, "train", tok, image_size=32, skip_bad=True, n_visual=NV)
    assert [p for p, _ in ds.skipped] == [missing, corrupt] and len(ds) == 58
    assert corrupt in ds.skipped[1][1] and "image.png" in ds.skipped[1][1]
    # Without skip_bad the corrupt file is found when the item is read, and the error names pid and path.
    (root / "images" / "train" / missing).mkdir(parents=True)
    (root / "images" / "train" / missing / "image.png").write_bytes((folder / "images" / "train" / missing / "image.png").read_bytes())
    ds = data.ScienceQADataset(root, "train", tok, image_size=32, n_visual=NV)
    i = [s["pid"] for s in ds.samples].index(corrupt)
    with pytest.raises(ValueError, match=rf"problem {corrupt}: cannot load image .*{corrupt}/image.png"):
        ds[i]
    with pytest.raises(ValueError, match="unknown prompt format"):
        data.ScienceQADataset(root, "train", tok, fmt="QCM-XYZ", n_visual=NV)


# =====================================================================================================================
# Training (train.py): methods, DDP/FSDP2, checkpoints, resume
# =====================================================================================================================

ROOT = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A small generated quiz plus random tiny backbones saved in the layouts real weights come in."""
    root = tmp_path_factory.mktemp("tiny")
    quiz = quizgen.ensure_quiz(root / "quiz", n_train=96, n_val=16, n_test=24)
    tok = data.Tokenizer(quiz / "tokenizer.model")
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=2, vocab_size=tok.n_words, multiple_of=32, norm_eps=1e-5)
    llama_dir = root / "llama"
    llama_dir.mkdir()
    (llama_dir / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 2, "vocab_size": -1,
                                                       "multiple_of": 32, "norm_eps": 1e-5}))
    torch.save(Transformer(args).state_dict(), llama_dir / "consolidated.00.pth")
    clip_path = root / "clip.pt"
    torch.save(VisionTransformer(VISION_PRESETS["tiny"]).state_dict(), clip_path)
    return {"root": root, "flags": ["--llama_dir", str(llama_dir), "--clip_path", str(clip_path), "--tokenizer",
                                    str(quiz / "tokenizer.model"), "--data_dir", str(quiz), "--no_eval",
                                    "--max_seq_len", "160", "--epochs", "2", "--batch_size", "8", "--micro_batch", "4",
                                    "--warmup_epochs", "0.5", "--blr", "0.05"]}


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(Path(out_dir) / "log.jsonl")]


def run_torchrun(flags, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *flags]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("method", ["mma", "lora", "mixlora", "full"])
def test_every_method_trains(tiny_setup, method, tmp_path):
    blr = {"mma": "0.5", "lora": "0.2", "mixlora": "0.2", "full": "0.02"}[method]  # a few steps must show learning
    flags = tiny_setup["flags"] + ["--method", method, "--out_dir", str(tmp_path), "--lora_rank", "4",
                                   "--max_steps", "8", "--epochs", "4", "--warmup_epochs", "0", "--blr", blr]
    train.main(flags)
    ls = losses(tmp_path)
    assert len(ls) == 8
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2, ls  # falling


def test_resume_is_exact(tiny_setup, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(tiny_setup["flags"] + ["--out_dir", str(full), "--max_steps", "5"])
    train.main(tiny_setup["flags"] + ["--out_dir", str(part), "--max_steps", "2"])
    train.main(["--resume", str(part / "ckpt.pt"), "--max_steps", "5", "--out_dir", str(part)])
    a, b = load_checkpoint(full / "ckpt.pt"), load_checkpoint(part / "ckpt.pt")
    assert a["step"] == b["step"] == 5
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert losses(full) == losses(part)  # the resumed run logged the same losses for steps 3..5


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_interrupted_save_keeps_last_good(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(train.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and torch.equal(ck["model"]["w"], torch.ones(3))


def test_lr_schedule():
    args = train.get_args(["--data_dir", "x", "--epochs", "20", "--warmup_epochs", "2"])
    spe = 397
    peak = 9e-3 * 32 / 256
    assert train.lr_at(0, spe, args) == 0.0
    assert abs(train.lr_at(2 * spe, spe, args) - peak) < 1e-12
    assert train.lr_at(20 * spe - 1, spe, args) < 1e-3 * peak
    assert train.lr_at(spe, spe, args) == pytest.approx(peak / 2)


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_follow_one(tiny_setup, tmp_path, fsdp):
    """DDP / FSDP2 on 2 CPU processes (gloo) follow the single-process loss curve for the same global batch.
    Dropout draws differ per rank, so it is off here; what remains is the order of floating-point sums."""
    flags = tiny_setup["flags"] + ["--max_steps", "4", "--dropout", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(flags + ["--out_dir", str(one)])
    run_torchrun(flags + ["--out_dir", str(two)] + (["--fsdp"] if fsdp else []), 2)
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa = load_checkpoint(one / "ckpt.pt")["model"]
    wb = load_checkpoint(two / "ckpt.pt")["model"]
    assert wa.keys() == wb.keys()


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_setup, tmp_path):
    flags = list(tiny_setup["flags"])
    llama_dir = Path(flags[flags.index("--llama_dir") + 1])
    bad = tmp_path / "llama_nan"
    bad.mkdir()
    (bad / "params.json").write_text((llama_dir / "params.json").read_text())
    sd = torch.load(llama_dir / "consolidated.00.pth")
    sd["output.weight"][0, 0] = float("nan")
    torch.save(sd, bad / "consolidated.00.pth")
    flags[flags.index("--llama_dir") + 1] = str(bad)
    out = tmp_path / "out"
    save_checkpoint(out / "ckpt.pt", {"model": {}, "step": 7})  # an earlier, unrelated run's checkpoint
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0.*Last good checkpoint: none yet"):
        train.main(flags + ["--out_dir", str(out)])
    assert load_checkpoint(out / "ckpt.pt")["step"] == 7  # left alone


# =====================================================================================================================
# Generation and evaluation (sample.py)
# =====================================================================================================================

HERE = Path(__file__).resolve().parent
MAX_SEQ_LEN = 128


@pytest.fixture(scope="module")
def quiz(tmp_path_factory):
    return quizgen.ensure_quiz(tmp_path_factory.mktemp("sample") / "quiz", n_train=40, n_val=4, n_test=24)


@pytest.fixture(scope="module")
def tok(quiz):
    return data.Tokenizer(quiz / "tokenizer.model")


def sample_tiny_lavin(tok):
    torch.manual_seed(0)
    m = build_lavin("tiny", "tiny", AdapterArgs(), vocab_size=tok.n_words, max_seq_len=MAX_SEQ_LEN)
    with torch.no_grad():  # the adapters start as the identity; random ones make merging and routing matter
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def model(tok):
    return sample_tiny_lavin(tok)


def images(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))  # (n, 3, 64, 64)


def prompt(tok, text, has_image):
    return data.encode_dialogue(tok, [(text, None)], has_image, n_visual=NV)["tokens"].tolist()


def test_streaming_equals_plain(model, tok):
    """The streamed pieces join to the non-streamed answer for the same seed (sampling, not greedy), and the seed
    decides the answer."""
    s = sample.Sampling(temperature=1.0, top_p=0.9, max_new_tokens=24)
    p, img = prompt(tok, "What color is the circle?", True), images(1)[0]
    pieces = []
    streamed = sample.answer(model, tok, p, img, s, torch.Generator().manual_seed(3), on_text=pieces.append)
    plain = sample.answer(model, tok, p, img, s, torch.Generator().manual_seed(3))
    assert "".join(pieces) == streamed == plain
    assert len(pieces) > 1  # it really streamed
    assert sample.answer(model, tok, p, img, s, torch.Generator().manual_seed(4)) != plain


def test_generate_merged_equals_unmerged(model, tok):
    """Greedy generation with the adapters folded into q/k/v (spec §12e) equals running them as modules, for both
    modalities, and unmerging restores the modules."""
    s = sample.Sampling(max_new_tokens=16)
    for has_image in (False, True):
        p = prompt(tok, "Which shape is red?", has_image)
        img = images(1)[0] if has_image else None
        unmerged = sample.answer(model, tok, p, img, s, None, merge=False)
        merged = sample.answer(model, tok, p, img, s, None, merge=True)
        assert model.merged_modality == int(has_image) and model.llama.layers[0].adapter_attn is None  # really folded
        again = sample.answer(model, tok, p, img, s, None, merge=False)
        assert model.merged_modality is None and model.llama.layers[0].adapter_attn is not None
        assert unmerged == merged == again and len(merged) > 0, has_image


def test_batch_equals_alone(model, tok):
    """A batch of prompts of four different lengths, mixing modalities, gives each prompt's tokens alone (greedy)."""
    texts = ["hi", "Which shape is red? Look at the picture carefully.", "What is the capital of Peru?", "Where?"]
    has = [True, False, True, False]
    ps = [prompt(tok, t, h) for t, h in zip(texts, has)]
    assert len({len(p) for p in ps}) == 4
    imgs = images(2)  # (2, 3, 64, 64): the two image rows, in batch order
    model.unmerge()  # a mixed batch needs the adapters as modules
    batch = model.generate(ps, has, imgs, max_new_tokens=12)
    alone = [model.generate([ps[0]], [True], imgs[:1], 12)[0], model.generate([ps[1]], [False], None, 12)[0],
             model.generate([ps[2]], [True], imgs[1:], 12)[0], model.generate([ps[3]], [False], None, 12)[0]]
    assert batch == alone


def test_evaluate_merged_equals_unmerged(model, tok, quiz):
    """evaluate() batches per modality and merges per batch: the same predictions and texts as unmerged."""
    problems = data.load_scienceqa(quiz, "test")
    kw = dict(batch_size=5, max_new_tokens=6)
    merged = evaluate.evaluate(model, tok, problems, quiz, "test", merge=True, **kw)
    assert merged == evaluate.evaluate(model, tok, problems, quiz, "test", merge=False, **kw)
    assert model.merged_modality is None and not model.training  # left as it came


# ---- the command line: a checkpoint in train.py's format, on base weights saved in Meta's and OpenAI's layouts

@pytest.fixture(scope="module")
def ckpt(model, quiz, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    llama_dir = root / "llama"
    llama_dir.mkdir()
    a = model.llama.args
    (llama_dir / "params.json").write_text(json.dumps(dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads,
                                                           vocab_size=a.vocab_size, multiple_of=a.multiple_of,
                                                           norm_eps=a.norm_eps)))
    base = lambda module: {k: v for k, v in module.state_dict().items() if "adapter_attn" not in k}  # noqa: E731
    torch.save(base(model.llama), llama_dir / "consolidated.00.pth")
    torch.save(base(model.visual), root / "clip.pt")
    args = dict(llama_dir=str(llama_dir), clip_path=str(root / "clip.pt"), tokenizer=str(quiz / "tokenizer.model"),
                data_dir=str(quiz), image_size=64, norm="imagenet", prompt_format="QCM-ALE", max_seq_len=MAX_SEQ_LEN)
    path = root / "out" / "ckpt.pt"
    save_checkpoint(path, dict(model=trainable_state_dict(model), config=model.config(), args=args, step=0))
    return path


def run(cmd, stdin=None, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))  # 1 thread each: the CI box has 2 cores
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd
    else:
        cmd = [sys.executable] + cmd
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=HERE, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_scripted_session(ckpt, quiz):
    """Questions piped on stdin, with a bad image path, a sampling change, a good image and /quit: every question is
    answered, the bad path is reported and the session goes on, nothing is read after /quit."""
    img = next((quiz / "images" / "test").glob("*/image.png"))
    script = f"hello\n/image /no/such.png\nwhat is this?\n/temp 0.7\n/image {img}\nwhat color?\n/quit\nnever\n"
    out = run(["sample.py", "--adapter", str(ckpt), "--max_new_tokens", "8"], stdin=script)
    assert out.count("lavin> ") == 3, out
    assert "could not attach the image: image not found: /no/such.png" in out
    assert "(image attached:" in out and "temperature 0.7" in out


def test_eval_single_and_two_processes(ckpt, quiz, tmp_path):
    """--eval prints the score table and writes the predictions; under torchrun with two (gloo) processes, the table
    and the predictions are the same as with one."""
    flags = ["sample.py", "--adapter", str(ckpt), "--eval", "--split", "test", "--batch_size", "4",
             "--max_new_tokens", "6"]
    one = run(flags + ["--out", str(tmp_path / "one.json")])
    two = run(flags + ["--out", str(tmp_path / "two.json")], nproc=2)
    table = lambda out: out[out.index("   NAT"):out.index("predictions written")]  # noqa: E731
    assert "acc %" in table(one) and table(one) == table(two)
    p1, p2 = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert p1 == p2 and len([k for k in p1 if k.isdigit()]) == 24 and "fallbacks" in p1


def _fsdp_worker(rank, world, port, quiz):
    """One rank: evaluate a plain model, then the same model sharded by train.py's FSDP2 wrapper, as train.py does."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tok = data.Tokenizer(quiz / "tokenizer.model")
        model = sample_tiny_lavin(tok)
        problems = data.load_scienceqa(quiz, "test")[:12]
        kw = dict(batch_size=4, max_new_tokens=4, merge=False)
        _, _, alone = evaluate.evaluate(model, tok, problems, quiz, "test", **kw)  # the whole split on each rank
        wrap_model(model, Namespace(fsdp=True, grad_ckpt=False, compile=False), torch.device("cpu"), world)
        _, _, sharded = evaluate.evaluate(model, tok, problems, quiz, "test", rank=rank, world=world, **kw)
        assert sharded == alone
        assert type(model.llama.layers[0].attention.wq.weight).__name__ == "DTensor"  # sharded again afterwards
    finally:
        dist.destroy_process_group()


def test_eval_under_fsdp2(quiz):
    """train.py's end-of-training evaluation of an FSDP2-sharded model: ranks generate different batches, for
    different numbers of steps, without deadlocking, and agree with the unsharded model."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, port, quiz), nprocs=2)


def test_official_adapter_file(model, tok, quiz, ckpt, tmp_path):
    """An adapter file in the official release's format (Conv1d shapes, official names, `module.` prefix, an
    argparse.Namespace of flags) loads with --llama_dir/--clip_path and answers exactly as the model it came from."""
    official = {}
    for k, v in trainable_state_dict(model).items():
        k = k.replace("llama.layers.", "layers.").replace("visual.blocks.", "backbone.visual.transformer.resblocks.")
        k = k.replace(".down.", ".conv_A.").replace(".up0.", ".conv_B.").replace(".up1.", ".conv_D.")
        k = k.replace(".router.proj.", ".expert_weights.").replace(".fc1.", ".conv_A.").replace(".fc2.", ".conv_B.")
        if ".adapter_attn.conv_" in k and k.endswith("weight"):
            v = v[..., None]  # the official adapters are 1x1 Conv1d: a trailing kernel axis
        official["module." + k] = v
    path = tmp_path / "checkpoint-19.pth"
    torch.save({"model": official, "epoch": 19, "args": Namespace(max_seq_len=512, adapter_dim=8)}, path)
    root = ckpt.parent.parent
    loaded, tok2, info = evaluate.load_for_inference(path, torch.device("cpu"), None, str(root / "llama"),
                                                     str(root / "clip.pt"), str(quiz / "tokenizer.model"),
                                                     model.adapter_args.tau, clip_every=1)
    assert info["prompt_format"] == "QCM-ALE" and info["norm"] == "imagenet" and info["image_size"] == 64
    p, img = prompt(tok, "Which shape is red?", True), images(1)[0]
    s = sample.Sampling(max_new_tokens=12)
    assert sample.answer(loaded, tok2, p, img, s, None) == sample.answer(model, tok, p, img, s, None)


def test_chat_prompt_follows_the_training_format(tok):
    """A ScienceQA-trained model is prompted exactly as in training; a chatbot with the instruction template."""
    line = "What color is the circle? (A) red (B) green"
    ids = sample.chat_prompt(tok, {"chat": "scienceqa", "prompt_format": "QCM-EA", "n_visual": NV}, [], line, True, 200)
    expected = "Question: What color is the circle?\nContext: N/A\nOptions: (A) red (B) green\nResponse:"
    assert ids == data.encode_prompt(tok, expected, True, n_visual=NV)
    ids = sample.chat_prompt(tok, {"chat": "instruction", "n_visual": NV}, [("hi", "hello")], line, False, 200)
    assert ids == data.encode_dialogue(tok, [("hi", "hello"), (line, None)], False, 201, n_visual=NV)["tokens"].tolist()


# =====================================================================================================================
# Benchmark (bench.py)
# =====================================================================================================================

def test_param_table_exact_counts():
    rows = {(r["model"], r["method"]): r["trainable"] for r in param_table()}
    # spec §4 / §13: the MMA totals, to the parameter
    assert rows[("LaVIN-7B", "MMA (LaVIN)")] == 3_781_296
    assert rows[("LaVIN-13B", "MMA (LaVIN)")] == 5_390_080
    # LoRA r=8 on every LLaMA linear of 7B: 32 layers x 8 x (4 x (4096 + 4096) + 3 x (4096 + 11008)) = 2,498,560 x 8,
    # plus the visual neck kept from LaVIN (131,200 + 528,384)
    assert rows[("LaVIN-7B", "LoRA r=8")] == 2_498_560 * 8 + 659_584


def test_flop_model_matches_worked_example():
    fm = bench.flop_model(build_lavin("7B", "ViT-L/14", AdapterArgs(method="mma"), device="meta"))
    # 32 blocks x 202.4M + the 131.1M head, frozen; the embedding lookup is not a matmul
    assert fm["n_frozen"] == pytest.approx(6.607e9, rel=1e-3)
    # 4 x 6.607e9 + 6 x 3.78e6 + 12 x 32 x 4096 x 512 ≈ 27.3 GFLOP per token (style-guide §4.2)
    assert bench.flops_per_token(fm, 512) == pytest.approx(27.3e9, rel=0.02)
    # CLIP ViT-L/14 per image: 257 x (4 x 0.303e9 + 12 x 24 x 1024 x 257) ≈ 0.33 TFLOP
    assert fm["vision_per_image"] == pytest.approx(0.33e12, rel=0.03)

    # Full fine-tuning: every LLaMA weight trains (6N); LoRA leaves CLIP frozen and gradient-free (forward only, 2N)
    full = bench.flop_model(build_lavin("7B", "ViT-L/14", AdapterArgs(method="full"), device="meta"))
    assert full["n_frozen"] == 0 and full["n_trainable"] == pytest.approx(fm["n_frozen"])
    lora = bench.flop_model(build_lavin("7B", "ViT-L/14", AdapterArgs(method="lora"), device="meta"))
    assert lora["vision_per_image"] < 0.5 * fm["vision_per_image"]


def test_length_distribution():
    lens = bench.sample_lengths(20_000, np.random.default_rng(0))
    assert lens.max() <= 512  # truncated like the official loader
    assert abs(np.median(lens) - bench.SCIENCEQA_TRAIN_LENGTH_PERCENTILES[50]) <= 3


def test_unknown_flag_is_an_error():
    with pytest.raises(SystemExit):
        bench.get_args(["--no_such_flag"])
    with pytest.raises(SystemExit):
        bench.get_args(["--methods", "mma,adapterx"])


def test_cpu_side_by_side_run(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    # One thread: on a shared CPU, two threads contending with other processes make each step up to 10x slower.
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--methods", "mma,lora,mixlora,full", "--steps", "2", "--warmup", "1", "--batch_size",
                             "2", "--gen_tokens", "4", "--threads", "1", "--json", str(out_json)])
    finally:
        torch.set_num_threads(threads)  # bench.main sets it process-wide; leave later tests as they were
    text = capsys.readouterr().out
    parsed = json.loads(text.strip().splitlines()[-1])  # the last line is the JSON object
    assert parsed == json.loads(out_json.read_text())
    assert [r["method"] for r in parsed["train"]] == ["mma", "lora", "mixlora", "full"]
    for r in parsed["train"]:
        assert "error" not in r and r["step_ms"] > 0 and r["flops_per_step"] > 0
        assert set(r["extrapolation"]) == {"scienceqa", "pad512"}
    # every method has a row in the training table, twice in the extrapolation table, and one in generation
    tables = text.split("== 2.")[1].split("== JSON ==")[0]  # parts 2-4
    for label in ("MMA (LaVIN)", "LoRA r=64", "MixLoRA E=16 r=4", "Full"):
        # part 2's table and FLOP breakdown, part 3's two length regimes, part 4's generation row
        assert tables.count(label + " ") == 5, label
    # merging must not change greedy tokens for the two methods that can merge
    gen = {r["method"]: r["generation"] for r in parsed["train"]}
    assert gen["mma"]["agree"] is True and gen["lora"]["agree"] is True
    assert gen["mixlora"]["merged"] is None and gen["full"]["merged"] is None
    mma_rows = {r["model"]: r["trainable"] for r in parsed["params"] if r["method"] == "MMA (LaVIN)"}
    assert mma_rows == {"LaVIN-7B": 3_781_296, "LaVIN-13B": 5_390_080}
    assert result["train"][0]["label"] == "MMA (LaVIN)"


# --- Quick start pre-training (quiz.py) ---

def test_pretrain_batches_are_seeded_draws():
    batches = quizgen._pretrain_batches(100, 8, 40, seed=3)
    assert len(batches) == 40 and all(len(b) == 8 and all(0 <= i < 100 for i in b) for b in batches)
    assert batches == quizgen._pretrain_batches(100, 8, 40, seed=3)  # a function of the seed alone
    assert batches != quizgen._pretrain_batches(100, 8, 40, seed=4)


def test_pretrain_llama_standin_resumes_bit_exact(tmp_path, data_small_quiz, monkeypatch, capsys):
    """Killed mid-interval (after its step-4 checkpoint) and rerun, pre-training ends exactly where an uninterrupted
    run does; a checkpoint made with other settings is not resumed; the checkpoint goes once the weights are saved."""
    folder, tok = data_small_quiz
    kw = dict(steps=6, batch=4, corpus=48, save_every=2)
    whole = quizgen.pretrain_llama_standin(folder, tok, tmp_path / "whole", "QCM-EA", **kw)

    def kill_at(n):  # collate runs once per step: raise on the n-th call, as a Ctrl-C would
        calls, real = [0], data.collate
        def collate(samples):
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt
            return real(samples)
        monkeypatch.setattr(quizgen, "collate", collate)

    out = tmp_path / "resumed"
    kill_at(6)  # during step 6: step 5 is lost, the checkpoint holds 4
    with pytest.raises(KeyboardInterrupt):
        quizgen.pretrain_llama_standin(folder, tok, out, "QCM-EA", **kw)
    assert load_checkpoint(out / "pretrain_ckpt.pt")["step"] == 4 and not (out / "consolidated.00.pth").exists()
    kill_at(1)
    with pytest.raises(KeyboardInterrupt):  # other settings: starts over rather than resuming
        quizgen.pretrain_llama_standin(folder, tok, out, "QCM-EA", **dict(kw, lr=1e-3))
    assert "starting over" in capsys.readouterr().out
    monkeypatch.undo()
    quizgen.pretrain_llama_standin(folder, tok, out, "QCM-EA", **kw)
    assert "resuming the stand-in LLaMA's pre-training at step 4 of 6" in capsys.readouterr().out
    assert not (out / "pretrain_ckpt.pt").exists()
    a, b = (torch.load(d / "consolidated.00.pth", weights_only=True) for d in (whole, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "params.json").read_text() == (out / "params.json").read_text()
