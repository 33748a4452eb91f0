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

`python sample.py --eval ...` is the same command. Answers are parsed with the official pattern "The answer is X.";
an unparsable answer falls back to a *seeded* random choice, and the fallbacks are counted (README, difference 16).
Greedy by default, so results depend on neither seed nor batch; `--temperature 0.1 --top_p 0.75` is what the
official evaluation samples with. Also home to loading a trained model for inference (train.py evaluates through
`evaluate`, sample.py loads through `load_for_inference`).

Tests: `python -m pytest -q test_all.py -k test_evaluate_`.
"""

import argparse
import json
import random
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

import data
from adapters import LoRALinear
from cli import (UserError, add_model_flags, check_device, check_flags, check_paths, check_split, check_vocab,
                 check_writable, cli, default_dtype, setup_distributed, teardown_distributed)
from model import LaVIN, Transformer, load_checkpoint, load_trained


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
    check_vocab(tok, model.llama.args.vocab_size, info["tokenizer"] or info["llama_dir"], info["llama_dir"])
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
# The command line (cli.add_model_flags, shared with sample.py, and the evaluation flags, which sample.py --eval takes)

def add_eval_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("evaluation")
    g.add_argument("--split", default="test")
    g.add_argument("--data_dir", help="ScienceQA root (default: what the checkpoint records)")
    g.add_argument("--limit", type=int, help="evaluate the first N problems only (a smoke run)")
    g.add_argument("--batch_size", type=int, default=16, help="prompts per generate() call on each rank")
    g.add_argument("--out", help="predictions JSON (default: preds_{split}.json next to the checkpoint)")


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
    and somewhere to write the predictions."""
    data_dir = args.data_dir or (ckpt["args"].get("data_dir") if "config" in ckpt else None)
    if data_dir is None:
        raise UserError("--data_dir: needed to evaluate (the ScienceQA root); the adapter file records none")
    check_split("split", args.split, data_dir)
    check_writable("out", preds_path(args).parent)


def preds_path(args) -> Path:
    return Path(args.out) if args.out else Path(args.adapter).parent / f"preds_{args.split}.json"


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
    dtype = args.dtype or default_dtype(device)
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
