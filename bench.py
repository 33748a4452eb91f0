"""
bench.py: LaVIN's efficiency claims measured on your own hardware, side by side with LoRA, MixLoRA and full fine-tuning.

The paper's headline is cost (Luo et al., NeurIPS 2023, arXiv 2305.15023, Table 6 and the official README's model zoo):
LaVIN-7B trains 3.8M parameters (exactly 3,781,296) for 20 ScienceQA epochs in 1.4 h on 8 A100s, peaking at 33.9 GB
and leaving a 15 MB checkpoint; LaVIN-13B trains 5.4M (5,390,080) in 2 h, 55.9 GB, 20 MB. One run prints, as tables
and then as one JSON object (also written to --json PATH):

  1. trainable parameters and checkpoint size by method at the real 7B/13B shapes (meta device: no weights, no memory);
  2. a measured training step per method (forward, backward, AdamW): time, tokens/s, peak memory, FLOP/s and MFU;
  3. the ScienceQA training time it extrapolates to on --gpus such devices, beside the paper's hours and the floor at
     the device's peak; and the utilisation the paper's hours imply;
  4. generation throughput with the KV cache, adapters merged into the weights against unmerged;
  5. a 4-bit NF4 base (QLoRA, LaVIN-lite): exact frozen bytes at 7B/13B and, with --quant nf4, its step beside.

    python bench.py                                      # CPU: tiny model, all four methods, under a minute
    python bench.py --model 7B --methods mma,lora        # one GPU: random weights of the real shapes, the real step
    python bench.py --model 7B --methods mma,lora --quant nf4   # ... and again on a 4-bit base (LaVIN-lite, QLoRA)
    python bench.py --model 13B --seq pad512 --gpus 8    # 13B as the official code pads it (to 512 tokens)
    python bench.py --model 7B --methods full --batch_size 1   # full FT in pure bf16 (~56 GB + activations)
    python bench.py --compare --threads 1                # instead: ours against the real transformers + peft
    python bench.py --load_memory                        # instead: host memory of loading a sharded HF checkpoint

FLOPs and MFU with a frozen base: nanoGPT's 6N per token assumes every weight trains (2N forward, 2N input gradients,
2N weight gradients). A frozen weight that gradients pass through (every LLaMA weight: adapters and neck sit at its
input) costs 4N; one with nothing trainable below it (CLIP under LoRA, run under no_grad) costs 2N. Per LLaMA token

    F(T) = 4 N_frozen + 6 N_trainable + 12 L d T            (T: the padded sequence length the kernels really process)

plus the CLIP tower once per image. MFU = (F per step / step time) / device peak (a frozen base counted as 6N would
inflate it 1.5x). Decoding is memory-bound: part 4 reports weight bytes read per second. The extrapolation holds the
measured FLOP/s at every length and scales perfectly across --gpus; for the tiny CPU model it describes that toy.

Tests: python -m pytest -q test_all.py -k test_bench_
"""

import argparse
import gc
import json
import math
import multiprocessing
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adapters import (LORA_TARGETS, METHODS, AdapterArgs, LoRALinear, MixLoRALinear, NF4Weight, nf4_nbytes,
                      quantize_llama_)
from clip_vit import VISION_PRESETS, VisionTransformer
from data import LLAMA_PREFIX_IDS, SCIENCEQA_TRAIN_LENGTH_PERCENTILES, collate, sequence_head
from cli import UserError, check_flags, cli, default_device, default_dtype
from generate import generate, inference_context
from model import IGNORE, LLAMA_PRESETS, LaVIN, build_lavin, count_params, load_llama
from weights import hf_to_meta_name, save_safetensors, unpermute

# What the paper claims (Table 6 and the official README's model zoo), and what it trains on
PAPER = {"7B": dict(trainable=3_781_296, hours=1.4, gpus=8, gpu="A100", mem_gb=33.9, ckpt_mb=15),
         "13B": dict(trainable=5_390_080, hours=2.0, gpus=8, gpu="A100", mem_gb=55.9, ckpt_mb=20)}
SQA_TRAIN = 12_726  # ScienceQA train problems
SQA_IMAGES = 6_218  # of which have an image (48.9%): these pay for a CLIP pass
MAX_SEQ_LEN = 512  # the official max_seq_len: longer samples are truncated, and the official loader pads to it
GEN_PROMPT_LEN = 128  # generation prompts: roughly a median ScienceQA prompt without its answer

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets. Looked up by device name, first
# match wins, so the PCIe H100 (lower clocks) comes before the plain "H100" (SXM). PCIe A100s share the SXM peak.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See bench.py's docstring for the FLOP model.")
    p.add_argument("--model", default="tiny", choices=list(LLAMA_PRESETS), help="LLaMA shapes (7B/13B need a GPU)")
    p.add_argument("--vision", choices=list(VISION_PRESETS), help="CLIP tower (default: tiny for tiny, else ViT-L/14)")
    p.add_argument("--methods", help="comma list of " + ",".join(METHODS) + " (default: all on CPU, mma on a GPU)")
    p.add_argument("--lora_rank", type=int, default=64, help="LoRA rank of the measured lora row (default 64, LLaVA's)")
    p.add_argument("--batch_size", type=int, default=4, help="samples per device per step (default 4, the official)")
    p.add_argument("--seq", default="scienceqa", choices=["scienceqa", "pad512"], help="lengths: ScienceQA's, padded "
                   "to each batch's longest (default, as data.collate), or all padded to 512 (the official loader)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first: allocator, cuBLAS heuristics, compile")
    p.add_argument("--gpus", type=int, default=8, help="N devices for the extrapolation (default 8, as the paper)")
    p.add_argument("--epochs", type=int, default=20, help="ScienceQA epochs to extrapolate to (default 20)")
    p.add_argument("--peak_tflops", type=float, help="device peak for MFU (default: looked up for A100/H100/H200 bf16)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="frozen weights and autocast dtype (default: bf16 on GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for the training step")
    p.add_argument("--quant", choices=["nf4"], help="also measure each adapter method on a 4-bit NF4 base (QLoRA)")
    p.add_argument("--gen_tokens", type=int, default=16, help="new tokens per prompt in part 4 (default 16)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default on CPU: 1; the tiny model gains little "
                   "from more, and on a shared machine threads waiting for busy cores make steps up to 10x slower)")
    p.add_argument("--json", help="also write the JSON result to this path")
    p.add_argument("--load_memory", action="store_true", help="instead: peak host memory of loading a sharded HF LLaMA")
    p.add_argument("--compare", action="store_true", help="instead: ours against transformers + peft (see compare)")
    p.add_argument("--seed", type=int, default=0, help="seeds the batch, the weights and the prompts (default 0)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also LAVIN_DEBUG=1)")
    args = p.parse_args(argv)
    pos = (lambda v: v >= 1, ">= 1")
    check_flags(args, [("batch_size", *pos), ("steps", *pos), ("gpus", *pos), ("epochs", *pos), ("gen_tokens", *pos),
                       ("lora_rank", *pos), ("threads", *pos), ("warmup", lambda v: v >= 0, ">= 0"),
                       ("peak_tflops", lambda v: v > 0, "> 0")])
    if args.json and not Path(args.json).parent.is_dir():
        raise UserError(f"--json {args.json}: no folder {Path(args.json).parent} to write it in")
    # The current device: one GPU if there is one (bench measures one device; part 3 scales to --gpus of them).
    args.device = default_device()
    if args.model != "tiny" and args.device.type != "cuda":
        raise UserError(f"--model {args.model} needs a GPU: its frozen weights alone are "
                        f"{'13' if args.model == '7B' else '26'} GB in bf16 (on CPU use --model tiny)")
    args.vision = args.vision or ("tiny" if args.model == "tiny" else "ViT-L/14")
    # The tiny model makes all four cheap; on a GPU each 7B build takes a while.
    methods = args.methods or (",".join(METHODS) if args.device.type == "cpu" else "mma")
    args.methods = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        raise UserError(f"--methods {methods}: unknown {bad}; choose from {','.join(METHODS)}")
    args.dtype = args.dtype or default_dtype(args.device)
    args.threads = args.threads or (None if args.device.type == "cuda" else 1)  # see --help
    return args


# ---------------------------------------------------------------------------------------------------------------------
# The FLOP model: count the matmul weights each token passes through, by what backward does there

def _linear_cost(lin, grad_in: bool) -> float:
    """FLOPs per token through one (possibly LoRA-wrapped) linear: 2, 4 or 6 per weight (module docstring)."""
    w = lin.weight  # a tensor, or an NF4Weight (--quant nf4): a frozen module (no requires_grad) with a .shape
    cost = (2 + 2 * grad_in + 2 * getattr(w, "requires_grad", False)) * w.shape.numel()
    if isinstance(lin, MixLoRALinear):
        # Only the r chosen rank-1 factors of the pool of E touch a token: r (d_in + d_out) weights, not E (...).
        # The routers run once per sequence on the pooled input, so their cost is ignored (< 0.1% at 7B).
        cost += 6 * lin.router.rank * (lin.in_features + lin.out_features)
    elif isinstance(lin, LoRALinear):
        cost += 6 * (lin.lora_A.numel() + lin.lora_B.numel())
    return cost


def flop_model(model) -> dict:
    """Per-token and per-image FLOP coefficients of one training step, from the model's modules (the module docstring:
    gradients pass through every LLaMA block, and through CLIP only if something in it trains)."""
    llama, vis = model.llama, model.visual
    # An MM-Adapter per token: its three projections train; its router (one vector a sample) and biases are ignored.
    adapter_cost = lambda ad: 0.0 if ad is None else 6 * sum(m.weight.numel() for m in (ad.down, ad.up0, ad.up1))
    linears = [lin for layer in llama.layers for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv,
               layer.attention.wo, layer.feed_forward.w1, layer.feed_forward.w2, layer.feed_forward.w3)]
    linears.append(llama.output)  # the head is on the loss path; the input embedding is a lookup and not counted
    n_frozen = sum(lin.weight.shape.numel() for lin in linears if not getattr(lin.weight, "requires_grad", False))
    llama_mm = sum(_linear_cost(lin, grad_in=True) for lin in linears)  # exact FLOPs per token, LoRA factors included
    llama_mm += sum(adapter_cost(layer.adapter_attn) for layer in llama.layers)
    # Frozen weights cost exactly 4 each above, so the rest is 6 x the trainable weights a token touches: all of them
    # in full fine-tuning, the LoRA factors, MixLoRA's r chosen factors, or the MM-Adapters' projections.
    n_trainable = (llama_mm - 4 * n_frozen) / 6
    # CLIP per image: T_v = patches + CLS tokens (257 at ViT-L/14 and 224 px), every block, plus the neck.
    a = vis.args
    t_vis = (a.image_size // a.patch_size) ** 2 + 1
    vis_grad = any(p.requires_grad for p in vis.parameters())  # LoRA / MixLoRA: CLIP runs under no_grad (model.embed)
    per_tok = sum(_linear_cost(lin, vis_grad) + adapter_cost(b.adapter_attn)
                  for b in vis.blocks for lin in (b.attn.in_proj, b.attn.out_proj, b.mlp.c_fc, b.mlp.c_proj))
    attn = (12 if vis_grad else 4) * a.layers * a.width * t_vis  # QK^T and AV: 4 L d T forward, twice that backward
    patch = _linear_cost(vis.conv1, grad_in=False) * (t_vis - 1)  # the patch conv is a matmul; pixels need no gradient
    neck = sum(_linear_cost(fc, True) for fc in (model.adapter_proj.fc1, model.adapter_proj.fc2)) * a.n_tokens
    return {"n_frozen": n_frozen, "n_trainable": n_trainable, "llama_matmul": llama_mm,
            "attn_coef": 12 * llama.args.n_layers * llama.args.dim,  # x T gives the attention FLOPs per token
            "vision_per_image": t_vis * (per_tok + attn) + patch + neck}


def flops_per_token(fm: dict, T) -> float:
    """F(T) = 4 N_frozen + 6 N_trainable + 12 L d T, per processed LLaMA token in a sequence of length T."""
    return fm["llama_matmul"] + fm["attn_coef"] * T


def batch_flops(fm: dict, batch_len, batch_size: int, n_images) -> float:
    """One step: batch_size rows padded to batch_len (also numpy arrays of them), plus one CLIP pass per image."""
    return batch_size * batch_len * flops_per_token(fm, batch_len) + n_images * fm["vision_per_image"]


# ---------------------------------------------------------------------------------------------------------------------
# Trainable parameters by method at the real shapes

# The rows of the method comparison at the real shapes: LoRA at two ranks of the LLaVA scaling study.
METHOD_ROWS = [AdapterArgs(method="mma"), AdapterArgs(method="lora", lora_rank=8), AdapterArgs(method="lora"),
               AdapterArgs(method="mixlora"), AdapterArgs(method="full")]


def method_label(a: AdapterArgs) -> str:
    """The one name of a method's rows in every table: MMA (LaVIN), LoRA r=64, MixLoRA E=16 r=4, Full."""
    return {"mma": "MMA (LaVIN)", "lora": f"LoRA r={a.lora_rank}", "mixlora": f"MixLoRA E={a.mix_pool} r={a.mix_rank}",
            "full": "Full"}[a.method]


def param_table(sizes=("7B", "13B")) -> list[dict]:
    """Trainable parameters and fp32 checkpoint size by method for LaVIN at the real shapes, on the meta device."""
    rows = []
    for size in sizes:
        for a in METHOD_ROWS:
            trainable, total = count_params(build_lavin(size, "ViT-L/14", a, device="meta"))
            rows.append({"model": f"LaVIN-{size}", "method": method_label(a), "trainable": trainable, "total": total,
                         "share_%": 100 * trainable / total, "ckpt_MB": trainable * 4 / 1e6,
                         "paper": PAPER[size]["trainable"] if a.method == "mma" else None})
    return rows


def print_params(result: dict):
    print("\n== 1. Trainable parameters and checkpoint size (real 7B/13B shapes, meta device) ==")
    table(["model", "method", "trainable", "share", "ckpt (fp32)", "paper"],
          [[r["model"], r["method"], f"{r['trainable']:,}", f"{r['share_%']:.3f}%", f"{r['ckpt_MB']:.1f} MB",
            f"{r['paper']:,}" if r["paper"] else "-"] for r in result["params"]], left=2)
    exact = all(r["trainable"] == r["paper"] for r in result["params"] if r["paper"])
    paper = "; ".join(f"{size}: {c['trainable'] / 1e6:.1f}M params, {c['ckpt_mb']} MB checkpoint"
                      for size, c in PAPER.items())
    print(f"MMA counts equal the exact 3,781,296 / 5,390,080: {'yes' if exact else 'NO'}. Paper (Table 6): {paper}")


# ---------------------------------------------------------------------------------------------------------------------
# Parts 2-4: ScienceQA-shaped batches, building, timing, one row per method, and what the paper's hours imply

def sample_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """n training-sequence lengths (modality token + BOS ... EOS) drawn from data.SCIENCEQA_TRAIN_LENGTH_PERCENTILES by
    inverse-CDF sampling, linear between the tabulated percentiles; truncated at 512 like the official loader."""
    pct = sorted(SCIENCEQA_TRAIN_LENGTH_PERCENTILES)  # 0, 5, ..., 100
    lens = np.interp(rng.uniform(0, 100, n), pct, [SCIENCEQA_TRAIN_LENGTH_PERCENTILES[k] for k in pct])  # (n,)
    return np.minimum(np.round(lens), MAX_SEQ_LEN).astype(int)


def make_batch(lengths, pad_to, vocab: int, image_size: int, n_visual: int, device, gen: torch.Generator) -> dict:
    """A data.collate batch of random token ids: row b has lengths[b] positions counting the modality token, and starts
    with data.sequence_head (LLaMA's prefix shape); even rows carry an image and its n_visual placeholders (48.9% of
    ScienceQA does). The last quarter of a row is labelled (answer and EOS). pad_to: every row's length, as official."""
    # Token values do not change the cost of a step, only the shapes do: random ids keep 7B/13B free of any file.
    samples = []
    for b, n in enumerate(lengths):
        img = b % 2 == 0
        row = torch.randint(3, vocab, (int(n) - 1,), generator=gen)  # ids >= 3: never pad/placeholder 0, BOS or EOS
        head = sequence_head(1, row[1:1 + len(LLAMA_PREFIX_IDS[img])].tolist(), n_visual if img else 0)
        row[:len(head)] = torch.tensor(head)
        labels, vis_mask = torch.full_like(row, IGNORE), torch.zeros(len(row), dtype=torch.bool)
        ans = max(1, len(row) // 4)  # about a QCM-ALE answer (lecture + solution); the loss covers it and EOS
        labels[-ans:] = row[-ans:]
        vis_mask[len(head) - n_visual:len(head)] = img  # image rows: the placeholders model.embed fills
        samples.append(dict(tokens=row, labels=labels, vis_mask=vis_mask, has_image=img, pid=str(b),
                            image=torch.randn(3, image_size, image_size, generator=gen) if img else None))
    batch = collate(samples)  # (B, T - 1) tokens, labels and vis_mask; (N_img, 3, S, S) images
    for key, value in (("tokens", 0), ("labels", IGNORE), ("vis_mask", False)) if pad_to else ():
        batch[key] = F.pad(batch[key], (0, pad_to - 1 - batch[key].shape[1]), value=value)
    return {k: (v.to(device) if v is not None else None) for k, v in batch.items() if k != "pids"}


def training_set_flops(fm: dict, seq: str, batch_size: int, epochs: int, seed: int) -> tuple[float, float]:
    """(FLOPs, processed tokens) of `epochs` over ScienceQA's 12,726 samples: lengths drawn from the real distribution,
    shuffled into batches of batch_size, each padded to its longest sample (or all to 512)."""
    # One simulated epoch stands for all: a fresh shuffle changes who meets in a batch, not the expected padding.
    n_batches = math.ceil(SQA_TRAIN / batch_size)
    # The short last batch's missing rows count as padding (fewer than batch_size samples, negligible).
    lens = np.pad(sample_lengths(SQA_TRAIN, np.random.default_rng(seed)), (0, n_batches * batch_size - SQA_TRAIN))
    batch_len = (np.full(n_batches, MAX_SEQ_LEN) if seq == "pad512"  # the official loader pads all to max_seq_len
                 else lens.reshape(n_batches, batch_size).max(1))  # (n_batches,): data.collate pads to the longest
    total = batch_flops(fm, batch_len.astype(float), batch_size, 0).sum() + SQA_IMAGES * fm["vision_per_image"]
    return epochs * total, epochs * float(batch_size * batch_len.sum())


def build(size: str, vision: str, method: str, lora_rank: int, device, dtype, seed: int, quant=None):
    """A LaVIN with random weights (step time does not depend on their values), built as a 7B must be: on the meta
    device, cast there, materialised with to_empty and filled in place. Frozen weights take `dtype`; trainable ones
    stay fp32 masters under autocast, except in full FT, whose fp32 masters + AdamW state at 7B (~112 GB) fit no GPU."""
    model = build_lavin(size, vision, AdapterArgs(method=method, lora_rank=lora_rank), device="meta").to(dtype)
    for p in model.parameters():
        if p.requires_grad and method != "full":
            p.data = p.data.float()  # meta tensors: only the dtype changes, nothing is allocated
    model.to_empty(device=device)  # allocates every tensor, uninitialised, in the dtype chosen above
    gen = torch.Generator(device=device).manual_seed(seed)  # on the device: filling 7B values stays on the GPU
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:  # every matrix, adapters too (zero up-projections would make part 4 trivially equal)
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)  # RMSNorm / LayerNorm gains; biases
    model.llama.init_rope(device)  # non-persistent buffers: to_empty left them uninitialised
    return quantize_llama_(model) if quant == "nf4" else model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA calls return before the GPU finishes: time only finished work


def timed(fn, device, runs: int = 1) -> list[float]:
    """Seconds of each of `runs` calls of fn, from an idle device to a finished one."""
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def optimizer_step(loss: torch.Tensor, opt):  # the tail of every training step timed here, ours and theirs
    loss.backward()  # outside autocast, as recommended: backward ops reuse the forward's dtypes
    opt.step()
    opt.zero_grad(set_to_none=True)  # frees the gradients between steps, as train.py does


def measure_train(model, batch: dict, args) -> list[float]:
    """Seconds per training step (forward + backward + AdamW), warmup steps dropped."""
    model.train()  # adapter dropout on, as in training
    # The official recipe's optimizer (AdamW, betas 0.9/0.95); the fused CUDA kernel is lighter on memory for full FT.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            weight_decay=0.02, fused=args.device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model  # generation keeps the plain one (shapes change)
    amp, losses = inference_context(model), []  # bf16 frozen weights and fp32 adapters mix under autocast

    def step():
        with amp:
            loss = step_model(**batch)  # forward + the cross-entropy on labelled positions (model.LaVIN.forward)
        optimizer_step(loss, opt)
        losses.append(loss.detach())

    times = timed(step, args.device, args.warmup + args.steps)[args.warmup:]
    if not math.isfinite(losses[-1].item()):
        raise RuntimeError(f"non-finite loss {losses[-1].item()} in the benchmark step")
    return times


def measure_generate(model, args, merge: bool) -> dict:
    """Greedy batched generation of --gen_tokens per image prompt (a merged model serves one modality) with the KV
    cache: tokens/s of the whole call, decode tokens/s after the first token, prefill time, and the tokens."""
    model.eval()
    B, vocab, S = args.batch_size, model.llama.args.vocab_size, model.visual.args.image_size
    gen = torch.Generator().manual_seed(args.seed + 1)
    prefix = torch.randint(3, vocab, (len(LLAMA_PREFIX_IDS[True]),), generator=gen).tolist()  # LLaMA's prefix shape
    head = sequence_head(1, prefix, model.visual.args.n_tokens)  # data.encode_prompt's layout; equal lengths: no pads
    prompts = [head + torch.randint(3, vocab, (GEN_PROMPT_LEN,), generator=gen).tolist() for _ in range(B)]
    images = torch.randn(B, 3, S, S, generator=gen).to(args.device)  # (B, 3, S, S)
    amp, stamps, out = inference_context(model), [], []  # stamps per run: its start, the ends of prefill and each step
    if merge:
        with amp:  # bf16 frozen weights + fp32 adapters: merge's router pass needs autocast like any forward
            model.merge(1)

    def on_token(_):
        sync(args.device)
        stamps[-1].append(time.perf_counter())

    def run():
        stamps.append([time.perf_counter()])
        with amp:  # eos_id -1 never occurs, so every row produces exactly gen_tokens tokens
            out[:] = generate(model, prompts, [True] * B, images, max_new_tokens=args.gen_tokens, eos_id=-1,
                              on_token=on_token)
    total = statistics.median(timed(run, args.device, 3)[1:])  # the first run is a warm-up
    model.unmerge()
    prefill = statistics.median(r[1] - r[0] for r in stamps[1:])
    decode = statistics.median(r[-1] - r[1] for r in stamps[1:])
    # Each decode step reads every LLaMA weight once (the embedding: a lookup of B rows), at only ~B FLOPs per byte.
    w_bytes = sum(p.nbytes for n, p in model.llama.named_parameters() if "tok_emb" not in n) + sum(
        w.nbytes for w in model.llama.modules() if isinstance(w, NF4Weight))  # a 4-bit base's packed weights
    steps_s = (args.gen_tokens - 1) / decode if decode > 0 else float("nan")
    return {"tok_s": B * args.gen_tokens / total, "decode_tok_s": B * steps_s,
            "prefill_ms": 1e3 * prefill, "bandwidth_GBs": w_bytes * steps_s / 1e9, "tokens": out}


def dequantize_ms(model) -> float:
    """Median time to dequantize every 4-bit weight once (to --dtype): what each forward, and each backward, does."""
    weights = [m for m in model.modules() if isinstance(m, NF4Weight)]
    return 1e3 * statistics.median(timed(lambda: [w.dequantize() for w in weights], weights[0].device, 3))


def device_peak(args) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "--peak_tflops"
    if args.device.type != "cuda":
        return None, "CPU: unknown (pass --peak_tflops)"
    name = torch.cuda.get_device_name(args.device)
    if args.dtype != "bf16":
        return None, f"{name}: no lookup for {args.dtype} (pass --peak_tflops)"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{name}, dense bf16"
    return None, f"{name}: not in the peak table (pass --peak_tflops)"


def si(x: float | None, unit: str = "") -> str:
    """1.23e12 -> '1.23 T' + unit."""
    if x is None or not math.isfinite(x):
        return "-"
    prefixes = ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
    scale, prefix = next(((s, p) for s, p in prefixes if abs(x) >= s), (1, ""))
    return f"{x / scale:.3g} {prefix}{unit}".rstrip()


def table(header: list[str], rows: list[list], left: int = 1):
    """Print rows under header in columns as wide as their widest cell: the first `left` (labels) flush left."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print(" ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())


def bench_method(method: str, quant, args, batch: dict, useful_tokens: int, peak) -> dict:
    """Build one method's model (on a 4-bit base if quant), time its training step and its generation: one row."""
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = build(args.model, args.vision, method, args.lora_rank, args.device, dtype, args.seed, quant)
    fm, (trainable, total) = flop_model(model), count_params(model)
    B, T = batch["tokens"].shape[0], batch["tokens"].shape[1] + 1  # T counts the modality token
    n_img = 0 if batch["images"] is None else batch["images"].shape[0]
    step_flops = batch_flops(fm, T, B, n_img)  # the work the step must do; the achieved rate divides this by time
    times = measure_train(model, batch, args)
    t = statistics.median(times)  # the median shrugs off a step that a neighbour process or a GC pause slowed
    if args.device.type == "cuda":
        mem, mem_kind = torch.cuda.max_memory_allocated(args.device) / 2**30, "GiB allocated (CUDA)"
    else:  # the process's peak resident set, which cannot be reset, so it only grows from row to row. Linux: KiB
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        mem, mem_kind = rss / 2**30, "GiB process peak RSS so far (CPU)"
    label = method_label(model.adapter_args) + ("/NF4" if quant else "")
    row = {"method": method, "quant": quant, "label": label, "trainable": trainable,
           "total": total, "step_ms": 1e3 * t, "step_ms_all": [1e3 * x for x in times], "tokens_s": B * T / t,
           "useful_tokens_s": useful_tokens / t, "samples_s": B / t, "peak_mem_gb": mem, "peak_mem_kind": mem_kind,
           "frozen_gb": sum(x.nbytes for x in [*model.parameters(), *model.buffers()] if not x.requires_grad) / 1e9,
           "dequant_ms": dequantize_ms(model) if quant else None, "flops_per_token": flops_per_token(fm, T),
           "flops_per_image": fm["vision_per_image"], "flops_per_step": step_flops, "flops_per_sample": step_flops / B,
           "achieved_flops_s": step_flops / t, "mfu": step_flops / t / peak if peak else None, "flop_model": fm}
    # Part 3: est. time = the run's FLOPs / (achieved FLOP/s x N); floor = its FLOPs / (peak x N), i.e. at 100% MFU.
    row["extrapolation"] = {}
    for seq in ("scienceqa", "pad512"):
        flops, toks = training_set_flops(fm, seq, args.batch_size, args.epochs, args.seed)
        row["extrapolation"][seq] = {"flops": flops, "tokens": toks, "seconds": flops / (step_flops / t * args.gpus),
                                     "floor_seconds": flops / (args.gpus * peak) if peak else None}
    # Part 4: generation, unmerged and (where the updates are static) merged into the weights.
    runs = {"unmerged": measure_generate(model, args, merge=False),
            "merged": measure_generate(model, args, merge=True) if method in ("mma", "lora") else None}
    gen = row["generation"] = {k: v and {x: y for x, y in v.items() if x != "tokens"} for k, v in runs.items()}
    # Merging is exact in real arithmetic, but bf16 folds round differently and random weights give nearly tied logits.
    m, u = runs["merged"] and runs["merged"]["tokens"], runs["unmerged"]["tokens"]
    same = [x == y for rm, ru in zip(m or [], u) for x, y in zip(rm, ru)]  # token by token
    gen["agree"], gen["match"] = (m == u, sum(same) / len(same)) if m else (None, None)
    return row


def paper_check(seed: int) -> list[dict]:
    """Device-independent: the FLOPs of LaVIN's ScienceQA run at the real shapes, the floor they set on the paper's 8
    A100s (312 TFLOP/s each; the fp16 peak is the same), and the utilisation the paper's wall time implies."""
    rows = []
    for size, claim in PAPER.items():
        fm = flop_model(build_lavin(size, "ViT-L/14", AdapterArgs(), device="meta"))
        peak = dict(PEAK_BF16_TFLOPS)[claim["gpu"]] * 1e12 * claim["gpus"]
        for seq in ("pad512", "scienceqa"):
            flops, _ = training_set_flops(fm, seq, 4, 20, seed)  # 20 epochs and 4 per GPU, as the paper's runs
            rows.append({"model": f"LaVIN-{size}", "seq": seq, "flops": flops, "floor_seconds": flops / peak,
                         "paper_hours": claim["hours"], "implied_mfu": flops / (claim["hours"] * 3600 * peak),
                         "gpus": f"{claim['gpus']}x {claim['gpu']}"})
    return rows


def print_train(result: dict, args, rows: list[dict], T: int):
    print(f"\n== 2. Training step: LaVIN-{args.model} + {args.vision} on {result['device']}, {args.dtype}, batch "
          f"{args.batch_size} x {T} tokens (row lengths {result['batch']['lengths']}, --seq {args.seq}), "
          f"{result['batch']['images']} images; median of {args.steps} steps after {args.warmup} warm-up ==")
    # step: the median; tok/s: B x T / step, pads included; FLOP/step: B T F(T) + CLIP per image; MFU: FLOP/s / peak
    cells = [[r["label"], f"{r['trainable']:,}", f"{r['step_ms']:.1f}", f"{r['tokens_s']:.0f}",
              f"{r['useful_tokens_s']:.0f}", f"{r['samples_s']:.2f}", f"{r['peak_mem_gb']:.2f}",
              si(r["flops_per_token"]), si(r["flops_per_step"]), si(r["achieved_flops_s"]),
              "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"] for r in rows]
    table(["method", "trainable", "step ms", "tok/s", "useful", "smp/s", "peak GiB", "FLOP/tok", "FLOP/step", "FLOP/s",
           "MFU"], cells)
    print("".join(f"{r['method']}{'/NF4' if r['quant'] else ''}: {r['error']}\n" for r in result["train"]
                  if "error" in r), end="")
    if rows:
        print(f"  tok/s counts pads (the kernels compute them), useful does not. Peak: {rows[0]['peak_mem_kind']}")
    if c := PAPER.get(args.model):
        print(f"  Paper: {c['mem_gb']} GB peak for LaVIN-{args.model} MMA ({c['gpus']}x {c['gpu']}, 4 per GPU, fp16)")
    print(f"  FLOPs per token at T={T}: 4 N_frozen + 6 N_trainable + 12 L d T (MixLoRA: its r chosen factors), plus "
          f"CLIP and the neck per image:")
    w = max((len(r["label"]) for r in rows), default=0)
    for r, fm in ((r, r["flop_model"]) for r in rows):
        print(f"    {r['label']:<{w}} 4 x {si(fm['n_frozen'])} + 6 x {si(fm['n_trainable'])} + {si(fm['attn_coef'])} x "
              f"{T} = {si(r['flops_per_token'], 'FLOP/token')}; {si(fm['vision_per_image'], 'FLOP/image')}")


def print_extrapolation(result: dict, args, rows: list[dict]):
    ls = result["length_summary"]
    print(f"\n== 3. Extrapolated ScienceQA training: {SQA_TRAIN:,} samples x {args.epochs} epochs on {args.gpus} "
          f"devices like this one, batch {args.batch_size} per device, at each method's FLOP/s; lengths: median "
          f"{ls['median']:.0f}, p90 {ls['p90']:.0f}, {ls['truncated_%']:.1f}% truncated at {MAX_SEQ_LEN} ==")
    if args.model == "tiny":
        print("  (the tiny model: how long *this* toy would take; run --model 7B on a GPU for LaVIN-7B)")
    paper = PAPER.get(args.model)
    hours = lambda s: "-" if s is None or not math.isfinite(s) else (f"{s / 3600:.2f} h" if s >= 360 else f"{s:.0f} s")
    regimes = {"scienceqa": "real lengths, pad to batch max", "pad512": "padded to 512 (official)"}
    table(["method", "lengths", "FLOPs", "est. time", "floor @peak", "paper"],
          [[r["label"], regimes[seq] + ("*" if seq == args.seq else ""), si(e["flops"]), hours(e["seconds"]),
            hours(e["floor_seconds"]), f"{paper['hours']} h on {paper['gpus']}x {paper['gpu']}" if paper else "n/a"]
           for r in rows for seq, e in r["extrapolation"].items()], left=2)
    print("  * = the measured batch's regime. The paper's times imply (MMA, 20 epochs, 4 per GPU, FLOPs as above):")
    for p in result["paper_check"]:
        print(f"    {p['model']:<10} {p['seq']:<10} {si(p['flops'], 'FLOP'):>10}: floor on {p['gpus']} "
              f"{hours(p['floor_seconds'])}, paper {p['paper_hours']} h -> {100 * p['implied_mfu']:.0f}% MFU")


def print_generation(args, rows: list[dict]):
    print(f"\n== 4. Generation: {args.batch_size} image prompts of {GEN_PROMPT_LEN} tokens after the head, "
          f"{args.gen_tokens} new tokens each, greedy, KV cache, median of 2 runs after 1 warm-up ==")
    cells, cols = [], (("tok_s", ".1f"), ("decode_tok_s", ".0f"), ("prefill_ms", ".1f"))
    for r in rows:
        g = r["generation"]
        u, m = g["unmerged"], g["merged"]  # merged is None where nothing can be folded
        same = "n/a" if g["agree"] is None else "yes" if g["agree"] else f"{100 * g['match']:.0f}% equal"
        cells.append([r["label"], *(format(d[k], f) if d else "n/a" for k, f in cols for d in (u, m)),
                      f"{u['bandwidth_GBs']:.2f}", same])
    table(["method", "tok/s u", "m", "decode tok/s u", "m", "prefill ms u", "m", "weights GB/s u", "same tokens"],
          cells)
    print("  u: unmerged adapters; m: merged (MMA folds its LLaMA-side adapters into q/k/v for the image modality, "
          "LoRA adds B A to W; MixLoRA routes per input and full FT has nothing to fold). tok/s includes prefill, "
          "decode does not; GB/s = LLaMA weight bytes x decode steps/s. bf16 rounding of folded weights can change "
          "greedy tokens on random, nearly tied logits; fp32 agrees exactly.")


# ---------------------------------------------------------------------------------------------------------------------
# Part 5, a 4-bit base (QLoRA, LaVIN-lite): the frozen bytes at the real shapes, and its measured step beside

def frozen_bytes(size: str) -> dict:
    """Exact bytes of LaVIN-{size}'s frozen weights (meta device): the LLaMA block linears, which --quant nf4 stores in
    4 bits, in fp32, bf16, NF4 and NF4+DQ; the rest (embeddings, norms, head, CLIP), left in the compute dtype: bf16."""
    model = build_lavin(size, "ViT-L/14", device="meta")
    shapes = [getattr(getattr(layer, p), a).weight.shape for layer in model.llama.layers
              for p, a in (t.split(".") for t in LORA_TARGETS.values())]
    n = sum(math.prod(sh) for sh in shapes)
    rest = sum(p.numel() for p in model.parameters() if not p.requires_grad) - n
    return {"model": f"LaVIN-{size}", "fp32": 4 * n, "bf16": 2 * n, "rest_bf16": 2 * rest,
            "nf4": sum(nf4_nbytes(sh, 64, False) for sh in shapes), "nf4_dq": sum(nf4_nbytes(sh) for sh in shapes)}


def print_nf4(result: dict, args):
    print("\n== 5. A 4-bit base (--quant nf4: QLoRA, LaVIN-lite), exact frozen bytes at the real shapes ==")
    gb = lambda x: f"{x / 1e9:.2f} GB"
    table(["model", "block linears fp32", "bf16", "NF4", "NF4+DQ", "bits/w", "rest (bf16)", "whole base, NF4+DQ"],
          [[r["model"], gb(r["fp32"]), gb(r["bf16"]), gb(r["nf4"]), gb(r["nf4_dq"]),
            f"{16 * r['nf4_dq'] / r['bf16']:.3f}", gb(r["rest_bf16"]), gb(r["nf4_dq"] + r["rest_bf16"])]
           for r in result["nf4_bytes"]])
    print("  anchors: LaVIN-7B-lite trains in 9 GB and LaVIN-13B-lite in 14-15 GB on one GPU (official README); "
          "torchtune's Llama-2-7B QLoRA peaks at 9.29 GB against 15.57 GB for LoRA. Their totals add activations, "
          "adapters and optimizer state to the base.")
    pairs = [(r, q) for r in result["train"] for q in result["train"] if "error" not in r and "error" not in q
             and r["method"] == q["method"] and r["quant"] is None and q["quant"]]
    if not pairs:
        print("  (--quant nf4 also measures each adapter method on a 4-bit base, beside the --dtype one)")
        return
    peak = lambda r: f"{r['peak_mem_gb']:.2f}" if args.device.type == "cuda" else "n/a (CPU)"
    print(f"measured here, LaVIN-{args.model}, batch as part 2: {args.dtype} base against a 4-bit one")
    table(["method", f"{args.dtype} step ms", "nf4 step ms", "ratio", f"frozen GB {args.dtype}", "frozen GB nf4",
           f"peak GB {args.dtype}", "peak GB nf4", "dequant once ms"],
          [[r["method"], f"{r['step_ms']:.1f}", f"{q['step_ms']:.1f}", f"{q['step_ms'] / r['step_ms']:.2f}",
            f"{r['frozen_gb']:.4f}", f"{q['frozen_gb']:.4f}", peak(r), peak(q), f"{q['dequant_ms']:.1f}"]
           for r, q in pairs])
    print("  a step dequantizes every 4-bit weight twice, in the forward and for the input gradient in the backward "
          "(adapters._NF4Matmul); dequant once = one pass over all of them, one gather and one multiply per weight.")


# ---------------------------------------------------------------------------------------------------------------------
# --compare: side by side with the real transformers LlamaForCausalLM and a peft LoRA (imported only here, neither is a
# dependency), holding the same weights as ours (compare_pair); one process, the same threads, interleaved turns.

# Two shapes of the same blocks: at vocab 32,000 the head is 39% of the matmul weights, so computing it only where a
# label is (model.LaVIN.forward) dominates the training gain; at 2,000 it is 4% (LLaMA-7B: 2%), leaving the blocks.
COMPARE_SHAPES = {f"vocab {v}": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                      intermediate_size=1408, vocab_size=v) for v in (32000, 2000)}
COMPARE_LORA = AdapterArgs(method="lora", lora_rank=8)  # alpha 16, dropout 0.05, all seven linears, as peft's below


def compare_pair(cfg: dict, folder: str, seed: int):
    """(ours: a LaVIN with LoRA on the LLaMA transformers wrote, theirs: that LlamaForCausalLM under a peft LoRA)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **cfg, rms_norm_eps=1e-5, max_position_embeddings=512, bos_token_id=1, eos_token_id=None, pad_token_id=0))
    hf.save_pretrained(folder)
    a = COMPARE_LORA
    targets = [f"{x}_proj" for x in ("q", "k", "v", "o", "gate", "up", "down")]
    theirs = get_peft_model(hf, LoraConfig(r=a.lora_rank, lora_alpha=2 * a.lora_rank, lora_dropout=a.lora_dropout,
                                           target_modules=targets))
    ours = LaVIN(load_llama(folder), VisionTransformer(VISION_PRESETS["tiny"]), a)
    mine = dict(ours.llama.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.02)  # peft starts B at zero; random, so the updates are not trivially zero
            if ".lora_" in name:
                ours_name, to_ours = peft_twin(name, ours.llama.args)
                mine[ours_name].copy_(to_ours(p))
    return ours, theirs


def peft_twin(name: str, args) -> tuple:
    """A peft factor's name -> (our name for it, the map of its values to ours, for weights and gradients alike):
    ...layers.0.self_attn.q_proj.lora_B.default.weight -> layers.0.attention.wq.lora_B, unpermuted like load_llama."""
    stem, factor = name.removeprefix("base_model.model.").split(".lora_")
    meta = hf_to_meta_name(stem + ".weight").removesuffix(".weight")
    heads = {"wq": args.n_heads, "wk": args.n_kv_heads or args.n_heads}.get(meta.split(".")[-1])
    permuted = heads is not None and factor[0] == "B"
    return f"{meta}.lora_{factor[0]}", (lambda t: unpermute(t, heads)) if permuted else (lambda t: t)


def race(ours, theirs, args) -> dict:
    """Median times of ours and theirs over --steps runs after --warmup, interleaved (turns alternate who goes first,
    so a neighbour's load hits both); ratio < 1: ours is faster."""
    times = ([], [])
    for i in range(args.warmup + args.steps):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            t = timed((ours, theirs)[j], args.device)
            times[j].extend(t if i >= args.warmup else [])
    o, r = (statistics.median(t) for t in times)
    pair = [a / b for a, b in zip(*times)]
    return {"ours_ms": 1e3 * o, "theirs_ms": 1e3 * r, "ratio": o / r, "ratio_min": min(pair), "ratio_max": max(pair)}


def compare_shape(cfg: dict, args, batch, prompt: int, new: int) -> dict:
    """The LoRA training step with labels on every position and on the answer only, then greedy generation of the
    merged models at batch 1 and 8: {"rows": {row: race result + agreement}, and what their side ran with}."""
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = compare_pair(cfg, folder, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    bos_and = lambda n, t: torch.cat([torch.ones(n, 1, dtype=torch.long),  # BOS, then random ids >= 3
                                      torch.randint(3, cfg["vocab_size"], (n, t - 1), generator=g)], 1)
    B, T = batch
    ids = bos_and(B, T)
    # transformers shifts: nothing predicts the first token (ours would, from the modality token); answer: last quarter
    every, answer = (ids.masked_fill(torch.arange(T) < k, IGNORE) for k in (1, 3 * T // 4))
    text = torch.zeros(B, dtype=torch.long)
    # lr 0: AdamW does all its work, but the weights stay equal (each side draws its own dropout masks, so their
    # gradients differ), and the losses and tokens compared afterwards still come from the same weights.
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.0) for m in (ours, theirs)]
    rows = {}
    for name, labels in (("train, every label", every), ("train, answer only", answer)):
        ours.eval(), theirs.eval()
        with torch.no_grad():  # same weights, same loss: dropout off
            gap = abs(ours(ids, text, labels=labels).item() - theirs(input_ids=ids, labels=labels).loss.item())
        ours.train(), theirs.train()
        rows[name] = race(lambda: optimizer_step(ours(ids, text, labels=labels), opts[0]),
                          lambda: optimizer_step(theirs(input_ids=ids, labels=labels).loss, opts[1]), args)
        rows[name]["same"] = f"loss gap {gap:.0e}"
    ours.eval()
    ours.merge(0)  # generation serves merged models: ours as sample.py does, theirs by peft's merge_and_unload
    hf = theirs.merge_and_unload().eval()
    with torch.no_grad():
        for b in (1, 8):
            p = bos_and(b, prompt)
            mine = lambda: generate(ours, p.tolist(), [False] * b, None, max_new_tokens=new, eos_id=-1)
            their = lambda: hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=new, do_sample=False,
                                        return_dict_in_generate=True)
            out = their()
            same = "same tokens" if mine() == out.sequences[:, prompt:].tolist() else "TOKENS DIFFER"
            rows[f"generate, batch {b}"] = race(mine, their, args) | {"same": same}
    head = ours.llama.output.weight.numel() / flop_model(ours)["n_frozen"]  # n_frozen: the block linears and the head
    return {"rows": rows, "attention": hf.config._attn_implementation, "cache": type(out.past_key_values).__name__,
            "head_%": 100 * head}


def compare(args, shapes=COMPARE_SHAPES, batch=(4, 256), prompt=32, new=128) -> dict:
    """Ours against transformers + peft at each shape: ratio table ours / theirs, medians of interleaved runs."""
    try:
        import peft
        import transformers
    except ImportError:
        raise UserError("--compare races the real transformers + peft, which are not installed here: "
                        "pip install transformers peft") from None
    transformers.logging.set_verbosity_error()  # their generate's notes on absent generation settings
    transformers.logging.disable_progress_bar()  # and save_pretrained's
    result = {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
              "threads": torch.get_num_threads(),
              "shapes": {name: compare_shape(cfg, args, batch, prompt, new) for name, cfg in shapes.items()}}
    first = next(iter(result["shapes"].values()))
    print(f"== Ours vs transformers {result['transformers']} LlamaForCausalLM + peft {result['peft']} LoRA "
          f"(attention {first['attention']}, generate's cache {first['cache']}), torch {torch.__version__}, "
          f"{args.device}, {result['threads']} threads, fp32; same weights; LoRA r={COMPARE_LORA.lora_rank} on all "
          f"seven linears; train {batch[0]} x {batch[1]} tokens, generate {prompt} + {new} tokens greedy ==")
    table(["shape", "", "ours ms", "theirs ms", "ours/theirs", "pairwise", "agree"],
          [[f"{name} (head {s['head_%']:.0f}%)", row, f"{r['ours_ms']:.0f}", f"{r['theirs_ms']:.0f}",
            f"{r['ratio']:.2f}", f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}", r["same"]]
           for name, s in result["shapes"].items() for row, r in s["rows"].items()], left=2)
    print(f"  medians of {args.steps} interleaved runs after {args.warmup} warm-up; ours/theirs < 1: ours is faster; "
          f"head: the vocabulary head's share of the matmul weights")
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Peak host memory of loading a Hugging Face checkpoint: python bench.py --load_memory (on its own; Linux)

def _rss(field: str = "VmRSS") -> int:
    """Resident memory now (VmRSS) or its peak (VmHWM), in bytes (Linux)."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _measure_load(folder: str, dtype) -> dict:
    """In a fresh process, so that nothing of the writing lingers in its memory: load, then read every weight once (as
    a real run does: every page becomes resident); the peak is the kernel's high-water mark of resident memory."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the resident memory now (Linux >= 4.0)
    base, t0 = _rss(), time.perf_counter()
    model = load_llama(folder, dtype=dtype)
    after_load, seconds = _rss() - base, time.perf_counter() - t0
    sum(float(p.sum()) for p in model.parameters())  # reads every page of every weight, without a copy
    peak, weights = _rss("VmHWM") - base, sum(p.nbytes for p in model.parameters())
    return {"dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."), "weights_GB": weights / 1e9,
            "load_s": seconds, "rss_after_load_GB": after_load / 1e9, "peak_rss_GB": peak / 1e9,
            "peak_over_one_copy": peak / weights}


def load_memory(dim=2048, n_layers=8, ffn=5632, vocab=32000, shards=4) -> list[dict]:
    """Write a random LLaMA (0.54B parameters, 1.08 GB in bf16: TinyLlama's widths with multi-head attention, so that
    q and k, which load_llama must permute and so copy, are as large a share as in LLaMA-7B) as a sharded HF folder;
    load it to bf16 and to fp32, each in a fresh process: the peak growth of resident memory against one copy."""
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for p in (f"model.layers.{i}." for i in range(n_layers)):
        shapes |= {p + f"self_attn.{x}_proj.weight": (dim, dim) for x in "qkvo"} | {
            p + "mlp.gate_proj.weight": (ffn, dim), p + "mlp.up_proj.weight": (ffn, dim), p + "mlp.down_proj.weight":
            (dim, ffn), p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,)}
    with tempfile.TemporaryDirectory() as folder:
        names, weight_map = list(shapes), {}
        for s in range(shards):  # one shard in memory at a time; a layer's tensors straddle shards, as they can
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: torch.randn(shapes[k], dtype=torch.bfloat16) * 0.02 for k in names[s::shards]}
            save_safetensors(part, f"{folder}/{file}", metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, file)
        Path(folder, "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        Path(folder, "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim, "num_hidden_layers":
            n_layers, "num_attention_heads": dim // 128, "intermediate_size": ffn, "rms_norm_eps": 1e-5,
            "vocab_size": vocab, "hidden_act": "silu"}))
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            results = [pool.apply(_measure_load, (folder, dtype)) for dtype in (None, torch.float32)]
    n = sum(math.prod(s) for s in shapes.values())
    print(f"load_llama on a random {shards}-shard Hugging Face LLaMA ({n / 1e9:.2f}B parameters in bf16 safetensors), "
          f"then every weight read once; peak growth of resident memory:")
    for r in results:
        print(f"  to {r['dtype']:<9} {r['weights_GB']:.2f} GB of weights, loaded in {r['load_s']:.1f} s, "
              f"{r['rss_after_load_GB']:.2f} GB resident after load_llama: peak {r['peak_rss_GB']:.2f} GB = "
              f"{r['peak_over_one_copy']:.2f} x one copy")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# The run

def main(argv=None) -> dict:
    args = get_args(argv)
    if args.load_memory:
        return {"load_memory": load_memory()}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        return compare(args)
    torch.manual_seed(args.seed)  # the adapters' dropout masks
    peak, peak_src = device_peak(args)
    dev_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    print(f"device: {dev_name} ({args.dtype}, CPU threads: {torch.get_num_threads()}); peak: {si(peak, 'FLOP/s')} "
          f"[{peak_src}]; torch {torch.__version__}")
    result = {"device": dev_name, "dtype": args.dtype, "peak_flops": peak, "peak_source": peak_src,
              "args": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}}
    result["params"] = param_table()
    print_params(result)
    # Parts 2-4: the same batch for every method, drawn once from ScienceQA's lengths
    lengths = sample_lengths(args.batch_size, np.random.default_rng(args.seed))  # (B,) real lengths, <= 512
    vis = VISION_PRESETS[args.vision]
    batch = make_batch(lengths, MAX_SEQ_LEN if args.seq == "pad512" else None, LLAMA_PRESETS[args.model].vocab_size,
                       vis.image_size, vis.n_tokens, args.device, torch.Generator().manual_seed(args.seed))
    T = batch["tokens"].shape[1] + 1  # counts the modality token
    result["batch"] = {"lengths": lengths.tolist(), "padded_to": T, "images": int(batch["has_image"].sum())}
    result["train"] = []  # with --quant nf4 each adapter method again on a 4-bit base (full FT cannot train one)
    for quant in [None, "nf4"] if args.quant else [None]:
        for method in [m for m in args.methods if not (quant and m == "full")]:
            try:
                result["train"].append(bench_method(method, quant, args, batch, int(lengths.sum()), peak))
            except torch.cuda.OutOfMemoryError as e:  # e.g. full fine-tuning of 13B on one 80 GB GPU: the others go on
                error = f"out of memory: {str(e).splitlines()[0]}"
                result["train"].append({"method": method, "quant": quant, "error": error})
            gc.collect()  # the failed or finished model goes before the next is built
            torch.cuda.empty_cache()  # a no-op without CUDA
    result["paper_check"] = paper_check(args.seed)  # analytic: 7B/13B on the paper's 8 A100s, whatever this device
    sqa = sample_lengths(SQA_TRAIN, np.random.default_rng(args.seed))  # (N,) the simulated training set
    result["length_summary"] = {"median": float(np.median(sqa)), "p90": float(np.percentile(sqa, 90)),
                                "truncated_%": 100 * float((sqa >= MAX_SEQ_LEN).mean())}
    result["nf4_bytes"] = [frozen_bytes(size) for size in PAPER]
    rows = [r for r in result["train"] if "error" not in r]
    print_train(result, args, rows, T)
    print_extrapolation(result, args, rows)
    print_generation(args, rows)
    print_nf4(result, args)
    text = json.dumps(result | {"train": [{k: v for k, v in r.items() if k != "flop_model"} for r in result["train"]]})
    print("\n== JSON ==\n" + text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    cli(main)
