"""
Generation: the one decoding path of LaVIN, used by evaluation (evaluate.py, train.py's end-of-training scores),
sample.py's chat and one-shot answers, bench.py's decode timings and demo.py's web chat (Luo et al., NeurIPS 2023,
§4.1; luogen1996/LaVIN lavin/generator.py, and demo.py for the streamed chat).

    python sample.py --prompt "What color is the circle?" --image quiz/images/test/3301/image.png   # one answer
    python demo.py                                            # the same answers, in the browser
    python evaluate.py --split test                           # batches of answers, scored

What it holds: loading a trained model for inference (`load_for_inference`) and the prompt budget it leaves; the
decoder (`generate`: a static KV cache, left padding so a batch gives each prompt's tokens alone, correct RoPE
positions and an early stop at EOS; README, differences 3-5); nucleus sampling as the official generator
(`sample_next`); the adapters folded into q/k/v per modality (`for_modality`; difference 6) and CPU weight packing
(`PackedLinear`); and what a chat front-end needs on top: one prompt laid out as training laid it out (`chat_prompt`),
one answer (`answer`) streamed as text that never shows half a character (`Streamer`).

Tests: `python -m pytest -q test_all.py -k test_generate_`.
"""

import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from cli import check_vocab
from adapters import LoRALinear
from model import LaVIN, Transformer, load_trained
from weights import load_checkpoint


# =====================================================================================================================
# Loading a trained model for inference (every inference script's)

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
    round differently in the last bit. Several linears that read the same input (q, k, v; w1, w3) become one, over
    their weights stacked: one call instead of three or two per block and token (Attention.wqkv).
    """

    def __init__(self, lins: list[nn.Linear]):
        super().__init__()
        self.weight = lins[0].weight  # kept for the dtype and device that setup_cache reads
        stack = lambda ts: ts[0].detach() if len(ts) == 1 else torch.cat([t.detach() for t in ts])  # (out, in)
        self.bias = None if lins[0].bias is None else stack([lin.bias for lin in lins])
        self.packed = torch.ops.mkldnn._reorder_linear_weight(stack([lin.weight for lin in lins]), None)
        # What it was packed from: the very tensors (holding them keeps their ids unique) and their in-place versions
        self.sources = [(t, t._version) for lin in lins for t in (lin.weight, lin.bias) if t is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def packs(self, lins: list[nn.Linear]) -> bool:
        """Whether this still packs exactly these linears' current values: the same tensors, untouched since (merge,
        unmerge, load_state_dict and optimizer steps all write in place, which bumps a tensor's version)."""
        now = [t for lin in lins for t in (lin.weight, lin.bias) if t is not None]
        return len(now) == len(self.sources) and all(t is s and t._version == v for t, (s, v) in zip(now, self.sources))


@contextmanager
def packed_linears(llama: Transformer):
    """While generating on CPU in fp32, swap every static linear of the LLaMA (plain, merged LoRA, MMA folded into
    q/k/v) for a PackedLinear, q/k/v and w1/w3 stacked into one each (Attention.wqkv, FeedForward.w13); restore the
    originals afterwards. Elsewhere (GPU, bf16, unmerged LoRA, MixLoRA) a no-op. Measured on 2 quiet cores, one row
    decodes in 0.68x the time of F.linear and eight in about half; on cores other processes keep busy, oneDNN's
    threads can wait on each other and one row was seen 5x slower.
    Packing reads and rewrites every weight (a generate call of 64 tokens at dim 512 spent 11% of its time on it), so
    the packed copies stay in llama.packed for the next call and are reused while their sources are unchanged
    (PackedLinear.packs); each call keeps only what it used. The cost: one more copy of the LLaMA's static weights
    stays in memory between calls, as it already did during each call."""
    w = llama.output.weight
    usable = w.device.type == "cpu" and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    static = lambda lin: type(lin) is nn.Linear or (isinstance(lin, LoRALinear) and lin.merged)
    groups = [(layer.attention, "wqkv", ("wq", "wk", "wv")) for layer in llama.layers]
    groups += [(layer.feed_forward, "w13", ("w1", "w3")) for layer in llama.layers]
    groups = [(mod, name, [getattr(mod, n) for n in parts]) for mod, name, parts in groups]
    fused = [(mod, name, lins) for mod, name, lins in groups  # biases: all or none (MMA's fold gives q/k/v all one)
             if usable and all(static(lin) for lin in lins) and len({lin.bias is None for lin in lins}) == 1]
    done = {id(lin) for _, _, lins in fused for lin in lins}  # their own packing would go unused
    swaps = [(mod, name, lin) for mod in llama.modules() for name, lin in mod.named_children()
             if usable and static(lin) and id(lin) not in done]
    kept, llama.packed = llama.packed, {}

    def packed(lins):  # the cached PackedLinear of these linears if it is still theirs, else a fresh one
        key = tuple(id(lin) for lin in lins)
        p = kept[key] if key in kept and kept[key].packs(lins) else PackedLinear(lins)
        llama.packed[key] = p
        return p

    for mod, name, lin in swaps:
        setattr(mod, name, packed([lin]))
    for mod, name, lins in fused:
        setattr(mod, name, packed(lins))
    try:
        yield
    finally:
        for mod, name, lin in swaps:
            setattr(mod, name, lin)
        for mod, name, _ in fused:
            setattr(mod, name, None)


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
# One answer, streamed: what sample.py's chat and one-shot answers and demo.py share

@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy: reproducible, and a batch gives what each prompt gives alone
    top_p: float = 0.75  # the official eval's and demo's nucleus; only used when temperature > 0
    max_new_tokens: int = 64  # the official eval's limit; generation stops earlier at EOS


class Streamer:
    """
    generate's on_token callback for a batch of one: writes the answer out as it grows. Decoding each token alone
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
           merge: bool = True, on_text=None, on_token=None) -> str:
    """One prompt (data.py's layout: BOS, prefix, placeholders, text) and an optional image (3, S, S) -> the answer
    text. With on_text, pieces of the answer are passed to it as they are generated. on_token(id) sees every chosen
    token first (EOS included); an exception it raises ends the generation there (demo.py's Stop)."""
    has_image = image is not None
    for_modality(model, int(has_image), merge)  # re-folds only when the modality changed since the last answer
    streamer = Streamer(tok, on_text) if on_text is not None else None

    def step(next_tokens):  # (1,) the token just chosen
        if on_token is not None:
            on_token(int(next_tokens[0]))
        if streamer is not None:
            streamer(next_tokens)

    with inference_context(model):
        ids = generate(model, [prompt_ids], [has_image], image[None] if has_image else None, s.max_new_tokens,
                       s.temperature, s.top_p, tok.eos_id, generator, on_token=step)[0]
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
        enc = data.encode_dialogue(tok, turns + [(line, None)], has_image, budget + 1, n_visual=info["n_visual"])
        return enc["tokens"].tolist()
    parts = re.split(r"\(([A-E])\)", line)  # "q (A) x (B) y" -> ["q ", "A", " x ", "B", " y"]
    problem = dict(question=parts[0].strip(), choices=[c.strip() for c in parts[2::2]], answer=0, hint="",
                   lecture="", solution="")
    ids = data.encode_prompt(tok, data.build_prompt(problem, info["prompt_format"])[0], has_image,
                             n_visual=info["n_visual"])
    return data.fit_prompt(tok, ids, has_image, budget, n_visual=info["n_visual"])
