"""
Talk to a trained LaVIN, or evaluate it on ScienceQA fast: one generation path (LaVIN.generate in model.py) behind an
interactive chat, a one-shot prompt, and a batched, multi-process evaluation (Luo et al., NeurIPS 2023, §4.1;
luogen1996/LaVIN eval.py, demo.py, lavin/generator.py; spec lavin-spec.md §7.1, §9, §12b, §12e).

    python sample.py                                          # chat with the quick start's out/ckpt.pt (CPU is fine)
    python sample.py --prompt "What color is the circle?" --image quiz/images/test/3301/image.png   # one answer
    python sample.py --adapter out/ckpt.pt --eval --split test                         # ScienceQA eval, one GPU
    torchrun --standalone --nproc_per_node 8 sample.py --adapter out/ckpt.pt --eval    # the split sharded over 8 GPUs
    python sample.py --adapter LaVIN-7B/checkpoint-19.pth --llama_dir /data/LLaMA/7B \\
        --clip_path /data/clip/ViT-L-14.pt --eval --data_dir /data/ScienceQA           # an official adapter file

In the chat, type a question; `/image PATH` attaches an image (`/image` alone removes it), `/temp T`, `/top_p P` and
`/max N` change the sampling, `/reset` starts a new conversation, `/quit` or Ctrl-D leaves. Answers stream token by
token. Piped stdin works the same way, so a session can be scripted.

What generation does, and where it departs from the official code (details in model.py, LaVIN.generate):
- a static KV cache; the routing weights of every layer are read once, at prefill, from the modality token;
- prompts of different lengths are left-padded with per-row RoPE positions, so a batch gives the tokens each prompt
  gives alone (the official code forces prompt tokens into a shared buffer and decodes one position short, §11
  quirk 2), and the loop stops once every row has produced EOS (quirk 12);
- by default the LLaMA-side adapters are folded into q/k/v for the batch's modality (§12e), so they cost nothing;
  `--no_merge` runs them as separate modules, for comparison;
- greedy by default, so results do not depend on a seed or on the batch; `--temperature 0.1 --top_p 0.75` is what
  the official evaluation samples with (§7.1);
- an unparsable answer falls back to a *seeded* random choice, and the fallbacks are counted (§11 quirk 5).

Tests: `python -m pytest -q test_all.py -k "generate or session or eval or official"`.
"""

import argparse
import json
import os
import random
import re
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

import clip_vit
import data
from adapters import AdapterArgs, load_trainable
from model import LaVIN, load_lavin
from train import build_from_checkpoint, load_checkpoint, setup_distributed


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--adapter", default="out/ckpt.pt",
                   help="adapter checkpoint: train.py's ckpt.pt (default: the quick start's) or an official LaVIN .pth")
    g.add_argument("--llama_dir", help="LLaMA folder, Meta's or Hugging Face's (default: what the checkpoint records)")
    g.add_argument("--clip_path", help="OpenAI CLIP ViT-L-14.pt, a vision state dict, or a Hugging Face CLIP folder or "
                                       ".safetensors file (default: the checkpoint's)")
    g.add_argument("--tokenizer", help="SentencePiece tokenizer.model or a folder holding it (default: the "
                                       "checkpoint's; for an official adapter file, LLaMA's, in or beside "
                                       "--llama_dir)")
    g.add_argument("--tau", type=float, help="router temperature of an official adapter file (default: 10 for a "
                                             "4096-wide LLaMA (7B), 5 otherwise, as the official scripts)")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", help="one-shot: answer this and exit")
    g.add_argument("--image", help="the image that goes with --prompt (without --prompt: attached as the chat starts)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default: deterministic and batch-independent); the official eval uses 0.1")
    g.add_argument("--top_p", type=float, default=0.75, help="nucleus sampling threshold when temperature > 0")
    g.add_argument("--max_new_tokens", type=int, default=64, help="64 as the official eval.py")
    g.add_argument("--seed", type=int, default=1, help="torch.manual_seed(1) as the official eval.py")
    g.add_argument("--no_merge", action="store_true", help="run the adapters as modules instead of folding them (§12e)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="generate for a ScienceQA split, print the score table")
    g.add_argument("--split", default="test")
    g.add_argument("--data_dir", help="ScienceQA root (default: what the checkpoint records)")
    g.add_argument("--limit", type=int, help="evaluate the first N problems only (a smoke run)")
    g.add_argument("--batch_size", type=int, default=16, help="prompts per generate() call on each rank")
    g.add_argument("--out", help="predictions JSON (default: preds_{split}.json next to the checkpoint)")
    g = p.add_argument_group("system")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; torchrun picks per rank)")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="frozen weights and compute: bf16 on GPU (default), fp32 on CPU (default)")
    return p.parse_args(argv)


# =====================================================================================================================
# Loading: this project's checkpoints and the official adapter files

def read_adapter_file(path) -> dict:
    """
    train.py's checkpoint, or an official LaVIN `checkpoint-{epoch}.pth` (spec §10.3). The official file pickles an
    argparse.Namespace next to the weights, which torch.load's safe mode refuses; instead of unpickling arbitrary code
    (weights_only=False) we allow-list exactly that one class.
    """
    try:
        return load_checkpoint(path)  # clear messages for a missing or corrupt file of ours
    except ValueError as ours:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise ours from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise ours from None
        return ckpt


def load_model(args, device, dtype):
    """
    -> (model in eval mode, tokenizer, info). info holds what generation needs to know about how the model was trained:
    image_size, norm, prompt format, data_dir. Flags override the paths a checkpoint records (e.g. after moving the
    weights to another machine).
    """
    ckpt = read_adapter_file(args.adapter)
    if "config" in ckpt:  # ours: the checkpoint says how to rebuild the model (style guide §2.3)
        a = dict(ckpt["args"])  # the training flags, base-weight paths included
        for flag in ("llama_dir", "clip_path", "tokenizer"):
            a[flag] = getattr(args, flag) or a.get(flag)  # a flag given here wins
        model, tok = build_from_checkpoint(dict(ckpt, args=a), device, dtype)  # train.py's one way to rebuild
        info = dict(norm=a.get("norm", "imagenet"), fmt=a.get("prompt_format", "QCM-ALE"), data_dir=a.get("data_dir"),
                    chat="instruction" if a.get("instruction_json") else "scienceqa")
    else:  # official: weights only, so the architecture comes from the base weights and the adapters' shapes
        sd = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}  # saved from inside DDP
        if "layers.0.adapter_attn.conv_B.weight" not in sd:
            raise ValueError(f"{args.adapter} is neither a train.py checkpoint (no 'config') nor an official LaVIN "
                             f"adapter file (no layers.0.adapter_attn.conv_B.weight)")
        if args.llama_dir is None or args.clip_path is None:
            raise SystemExit(f"{args.adapter} is an official LaVIN adapter file, which records no base weights: "
                             f"pass --llama_dir (e.g. /data/LLaMA/7B) and --clip_path (ViT-L-14.pt)")
        width = sd["layers.0.adapter_attn.conv_B.weight"].shape[0]  # C: 4096 for 7B, 5120 for 13B
        tau = args.tau if args.tau is not None else (10.0 if width == 4096 else 5.0)  # finetuning_sqa_{7b,13b}.sh
        model = load_lavin(args.llama_dir, args.clip_path, AdapterArgs(method="mma", tau=tau), device, dtype)
        load_trainable(model, sd)  # converts the official conv_A/B/D, expert_weights names (adapters.py)
        tok = data.Tokenizer(args.tokenizer or args.llama_dir)  # a folder: its tokenizer.model, in it or beside it
        # The official pipeline: ImageNet normalisation (quirk 3) and QCM-ALE prompts (every script, quirk 9).
        info = dict(norm="imagenet", fmt="QCM-ALE", data_dir=None, chat="scienceqa")
    if model.llama.args.vocab_size != tok.n_words:
        raise SystemExit(f"the tokenizer has {tok.n_words} pieces but the LLaMA has a "
                         f"{model.llama.args.vocab_size}-row embedding: pass the --tokenizer of that --llama_dir")
    info["data_dir"] = args.data_dir or info["data_dir"]
    info["image_size"] = model.visual.args.image_size
    return model.eval(), tok, info


def compute_context(model: LaVIN):
    """
    Frozen weights in bf16/fp16 next to fp32 adapters (how train.py and load_lavin keep them on GPU) only mix under
    autocast, which casts every matmul to the frozen dtype, as in training. An all-fp32 model needs nothing.
    """
    w = model.llama.tok_embeddings.weight  # a frozen weight: its dtype is the one the backbones were loaded in
    # Under FSDP2 the gathered copies already carry the policy's compute dtype, so this also picks the right context.
    return nullcontext() if w.dtype == torch.float32 else torch.autocast(w.device.type, dtype=w.dtype)


def use_modality(model: LaVIN, modality: int, merge: bool):
    """
    Make the model ready for rows of one modality (0 text-only, 1 image). Merged (§12e): the LLaMA-side adapters are
    folded into q/k/v with that modality's routing; merge() is a no-op when already merged for it and re-merges when
    the modality changes. MixLoRA picks its factors per input, so it has nothing static to fold and runs unmerged.
    """
    if merge and model.adapter_args.method in ("mma", "lora"):
        # Outside autocast on purpose: the fold is computed in fp32 and stored in the frozen dtype (the adapters cast
        # their inputs to their own fp32, so the mixed-dtype blocks run here too).
        model.merge(modality)
    else:
        model.unmerge()


# =====================================================================================================================
# Generation of one answer, streamed

@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy: reproducible, and a batch gives what each prompt gives alone
    top_p: float = 0.75  # the official eval's and demo's nucleus; only used when temperature > 0
    max_new_tokens: int = 64  # the official eval's limit; generation stops earlier at EOS


class Streamer:
    """
    LaVIN.generate's on_token callback for a batch of one: prints the answer as it grows. Decoding each token alone
    would lose the spaces: SentencePiece marks a word start with "▁" and decode() drops the leading space of the first
    piece, so "▁is" alone decodes to "is". Instead we decode the whole answer so far and print only what is new
    (gpt-fast's trick); a trailing U+FFFD means a multi-byte character is still incomplete, so we wait for the rest.
    """

    def __init__(self, tok: data.Tokenizer, write):
        self.tok, self.write = tok, write
        self.ids, self.shown, self.done = [], "", False

    def __call__(self, next_tokens: torch.Tensor):  # (1,) the token just chosen
        t = int(next_tokens[0])
        self.done = self.done or t == self.tok.eos_id  # generate() keeps emitting EOS for finished rows
        if self.done:
            return
        self.ids.append(t)
        text = self.tok.decode(self.ids)  # O(answer length) per token: nothing next to a forward pass
        if not text.endswith("\ufffd"):  # LLaMA's byte-fallback pieces spell rare characters byte by byte
            self._emit(text)

    def finish(self):
        self._emit(self.tok.decode(self.ids))

    def _emit(self, text):
        # Decoding a longer list only appends (pieces map to fixed strings), so the new text is the suffix.
        if len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def answer(model: LaVIN, tok, prompt_ids: list[int], image: torch.Tensor | None, s: Sampling, generator,
           merge: bool = True, on_text=None) -> str:
    """One prompt (data.py's layout: BOS, prefix, placeholders, text) and an optional image (3, S, S) -> the answer
    text. With on_text, pieces of the answer are passed to it as they are generated."""
    has_image = image is not None
    use_modality(model, int(has_image), merge)  # re-folds only when the modality changed since the last answer
    streamer = Streamer(tok, on_text) if on_text is not None else None
    with compute_context(model):
        ids = model.generate([prompt_ids], [has_image], image[None] if has_image else None, s.max_new_tokens,
                             s.temperature, s.top_p, tok.eos_id, generator, on_token=streamer)[0]
    if streamer is not None:
        streamer.finish()  # whatever was held back (an incomplete character at the very end)
    return tok.decode(ids)


def chat_prompt(tok, info: dict, turns: list, line: str, has_image: bool, budget: int) -> list[int]:
    """
    The prompt for a typed line. A chatbot (trained on instruction data) gets the whole conversation through
    data.encode_dialogue, the one place the "Instruction: ...\\nResponse:" template lives. A model trained on ScienceQA
    (the quick start's included) knows only that prompt format, so the line becomes one ScienceQA problem:
    "What color is the circle? (A) red (B) green" gives the question and its options, context N/A, through
    data.build_prompt; such a model answers one question at a time. `budget` excludes the modality token.
    """
    if info.get("chat") != "scienceqa":
        return data.encode_dialogue(tok, turns + [(line, None)], has_image, budget + 1)["tokens"].tolist()
    parts = re.split(r"\(([A-E])\)", line)  # "q (A) x (B) y" -> ["q ", "A", " x ", "B", " y"]
    problem = dict(question=parts[0].strip(), choices=[c.strip() for c in parts[2::2]], answer=0, hint="",
                   lecture="", solution="")
    ids = data.encode_prompt(tok, data.build_prompt(problem, info["fmt"])[0], has_image)
    return fit_prompt(tok, ids, has_image, budget)


def prompt_budget(model: LaVIN) -> int:
    """
    Longest prompt, in tokens before the modality token: the training length less the few answer tokens that training
    always keeps (data.MIN_ANSWER_TOKENS, "The answer is X."). This is exactly how data.encode_example cuts over-long
    samples, so every prompt position is one the model was trained at. A long answer may run past max_seq_len: those
    positions are new to the model, but the RoPE tables cover twice max_seq_len, and the scored part comes first.
    """
    return model.llama.args.max_seq_len - 1 - data.MIN_ANSWER_TOKENS


def load_user_image(path, info: dict) -> torch.Tensor:
    """An image file -> (3, S, S), preprocessed exactly as in training (bicubic squash to the tower's size, then the
    checkpoint's normalisation, spec §6.4). clip_vit.load_image raises FileNotFoundError / ValueError naming it."""
    return clip_vit.preprocess(clip_vit.load_image(path), size=info["image_size"], norm=info["norm"])


# =====================================================================================================================
# The interactive session

HELP = ("commands: /image PATH attaches an image (/image alone removes it), /temp T, /top_p P, /max N, "
        "/reset clears the conversation, /help, /quit (or Ctrl-D)")


def set_sampling(s: Sampling, cmd: str, arg: str, max_len: int) -> str:
    """Apply /temp, /top_p or /max; returns the message to show (an error message leaves s unchanged)."""
    try:
        value = float(arg) if cmd != "/max" else int(arg)
    except ValueError:
        return f"{cmd} needs a number, got {arg!r}"
    if cmd == "/temp" and value >= 0:
        s.temperature = value
    elif cmd == "/top_p" and 0 < value <= 1:
        s.top_p = value
    elif cmd == "/max" and 1 <= value <= max_len:  # prompt (< max_len) + answer then fit the RoPE tables (2 x max_len)
        s.max_new_tokens = value
    else:
        bounds = {"/temp": ">= 0", "/top_p": "in (0, 1]", "/max": f"in [1, {max_len}] (the model's max_seq_len)"}
        return f"{cmd} must be {bounds[cmd]}"
    return f"(temperature {s.temperature}, top_p {s.top_p}, max_new_tokens {s.max_new_tokens})"


def chat(model: LaVIN, tok, info: dict, s: Sampling, merge: bool, seed: int, image_path=None):
    """
    A read-eval-print loop on stdin. The whole conversation is re-encoded every turn with data.encode_dialogue (the
    one place the "Instruction: ...\\nResponse:" chat template lives), which drops the oldest turns when the history
    outgrows the window. The sequence has one image slot, right after BOS (spec §2), so attaching or removing an image
    starts a new conversation: earlier answers were about another picture. image_path (--image) is attached first.
    """
    device = model.llama.tok_embeddings.weight.device
    # Seeded once for the whole session (as the official eval seeds once): the same inputs replay the same session.
    generator = torch.Generator(device=device).manual_seed(seed)
    image, turns = None, []  # the attached image (3, S, S) and the finished (question, answer) turns
    print(HELP)
    # The quick start's quiz has images to try; a real data_dir (ScienceQA) works the same way.
    example = next(Path(info["data_dir"], "images").glob("*/*/image.png"), None) if info["data_dir"] else None
    if example is not None:
        print(f"try: /image {example}")
    pending = [f"/image {image_path}"] if image_path else []  # as if typed
    while True:
        try:
            line = pending.pop() if pending else input("you> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, end of piped input, or Ctrl-C at the prompt
            print()
            break
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                turns = []
                print("(conversation cleared)")
            elif cmd == "/image" and not arg:
                image, turns = None, []
                print("(image removed; new conversation)")
            elif cmd == "/image":
                path = os.path.expanduser(arg.strip("'\""))  # paths pasted with quotes, or ~
                try:
                    image = load_user_image(path, info).to(device)
                    turns = []
                    print(f"(image attached: {path}; new conversation)")
                except (FileNotFoundError, ValueError) as e:  # the session goes on with whatever it had before
                    print(f"could not attach the image: {e}")
            elif cmd in ("/temp", "/top_p", "/max"):
                print(set_sampling(s, cmd, arg, model.llama.args.max_seq_len))
            else:
                print(HELP if cmd == "/help" else f"unknown command {cmd}. {HELP}")
            continue
        # Re-encoding the history each turn costs a prefill of the whole conversation. Keeping the KV cache between
        # turns would avoid it, but generate() owns its cache, and a prefill is one batched forward over the prompt,
        # cheap next to decoding the answer one token (one full pass over the weights) at a time.
        prompt = chat_prompt(tok, info, turns, line, image is not None, prompt_budget(model))
        print("lavin> ", end="", flush=True)
        try:
            text = answer(model, tok, prompt, image, s, generator, merge,
                          on_text=lambda piece: print(piece, end="", flush=True))
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            print(" (interrupted)")
            continue
        print()
        turns.append((line, text))  # the answer as text: the next turn re-tokenizes it with the template


# =====================================================================================================================
# Batched evaluation on ScienceQA (also train.py's end-of-training evaluation)

def eval_prompts(tok, problems: list[dict], fmt: str, budget: int) -> list[list[int]]:
    """Each problem's prompt in the training layout (data.encode_prompt: BOS, prefix, placeholders, QCM... text up to
    "Response:"), cut to `budget` tokens the way training cuts an over-long sample: from the start of the question
    (data._fit), keeping BOS, the prefix and the placeholders, and the "Options: ... Response:" end the answer needs."""
    return [fit_prompt(tok, data.encode_prompt(tok, data.build_prompt(rec, fmt)[0], bool(rec.get("image"))),
                       bool(rec.get("image")), budget) for rec in problems]


def fit_prompt(tok, ids: list[int], has_image: bool, budget: int) -> list[int]:
    """Cut a prompt to `budget` tokens from the start of its text, keeping BOS, the prefix and the placeholders."""
    if len(ids) <= budget:
        return ids
    head = len(data.encode_prompt(tok, "", has_image))  # BOS + prefix (+ the six placeholders)
    return ids[:head] + ids[len(ids) - (budget - head):]


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


def generate_split(model: LaVIN, tok, problems, data_dir, split, fmt, batch_size, max_new_tokens, image_size, norm,
                   rank, world, merge, seed, temperature, top_p) -> dict:
    """This rank's share of the generation: {pid: generated text}. Arguments as `evaluate`."""
    dev = model.llama.tok_embeddings.weight.device
    was_training = model.training
    model.eval()  # adapter dropout off (merging is only exact in eval mode)
    prompts = eval_prompts(tok, problems, fmt, prompt_budget(model))
    items = [(int(bool(rec.get("image"))), len(p)) for rec, p in zip(problems, prompts)]
    batches = eval_batches(items, batch_size)
    raw = {}
    for b in tqdm(range(rank, len(batches), world), desc=f"eval {split}", disable=rank != 0, dynamic_ncols=True):
        rows = batches[b]
        modality = items[rows[0]][0]  # the same for the whole batch
        use_modality(model, modality, merge)  # at most two merges per rank: image batches come first
        images = None
        if modality:
            images = torch.stack([data.load_image_tensor(data.image_path(data_dir, split, problems[i]["pid"]),
                                                           problems[i]["pid"], image_size, norm)
                                  for i in rows]).to(dev)  # (B, 3, S, S)
        # One generator per batch, seeded by the batch's index: sampled answers do not depend on which rank ran it.
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + b)
        with compute_context(model):
            outs = model.generate([prompts[i] for i in rows], [bool(modality)] * len(rows), images, max_new_tokens,
                                  temperature, top_p, tok.eos_id, gen)
        for i, o in zip(rows, outs):
            # Only the generated part is kept and parsed. The official code decodes prompt + answer, so its first regex
            # match could in principle come from the prompt (QCM prompts do not contain "The answer is").
            raw[problems[i]["pid"]] = tok.decode(o)
    model.unmerge()  # leave the model as it came: train.py may go on training it
    model.train(was_training)
    return raw


@torch.no_grad()
def evaluate(model: LaVIN, tokenizer, problems: list[dict], data_dir, split, fmt="QCM-ALE", batch_size=16,
             max_new_tokens=64, image_size=224, norm="imagenet", rank=0, world=1, merge=True, seed=1,
             temperature=0.0, top_p=0.75, out=None):
    """
    Generate an answer for every problem (records from data.load_scienceqa), parse and score them (spec §7.1).
    Every rank calls this (its share of the batches runs there; the texts are gathered to all ranks). Rank 0 prints
    the score table and writes `out` (if given) as {pid: {"pred": index, "text": generated}, ..., "fallbacks": n,
    "scores": {...}}. Returns (preds {pid: index}, number of random fallbacks, {pid: generated text}) on every rank.
    The model is left unmerged and in the train/eval mode it came in.
    """
    # Generation, each rank on its own batches; under FSDP2 with the whole model gathered on every rank first.
    with unsharded(model):
        raw = generate_split(model, tokenizer, problems, data_dir, split, fmt, batch_size, max_new_tokens,
                             image_size, norm, rank, world, merge, seed, temperature, top_p)
    if world > 1:  # every rank gets every text (a CPU object gather: the texts are small)
        parts = [None] * world
        dist.all_gather_object(parts, raw)
        raw = {pid: text for part in parts for pid, text in part.items()}

    # Parse in the split's order with a seeded RNG (the official fallback is unseeded, quirk 5): the draws are the same
    # on every rank, in every run and for any number of ranks.
    rng = random.Random(seed)
    preds, n_fallback = {}, 0
    for rec in problems:
        preds[rec["pid"]], fell_back = data.parse_answer(raw[rec["pid"]], len(rec["choices"]), rng)
        n_fallback += fell_back
    if rank == 0:  # every rank holds the same preds; one prints and writes
        scores = data.score_table({rec["pid"]: rec for rec in problems}, preds, n_fallback)
        print(f"ScienceQA {split}: {len(problems)} problems, {world} rank(s), "
              f"{'greedy' if temperature <= 0 else f'temperature {temperature}, top_p {top_p}'}, "
              f"adapters {'merged' if merge else 'unmerged'}")
        print(data.format_table(scores))
        if out is not None:
            record = {pid: {"pred": p, "text": raw[pid]} for pid, p in preds.items()}
            record.update(fallbacks=n_fallback, scores=scores)  # no pid collides: ScienceQA pids are numbers
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(record, indent=1))
            print(f"predictions written to {out}")
    return preds, n_fallback, raw


# =====================================================================================================================

def main(argv=None):
    args = get_args(argv)
    # torchrun sets RANK/WORLD_SIZE: one process per GPU (NCCL) or per CPU process (gloo); plain python: a single one
    rank, _, world, device = setup_distributed()
    if world > 1 and not args.eval:
        raise SystemExit("torchrun is for --eval (the split is sharded over the ranks); chat runs in one process")
    if args.device and world == 1:
        device = torch.device(args.device)  # under torchrun each rank keeps the GPU of its LOCAL_RANK
    # The frozen backbones in bf16 on GPU (half the memory, what training ran in); the adapters stay fp32 and autocast
    # mixes the two (compute_context). CPU: fp32, where bf16 matmuls are slow.
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    frozen = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    log = (lambda *a: print(*a, file=sys.stderr)) if rank == 0 else (lambda *a: None)  # stdout: answers only
    log(f"loading {args.adapter} on {device} ({dtype}) ...")
    try:
        model, tok, info = load_model(args, device, frozen)
    except (FileNotFoundError, ValueError) as e:  # missing or mismatched files: the message says what to do
        raise SystemExit(f"error: {e}") from None
    merge = not args.no_merge

    if args.eval:
        if info["data_dir"] is None:
            raise SystemExit("--eval needs --data_dir (the ScienceQA root): the adapter file does not record one")
        problems = data.load_scienceqa(info["data_dir"], args.split)[:args.limit]  # [:None] is the whole split
        out = args.out or Path(args.adapter).parent / f"preds_{args.split}.json"
        evaluate(model, tok, problems, info["data_dir"], args.split, info["fmt"], args.batch_size,
                 args.max_new_tokens, info["image_size"], info["norm"], rank, world, merge, args.seed,
                 args.temperature, args.top_p, out)
    elif args.prompt is not None:  # one-shot: the answer alone on stdout (messages go to stderr), for scripts
        try:
            image = load_user_image(args.image, info).to(device) if args.image else None
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--image: {e}") from None
        # The same template as one chat turn, so a question gets the same answer here and as a chat's first question
        prompt = chat_prompt(tok, info, [], args.prompt, image is not None, prompt_budget(model))
        generator = torch.Generator(device=device).manual_seed(args.seed)
        s = Sampling(args.temperature, args.top_p, args.max_new_tokens)
        answer(model, tok, prompt, image, s, generator, merge, on_text=lambda t: print(t, end="", flush=True))
        print()
    else:
        chat(model, tok, info, Sampling(args.temperature, args.top_p, args.max_new_tokens), merge, args.seed,
             args.image)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
