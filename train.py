"""
Train LaVIN: Mixture-of-Modality Adaptation of a frozen LLaMA and a frozen CLIP ViT (Luo et al., NeurIPS 2023,
§3.3-3.4 and §4.2; luogen1996/LaVIN train.py, engine.py, util/lr_sched.py; spec lavin-spec.md §5). One file for a
laptop CPU, one GPU, torchrun DDP and FSDP2, one node or many.

    python train.py                                  # the quick start: generated quiz, tiny model, CPU, ~10 min
    python train.py --llama_dir /data/LLaMA/7B --tokenizer /data/LLaMA/tokenizer.model \\
        --clip_path /data/clip/ViT-L-14.pt --data_dir /data/ScienceQA --micro_batch 4    # one GPU, accumulates to 32
    torchrun --standalone --nproc_per_node 8 train.py --llama_dir ... --clip_path ... --data_dir ...   # DDP
    torchrun --standalone --nproc_per_node 8 train.py ... --fsdp                                      # FSDP2
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py ...  # two nodes
    python train.py --resume out/ckpt.pt             # continue exactly where a run stopped

Recipe (the official one for real runs, spec §5.1): global batch 32, lr = blr x global batch / 256 = 9e-3 x 32/256
= 1.125e-3, AdamW betas (0.9, 0.95), weight decay 0.02 on matrices only, 2 warmup epochs then a half-cycle cosine
updated every optimizer step, 20 epochs, max_seq_len 512, tau = 10 (7B) / 5 (13B). Deliberate departures, each
commented where it happens: batches padded to their longest sample instead of 512; the loss normalised by the
labelled tokens of the whole optimizer step across ranks (`--loss_norm official` restores the per-micro-batch mean,
one cause of the official code's GPU-count dependence, spec §11); no accumulated gradient is thrown away at the end of
an epoch (the official loop zeroes the last micro-batches' gradients, §11 quirk 16): the global batch stays fixed by
dropping the remainder of the *shuffled* epoch before it is cut into steps, as DistributedSampler's drop_last does.

The quick start: with no --llama_dir / --clip_path there is nothing pretrained to adapt, so it first pre-trains tiny
stand-ins for the backbones on the generated quiz (a language model on its train text, and a CLIP-style contrastive
image-caption model on its train images), saves them in Meta's and OpenAI's layouts, and loads them back through the
same loaders real weights use. Then the MMA stage trains the adapters only, exactly as with real weights.
"""

import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
from adapters import METHODS, AdapterArgs, load_trainable, trainable_state_dict
from clip_vit import VISION_PRESETS, VisionTransformer, to_openai_state_dict
from model import LLAMA_PRESETS, LaVIN, ModelArgs, Transformer, count_params, load_lavin

QUIZ_DIR = Path("quiz")  # the generated default data (git-ignored)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("base weights (leave all empty for the quick start's pre-trained tiny stand-ins)")
    g.add_argument("--llama_dir", help="LLaMA folder: Meta's (params.json + consolidated.*.pth) or Hugging Face's "
                                       "(config.json + model*.safetensors)")
    g.add_argument("--tokenizer", help="SentencePiece tokenizer.model or a folder holding it (default: LLaMA's, in "
                                       "or next to --llama_dir)")
    g.add_argument("--clip_path", help="OpenAI CLIP ViT-L-14.pt (TorchScript archive), a vision state dict, or a "
                                       "Hugging Face CLIP folder or .safetensors file")
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", help="ScienceQA root: problems.json, pid_splits.json, images/ (default: the quiz)")
    g.add_argument("--instruction_json", help="LLaVA-Instruct / Alpaca JSON for the chatbot setting instead of ScienceQA")
    g.add_argument("--image_dir", help="image folder for --instruction_json (e.g. COCO train2014)")
    g.add_argument("--prompt_format", default="QCM-ALE", help="ScienceQA prompt format (the scripts' QCM-ALE)")
    g.add_argument("--norm", default="imagenet", choices=["imagenet", "clip"], help="image normalisation (spec §12c)")
    g.add_argument("--max_seq_len", type=int, default=512)
    g.add_argument("--group_by_length", action="store_true", help="batch similar lengths together (fewer pads)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="mma", choices=METHODS)
    g.add_argument("--tau", type=float, default=None, help="router temperature (default: 10 for 7B, 5 for 13B, as the "
                   "official scripts)")
    g.add_argument("--adapter_dim", type=int, default=8)
    g.add_argument("--dropout", type=float, default=None,
                   help="adapter dropout (default: 0.1 in MM-Adapters as official, 0.05 in LoRA/MixLoRA as LLaVA)")
    g.add_argument("--lora_rank", type=int, default=64)
    g.add_argument("--mix_pool", type=int, default=16)
    g.add_argument("--mix_rank", type=int, default=4)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch_size", type=int, default=32, help="global batch: micro_batch x accumulation x ranks")
    g.add_argument("--micro_batch", type=int, default=4, help="samples per rank per forward")
    g.add_argument("--blr", type=float, default=9e-3, help="base lr; actual lr = blr x batch_size / 256")
    g.add_argument("--weight_decay", type=float, default=0.02)
    g.add_argument("--warmup_epochs", type=float, default=2.0)
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument("--loss_norm", default="global", choices=["global", "official"],
                   help="global: mean over the labelled tokens of the whole step on all ranks; official: per micro-batch")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (tests, smoke runs)")
    g = p.add_argument_group("system")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="compute dtype: bf16 autocast on GPU (default), fp32 on CPU; fp16 uses a loss scaler")
    g.add_argument("--fsdp", action="store_true", help="shard the frozen backbones with FSDP2 (fully_shard)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing of every LLaMA block")
    g.add_argument("--compile", action="store_true", help="torch.compile every LLaMA block")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    g.add_argument("--out_dir", default="out")
    g.add_argument("--resume", help="checkpoint to continue from (its flags are used, except --max_steps/--out_dir)")
    g.add_argument("--save_every", type=int, default=0, help="also checkpoint every N optimizer steps")
    g.add_argument("--eval_every", type=int, default=0, help="evaluate every N epochs (0: only at the end)")
    g.add_argument("--eval_split", default="test")
    g.add_argument("--eval_max_new_tokens", type=int, default=64)
    g.add_argument("--no_eval", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # set when the quick start is in force
    args = p.parse_args(argv)
    if args.llama_dir is None and args.clip_path is None and args.data_dir is None and args.instruction_json is None:
        quick_start_defaults(args, p)
    return args


# The quick start's own small settings: they replace the real-run defaults above only where the user gave no flag.
QUICK = dict(epochs=10, batch_size=32, micro_batch=32, blr=2e-2, warmup_epochs=0.5, max_seq_len=160, eval_split="test",
             eval_max_new_tokens=24, group_by_length=True, weight_decay=0.0, prompt_format="QCM-EA")


def quick_start_defaults(args, parser):
    args.quick = True
    for k, v in QUICK.items():
        if getattr(args, k) == parser.get_default(k):
            setattr(args, k, v)


# =====================================================================================================================
# Distributed set-up: one code path for CPU, one GPU and torchrun

def setup_distributed():
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them we are a single process. NCCL on GPUs, gloo on CPU.
    Returns (rank, local_rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, local_rank, world, device


def all_sum(x: float, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


# =====================================================================================================================
# Checkpoints: trainable tensors + optimizer + schedule + RNG, written atomically

def save_checkpoint(path, obj: dict):
    """Write to a temporary file, flush it to disk, then rename over the old one: the rename is atomic, so a run killed
    mid-save leaves the previous checkpoint intact, never a half-written file in its place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (train.py writes {{out_dir}}/ckpt.pt; "
                                f"run `python train.py` first for the quick start's)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, a pickle we do not trust...
        raise ValueError(f"checkpoint {path} is corrupt or truncated and cannot be read ({type(e).__name__}: {e}); "
                         f"use an earlier checkpoint or start again") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this project (no 'model' entry); an official LaVIN adapter "
                         f"file goes to sample.py --adapter, which converts its keys")
    return ckpt


def build_from_checkpoint(ckpt: dict, device, dtype=None):
    """Rebuild the trained model from what a checkpoint records: base weights from their paths, the adapters from it."""
    a = ckpt["args"]
    cfg = ckpt["config"]
    model = load_lavin(a["llama_dir"], a["clip_path"], AdapterArgs(**cfg["adapter"]), device, dtype,
                       cfg["llama"]["max_seq_len"], cfg["neck_hidden"])
    load_trainable(model, ckpt["model"])
    return model, data.Tokenizer(a["tokenizer"])


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# =====================================================================================================================
# The quick start's stand-ins for downloading LLaMA and CLIP

def pretrain_llama_standin(quiz: Path, tok: data.Tokenizer, out: Path, fmt: str, steps: int = 2500,
                           seed: int = 0) -> Path:
    """
    Stand-in for LLaMA's pre-training, labelled as such: a tiny LLaMA (the `tiny` preset) learns the quiz's language
    and reasoning from 20,000 freshly drawn quiz problems (data.quiz_corpus: another seed than the quiz, its held-out
    val/test questions excluded), image problems described by their caption in the context since a language model
    has no eyes. It learns the quiz's language, to read a context and to name the fact and its option letter; it never
    sees the quiz's images. Saved in Meta's layout and read back by load_llama, like real weights.
    """
    if (out / "consolidated.00.pth").is_file():
        return out
    torch.manual_seed(seed)
    args = ModelArgs(**{**asdict(LLAMA_PRESETS["tiny"]), "vocab_size": tok.n_words, "max_seq_len": 256})
    model = Transformer(args)
    examples = [dict(data.encode_example(tok, *data.build_prompt(rec, fmt), False, 256), has_image=False, pid=i)
                for i, rec in enumerate(data.quiz_corpus(quiz, 20_000, seed=seed + 1))]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="stand-in LLaMA (pre-training on generated quiz text)", dynamic_ncols=True)
    for step in bar:
        batch = data.collate([examples[i] for i in torch.randint(len(examples), (32,), generator=g).tolist()])
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        # A language model's loss on every real token (pads excluded): the questions and hints, where names and
        # objects recur, are what teaches it to look things up in its context.
        target = batch["tokens"][:, 1:].masked_fill(batch["tokens"][:, 1:] == 0, data.IGNORE)  # (B, T-1)
        logits = model(batch["tokens"][:, :-1])  # (B, T-1, V): token t predicts token t+1
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=data.IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in asdict(args).items() if k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of",
                                                           "norm_eps", "rope_theta")}
    (out / "params.json").write_text(json.dumps(params, indent=1))
    save_checkpoint(out / "consolidated.00.pth", model.state_dict())
    return out


def pretrain_clip_standin(quiz: Path, tok: data.Tokenizer, out: Path, steps: int = 300, seed: int = 0) -> Path:
    """
    Stand-in for CLIP's pre-training, labelled as such: the tiny ViT learns image embeddings contrastively (CLIP's
    symmetric InfoNCE, Radford et al. 2021 §2.3) against a bag-of-words encoder of the quiz's captions.json, which
    describe each drawing (colours, shapes, count, places). Saved with OpenAI's key names and read back by load_clip.
    """
    path = out / "clip.pt"
    if path.is_file():
        return path
    torch.manual_seed(seed)
    vit = VisionTransformer(VISION_PRESETS["tiny"])
    captions = json.loads((quiz / "captions.json").read_text())["captions"]
    recs = [r for r in data.load_scienceqa(quiz, "train") if r.get("image")]
    size = vit.args.image_size
    images = torch.stack([data.load_image_tensor(data.image_path(quiz, "train", r["pid"]), r["pid"], size, "imagenet")
                          for r in recs])  # (N, 3, H, W)
    words = [tok.encode(captions[r["pid"]], bos=False, eos=False) for r in recs]
    text_emb = nn.EmbeddingBag(tok.n_words, vit.args.output_dim, mode="mean")  # the text tower: mean of word vectors
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    opt = torch.optim.AdamW([*vit.parameters(), *text_emb.parameters(), logit_scale], lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="stand-in CLIP (contrastive on quiz captions)", dynamic_ncols=True)
    for step in bar:
        idx = torch.randperm(len(recs), generator=g)[:64].tolist()
        flat = torch.tensor([w for i in idx for w in words[i]])
        offsets = torch.tensor([0] + [len(words[i]) for i in idx[:-1]]).cumsum(0)
        img = F.normalize(vit.encode_image(images[idx]), dim=-1)  # (B, D)
        txt = F.normalize(text_emb(flat, offsets), dim=-1)  # (B, D)
        logits = logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, B): matching pairs on the diagonal
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, to_openai_state_dict(vit.state_dict()))  # OpenAI's key names, as ViT-L-14.pt
    return path


# =====================================================================================================================
# Optimisation pieces

def param_groups(model: nn.Module, weight_decay: float):
    """Decay matrices only: tensors with >= 2 dims whose names do not end in .bias (timm's param_groups_weight_decay, as
    the official code; this does decay the router weights, the neck and the modality embedding, spec §5.1)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith(".bias") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, steps_per_epoch: int, args) -> float:
    """Linear warmup, then a half-cycle cosine to min_lr, on the fractional epoch e = step / steps_per_epoch, updated
    every optimizer step (util/lr_sched.py)."""
    peak = args.blr * args.batch_size / 256  # 9e-3 x 32 / 256 = 1.125e-3 for the official recipe
    e = step / steps_per_epoch
    if e < args.warmup_epochs:
        return peak * e / args.warmup_epochs
    progress = (e - args.warmup_epochs) / max(1e-8, args.epochs - args.warmup_epochs)
    return args.min_lr + (peak - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(lengths, epoch: int, args, rank: int, world: int) -> list[list[int]]:
    """
    This rank's micro-batches for one epoch. The order is a function of (seed, epoch) alone, so every rank agrees and a
    resumed run sees the same batches (DistributedSampler's set_epoch, made explicit). The shuffled epoch is cut to a
    whole number of global batches, so the global batch stays fixed whatever the number of ranks.
    """
    n_global = args.batch_size
    if args.group_by_length:
        order = data.length_grouped_order(lengths, args.micro_batch, args.seed + epoch)
    else:
        g = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(lengths), generator=g).tolist()
    order = order[: len(order) // n_global * n_global]
    batches = []
    for start in range(0, len(order), n_global):
        step = order[start:start + n_global]
        mine = step[rank * len(step) // world:(rank + 1) * len(step) // world]  # this rank's share of the step
        batches += [mine[i:i + args.micro_batch] for i in range(0, len(mine), args.micro_batch)]
    return batches


def wrap_model(model: LaVIN, args, device, world: int):
    """DDP or FSDP2 around the model; the unwrapped model stays reachable for checkpoints and evaluation."""
    if args.grad_ckpt:
        model.llama.grad_ckpt = True  # non-reentrant, see model.Transformer.forward_embeds
    if args.compile:
        for layer in model.llama.layers:
            layer.compile()
    if world == 1:
        return model
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # FSDP2 needs one dtype per unit: the frozen weights are kept fp32 here (the simplest of the style guide's two
        # options) and the policy casts them to bf16 for compute on GPU. Block by block, CLIP as one unit (one
        # all-gather for the small encoder), then the root picks up embeddings, norm, head, neck and modality token.
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for layer in model.llama.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model.visual, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    # Frozen parameters get no gradient buckets, so DDP communicates the adapters only. Every trainable parameter gets
    # a gradient every step (LaVIN.visual_touch covers image-free micro-batches), so no find_unused_parameters.
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def show_routing(model: LaVIN) -> str:
    """The LLaMA-side routing weights each modality gets, per layer (spec §1.5: a per-modality constant)."""
    if model.adapter_args.method != "mma":
        return ""
    was = model.training
    model.eval()
    lines = ["router weights (w0, w1) per LLaMA layer:"]
    for m, name in ((0, "text-only"), (1, "image    ")):
        ws = model.routing_weights(m)
        lines.append(f"  {name}: " + "  ".join(f"({w[0]:.3f}, {w[1]:.3f})" for w in ws))
    model.train(was)
    return "\n".join(lines)


# =====================================================================================================================

def main(argv=None):
    args = get_args(argv)
    rank, local_rank, world, device = setup_distributed()
    master = rank == 0
    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:  # the checkpoint's flags win, except where to write and when to stop
        keep = {k: getattr(args, k) for k in ("max_steps", "out_dir", "resume", "save_every")}
        args = argparse.Namespace(**{**resume["args"], **keep})
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if dtype != "fp32" and device.type == "cpu":
        raise SystemExit("--dtype bf16/fp16 autocast is for GPUs; on CPU use the default fp32")
    torch.manual_seed(args.seed)  # identical model init on every rank (DDP also broadcasts rank 0's parameters)
    random.seed(args.seed + rank)

    # ---- data and base weights
    if args.quick and resume is None:
        if master:
            print("quick start: no --llama_dir/--clip_path/--data_dir given, so using the generated quiz and "
                  "pre-training tiny stand-ins for LLaMA and CLIP first (labelled as such)")
            data.ensure_quiz(QUIZ_DIR)
            tok = data.Tokenizer(QUIZ_DIR / "tokenizer.model")
            pretrain_llama_standin(QUIZ_DIR, tok, QUIZ_DIR / "backbones" / "llama", args.prompt_format, seed=args.seed)
            pretrain_clip_standin(QUIZ_DIR, tok, QUIZ_DIR / "backbones", seed=args.seed)
        if dist.is_initialized():
            dist.barrier()
        args.data_dir, args.tokenizer = str(QUIZ_DIR), str(QUIZ_DIR / "tokenizer.model")
        args.llama_dir, args.clip_path = str(QUIZ_DIR / "backbones" / "llama"), str(QUIZ_DIR / "backbones" / "clip.pt")
    for flag in ("llama_dir", "clip_path"):
        if getattr(args, flag) is None:
            raise SystemExit(f"--{flag} is required when training on real data (or give no data flags at all for the "
                             f"quick start)")
    if args.tokenizer is None:  # in the folder (Hugging Face), or next to it (Meta's 7B/ and 13B/)
        args.tokenizer = str(data.tokenizer_path(args.llama_dir))
    tok = data.Tokenizer(args.tokenizer)
    if args.tau is None:  # the official scripts: tau = 10 for 7B (width 4096), 5 for 13B (width 5120)
        files = [Path(args.llama_dir) / name for name in ("params.json", "config.json")]  # Meta's, Hugging Face's
        conf = next((json.loads(p.read_text()) for p in files if p.is_file()), {})
        args.tau = 5.0 if conf.get("dim", conf.get("hidden_size", 0)) >= 5120 else 10.0
    dropout = {} if args.dropout is None else {"adapter_dropout": args.dropout, "lora_dropout": args.dropout}
    adapter_args = AdapterArgs(method=args.method, tau=args.tau, adapter_dim=args.adapter_dim,
                               lora_rank=args.lora_rank, mix_pool=args.mix_pool, mix_rank=args.mix_rank, **dropout)
    # Frozen weights: bf16 on GPU (fp32 under FSDP2, which casts per unit; see wrap_model), fp32 on CPU.
    frozen_dtype = torch.bfloat16 if (device.type == "cuda" and not args.fsdp and args.method != "full") else None
    model = load_lavin(args.llama_dir, args.clip_path, adapter_args, device, frozen_dtype, args.max_seq_len)
    if model.llama.args.vocab_size != tok.n_words:
        raise SystemExit(f"tokenizer {args.tokenizer} has {tok.n_words} pieces but the LLaMA at {args.llama_dir} "
                         f"has a {model.llama.args.vocab_size}-row embedding: they do not belong together")
    img = model.visual.args.image_size
    if args.instruction_json:
        train_set = data.InstructionDataset(args.instruction_json, tok, image_dir=args.image_dir,
                                            max_seq_len=args.max_seq_len, image_size=img, norm=args.norm)
    else:
        train_set = data.ScienceQADataset(args.data_dir, "train", tok, args.prompt_format, args.max_seq_len, img,
                                          args.norm, cache_images=args.quick)
    trainable, total = count_params(model)
    if master:
        print(f"method {args.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
        if train_set.n_truncated:
            print(f"note: {train_set.n_truncated} samples exceed max_seq_len {args.max_seq_len} and were truncated "
                  f"(answer tail first; see data.encode_example)")

    # ---- batch geometry: a fixed global batch whatever the number of ranks (style guide §3.1)
    if args.batch_size % (args.micro_batch * world):
        raise SystemExit(f"--batch_size {args.batch_size} must be a multiple of micro_batch x ranks "
                         f"= {args.micro_batch} x {world}")
    accum = args.batch_size // (args.micro_batch * world)
    steps_per_epoch = len(train_set) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training samples are fewer than one global batch of {args.batch_size}")
    total_steps = steps_per_epoch * args.epochs

    raw = model
    model = wrap_model(model, args, device, world)
    # The optimizer is created after sharding and before any forward, on trainable parameters only (FSDP2 gotcha 3).
    opt = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=0.0, betas=(0.9, 0.95), eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
                if device.type == "cuda" and dtype != "fp32" else nullcontext())

    step = 0
    out_dir = Path(args.out_dir)
    if resume is not None:
        load_trainable(raw, resume["model"])
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(raw, opt, resume["optimizer"], options=StateDictOptions(full_state_dict=True))
        step = resume["step"]
        set_rng_state(resume["rng"][rank] if rank < len(resume["rng"]) else resume["rng"][0])
        if master:
            print(f"resumed from {args.resume} at step {step}")

    def checkpoint():
        # Every rank takes part: FSDP2 parameters and optimizer states are shards that must be gathered (gotcha 4).
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        weights = trainable_state_dict(raw)
        optim = get_optimizer_state_dict(raw, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        rngs = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if master:
            save_checkpoint(out_dir / "ckpt.pt", {"model": weights, "optimizer": optim, "step": step, "rng": rngs,
                                                  "config": raw.config(), "args": vars(args)})
        if dist.is_initialized():
            dist.barrier()

    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"{len(train_set)} samples, {steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps; "
              f"global batch {args.batch_size} = {args.micro_batch} x {accum} accumulation x {world} ranks; "
              f"peak lr {args.blr * args.batch_size / 256:.3g}; loss normalisation: {args.loss_norm}")
    log = open(out_dir / "log.jsonl", "a") if master else None
    bar = tqdm(total=total_steps, initial=step, disable=not master, desc=f"train {args.method}", dynamic_ncols=True)
    last_good = str(out_dir / "ckpt.pt") if (out_dir / "ckpt.pt").is_file() else None  # e.g. the resumed one
    model.train()
    while step < total_steps and (args.max_steps is None or step < args.max_steps):
        epoch = step // steps_per_epoch
        batches = epoch_batches(train_set.lengths, epoch, args, rank, world)
        # Its own generator, so that creating the loader (which draws worker seeds) leaves the global RNG, and hence
        # the dropout masks, exactly where an uninterrupted run has them: resuming is then bit-exact.
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches[(step % steps_per_epoch) * accum:],
                                             collate_fn=data.collate, num_workers=args.workers,
                                             generator=torch.Generator().manual_seed(args.seed + epoch))
        it = iter(loader)
        for _ in range(step % steps_per_epoch, steps_per_epoch):
            t0 = time.time()
            micro = [next(it) for _ in range(accum)]  # the whole step's micro-batches: their labels set the normaliser
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps_per_epoch, args)
            # Loss normalisation: each labelled token of the optimizer step weighs the same, on every rank and under
            # any accumulation (DDP/FSDP average gradients over ranks, hence the factor world).
            n_tok = sum(int((b["labels"] != data.IGNORE).sum()) for b in micro)
            n_global = all_sum(n_tok, device)
            loss_sum = 0.0
            for i, b in enumerate(micro):
                last = i == accum - 1
                # Gradient sync only on the last micro-step: DDP's no_sync, FSDP2's set_requires_gradient_sync.
                if args.fsdp and world > 1:
                    model.set_requires_gradient_sync(last)
                sync = nullcontext() if (last or args.fsdp or world == 1) else model.no_sync()
                images = b["images"].to(device) if b["images"] is not None else None
                with sync:  # the backward must run inside no_sync too; autocast covers the forward only
                    with autocast:
                        # global: the sum over this micro-batch's labelled tokens, scaled by the step's global count
                        # (x world, since DDP/FSDP then average over ranks). official: the token-mean per micro-batch,
                        # divided by the accumulation count, as engine.py does.
                        loss = model(b["tokens"].to(device), b["has_image"].to(device), b["vis_mask"].to(device),
                                     images, labels=b["labels"].to(device),
                                     reduction="sum" if args.loss_norm == "global" else "mean")
                    scaled = loss * world / max(n_global, 1) if args.loss_norm == "global" else loss / accum
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"loss is {loss.item()} at step {step} (micro-batch {i}, samples {b['pids']}); stopping. "
                            f"Last good checkpoint: {last_good or 'none yet'}. Try a lower --blr or --dtype fp32.")
                    scaler.scale(scaled).backward()
                loss_sum += loss.item() if args.loss_norm == "global" else loss.item() * n_tok / accum
            scaler.step(opt)  # a plain opt.step() unless fp16, where it also skips steps with inf gradients
            scaler.update()
            opt.zero_grad(set_to_none=True)  # None rather than zeros: no memset, and no stale gradient can leak
            step += 1
            train_loss = all_sum(loss_sum, device) / max(n_global, 1)
            dt = time.time() - t0
            tok_s = all_sum(sum(b["tokens"].numel() for b in micro), device) / dt
            if master:
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{group['lr']:.2e}", tok_s=f"{tok_s:.0f}")
                log.write(json.dumps({"step": step, "epoch": step / steps_per_epoch, "loss": train_loss,
                                      "lr": group["lr"], "tok_per_s": tok_s, "time": time.time()}) + "\n")
                log.flush()
            if args.save_every and step % args.save_every == 0:
                checkpoint()
                last_good = str(out_dir / "ckpt.pt")
            if args.max_steps is not None and step >= args.max_steps:
                break
        else:
            checkpoint()  # end of every epoch
            last_good = str(out_dir / "ckpt.pt")
            if args.eval_every and (epoch + 1) % args.eval_every == 0 and not args.no_eval:
                evaluate_split(raw, tok, args, rank, world, device)
                model.train()
    bar.close()
    if args.max_steps is not None and step % steps_per_epoch:
        checkpoint()  # stopped mid-epoch by --max_steps: keep that state too
    if master and not args.fsdp:  # under FSDP2 the layers are shards that only a forward on every rank can gather
        print(show_routing(raw))
    if not args.no_eval and (args.max_steps is None or step >= total_steps) and not args.instruction_json:
        evaluate_split(raw, tok, args, rank, world, device)
    if log:
        log.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return raw


def evaluate_split(model: LaVIN, tok, args, rank, world, device):
    """Evaluation by generation on a ScienceQA split (sample.evaluate), on every rank: the split is sharded and
    gathered, and under FSDP every forward needs all ranks."""
    import sample
    problems = data.load_scienceqa(args.data_dir, args.eval_split)
    model.eval()
    preds, n_fallback, _ = sample.evaluate(model, tok, problems, args.data_dir, args.eval_split, args.prompt_format,
                                           batch_size=64, max_new_tokens=args.eval_max_new_tokens,
                                           image_size=model.visual.args.image_size, norm=args.norm, rank=rank,
                                           world=world, merge=args.method in ("mma", "lora") and not args.fsdp,
                                           seed=args.seed, out=Path(args.out_dir) / f"preds_{args.eval_split}.json")
    return preds, n_fallback


if __name__ == "__main__":
    try:
        main()
    except torch.cuda.OutOfMemoryError as e:
        raise SystemExit(f"out of GPU memory: {str(e).splitlines()[0]}\nFlags that help, most effective first: "
                         f"--micro_batch 1 or 2 (accumulation keeps the global batch), --grad_ckpt (recompute "
                         f"activations), --fsdp under torchrun (shards the frozen backbones), a shorter --max_seq_len. "
                         f"The last good checkpoint, if any, is in --out_dir.") from e
