"""
Evaluate a trained LaVIN on ScienceQA by generation, fast: the split is cut into batches of one modality and similar
lengths, the adapters are folded into the weights for each modality, and the batches are shared out over torchrun
ranks and gathered, so the table does not depend on the number of GPUs (Luo et al., NeurIPS 2023, §4.1; luogen1996/
LaVIN eval.py, and ScienceQA's tools/evaluate_acc.py for the score table).

    python evaluate.py                                                 # the quick start's out/ckpt.pt, test split
    python evaluate.py --adapter out/ckpt.pt --split val --limit 100   # a smoke run
    torchrun --standalone --nproc_per_node 8 evaluate.py --adapter out/ckpt.pt     # 8 GPUs, sharded and gathered
    python evaluate.py --adapter LaVIN-7B/checkpoint-19.pth --llama_dir /data/LLaMA/7B \
        --clip_path /data/clip/ViT-L-14.pt --data_dir /data/ScienceQA             # an official adapter file
    python evaluate.py --benchmark mme --data_dir MME_Benchmark_release_version --adapter out/ckpt.pt  # MME

`python sample.py --eval ...` is the same command. Answers are parsed with the official pattern "The answer is X.";
an unparsable answer falls back to a *seeded* random choice, and the fallbacks are counted (README, difference 16).
Greedy by default, so results depend on neither seed nor batch; `--temperature 0.1 --top_p 0.75` is what the
official evaluation samples with. `--benchmark mme` reads MME's release folder and scores it as MME's own
calculation tool does, writing the results files that tool reads (the MME section). Also home to what every entry
point shares: the distributed set-up, the checks of flags and the one-line report of user errors (`cli`), and loading
a trained model for inference (train.py evaluates through `evaluate`, sample.py loads through `load_for_inference`).

Tests: `python -m pytest -q test_all.py -k test_evaluate_`.
"""

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

import clip_vit
import data
from adapters import LoRALinear
from model import LaVIN, Transformer, load_checkpoint, load_trained


# =====================================================================================================================
# Distributed set-up: one code path for CPU, one GPU and torchrun (train.py, sample.py and this file)

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


def teardown_distributed():
    """Leave together: a barrier, then destroy the group. A rank that destroys its connections while a peer still
    works (rank 0 printing, saving) can hang the exit now and then (pytorch/pytorch#75097)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# =====================================================================================================================
# User errors: every script checks its flags before any work, and reports a mistake in one line (train.py, sample.py
# and bench.py use these too)

class UserError(Exception):
    """A mistake in the flags or in the files they name: `cli` prints its one line, without a traceback."""


def check_flags(args, rules):
    """rules: (flag, allowed(value) -> bool, what is allowed). A flag at None (optional, not given) passes."""
    for flag, ok, allowed in rules:
        value = getattr(args, flag)
        if value is not None and not ok(value):
            raise UserError(f"--{flag} {value}: must be {allowed}")


def check_paths(args, rules):
    """rules: (flag, "file" or "folder"): a given path must exist and be one."""
    for flag, kind in rules:
        value = getattr(args, flag, None)  # sample.py and evaluate.py share the rules, not every flag
        if value is not None and not (Path(value).is_file() if kind == "file" else Path(value).is_dir()):
            raise UserError(f"--{flag} {value}: no such {kind}")


def check_device(device: str | None, dtype: str | None):
    """--device must name a device this machine has (None: cuda if there is one), and bf16/fp16 are for GPUs."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device {device}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s) here; use --device cpu"
                        + (f" or cuda:0 .. cuda:{torch.cuda.device_count() - 1}" if torch.cuda.is_available() else ""))
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: only cpu and cuda devices are supported")
    if dtype in ("bf16", "fp16") and dev.type == "cpu":
        raise UserError(f"--dtype {dtype}: for GPUs; on CPU use --dtype fp32 (the default there)")


def check_split(flag: str, split: str, data_dir):
    splits = data.read_splits(data_dir)
    if split not in splits:
        raise UserError(f"--{flag} {split}: not a split of {Path(data_dir) / 'pid_splits.json'} (has: "
                        f"{', '.join(splits)})")


def check_writable(flag: str, folder):
    """Create the folder if needed and write a scratch file there: a read-only disk, or a file in the folder's place,
    is found now rather than at the first save."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"--{flag} {folder}: cannot write there ({e.strerror or e})") from None


def cli(main):
    """
    Run a script's main() as a command. A user error (UserError; a missing, unreadable or malformed file, which the
    loaders report as FileNotFoundError or ValueError; an OSError such as a full or read-only disk; Ctrl-C) prints one
    line, with what to do next when the failure added a note (train.py's resume command), and exits non-zero (130
    for Ctrl-C). --debug or LAVIN_DEBUG=1 shows the traceback instead. Anything else is a bug and shows its traceback.
    """
    try:
        main()
    except (UserError, OSError, ValueError, FloatingPointError, KeyboardInterrupt) as e:
        if "--debug" in sys.argv[1:] or os.environ.get("LAVIN_DEBUG") == "1":
            raise
        what = ("interrupted" if isinstance(e, KeyboardInterrupt) else
                f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else str(e))
        line = "; ".join(part.strip() for part in [what, *getattr(e, "__notes__", [])] if part.strip())
        # One line, whatever the message held; tqdm.write moves an open progress bar out of its way.
        tqdm.write(f"error: {' '.join(line.split())}", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 1)


# =====================================================================================================================
# Scoring (the official eval.py, and ScienceQA's tools/evaluate_acc.py)

# The official pattern. The final "." matches any character, and the first match wins.
_ANSWER_RE = re.compile(r"The answer is ([A-Z]).")


def parse_answer(text: str, n_choices: int, rng: random.Random) -> tuple[int, bool]:
    """Generated text -> (choice index, used_fallback).

    A letter outside the first n_choices, or no match at all ("FAILED" in eval.py), becomes a uniformly random
    choice. The official code draws it from Python's unseeded global `random`, so its scores wobble from run to run;
    here the caller passes a seeded rng and counts the fallbacks (README, difference 16).
    """
    m = _ANSWER_RE.search(text)
    if m and m.group(1) in data.OPTIONS[:n_choices]:
        return data.OPTIONS.index(m.group(1)), False
    return rng.choice(range(n_choices)), True


COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")  # the paper's table, left to right
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def _columns_of(rec):
    """The table columns a record counts towards (evaluate_acc.py definitions: TXT and IMG may overlap)."""
    cols = ["Avg"]
    if rec.get("subject") in _SUBJECTS:  # null subject (reconstructed test records) -> left out of NAT/SOC/LAN only
        cols.append(_SUBJECTS[rec["subject"]])
    if rec.get("hint"):
        cols.append("TXT")
    if rec.get("image"):
        cols.append("IMG")
    if not rec.get("hint") and not rec.get("image"):
        cols.append("NO")
    grade = rec.get("grade") or ""
    if grade.startswith("grade") and grade[5:].isdigit():
        cols.append("G1-6" if int(grade[5:]) <= 6 else "G7-12")
    return cols


def score_table(problems: dict, preds: dict, n_fallback: int = 0) -> dict:
    """Accuracy (%) per paper column over `problems` ({pid: record}); preds is {pid: predicted index}.

    Returns {column: percent or None (empty column), "counts": {column: n}, "correct": {column: k},
    "n_fallback": n_fallback}.
    """
    missing = [pid for pid in problems if pid not in preds]
    if missing:
        raise ValueError(f"{len(missing)} problems have no prediction (first: {missing[:5]})")
    counts = dict.fromkeys(COLUMNS, 0)
    correct = dict.fromkeys(COLUMNS, 0)
    for pid, rec in problems.items():
        hit = int(preds[pid]) == rec["answer"]
        for col in _columns_of(rec):
            counts[col] += 1
            correct[col] += hit
    scores = {c: (100.0 * correct[c] / counts[c] if counts[c] else None) for c in COLUMNS}
    return dict(scores, counts=counts, correct=correct, n_fallback=n_fallback)


def format_table(scores: dict) -> str:
    """The paper's columns in one row, then the number of problems behind each, then the fallback count."""
    head = "      " + "".join(f"{c:>7}" for c in COLUMNS)
    acc = "acc % " + "".join(f"{'-' if scores[c] is None else f'{scores[c]:.2f}':>7}" for c in COLUMNS)
    n = "n     " + "".join(f"{scores['counts'][c]:>7}" for c in COLUMNS)
    return f"{head}\n{acc}\n{n}\nunparsed answers (random fallback): {scores['n_fallback']}"



# =====================================================================================================================
# Loading a trained model for inference (sample.py's too)

def load_for_inference(path, device, dtype=None, overrides: dict | None = None):
    """
    A checkpoint (train.py's, or an official LaVIN adapter file; its path, or the dict load_checkpoint read from it)
    -> (model in eval mode, tokenizer, info): info says how the model was trained (model.load_trained's, plus
    image_size and n_visual). `overrides` (llama_dir, clip_path, tokenizer, tau, clip_every, quant, data_dir; None
    values ignored) win over what the checkpoint records.
    """
    ckpt = path if isinstance(path, dict) else load_checkpoint(path)
    model, info = load_trained(ckpt, device, dtype, overrides)
    tok = data.Tokenizer(info["tokenizer"] or info["llama_dir"])  # a folder: its tokenizer.model, in it or beside it
    if model.llama.args.vocab_size != tok.n_words:
        raise ValueError(f"the tokenizer has {tok.n_words} pieces but the LLaMA has a "
                         f"{model.llama.args.vocab_size}-row embedding: pass the --tokenizer of that --llama_dir")
    info.update(image_size=model.visual.args.image_size, n_visual=model.visual.args.n_tokens)
    return model, tok, info


def prompt_budget(model: LaVIN) -> int:
    """
    Longest prompt, in tokens before the modality token: the training length less the few answer tokens that training
    always keeps (data.MIN_ANSWER_TOKENS, "The answer is X."). This is exactly how data.encode_example cuts over-long
    samples, so every prompt position is one the model was trained at. A long answer may run past max_seq_len: those
    positions are new to the model, but the RoPE tables cover twice max_seq_len, and the scored part comes first.
    """
    return model.llama.args.max_seq_len - 1 - data.MIN_ANSWER_TOKENS


# =====================================================================================================================
# Generation (lavin/generator.py; paper §4.1): the one decoding path of evaluation, sample.py's chat and bench.py

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
def packed_linears(llama: Transformer):
    """While generating on CPU in fp32, swap every static linear of the LLaMA (plain, merged LoRA, MMA folded into
    q/k/v) for a PackedLinear; restore the originals afterwards. Elsewhere (GPU, bf16, unmerged LoRA, MixLoRA) a
    no-op. Measured on 2 quiet cores, one row decodes in 0.68x the time of F.linear and eight in about half; on cores
    other processes keep busy, oneDNN's threads can wait on each other and one row was seen 5x slower."""
    w = llama.output.weight
    usable = w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    swaps = [(mod, name, lin) for mod in llama.modules() for name, lin in mod.named_children()
             if usable and (type(lin) is nn.Linear or (isinstance(lin, LoRALinear) and lin.merged))]
    for mod, name, lin in swaps:
        setattr(mod, name, PackedLinear(lin))
    try:
        yield
    finally:
        for mod, name, lin in swaps:
            setattr(mod, name, lin)


def for_modality(model: LaVIN, modality: int, merge: bool = True):
    """
    Ready the model for rows of one modality (0 text-only, 1 image). Merged: the LLaMA-side adapters fold into
    q/k/v with that modality's routing; merge() is a no-op when already merged for it and re-merges when the
    modality changes. MixLoRA picks its factors per input, so it has nothing static to fold and runs unmerged.
    Call it outside autocast: the fold is computed in fp32 and stored in the frozen dtype.
    """
    if merge and model.adapter_args.method in ("mma", "lora"):
        model.merge(modality)
    else:
        model.unmerge()

def inference_context(model: LaVIN):
    """
    The context inference runs in. Frozen weights in bf16/fp16 next to fp32 adapters (how train.py and load_lavin
    keep them on GPU) only mix under autocast, which casts every matmul to the frozen dtype, as in training. An
    all-fp32 model needs nothing. Under FSDP2 the gathered copies carry the policy's dtype, which this also reads.
    """
    w = model.llama.tok_embeddings.weight  # a frozen weight: its dtype is the one the backbones were loaded in
    return nullcontext() if w.dtype == torch.float32 else torch.autocast(w.device.type, dtype=w.dtype)

@torch.no_grad()
def generate(model: LaVIN, prompts: list[list[int]], has_image, images=None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, eos_id: int = 2, generator=None, on_token=None):
    """
    Batched generation with a KV cache. prompts: token lists laid out by data.encode_prompt (placeholders included);
    has_image (B,) bool; images (N_img, 3, H, W) for the image rows. Returns the new tokens of each row, cut at EOS.

    Rows of different lengths are left-padded and each row's RoPE positions start at 0 on its modality token, so a
    batch gives the same tokens as each prompt alone (the official code instead forces prompt tokens into the
    sampled stream and decodes with positions one short; README, differences 3 and 4). The modality token stays in
    cache slot `pad`, hidden from later queries by the mask, so cache slot - pad = the training position. The loop
    stops once every row has produced EOS, looking every 8 steps (the official loop always runs to the end; README,
    difference 5).
    """
    llama = model.llama
    dev = llama.tok_embeddings.weight.device
    B = len(prompts)
    has_image = torch.as_tensor(has_image, dtype=torch.bool, device=dev)
    if model.merged_modality is not None and bool((has_image.long() != model.merged_modality).any()):
        raise ValueError(f"model is merged for modality {model.merged_modality}; call unmerge() or merge() first")
    P = max(len(p) for p in prompts)
    pad = torch.tensor([P - len(p) for p in prompts], device=dev)  # (B,) left padding of each row
    tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        tokens[b, P - len(p):] = torch.tensor(p, device=dev)
    vis_mask = data.visual_slots(tokens, has_image, model.visual.args.n_tokens, pad)  # (B, P)
    h = model.embed(tokens, has_image, vis_mask, images)  # (B, 1 + P, C): [modality, pads..., prompt]
    # Move each row's modality token from slot 0 to slot pad_b, right before its BOS; the pads shift left by one.
    s = torch.arange(1 + P, device=dev)[None, :]  # (1, 1 + P)
    order = torch.where(s < pad[:, None], s + 1, torch.where(s == pad[:, None], 0, s))  # (B, 1 + P)
    h = h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))

    with packed_linears(llama):
        rows = decode(llama, h, pad, P, max_new_tokens, temperature, top_p, eos_id, generator, on_token)
    return [r[:r.index(eos_id)] if eos_id in r else r for r in rows]

def decode(llama, h, pad, P: int, max_new_tokens, temperature, top_p, eos_id, generator, on_token):
    """generate's loop: prefill the prompt slots h (B, 1 + P, C), then one token per step; (B, steps) lists."""
    B, dev = h.shape[0], h.device
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
# Batched evaluation on ScienceQA (also train.py's end-of-training evaluation)

def eval_prompts(tok, problems: list[dict], fmt: str, budget: int, n_visual: int) -> list[list[int]]:
    """Each problem's prompt in the training layout (data.encode_prompt: BOS, prefix, placeholders, QCM... text up to
    "Response:"), cut to `budget` tokens the way training cuts an over-long sample (data.fit_prompt)."""
    prompts = []
    for rec in problems:
        img = bool(rec.get("image"))
        ids = data.encode_prompt(tok, data.build_prompt(rec, fmt)[0], img, n_visual=n_visual)
        prompts.append(data.fit_prompt(tok, ids, img, budget, n_visual=n_visual))
    return prompts


def eval_batches(items: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """
    items: (modality, prompt length) per problem -> batches of problem indices. One modality per batch, so the adapters
    can be merged for it; sorted by length inside each modality, so a batch holds similar lengths and few pads. The
    batches depend on nothing but the split and batch_size: ranks then take whole batches (batches[rank::world]), and
    every batch is computed exactly as in a single process, so the table does not depend on the number of GPUs.
    (Sharding the problems instead, problems[rank::world], would regroup them per rank: other pads, other float
    rounding, and on a near tie another greedy token.)
    """
    batches = []
    for modality in (1, 0):
        idx = sorted((i for i, (m, _) in enumerate(items) if m == modality), key=lambda i: (items[i][1], i))
        batches += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    return batches


@contextmanager
def unsharded(model):
    """
    Under FSDP2 (train.py --fsdp) the parameters are DTensor shards, gathered only inside each unit's forward, so every
    rank would have to run the same forwards in lockstep, which per-rank batches and early stopping at EOS break.
    For evaluation we gather every unit once and keep it gathered (set_reshard_after_forward(False)): the ranks then
    generate independently, at the cost of one full copy of the model per rank. Afterwards the shards come back, with
    resharding after forward on again, train.py's (and fully_shard's) default. A model without FSDP passes through.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()  # all-gather now (every rank, together), so no forward below needs the other ranks
        unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def generate_split(model: LaVIN, tok, problems, data_dir, split, fmt, norm, batch_size, max_new_tokens, rank, world,
                   merge, seed, temperature, top_p) -> dict:
    """This rank's share of the generation: {pid: generated text}. Arguments as `evaluate`."""
    dev = model.llama.tok_embeddings.weight.device
    was_training = model.training
    model.eval()  # adapter dropout off (merging is only exact in eval mode)
    prompts = eval_prompts(tok, problems, fmt, prompt_budget(model), model.visual.args.n_tokens)
    items = [(int(bool(rec.get("image"))), len(p)) for rec, p in zip(problems, prompts)]
    batches = eval_batches(items, batch_size)
    raw = {}
    for b in tqdm(range(rank, len(batches), world), desc=f"eval {split}", disable=rank != 0, dynamic_ncols=True):
        rows = batches[b]
        modality = items[rows[0]][0]  # the same for the whole batch
        for_modality(model, modality, merge)  # at most two merges per rank: image batches come first
        images = None
        if modality:
            S = model.visual.args.image_size
            images = torch.stack([data.load_image_tensor(data.image_path(data_dir, split, problems[i]["pid"]), S, norm)
                                  for i in rows]).to(dev)  # (B, 3, S, S)
        # One generator per batch, seeded by the batch's index: sampled answers do not depend on which rank ran it.
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + b)
        with inference_context(model):
            outs = generate(model, [prompts[i] for i in rows], [bool(modality)] * len(rows), images, max_new_tokens,
                                  temperature, top_p, tok.eos_id, gen)
        for i, o in zip(rows, outs):
            # Only the generated part is kept and parsed. The official code decodes prompt + answer, so its first regex
            # match could in principle come from the prompt (QCM prompts do not contain "The answer is").
            raw[problems[i]["pid"]] = tok.decode(o)
    model.unmerge()  # leave the model as it came: train.py may go on training it
    model.train(was_training)
    return raw


@torch.no_grad()
def evaluate(model: LaVIN, tokenizer, problems: list[dict], data_dir, split, fmt="QCM-ALE", norm="imagenet", *,
             batch_size=16, max_new_tokens=64, rank=0, world=1, merge=True, seed=1, temperature=0.0, top_p=0.75,
             out=None):
    """
    Generate an answer for every problem (records from data.load_scienceqa), parse and score them (eval.py).
    Every rank calls this (its share of the batches runs there; the texts are gathered to all ranks). Rank 0 prints
    the score table and writes `out` (if given) as {pid: {"pred": index, "text": generated}, ..., "fallbacks": n,
    "scores": {...}}. Returns (preds {pid: index}, number of random fallbacks, {pid: generated text}) on every rank.
    The model is left unmerged and in the train/eval mode it came in.
    """
    # Generation, each rank on its own batches; under FSDP2 with the whole model gathered on every rank first.
    t0 = time.perf_counter()
    with unsharded(model):
        raw = generate_split(model, tokenizer, problems, data_dir, split, fmt, norm, batch_size, max_new_tokens, rank,
                             world, merge, seed, temperature, top_p)
    if world > 1:  # every rank gets every text (a CPU object gather: the texts are small)
        parts = [None] * world
        dist.all_gather_object(parts, raw)
        raw = {pid: text for part in parts for pid, text in part.items()}
    seconds = time.perf_counter() - t0  # generation and gathering: what the problems/s below measures

    # Parse in the split's order with a seeded RNG (the official fallback is unseeded; README, difference 16): the
    # draws are the same on every rank, in every run and for any number of ranks.
    rng = random.Random(seed)
    preds, n_fallback = {}, 0
    for rec in problems:
        preds[rec["pid"]], fell_back = parse_answer(raw[rec["pid"]], len(rec["choices"]), rng)
        n_fallback += fell_back
    if rank == 0:  # every rank holds the same preds; one prints and writes
        scores = score_table({rec["pid"]: rec for rec in problems}, preds, n_fallback)
        print(f"ScienceQA {split}: {len(problems)} problems, {world} rank(s), "
              f"{'greedy' if temperature <= 0 else f'temperature {temperature}, top_p {top_p}'}, "
              f"adapters {'merged' if merge else 'unmerged'}; generated in {seconds:.1f} s, "
              f"{len(problems) / seconds:.1f} problems/s")
        print(format_table(scores))
        if out is not None:
            record = {pid: {"pred": p, "text": raw[pid]} for pid, p in preds.items()}
            record.update(fallbacks=n_fallback, scores=scores)  # no pid collides: ScienceQA pids are numbers
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(record, indent=1))
            print(f"predictions written to {out}")
    return preds, n_fallback, raw


# =====================================================================================================================
# MME (Fu et al. 2023, "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models"): the release
# folder read as it is, generated through the same batched, rank-sharded path as ScienceQA, and scored exactly as MME's
# calculation tool scores (eval_tool/calculation.py), from the results files it reads, which are written for it:
#
#   python evaluate.py --benchmark mme --data_dir MME_Benchmark_release_version --adapter out/ckpt.pt
#   torchrun --standalone --nproc_per_node 8 evaluate.py --benchmark mme --data_dir ... --adapter ...
#   python eval_tool/calculation.py --results_dir out/mme_results    # MME's own script re-scores what this wrote

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_IMAGE_TYPES = (".png", ".jpg", ".jpeg")
MME_CHOICES = ("yes", "no")  # a ScienceQA-trained model's options (A) and (B), lower-case as MME asks; see mme_prompts


def _mme_files(folder: Path) -> list[tuple[Path, Path]]:
    """One subtask folder -> [(question file, its image)], by name. The release has two layouts: images with a .txt of
    the same stem beside each (existence, count, OCR, the cognition subtasks ...), or images/ + questions_answers_YN/
    (artwork, celebrity, landmark, posters, scene)."""
    qdir, idir = folder / "questions_answers_YN", folder / "images"
    if not (qdir.is_dir() and idir.is_dir()):
        qdir = idir = folder
    files = sorted(qdir.glob("*.txt"))
    if not files:
        raise UserError(f"{folder}: not an MME subtask folder (no question .txt files beside its images, nor "
                        f"images/ + questions_answers_YN/)")
    pairs = []
    for txt in files:
        image = next((idir / (txt.stem + t) for t in MME_IMAGE_TYPES if (idir / (txt.stem + t)).is_file()), None)
        if image is None:
            raise UserError(f"{txt}: no image {txt.stem}.png or .jpg beside it in {idir}")
        pairs.append((txt, image))
    return pairs


def _mme_lines(txt: Path) -> list[tuple[str, str]]:
    """A question file -> its two (question, answer) lines, each `question<TAB>Yes|No`."""
    try:
        lines = [line for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise UserError(f"{txt}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if line.count("\t") != 1:
            raise UserError(f"{txt}, line {i}: expected question<TAB>Yes or No, found {line.count(chr(9))} tabs")
        question, answer = line.split("\t")
        if answer.strip().lower() not in ("yes", "no") or not question.strip():
            raise UserError(f"{txt}, line {i}: expected question<TAB>Yes or No, found {line!r}")
        out.append((question, answer.strip()))
    if len(out) != 2:  # calculation.py reads each image's questions as a pair of consecutive lines (acc+)
        raise UserError(f"{txt}: {len(out)} questions; MME asks two per image (one Yes, one No)")
    return out


def read_mme(root, limit: int | None = None) -> dict[str, list[dict]]:
    """
    The MME release folder -> {subtask: [question]} in MME's subtask order, each question {image (Path), image_name,
    question, answer}, the two of an image consecutive; `limit` keeps the first N images of each subtask. All of it
    is read, and every image decoded, before anything runs: a bad file is one UserError naming it (and the line), so
    nothing is scored from a half-read folder. Subtasks whose folder is absent are simply not in the result.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data_dir {root}: no such folder (the MME release folder, MME_Benchmark_release_version)")
    present = [t for t in MME_PERCEPTION + MME_COGNITION if (root / t).is_dir()]
    if not present:
        raise UserError(f"--data_dir {root}: not MME's release layout: none of its subtask folders ("
                        f"{', '.join(MME_PERCEPTION + MME_COGNITION)}) is there")
    tasks = {}
    for task in present:
        tasks[task] = []
        for txt, image in _mme_files(root / task)[:limit]:
            try:
                clip_vit.load_image(image)  # decodes it fully: a broken file fails now, not mid-run on one rank
            except (FileNotFoundError, ValueError) as e:
                raise UserError(f"{image}: the image of {txt.name} will not open ({e})") from None
            tasks[task] += [dict(image=image, image_name=image.name, question=q, answer=a) for q, a in _mme_lines(txt)]
    return tasks


def mme_label(prediction: str) -> str:
    """calculation.py's parse_pred_ans: lower-cased, exactly yes/no, else yes or no if its first four characters hold
    one ("Yes, it is" -> yes, "No." -> no, "The answer is yes" -> other), else "other", which counts as wrong."""
    p = prediction.lower()
    if p in ("yes", "no"):
        return p
    return "yes" if "yes" in p[:4] else "no" if "no" in p[:4] else "other"


def mme_scores(results: dict[str, list[tuple]]) -> dict:
    """
    results {subtask: [(image_name, question, ground truth, prediction)], an image's two questions consecutive} ->
    {"subtasks": {subtask: {acc, acc_plus (both %), score, questions, images, unparsed}}, "Perception", "Cognition"
    (None where none of its subtasks is present), "missing" [subtasks], "unparsed"}. As calculation.py: acc over
    questions, acc+ over images with both questions right, score = 100 (acc + acc+) in 0-200, each total the sum of
    its present subtasks (at most 2000 and 800).
    """
    per = {}
    for task, rows in results.items():
        labels = [mme_label(pred) for *_, pred in rows]
        right = [label == gt.lower() for label, (_, _, gt, _) in zip(labels, rows)]
        both = [right[i] and right[i + 1] for i in range(0, len(right), 2)]
        acc, acc_plus = 100 * sum(right) / len(right), 100 * sum(both) / len(both)
        per[task] = dict(acc=acc, acc_plus=acc_plus, score=acc + acc_plus, questions=len(right), images=len(both),
                         unparsed=labels.count("other"))
    totals = {name: (sum(per[t]["score"] for t in group if t in per) if any(t in per for t in group) else None)
              for name, group in (("Perception", MME_PERCEPTION), ("Cognition", MME_COGNITION))}
    return dict(subtasks=per, **totals, missing=[t for t in MME_PERCEPTION + MME_COGNITION if t not in per],
                unparsed=sum(v["unparsed"] for v in per.values()))


def format_mme(scores: dict) -> str:
    """Every present subtask (acc and acc+ in %, score 0-200), both totals, the missing subtasks, the unparsed count."""
    lines = [f"{'subtask':<22}{'acc':>8}{'acc+':>8}{'score':>8}{'images':>8}{'unparsed':>9}"]
    for task, v in scores["subtasks"].items():
        lines.append(f"{task:<22}{v['acc']:>8.2f}{v['acc_plus']:>8.2f}{v['score']:>8.2f}{v['images']:>8}"
                     f"{v['unparsed']:>9}")
    for name, group in (("Perception", MME_PERCEPTION), ("Cognition", MME_COGNITION)):
        n, total = sum(t in scores["subtasks"] for t in group), scores[name]
        label = f"{name} ({n} of {len(group)} subtasks)"
        lines.append(f"{label:<38}{'-' if total is None else f'{total:.2f}':>8}")  # under the score column
    if scores["missing"]:
        lines.append("missing subtasks (left out of the totals): " + ", ".join(scores["missing"]))
    lines.append(f"unparsed replies (neither yes nor no by their first word, counted wrong): {scores['unparsed']}")
    return "\n".join(lines)


def write_mme_results(folder, results: dict[str, list[tuple]]):
    """The files calculation.py --results_dir reads: <subtask>.txt, one `image_name<TAB>question<TAB>ground
    truth<TAB>prediction` line per question. Earlier results of any subtask are removed first, so that the folder,
    which the official script scores whole, holds exactly this run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task in MME_PERCEPTION + MME_COGNITION:
        (folder / f"{task}.txt").unlink(missing_ok=True)
    for task, rows in results.items():
        (folder / f"{task}.txt").write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


def read_mme_results(folder) -> dict[str, list[tuple]]:
    """A results folder as calculation.py reads it: each subtask's <subtask>.txt, every line split at its tabs into
    (image_name, question, ground truth, prediction)."""
    folder = Path(folder)
    files = {task: folder / f"{task}.txt" for task in MME_PERCEPTION + MME_COGNITION}
    return {task: [tuple(line.split("\t")) for line in f.read_text(encoding="utf-8").splitlines()]
            for task, f in files.items() if f.is_file()}


def mme_prompts(tok, questions: list[dict], info: dict, budget: int, n_visual: int) -> list[list[int]]:
    """
    How a model is asked an MME question. A chatbot (trained on instruction data, as LaVIN's MME evaluation uses
    its instruction-tuned model) gets the question verbatim, "Please answer yes or no." included, in its
    "Instruction: ...\nResponse:" template (data.encode_dialogue, as sample.py's chat). A model trained on ScienceQA
    (the quick start's included) knows only its ScienceQA prompt, so the question becomes a two-option problem in the
    format it was trained with, "(A) yes (B) no", context N/A (eval_prompts); its "The answer is A." is then mapped to
    the option's text (mme_reply), since MME scores the reply's first word.
    """
    if info["chat"] != "scienceqa":
        return [data.encode_dialogue(tok, [(q["question"], None)], True, budget + 1, n_visual=n_visual)["tokens"]
                .tolist() for q in questions]
    problems = [dict(question=q["question"], choices=list(MME_CHOICES), answer=0, hint="", image=q["image_name"])
                for q in questions]
    return eval_prompts(tok, problems, info["prompt_format"], budget, n_visual)


def mme_reply(text: str, chat: str) -> str:
    """Generated text -> the prediction written for calculation.py: one line (its format is tab-separated lines); for
    a ScienceQA-trained model the chosen option's text, or its whole reply when it names no option."""
    m = _ANSWER_RE.search(text) if chat == "scienceqa" else None
    if m and m.group(1) in data.OPTIONS[:len(MME_CHOICES)]:
        return MME_CHOICES[data.OPTIONS.index(m.group(1))]
    return " ".join(text.split())


def generate_mme(model: LaVIN, tok, questions, prompts, norm, batch_size, max_new_tokens, rank, world, merge, seed,
                 temperature, top_p) -> dict[int, str]:
    """This rank's share of the MME generation, {question index: text}: generate_split's batching for one modality
    (every MME question has an image), so ranks take whole batches and the table does not depend on their number."""
    dev, S = model.llama.tok_embeddings.weight.device, model.visual.args.image_size
    was_training = model.training
    model.eval()
    batches = eval_batches([(1, len(p)) for p in prompts], batch_size)
    for_modality(model, 1, merge)
    raw = {}
    for b in tqdm(range(rank, len(batches), world), desc="eval MME", disable=rank != 0, dynamic_ncols=True):
        rows = batches[b]
        images = torch.stack([data.load_image_tensor(questions[i]["image"], S, norm) for i in rows]).to(dev)
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + b)  # as generate_split: rank-independent
        with inference_context(model):
            outs = generate(model, [prompts[i] for i in rows], [True] * len(rows), images, max_new_tokens,
                            temperature, top_p, tok.eos_id, gen)
        raw.update((i, tok.decode(o)) for i, o in zip(rows, outs))
    model.unmerge()
    model.train(was_training)
    return raw


@torch.no_grad()
def evaluate_mme(model: LaVIN, tok, tasks: dict[str, list[dict]], info: dict, out_dir, *, batch_size=16,
                 max_new_tokens=64, rank=0, world=1, merge=True, seed=1, temperature=0.0, top_p=0.75) -> dict:
    """
    Answer every question of read_mme's `tasks` (each rank its share of the batches, the texts gathered to all), and
    on rank 0 write the results folder for calculation.py, read it back as calculation.py reads it, and print the score
    table of what was read. Returns the scores (mme_scores) on every rank; info is load_for_inference's.
    """
    questions = [q for qs in tasks.values() for q in qs]
    prompts = mme_prompts(tok, questions, info, prompt_budget(model), model.visual.args.n_tokens)
    t0 = time.perf_counter()
    with unsharded(model):
        raw = generate_mme(model, tok, questions, prompts, info["norm"], batch_size, max_new_tokens, rank, world,
                           merge, seed, temperature, top_p)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, raw)
        raw = {i: text for part in parts for i, text in part.items()}
    seconds = time.perf_counter() - t0
    results, i = {}, 0
    for task, qs in tasks.items():
        results[task] = [(q["image_name"], q["question"], q["answer"], mme_reply(raw[i + j], info["chat"]))
                         for j, q in enumerate(qs)]
        i += len(qs)
    scores = mme_scores(results)
    if rank == 0:
        write_mme_results(out_dir, results)
        scores = mme_scores(read_mme_results(out_dir))  # the table is the one calculation.py gets from the files
        print(f"MME: {len(questions)} questions on {len(questions) // 2} images, {len(tasks)} of 14 subtasks, "
              f"{world} rank(s), {'greedy' if temperature <= 0 else f'temperature {temperature}, top_p {top_p}'}; "
              f"generated in {seconds:.1f} s, {len(questions) / seconds:.1f} questions/s")
        print(format_mme(scores))
        print(f"results written to {out_dir} (MME's eval_tool/calculation.py --results_dir reads them)")
    return scores


def run_mme(args, rank, world, model, tok, info):
    """--benchmark mme with the flags of add_eval_flags (evaluate.py and sample.py --eval)."""
    tasks = read_mme(args.data_dir, args.limit)
    evaluate_mme(model, tok, tasks, info, preds_path(args), batch_size=args.batch_size,
                 max_new_tokens=args.max_new_tokens, rank=rank, world=world, merge=not args.no_merge, seed=args.seed,
                 temperature=args.temperature, top_p=args.top_p)


# =====================================================================================================================
# The command line (sample.py shares the model and generation flags)

def add_model_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--adapter", default="out/ckpt.pt",
                   help="adapter checkpoint: train.py's ckpt.pt (default: the quick start's) or an official LaVIN .pth")
    g.add_argument("--llama_dir", help="LLaMA folder, Meta's or Hugging Face's (default: what the checkpoint records)")
    g.add_argument("--clip_path", help="OpenAI CLIP ViT-L-14.pt, a vision state dict, or a Hugging Face CLIP folder or "
                                       ".safetensors file (default: the checkpoint's)")
    g.add_argument("--tokenizer", help="SentencePiece tokenizer.model or a folder holding it (default: the "
                                       "checkpoint's; for an official adapter file, LLaMA's, in or beside --llama_dir)")
    g.add_argument("--tau", type=float, help="router temperature of an official adapter file (default: 10 for 7B, 5 "
                                             "for 13B, as the official scripts; router.default_tau)")
    g.add_argument("--clip_every", type=int, help="visual tokens of an official adapter file: the class token after "
                                                  "every Nth CLIP block (default: 4, as the official code)")
    g.add_argument("--quant", choices=["nf4"], help="run on a 4-bit NF4 base (default: what the checkpoint was "
                                                    "trained on; README, 'A 4-bit base')")
    g = p.add_argument_group("generation")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default: deterministic and batch-independent); the official eval uses 0.1")
    g.add_argument("--top_p", type=float, default=0.75, help="nucleus sampling threshold when temperature > 0")
    g.add_argument("--max_new_tokens", type=int, default=64, help="64 as the official eval.py")
    g.add_argument("--seed", type=int, default=1, help="torch.manual_seed(1) as the official eval.py")
    g.add_argument("--no_merge", action="store_true", help="run the adapters as modules instead of folding them "
                                                          "(README, difference 6)")
    g = p.add_argument_group("system")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; torchrun picks per rank)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="frozen weights and compute: bf16 on GPU (default), fp32 on CPU (default)")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error (also LAVIN_DEBUG=1)")


def add_eval_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("evaluation")
    g.add_argument("--benchmark", default="scienceqa", choices=["scienceqa", "mme"],
                   help="scienceqa, or mme: the MME release folder given as --data_dir, scored as MME's calculation.py")
    g.add_argument("--split", default="test", help="ScienceQA split")
    g.add_argument("--data_dir", help="ScienceQA root (default: what the checkpoint records), or MME's release folder "
                                      "(MME_Benchmark_release_version; quiz.py --mme makes a small one)")
    g.add_argument("--limit", type=int, help="evaluate the first N problems only (MME: the first N images of each "
                                             "subtask; a smoke run)")
    g.add_argument("--batch_size", type=int, default=16, help="prompts per generate() call on each rank")
    g.add_argument("--out", help="predictions JSON (default: preds_{split}.json next to the checkpoint); MME: the "
                                 "results folder for calculation.py (default: mme_results/ next to the checkpoint)")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_flags(p)
    add_eval_flags(p)
    return p.parse_args(argv)


def check_inference_args(args):
    """The flags of add_model_flags and add_eval_flags, before anything is read."""
    check_flags(args, [("temperature", lambda v: v >= 0, ">= 0 (0: greedy)"),
                       ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"), ("max_new_tokens", lambda v: v >= 1, ">= 1"),
                       ("batch_size", lambda v: v >= 1, ">= 1"),
                       ("limit", lambda v: v >= 1, ">= 1"), ("tau", lambda v: v > 0, "> 0"),
                       ("clip_every", lambda v: v >= 1, ">= 1")])
    check_device(args.device, args.dtype)
    check_paths(args, [("llama_dir", "folder"), ("clip_path", "file"), ("tokenizer", "file"), ("data_dir", "folder"),
                       ("image", "file")])


def check_eval_data(args, ckpt: dict):
    """What evaluation needs, before the model loads: a ScienceQA root (given, or recorded in ckpt) with that split,
    or for MME a given --data_dir, and somewhere to write the predictions."""
    if args.benchmark == "mme":  # the folder itself is read whole, and checked, before anything is generated
        if args.data_dir is None:
            raise UserError("--data_dir: --benchmark mme needs MME's release folder (MME_Benchmark_release_version)")
        check_writable("out", preds_path(args))
        return
    data_dir = args.data_dir or (ckpt["args"].get("data_dir") if "config" in ckpt else None)
    if data_dir is None:
        raise UserError("--data_dir: needed to evaluate (the ScienceQA root); the adapter file records none")
    check_split("split", args.split, data_dir)
    check_writable("out", preds_path(args).parent)


def preds_path(args) -> Path:
    if args.out:
        return Path(args.out)
    return Path(args.adapter).parent / ("mme_results" if args.benchmark == "mme" else f"preds_{args.split}.json")


def inference_setup(args, evaluating: bool = True):
    """The process, device and model every inference entry point starts with -> (rank, world, device, model, tok,
    info), every flag checked first. The frozen backbones load in bf16 on GPU (half the memory, what training ran in);
    the adapters stay fp32 and autocast mixes the two (inference_context). CPU: fp32, where bf16 matmuls are slow."""
    check_inference_args(args)
    ckpt = load_checkpoint(args.adapter)
    if evaluating:
        check_eval_data(args, ckpt)
    rank, _, world, device = setup_distributed()
    if args.device and world == 1:
        device = torch.device(args.device)  # under torchrun each rank keeps the GPU of its LOCAL_RANK
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if rank == 0:
        print(f"loading {args.adapter} on {device} ({dtype}) ...", file=sys.stderr)  # stdout: answers only
    frozen = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    over = {k: getattr(args, k) for k in ("llama_dir", "clip_path", "tokenizer", "tau", "clip_every", "quant",
                                          "data_dir")}
    model, tok, info = load_for_inference(ckpt, device, frozen, over)
    limit = model.llama.args.max_seq_len  # prompt (< limit) + answer then fit the RoPE tables (2 x limit)
    check_flags(args, [("max_new_tokens", lambda v: v <= limit, f"in [1, {limit}] (the model's max_seq_len: prompt "
                                                                 f"and answer must fit its RoPE table of 2 x {limit})")])
    return rank, world, device, model, tok, info


def run(args, rank, world, model, tok, info):
    """Score a split with the flags of add_eval_flags (evaluate.py and sample.py --eval)."""
    if args.benchmark == "mme":
        return run_mme(args, rank, world, model, tok, info)
    problems = data.load_scienceqa(info["data_dir"], args.split)[:args.limit]  # [:None] is the whole split
    evaluate(model, tok, problems, info["data_dir"], args.split, info["prompt_format"], info["norm"],
             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, rank=rank, world=world,
             merge=not args.no_merge, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
             out=preds_path(args))


def main(argv=None):
    args = get_args(argv)
    rank, world, _, model, tok, info = inference_setup(args)
    run(args, rank, world, model, tok, info)
    teardown_distributed()


if __name__ == "__main__":
    cli(main)
