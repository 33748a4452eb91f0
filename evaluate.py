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
calculation tool does, writing the results files that tool reads (the MME section). Also the command line of every
inference script (`inference_setup`; train.py evaluates through `evaluate`). Generation and loading a model for
inference are generate.py's; the flag checks and the one-line report of user errors are cli.py's.

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

import clip_vit
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
# The command line (cli.add_model_flags, shared with sample.py, and the evaluation flags, which sample.py --eval takes)

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
    dtype = args.dtype or default_dtype(device)
    if rank == 0:
        print(f"loading {args.adapter} on {device} ({dtype}) ...", file=sys.stderr)  # stdout: answers only
    frozen = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    over = {k: getattr(args, k) for k in ("llama_dir", "clip_path", "tokenizer", "tau", "clip_every", "quant",
                                          "data_dir")}
    model, tok, info = load_for_inference(ckpt, device, frozen, over)
    limit = model.llama.args.max_seq_len  # prompt (< limit) + answer then fit the RoPE tables (2 x limit)
    check_flags(args, [("max_new_tokens", lambda v: v <= limit,
                        f"in [1, {limit}] (the model's max_seq_len: prompt and answer must fit its RoPE table "
                        f"of 2 x {limit})")])
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
