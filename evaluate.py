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
official evaluation samples with, and the command line of every inference script (`inference_setup`; train.py
evaluates through `evaluate`). Generation and loading a model for inference are generate.py's; the flag checks and
the one-line report of user errors are cli.py's.

Tests: `python -m pytest -q test_all.py -k test_evaluate_`.
"""

import argparse
import json
import random
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

import data
from cli import (UserError, add_model_flags, check_device, check_flags, check_paths, check_split, check_writable, cli,
                 default_dtype, setup_distributed, teardown_distributed)
from generate import for_modality, generate, inference_context, load_for_inference, prompt_budget
from model import LaVIN
from weights import load_checkpoint


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
