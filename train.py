"""
Train LaVIN: Mixture-of-Modality Adaptation of a frozen LLaMA and a frozen CLIP ViT (Luo et al., NeurIPS 2023,
§3.3-3.4 and §4.2; luogen1996/LaVIN train.py, engine.py, util/lr_sched.py). One file for a laptop CPU, one GPU,
torchrun DDP and FSDP2, one node or many.

    python train.py                                  # the quick start: generated quiz, tiny model, CPU, minutes
    python train.py --llama_dir /data/LLaMA/7B --tokenizer /data/LLaMA/tokenizer.model \\
        --clip_path /data/clip/ViT-L-14.pt --data_dir /data/ScienceQA --micro_batch 4    # one GPU, accumulates to 32
    torchrun --standalone --nproc_per_node 8 train.py --llama_dir ... --clip_path ... --data_dir ...   # DDP
    torchrun --standalone --nproc_per_node 8 train.py ... --fsdp                                      # FSDP2
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py ...  # two nodes
    python train.py --resume out/ckpt.pt             # continue exactly where a run stopped

Recipe (the official one for real runs, finetuning_sqa_7b.sh): global batch 32, lr = blr x global batch / 256 =
9e-3 x 32/256 = 1.125e-3, AdamW betas (0.9, 0.95), weight decay 0.02 on matrices only, 2 warmup epochs then a
half-cycle cosine updated every optimizer step, 20 epochs, max_seq_len 512, tau = 10 (7B) / 5 (13B). Deliberate
departures, each commented where it happens and numbered in the README: batches padded to their longest sample
(difference 10); the loss normalised by the labelled tokens of the whole optimizer step across ranks (13;
`--loss_norm official` restores the per-micro-batch mean, one cause of the official code's GPU-count dependence); no
accumulated gradient thrown away at the end of an epoch (14).

The quick start: with no --llama_dir / --clip_path / --data_dir there is nothing pretrained to adapt, so quiz.py
generates a ScienceQA-format quiz and pre-trains tiny stand-ins for the backbones, saved in Meta's and OpenAI's
layouts; this file then loads them through the same loaders real weights use and trains the adapters only.

Tests: `python -m pytest -q test_all.py -k test_train_`.
"""

import argparse
import json
import os
import random
import signal
import time
import warnings
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import data
import quiz
from adapters import FULL_NF4_ERROR, load_trainable, trainable_state_dict
from cli import (STOPS, Stopped, UserError, adapter_args_from, add_adapter_flags, check_device, check_flags,
                 check_paths, check_split, check_vocab, check_writable, cli, default_dtype, setup_distributed,
                 stop_signal, teardown_distributed)
from evaluate import evaluate
from model import IGNORE, LaVIN, count_params, load_lavin, warmup_cosine
from router import default_tau, routing_table
from weights import load_checkpoint, save_checkpoint


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("base weights (leave all empty for the quick start's pre-trained tiny stand-ins)")
    g.add_argument("--llama_dir", help="LLaMA folder: Meta's (params.json + consolidated.*.pth) or Hugging Face's "
                                       "(config.json + model*.safetensors)")
    g.add_argument("--tokenizer", help="SentencePiece tokenizer.model or a folder holding it (default: LLaMA's, in "
                                       "or next to --llama_dir)")
    g.add_argument("--clip_path", help="OpenAI CLIP ViT-L-14.pt (TorchScript archive), a vision state dict, or a "
                                       "Hugging Face CLIP folder or .safetensors file")
    g.add_argument("--quant", choices=["nf4"], help="nf4: the LLaMA block linears in 4-bit NormalFloat with double "
                   "quantization, bf16 compute: QLoRA with --method lora, LaVIN-lite with mma (README, 'A 4-bit base')")
    g.add_argument("--clip_every", type=int, default=4, help="visual tokens: CLIP's class token after every Nth block "
                   "(4 as the official code: 6 tokens from ViT-L/14's 24 blocks)")
    g = p.add_argument_group("data (every training image is decoded once before training starts; an unreadable one "
                             "is left out, and the count is printed then and at the end)")
    g.add_argument("--data_dir", help="ScienceQA root: problems.json, pid_splits.json, images/ (default: the quiz)")
    g.add_argument("--instruction_json", help="LLaVA-Instruct / Alpaca records for the chatbot setting instead of "
                   "ScienceQA: a JSON list, or JSONL (one record per line)")
    g.add_argument("--image_dir", help="image folder for --instruction_json (e.g. COCO train2014)")
    g.add_argument("--prompt_format", default="QCM-ALE", help="ScienceQA prompt format (the scripts' QCM-ALE)")
    g.add_argument("--norm", default="imagenet", choices=["imagenet", "clip"],
                   help="image normalisation: ImageNet's statistics as the official code, or CLIP's own")
    g.add_argument("--max_seq_len", type=int, default=512)
    g.add_argument("--group_by_length", action="store_true", help="batch similar lengths together (fewer pads)")
    add_adapter_flags(p)  # --method, --tau, --adapter_dim ... --mix_lambda: adapters.AdapterArgs, its defaults
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch_size", type=int, default=32, help="global batch: micro_batch x accumulation x ranks")
    g.add_argument("--micro_batch", type=int, default=4, help="samples per rank per forward")
    g.add_argument("--blr", type=float, default=9e-3, help="base lr; actual lr = blr x batch_size / 256")
    g.add_argument("--weight_decay", type=float, default=0.02)
    g.add_argument("--warmup_epochs", type=float, default=2.0)
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument("--loss_norm", default="global", choices=["global", "official"],
                   help="global: mean over the labelled tokens of the whole step on all ranks; official: per "
                   "micro-batch")
    g.add_argument("--max_steps", type=int, default=None, help="end training early, after this many optimizer "
                   "steps (smoke runs; the lr schedule stays --epochs'); the final evaluation still runs "
                   "unless --no_eval")
    g = p.add_argument_group("system")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="compute dtype: bf16 autocast on GPU (default), fp32 on CPU; fp16 uses a loss scaler")
    g.add_argument("--fsdp", action="store_true", help="shard the frozen backbones with FSDP2 (fully_shard)")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing of every LLaMA block")
    g.add_argument("--compile", action="store_true", help="torch.compile every LLaMA block")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    g.add_argument("--out_dir", default="out", help="where ckpt.pt, log.jsonl and the predictions go; one run at a "
                   "time (a lock file holds the writer's pid)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out_dir that holds a checkpoint")
    g.add_argument("--resume", help="checkpoint to continue from, with its flags; only these may be given again: "
                   + ", ".join(f"--{k}" for k in RESUMABLE[1:]))
    g.add_argument("--save_every", type=int, default=0, help="also checkpoint every N optimizer steps")
    g.add_argument("--eval_every", type=int, default=0, help="evaluate every N epochs (0: only at the end)")
    g.add_argument("--eval_split", default="test")
    g.add_argument("--eval_max_new_tokens", type=int, default=64)
    g.add_argument("--no_eval", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--debug", action="store_true", help="show the traceback of an error (also LAVIN_DEBUG=1)")
    return p


# The quick start's own small settings. They apply only to flags the user did not pass; its micro-batch, unless given,
# is each rank's whole share of the step (get_args).
QUICK = dict(epochs=6, batch_size=32, blr=2e-2, warmup_epochs=0.5, max_seq_len=160, eval_split="test",
             eval_max_new_tokens=24, group_by_length=True, weight_decay=0.0, prompt_format="QCM-EA", clip_every=1)
# What a resumed run may change: where it writes, when it stops, saves and evaluates. Everything else is the run's.
RESUMABLE = ("resume", "out_dir", "max_steps", "save_every", "eval_every", "eval_split", "eval_max_new_tokens",
             "no_eval", "workers", "overwrite", "debug")
NOT_SAVED = ("quick", "overwrite", "debug")  # what this invocation alone decides, not the run
PATHS = ("llama_dir", "clip_path", "tokenizer", "data_dir", "instruction_json", "image_dir", "out_dir", "resume")


def passed_flags(argv) -> set:
    """The flags the user gave on the command line: a parse with every default suppressed names only those."""
    probe = make_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))  # torchrun's; known before the process group exists


def get_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    given = passed_flags(argv)
    if args.resume:  # the checkpoint's flags (defaults for flags it predates), and the RESUMABLE ones given here
        ckpt = load_checkpoint(args.resume)
        if not isinstance(ckpt.get("args"), dict) or "optimizer" not in ckpt:
            raise UserError(f"--resume {args.resume}: not a train.py checkpoint (an official adapter file has no "
                            f"optimizer state to continue from)")
        fixed = sorted(given - set(RESUMABLE))
        if fixed:
            raise UserError(f"--{fixed[0]}: a resumed run keeps its checkpoint's value "
                            f"({ckpt['args'].get(fixed[0])}); only --" + ", --".join(RESUMABLE) + " may be given")
        args = argparse.Namespace(**{**vars(parser.parse_args([])), **ckpt["args"],
                                     **{k: getattr(args, k) for k in given}})
    args.quick = not any(getattr(args, k) for k in ("llama_dir", "clip_path", "data_dir", "instruction_json"))
    if args.quick and not args.resume:
        for k, v in QUICK.items():
            if k not in given:
                setattr(args, k, v)
        if "micro_batch" not in given:
            args.micro_batch = max(1, args.batch_size // world_size())
    for k in PATHS:  # absolute, so that the checkpoint works from any folder
        if getattr(args, k):
            setattr(args, k, os.path.abspath(os.path.expanduser(getattr(args, k))))
    return args


def check_args(args, world: int):
    """Every flag, before any work: a mistake is one UserError line naming the flag, its value and what is allowed."""
    pos, nonneg = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0")
    check_flags(args, [("epochs", *pos), ("batch_size", *pos), ("micro_batch", *pos), ("max_steps", *pos),
                       ("tau", lambda v: v > 0, "> 0 (the router's softmax temperature)"),
                       ("blr", lambda v: v > 0, "> 0"),
                       ("min_lr", *nonneg), ("weight_decay", *nonneg), ("warmup_epochs", *nonneg),
                       ("max_seq_len", lambda v: v >= 32, ">= 32"), ("clip_every", *pos), ("adapter_dim", *pos),
                       ("lora_rank", *pos), ("lora_alpha", lambda v: v > 0, "> 0"), ("mix_pool", *pos),
                       ("mix_rank", *pos), ("mix_alpha", lambda v: v > 0, "> 0"),
                       ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"), ("workers", *nonneg), ("save_every", *nonneg),
                       ("eval_every", *nonneg), ("eval_max_new_tokens", lambda v: 1 <= v <= args.max_seq_len,
                                                 f"in [1, --max_seq_len {args.max_seq_len}] (prompt and answer must "
                                                 f"fit the RoPE table of 2 x max_seq_len)"),
                       ("prompt_format", lambda v: v in data.PROMPT_FORMATS, "INPUT-OUTPUT such as QCM-ALE or CQM-A")])
    if args.batch_size % (args.micro_batch * world):
        raise UserError(f"--batch_size {args.batch_size}: must be a multiple of --micro_batch x ranks = "
                        f"{args.micro_batch} x {world}")
    adapter_args_from(args)  # AdapterArgs checks --lora_targets and the method's own settings
    check_device(None, args.dtype)
    check_paths(args, [("llama_dir", "folder"), ("clip_path", "file"), ("tokenizer", "file"), ("data_dir", "folder"),
                       ("instruction_json", "file"), ("image_dir", "folder")])
    if not args.quick:
        for flag in ("llama_dir", "clip_path"):
            if getattr(args, flag) is None:
                raise UserError(f"--{flag}: required when training on real data (or give no data flags at all for "
                                f"the quick start)")
    if args.method == "full" and args.quant:
        raise UserError(FULL_NF4_ERROR)
    if args.quick and not args.no_eval and args.eval_split not in quiz.SPLITS:  # before the quiz exists
        raise UserError(f"--eval_split {args.eval_split}: not a split of the quick start's quiz (has: "
                        f"{', '.join(quiz.SPLITS)})")
    if not args.instruction_json and not args.quick and not args.no_eval:
        check_split("eval_split", args.eval_split, args.data_dir)
    ckpt = Path(args.out_dir) / "ckpt.pt"
    if ckpt.exists() and not args.overwrite and str(ckpt) != args.resume:
        raise UserError(f"--out_dir {args.out_dir}: already holds a checkpoint; continue it with --resume {ckpt}, "
                        f"start afresh there with --overwrite, or choose another --out_dir")
    check_writable("out_dir", args.out_dir)


# =====================================================================================================================
# Set-up: base weights, data, model, wrapping, optimizer

def all_sum(x: float, device) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


# Rank 0 alone generates the quiz and pre-trains the stand-ins (minutes on a CPU, longer on a busy one) while the
# other ranks wait: an hour, rather than the default 30 minutes, which a slow machine can outlast.
QUICK_START_WAIT = timedelta(hours=1)


def base_paths(args, master: bool):
    """The quick start's generated quiz and stand-ins (rank 0 makes them, the others wait), or the user's paths."""
    if args.quick:
        if master:
            print("quick start: no --llama_dir/--clip_path/--data_dir given, so using the generated quiz and "
                  "pre-training tiny stand-ins for LLaMA and CLIP first (labelled as such)")
            quiz.quick_start("quiz", args.prompt_format, args.seed)
        if dist.is_initialized():  # a gloo group of its own: its barrier takes a timeout whatever the main backend
            dist.monitored_barrier(dist.new_group(backend="gloo", timeout=QUICK_START_WAIT), timeout=QUICK_START_WAIT)
        # On every rank: the files exist now, so this only returns their paths.
        paths = quiz.quick_start("quiz", args.prompt_format, args.seed)
        args.data_dir, args.tokenizer, args.llama_dir, args.clip_path = map(os.path.abspath, paths)
        return
    args.tokenizer = args.tokenizer or str(data.tokenizer_path(args.llama_dir))


def build(args, device, master: bool):
    """-> (model, tokenizer, training set). Frozen weights: bf16 on GPU (fp32 under FSDP2, which casts per unit; see
    wrap_model), fp32 on CPU; the adapters are fp32 masters."""
    tok = data.Tokenizer(args.tokenizer)
    frozen_dtype = torch.bfloat16 if (device.type == "cuda" and not args.fsdp and args.method != "full") else None
    model = load_lavin(args.llama_dir, args.clip_path, adapter_args_from(args), device, frozen_dtype, args.max_seq_len,
                       args.clip_every, args.quant)
    check_vocab(tok, model.llama.args.vocab_size, args.tokenizer, args.llama_dir)
    vis = dict(image_size=model.visual.args.image_size, norm=args.norm, n_visual=model.visual.args.n_tokens)
    if args.instruction_json:
        train_set = data.InstructionDataset(args.instruction_json, tok, args.image_dir, args.max_seq_len, **vis,
                                            skip_bad=True)
    else:  # skip_bad: every image is decoded now, so none can stop the run mid-epoch (README, difference 22)
        train_set = data.ScienceQADataset(args.data_dir, "train", tok, args.prompt_format, args.max_seq_len, **vis,
                                          cache_images=args.quick, skip_bad=True)
    if master:
        trainable, total = count_params(model)
        tau = args.tau if args.tau is not None else default_tau(model.llama.args.dim)
        print(f"method {args.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"
              + (f"; router temperature {tau:g}" if args.method == "mma" and args.router == "modality" else "")
              + ("; no modality router (--router none)" if args.method == "mma" and args.router == "none" else ""))
        if train_set.n_truncated:
            print(f"note: {train_set.n_truncated} samples exceed max_seq_len {args.max_seq_len} and were truncated "
                  f"(answer tail first; see data.encode_example)")
        if train_set.skipped:
            print(skipped_note(train_set))
    return model, tok, train_set


def skipped_note(train_set) -> str:
    return (f"note: {len(train_set.skipped)} training samples left out, their image unreadable (first: "
            f"{train_set.skipped[0][1]})")


def wrap_model(model: LaVIN, args, device, world: int):
    """DDP or FSDP2 around the model; the unwrapped model stays reachable for checkpoints and evaluation."""
    if args.grad_ckpt:
        model.llama.grad_ckpt = True  # non-reentrant, see model.Transformer.run_blocks
    if args.compile:
        for layer in model.llama.layers:
            layer.compile()
    if world == 1:
        return model
    if args.fsdp:
        # FSDP2 needs one dtype per unit: the frozen weights are kept fp32 here (the simpler option; 2x the memory of
        # bf16 before sharding) and the policy casts them to bf16 for compute on GPU. Block by block, CLIP as one unit
        # (one all-gather for the small encoder), then the root picks up embeddings, norm, head, neck, modality token.
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for layer in model.llama.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model.visual, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    # Frozen parameters get no gradient buckets, so DDP communicates the adapters only. Every trainable parameter gets
    # a gradient every step (LaVIN.embed runs the vision tower on image-free micro-batches too), so no
    # find_unused_parameters. No buffer changes and every rank loads the same weights, so none is broadcast, neither
    # at wrapping nor every forward (for a 4-bit base: the whole base). Its successor forward_sync_buffers=False would
    # still broadcast at wrapping, so torch (2.13) itself advises broadcast_buffers=False for this case, and its
    # deprecation warning is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                   broadcast_buffers=False)


def param_groups(model: nn.Module, weight_decay: float):
    """Decay matrices only: tensors with >= 2 dims whose names do not end in .bias (timm's param_groups_weight_decay, as
    the official code; this does decay the router weights, the neck and the modality embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and not name.endswith(".bias") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, steps_per_epoch: int, args) -> float:
    """util/lr_sched.py: warmup then cosine on the fractional epoch step / steps_per_epoch, every optimizer step."""
    peak = args.blr * args.batch_size / 256  # 9e-3 x 32 / 256 = 1.125e-3 for the official recipe
    return warmup_cosine(step / steps_per_epoch, args.warmup_epochs, args.epochs, peak, args.min_lr)


def epoch_batches(lengths, epoch: int, args, rank: int, world: int) -> list[list[int]]:
    """
    This rank's micro-batches for one epoch. The order is a function of (seed, epoch) alone, so every rank agrees and a
    resumed run sees the same batches (DistributedSampler's set_epoch, made explicit). The shuffled epoch is cut to a
    whole number of global batches, so the global batch stays fixed whatever the number of ranks (README, 14).
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


# =====================================================================================================================
# One optimizer step

def loss_weight(args, n_global: int, accum: int, world: int) -> float:
    """
    What one micro-batch's loss is multiplied by before backward. global (README, difference 13): the model returns
    the *sum* over the micro-batch's labelled tokens, and every labelled token of the step on every rank weighs the
    same, 1 / n_global; times world, because DDP and FSDP2 then average the gradients over ranks. official: the model
    returns the token-*mean* of the micro-batch, divided by the accumulation count, as engine.py does, so a token's
    weight depends on how many labelled tokens its micro-batch happens to hold.
    """
    return world / max(n_global, 1) if args.loss_norm == "global" else 1.0 / accum


def train_step(model, micro: list[dict], opt, scaler, autocast, args, step: int, world: int, device, last_good):
    """Accumulate the step's micro-batches (syncing gradients on the last one only), then one optimizer update.
    Returns the step's mean loss per labelled token, as a tensor: no host sync here."""
    n_tok = sum(int((b["labels"] != IGNORE).sum()) for b in micro)  # on the CPU, before anything moves
    n_global = all_sum(n_tok, device)
    weight = loss_weight(args, n_global, len(micro), world)
    total = torch.zeros((), device=device)
    for i, b in enumerate(micro):
        last = i == len(micro) - 1
        # Gradient sync only on the last micro-step: DDP's no_sync, FSDP2's set_requires_gradient_sync.
        if args.fsdp and world > 1:
            model.set_requires_gradient_sync(last)
        sync = nullcontext() if (last or args.fsdp or world == 1) else model.no_sync()
        images = b["images"].to(device) if b["images"] is not None else None
        with sync:  # the backward must run inside no_sync too; autocast covers the forward only
            with autocast:
                loss = model(b["tokens"].to(device), b["has_image"].to(device), b["vis_mask"].to(device), images,
                             labels=b["labels"].to(device), reduction="sum" if args.loss_norm == "global" else "mean")
            scaler.scale(loss * weight).backward()
        total += loss.detach() * (1.0 if args.loss_norm == "global" else n_tok / len(micro))
    if not torch.isfinite(total):  # one host sync per step, the check the README's difference 15 promises
        raise FloatingPointError(f"loss is {total.item()} at step {step}; stopping. Last good checkpoint: "
                                 f"{last_good or 'none yet'}. Try a lower --blr or --dtype fp32.")
    scaler.step(opt)  # a plain opt.step() unless fp16, where it also skips steps with inf gradients
    scaler.update()
    opt.zero_grad(set_to_none=True)  # None rather than zeros: no memset, and no stale gradient can leak
    return total / max(n_global, 1)  # this rank's share of the step's mean loss: all_sum gives the mean


# =====================================================================================================================
# Saving, resuming, evaluating

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


def save(raw: LaVIN, opt, step: int, args, world: int, master: bool) -> str:
    """Every rank takes part: FSDP2 parameters and optimizer states are shards that must be gathered. The file holds
    the trainable tensors, the optimizer, the step, every rank's RNG and the flags, so a resume is exact."""
    weights = trainable_state_dict(raw)
    optim = get_optimizer_state_dict(raw, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rngs = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    path = Path(args.out_dir) / "ckpt.pt"
    if master:
        save_checkpoint(path, {"model": weights, "optimizer": optim, "step": step, "rng": rngs, "config": raw.config(),
                               "args": {k: v for k, v in vars(args).items() if k not in NOT_SAVED}})
    if dist.is_initialized():
        dist.barrier()
    return str(path)


def resume_from(raw: LaVIN, opt, args, rank: int) -> int:
    """Load the trainable tensors, the optimizer and this rank's RNG; -> the step to continue from."""
    ckpt = load_checkpoint(args.resume)
    load_trainable(raw, ckpt["model"])
    set_optimizer_state_dict(raw, opt, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
    set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
    if rank == 0:
        print(f"resumed from {args.resume} at step {ckpt['step']}")
    return ckpt["step"]


def evaluate_split(model: LaVIN, tok, args, rank, world):
    """Evaluation by generation on a ScienceQA split (evaluate.evaluate), on every rank: the split is sharded and
    gathered, and under FSDP every forward needs all ranks."""
    problems = data.load_scienceqa(args.data_dir, args.eval_split)
    return evaluate(model, tok, problems, args.data_dir, args.eval_split, args.prompt_format, args.norm, batch_size=64,
                    max_new_tokens=args.eval_max_new_tokens, rank=rank, world=world,
                    merge=args.method in ("mma", "lora") and not args.fsdp, seed=args.seed,
                    out=Path(args.out_dir) / f"preds_{args.eval_split}.json")


def show_routing(model: LaVIN) -> str:
    """The LLaMA-side routing weights each modality gets, per layer (a per-modality constant: paper §3.2)."""
    table = routing_table(model)
    if not table:
        return ""
    lines = ["router weights (w0, w1) per LLaMA layer:"]
    for m, name in ((0, "text-only"), (1, "image    ")):
        lines.append(f"  {name}: " + "  ".join(f"({w0:.3f}, {w1:.3f})" for w0, w1 in table[m]))
    return "\n".join(lines)


# =====================================================================================================================

@contextmanager
def out_dir_lock(out_dir, master: bool):
    """One run writes an out_dir at a time: rank 0 holds `lock` there, a file with its pid, created atomically
    (O_EXCL). A lock whose pid no longer runs was left by a killed run and is taken over, and the half-written
    checkpoint such a run may have left (weights.save_checkpoint's ckpt.pt.{pid}.tmp) is removed."""
    if not master:
        yield
        return
    lock = Path(out_dir) / "lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            text = lock.read_text().strip()
            if not text.isdigit() or pid_alive(int(text)):  # no pid yet: the other run is writing it right now
                raise UserError(f"--out_dir {out_dir}: another run (pid {text or 'starting'}) is writing there; wait "
                                f"for it to end or choose another --out_dir") from None
            print(f"note: taking over the lock of pid {text} in {out_dir}, which is no longer running")
            lock.unlink(missing_ok=True)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    for stale in Path(out_dir).glob("ckpt.pt.*.tmp"):  # nobody else writes here now
        stale.unlink()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def main(argv=None):
    """Check every flag, lock the out_dir, train. A failure once a checkpoint exists carries the resume command."""
    args = get_args(argv)
    check_args(args, world_size())
    master = int(os.environ.get("RANK", 0)) == 0
    with out_dir_lock(args.out_dir, master):
        ckpt = Path(args.out_dir) / "ckpt.pt"
        if master and args.overwrite and str(ckpt) != args.resume:  # the new run's checkpoints replace the old one
            ckpt.unlink(missing_ok=True)
        try:
            return train(args)
        except BaseException as e:
            last = str(ckpt) if ckpt.is_file() else args.resume
            if last and not isinstance(e, UserError):
                launcher = "torchrun <the same launcher flags>" if world_size() > 1 else "python"
                e.add_note(f"continue with: {launcher} train.py --resume {last}")
            raise


def batch_geometry(args, n_samples: int, world: int) -> tuple[int, int, int, int]:
    """A fixed global batch whatever the number of ranks (check_args saw it divide) -> (accumulation, steps per epoch,
    steps in all, the step to stop at)."""
    accum = args.batch_size // (args.micro_batch * world)
    steps_per_epoch = n_samples // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size {args.batch_size}: more than the {n_samples} training samples")
    total = steps_per_epoch * args.epochs
    return accum, steps_per_epoch, total, total if args.max_steps is None else min(total, args.max_steps)


def epoch_loader(train_set, epoch: int, step: int, steps_per_epoch: int, accum: int, args, rank: int, world: int):
    """This rank's micro-batches of the epoch, from the one `step` starts with."""
    batches = epoch_batches(train_set.lengths, epoch, args, rank, world)
    # Its own generator, so that creating the loader (which draws worker seeds) leaves the global RNG, and
    # hence the dropout masks, exactly where an uninterrupted run has them: resuming is then bit-exact.
    return torch.utils.data.DataLoader(train_set, batch_sampler=batches[(step % steps_per_epoch) * accum:],
                                       collate_fn=data.collate, num_workers=args.workers,
                                       generator=torch.Generator().manual_seed(args.seed + epoch))


def log_step(bar, log, step: int, steps_per_epoch: int, loss: float, lr: float, tok_s: float):
    """Rank 0: the progress bar and one log.jsonl line per step."""
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
    log.write(json.dumps({"step": step, "epoch": step / steps_per_epoch, "loss": loss, "lr": lr, "tok_per_s": tok_s,
                          "time": time.time()}) + "\n")
    log.flush()


def save_or_stop(raw: LaVIN, opt, step: int, epoch_end: int, args, world: int, master: bool, device, bar,
                 last_good) -> str:
    """Save every save_every steps, at the epoch's end and on a stop signal, which then ends the run; -> last save."""
    signum = stop_signal(STOPS.got, device)
    if (args.save_every and step % args.save_every == 0) or step == epoch_end or signum:
        last_good = save(raw, opt, step, args, world, master)
    if signum:
        bar.close()
        raise Stopped(signum, f"stopped by {signal.Signals(signum).name} after step {step}, saved")
    return last_good


def finish(raw: LaVIN, tok, train_set, args, rank: int, world: int, log):
    """After the last step: the routing weights, the final evaluation, and the skipped samples' note."""
    if rank == 0 and not args.fsdp:  # under FSDP2 the layers are shards that only a forward on every rank can gather
        print(show_routing(raw))
    if not args.no_eval and not args.instruction_json:  # after the last epoch, or after --max_steps
        evaluate_split(raw, tok, args, rank, world)
    if log:
        log.close()
    if rank == 0 and train_set.skipped:
        print(skipped_note(train_set))
    teardown_distributed()


def train(args):
    rank, _, world, device = setup_distributed()
    master = rank == 0
    dtype = args.dtype or default_dtype(device)
    base_paths(args, master)  # on a first quick start, rank 0 pre-trains the stand-ins here, drawing on torch's RNG
    # Seeded after that: the same model init on every rank (FSDP2 keeps each rank's own shards, nothing broadcasts
    # them) and on a first run as on every later one.
    torch.manual_seed(args.seed)
    random.seed(args.seed + rank)
    raw, tok, train_set = build(args, device, master)
    accum, steps_per_epoch, total_steps, stop = batch_geometry(args, len(train_set), world)

    model = wrap_model(raw, args, device, world)
    # The optimizer is created after sharding and before any forward, on trainable parameters only.
    opt = torch.optim.AdamW(param_groups(raw, args.weight_decay), lr=0.0, betas=(0.9, 0.95), eps=1e-8)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)
                if device.type == "cuda" and dtype != "fp32" else nullcontext())
    step = resume_from(raw, opt, args, rank) if args.resume else 0
    last_good = args.resume
    if master:
        print(f"{len(train_set)} samples, {steps_per_epoch} steps/epoch x {args.epochs} epochs = {total_steps} steps; "
              f"global batch {args.batch_size} = {args.micro_batch} x {accum} accumulation x {world} ranks; "
              f"peak lr {args.blr * args.batch_size / 256:.3g}; loss normalisation: {args.loss_norm}")
    log = open(Path(args.out_dir) / "log.jsonl", "a" if args.resume else "w") if master else None
    if log and args.resume:  # where this run took over: the steps after it may repeat ones the log already has
        log.write(json.dumps({"resumed_from": args.resume, "step": step}) + "\n")
    bar = tqdm(total=total_steps, initial=step, disable=not master, desc=f"train {args.method}", dynamic_ncols=True)
    model.train()
    with STOPS.deferred():  # a signal from here on ends the step it arrives in; then a save, and the stop
        while step < stop:
            epoch = step // steps_per_epoch
            it = iter(epoch_loader(train_set, epoch, step, steps_per_epoch, accum, args, rank, world))
            epoch_end = min(stop, (epoch + 1) * steps_per_epoch)
            while step < epoch_end:
                t0 = time.time()
                micro = [next(it) for _ in range(accum)]  # the whole step's micro-batches: their labels, the normaliser
                lr = lr_at(step, steps_per_epoch, args)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss = train_step(model, micro, opt, scaler, autocast, args, step, world, device, last_good)
                step += 1
                train_loss = all_sum(float(loss), device)  # the step's one host sync for logging, after the update
                tok_s = all_sum(sum(b["tokens"].numel() for b in micro), device) / (time.time() - t0)
                if master:
                    log_step(bar, log, step, steps_per_epoch, train_loss, lr, tok_s)
                last_good = save_or_stop(raw, opt, step, epoch_end, args, world, master, device, bar, last_good)
            if step % steps_per_epoch == 0 and args.eval_every and (epoch + 1) % args.eval_every == 0 \
                    and not args.no_eval:
                evaluate_split(raw, tok, args, rank, world)
                model.train()
    bar.close()
    finish(raw, tok, train_set, args, rank, world, log)
    return raw


def command():
    try:
        with STOPS.installed():
            main()
    except torch.cuda.OutOfMemoryError as e:
        err = UserError(f"out of GPU memory: {str(e).splitlines()[0]}; flags that help, most effective first: "
                        f"--micro_batch 1 or 2 (accumulation keeps the global batch), --grad_ckpt (recompute "
                        f"activations), --fsdp under torchrun (shards the frozen backbones), a shorter --max_seq_len")
        for note in getattr(e, "__notes__", []):  # the resume command main() attached
            err.add_note(note)
        raise err from e


if __name__ == "__main__":
    cli(command)
