"""
Data for LaVIN: the tokenizer, ScienceQA prompts, token/label layout, batching, scoring, and a generated quiz.

Everything that turns a JSON record into the integer tensors the model trains on lives here, plus the inverse
direction (parsing generated text back into an answer choice and scoring it).

It follows the official code (github.com/luogen1996/LaVIN) file by file:
- `util/base_prompt.py`        -> build_prompt / PROMPT_FORMATS (strings reproduced exactly, spec §6.2)
- `util/datasets.py`           -> encode_example / ScienceQADataset / InstructionDataset (masking rule, spec §6.3)
- `tools/data_processing.py`   -> build_instruction (the "Instruction: ...\nResponse:" template, spec §6.7)
- `eval.py` (+ ScienceQA's `tools/evaluate_acc.py`) -> parse_answer / score_table (spec §7.1)
The design notes are in /work/shared/design/lavin-spec.md; section numbers below refer to it.

Deliberate departures from the official code (each is commented again where it happens):
- Ignore index is -100, not 0 (see IGNORE).
- Batches are padded to their longest row, not to a fixed 512 (see collate).
- Over-long samples keep at least the start of the answer (see _fit); the official code cuts the tail blindly.
- Multi-turn conversations stay whole, with a loss on every answer (see encode_dialogue, spec §6.7).
- The unparsable-answer fallback draws from a seeded RNG and is counted (spec §11 quirk 5).
- Broken or missing images raise an error that names the problem id and the path, or are skipped on request.
- The default prompt format is QCM-ALE, as the official *scripts* use, not the CQM-A of the CLI default (§11 quirk 9).
- Layout: the six visual slots are placeholder ids (0) inside `tokens`, marked by a `vis_mask`, where
  the official model splices the visual features in after embedding; the positions come out the same (spec §2.1).
  Text-only items carry image=None rather than a zero image.

Without real ScienceQA at hand, `ensure_quiz()` generates a small look-alike ("the quiz") in ScienceQA's own file
layout, so the whole pipeline runs on a laptop CPU; see make_quiz for its design.

Commands that use this file:
    python data.py                      # generate ./quiz (+ its tokenizer), print an example and length stats
    python -m pytest -q test_all.py -k "quiz or prompt or score"    # its tests
    train.py / sample.py / bench.py import it (ScienceQADataset, collate, parse_answer, score_table, ...).
"""

import inspect
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image, ImageDraw

import clip_vit  # only load_image (RGB, clear errors) and preprocess (bicubic squash + normalisation, spec §6.4)

# -----------------------------------------------------------------------------
# Tokenizer


def tokenizer_path(path) -> Path:
    """LLaMA's tokenizer.model, given the file or a LLaMA folder: inside it (Hugging Face's layout) or beside it
    (Meta's downloads keep it next to the 7B/ 13B/ folders)."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / "tokenizer.model").is_file():
        return path / "tokenizer.model"
    if (path / "tokenizer.json").is_file():
        raise ValueError(f"{path} has tokenizer.json but no tokenizer.model: a byte-level BPE (tiktoken) tokenizer "
                         f"like Llama-3's, which this project cannot read; it needs a SentencePiece tokenizer.model "
                         f"(LLaMA-1/2, Vicuna)")
    return path.parent / "tokenizer.model"


class Tokenizer:
    """Thin SentencePiece wrapper with the interface of the official `lavin/tokenizer.py`. `model_path` is the
    tokenizer.model file or the LLaMA folder it belongs to (see tokenizer_path)."""

    def __init__(self, model_path):
        path = tokenizer_path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {path}. LLaMA's tokenizer.model sits in a Hugging Face LLaMA folder, or "
                f"at the root of Meta's download (next to the 7B/ 13B/ folders); the generated quiz keeps its "
                f"own at quiz/tokenizer.model."
            )
        with open(path, "rb") as f:
            head = f.read(64)
        # Llama-3's tokenizer.model is tiktoken's text format, "<base64 token> <rank>" per line; SentencePiece's is a
        # binary protobuf and would fail on it with an opaque "could not parse ModelProto"
        if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head.split(b"\n")[0]):
            raise ValueError(f"{path} is a tiktoken BPE rank file (Llama-3's tokenizer), which this project cannot "
                             f"read; it needs a SentencePiece tokenizer.model (LLaMA-1/2, Vicuna)")
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.n_words = self.sp.vocab_size()  # 32000 for LLaMA
        self.bos_id = self.sp.bos_id()  # 1
        self.eos_id = self.sp.eos_id()  # 2
        # LLaMA has no pad piece (pad_id() == -1); id 0 is <unk>, which LaVIN uses as the pad value.

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        # Negative ids (IGNORE, official -1 pads) and 0 (our pad and the visual placeholders) are not text.
        # SentencePiece itself drops BOS/EOS, which are control pieces.
        return self.sp.decode([int(i) for i in ids if int(i) > 0])


# -----------------------------------------------------------------------------
# Sequence layout constants (spec §2)

IMAGE_PREFIX = "Image: "  # LLaMA: ▁Image : ▁ = [7084, 29901, 29871]; six visual tokens follow
TEXT_PREFIX = "Image: N/A"  # LLaMA: ▁Image : ▁N / A = [7084, 29901, 405, 29914, 29909]
N_VISUAL = 6  # one CLS feature from every 4th of CLIP's 24 blocks (spec §1.6)
# The official code maps pads and masked positions to 0 and uses ignore_index=0. That is equivalent to -100,
# because id 0 (<unk>) never occurs as a target; -100 (PyTorch's default) keeps id 0 free to be the pad and the
# visual placeholder in `tokens` without any risk of it being scored.
IGNORE = -100
OPTIONS = "ABCDE"  # ScienceQA has at most 5 choices; the official `args.options`
MIN_ANSWER_TOKENS = 8  # what truncation always keeps of an answer: "The answer is X." is 5-6 LLaMA tokens


def _head(tok, has_image):
    """[BOS] enc(prefix) [0]*6 (image) or [BOS] enc(prefix) (text). Returns (ids, index of first placeholder)."""
    prefix = tok.encode(IMAGE_PREFIX if has_image else TEXT_PREFIX, bos=False, eos=False)
    # The six 0s are placeholders: the model overwrites their embeddings with the visual neck's outputs.
    return [tok.bos_id] + prefix + ([0] * N_VISUAL if has_image else []), 1 + len(prefix)


def image_slots(tok) -> slice:
    """Positions of the six placeholders in any image sequence (before the model prepends its modality token)."""
    _, start = _head(tok, True)
    return slice(start, start + N_VISUAL)


# -----------------------------------------------------------------------------
# ScienceQA: files and prompts (spec §6.1, §6.2)


def load_scienceqa(data_dir, split) -> list[dict]:
    """The records of one split, in pid_splits order, each a copy with its "pid" added. Validates what we use."""
    data_dir = Path(data_dir)
    layout = "expected <data_dir>/problems.json, pid_splits.json and images/<split>/<pid>/image.png"
    for name in ("problems.json", "pid_splits.json"):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"missing {data_dir / name} ({layout})")
    problems = json.loads((data_dir / "problems.json").read_text())
    splits = json.loads((data_dir / "pid_splits.json").read_text())
    if split not in splits:
        raise ValueError(f"split {split!r} not in {data_dir / 'pid_splits.json'} (has: {', '.join(splits)})")
    records = []
    for pid in splits[split]:
        pid = str(pid)
        if pid not in problems:
            raise ValueError(f"pid {pid} of split {split!r} is missing from {data_dir / 'problems.json'}")
        if not isinstance(problems[pid], dict):
            raise ValueError(f"ScienceQA record pid {pid}: expected an object, got {type(problems[pid]).__name__}")
        rec = dict(problems[pid], pid=pid)
        _check_record(rec)
        records.append(rec)
    return records


def _check_record(rec):
    """Fail early, naming the pid and the field, rather than deep inside a DataLoader worker."""
    pid = rec.get("pid", "?")

    def bad(field, why):
        raise ValueError(f"ScienceQA record pid {pid}: field {field!r} {why}")

    if not isinstance(rec.get("question"), str):
        bad("question", "must be a string")
    choices = rec.get("choices")
    if not (isinstance(choices, list) and 1 <= len(choices) <= 5 and all(isinstance(c, str) for c in choices)):
        bad("choices", f"must be a list of 1-5 strings, got {choices!r}")
    answer = rec.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        bad("answer", f"must be an index into the {len(choices)} choices, got {answer!r}")
    for field in ("hint", "lecture", "solution", "image"):  # None is accepted and read as "" / no image
        if rec.get(field) is not None and not isinstance(rec[field], str):
            bad(field, f"must be a string or null, got {type(rec[field]).__name__}")


# The official create_training_example, as two tables. Input part: Q question, C context, M options,
# L lecture, E solution ("explanation"); the QCML... variants are the paper's "upper bound" experiments.
_INPUTS = {
    "CQM": "Context: {context}\nQuestion: {question}\nOptions: {options}\n",
    "QCM": "Question: {question}\nContext: {context}\nOptions: {options}\n",
    "QCML": "Question: {question}\nContext: {context}\nOptions: {options}\nBECAUSE: {lecture}\n",
    "QCME": "Question: {question}\nContext: {context}\nOptions: {options}\nBECAUSE: {solution}\n",
    "QCMLE": "Question: {question}\nContext: {context}\nOptions: {options}\nBECAUSE: {lecture} {solution}\n",
    "QCLM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {options}\n",
    "QCEM": "Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {options}\n",
    "QCLEM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture} {solution}\nOptions: {options}\n",
}
_OUTPUTS = {
    "A": "The answer is {letter}.",
    # Official quirk, reproduced: "AL" puts the *solution* after BECAUSE and "AE" the *lecture*, the reverse of
    # what the letters (L = lecture, E = explanation) suggest.
    "AL": "The answer is {letter}. BECAUSE: {solution}",
    "AE": "The answer is {letter}. BECAUSE: {lecture}",
    "ALE": "The answer is {letter}. BECAUSE: {lecture} {solution}",
    "AEL": "The answer is {letter}. BECAUSE: {solution} {lecture}",
    "LA": "{lecture} The answer is {letter}.",
    "EA": "{solution} The answer is {letter}.",
    "LEA": "{lecture} {solution} The answer is {letter}.",
    "ELA": "{solution} {lecture} The answer is {letter}.",
}
PROMPT_FORMATS = tuple(f"{i}-{o}" for i in _INPUTS for o in _OUTPUTS)  # 8 x 9 = 72, all the official code builds


def build_prompt(problem: dict, fmt: str = "QCM-ALE") -> tuple[str, str]:
    """(prompt, answer) exactly as util/base_prompt.py's build_prompt; the training text is prompt + answer.

    The default is QCM-ALE because that is what every official training and evaluation script passes. The
    command-line default (and the paper's wording) is CQM-A, which nothing actually ran (spec §11 quirk 9).
    """
    if fmt not in PROMPT_FORMATS:
        raise ValueError(
            f"unknown prompt format {fmt!r}; valid formats are INPUT-OUTPUT with INPUT in {list(_INPUTS)} "
            f"and OUTPUT in {list(_OUTPUTS)} (e.g. QCM-ALE, CQM-A)"
        )
    in_fmt, out_fmt = fmt.split("-")
    # Context = hint (+ caption, which every script disables) stripped; "N/A" when empty. Inner newlines stay real.
    context = (problem.get("hint") or "").strip() or "N/A"
    options = " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"]))
    # Only lecture and solution get their newlines escaped to the two characters backslash-n (the official
    # comment: "GPT-3 can generate the lecture with more tokens").
    fields = dict(
        question=problem["question"],
        context=context,
        options=options,
        letter=OPTIONS[problem["answer"]],
        lecture=(problem.get("lecture") or "").replace("\n", "\\n"),
        solution=(problem.get("solution") or "").replace("\n", "\\n"),
    )
    prompt = "\n" + _INPUTS[in_fmt].format(**fields) + "Response:"
    answer = _OUTPUTS[out_fmt].format(**fields)
    # Clean-up, each string separately: one left-to-right pass of "  " -> " " (so 3 spaces become 2), then strip
    # (which also drops the leading "\n" above). The official code then tries to drop a dangling "BECAUSE:"
    # (empty lecture and solution) but assigns the result to an unused variable, so "BECAUSE:" stays (quirk 8).
    prompt = prompt.replace("  ", " ").strip()
    answer = answer.replace("  ", " ").strip()
    # Joined with no separator: "...\nResponse:The answer is A. BECAUSE: ..." (quirk 7).
    return prompt, answer


def build_instruction(instruction: str, input: str | None = "") -> str:
    """The chatbot prompt of tools/data_processing.py (spec §6.7); it always ends in "Response:".

    Alpaca records use `input` (possibly ""): "Instruction: {instruction} {input}\nResponse: " -> fold + strip, so an
    empty input leaves "Instruction: {instruction} \nResponse:" with a space before the newline, as the official
    data has. LLaVA-Instruct turns have no input slot at all; pass input=None for that form
    ("Instruction: {instruction}\nResponse:").
    """
    slot = "" if input is None else " " + input
    return ("Instruction: " + instruction + slot + "\n" + "Response: ").replace("  ", " ").strip()


# -----------------------------------------------------------------------------
# Tokens and labels (spec §2.1, §6.3)


def _split_body(tok, prompt, answer):
    """Joint encoding of prompt + answer + EOS, split at the official boundary len(enc(prompt)).

    Boundary caveat (spec §6.3): the boundary is measured on the prompt encoded *alone* but applied to the joint
    encoding. If SentencePiece merged across "Response:" / "The", the mask would be off by a token. It does not for
    LLaMA's tokenizer on ScienceQA nor for the quiz tokenizer; test_all.py checks both.
    answer=None (inference) gives (enc(prompt), []).
    """
    prompt_ids = tok.encode(prompt, bos=False, eos=False)
    if answer is None:
        return prompt_ids, []
    body = tok.encode(prompt + answer, bos=False, eos=True)
    return body[: len(prompt_ids)], body[len(prompt_ids) :]


def _fit(p, a, budget):
    """Truncate one (prompt ids, answer ids) pair to `budget` tokens. Returns (p, a, truncated).

    The official code pads/cuts the joint sequence to 512 and so silently drops the tail: lecture, solution, EOS,
    and for a very long prompt the whole answer, leaving a sample that teaches nothing. Instead:
    1. cut the answer's tail (EOS goes first) but keep at least MIN_ANSWER_TOKENS of it ("The answer is X.");
    2. if that still does not fit, cut the prompt from its start (the caller keeps BOS, prefix and placeholders).
    (For the rare answer-last formats such as QCM-LEA the kept start is lecture text, not the letter.)
    Real ScienceQA with QCM-ALE: ~17% of full records exceed 512 (see SCIENCEQA_TRAIN_LENGTH_PERCENTILES).
    """
    if len(p) + len(a) <= budget:
        return p, a, False
    a = a[: max(budget - len(p), min(MIN_ANSWER_TOKENS, len(a)))]
    keep_p = budget - len(a)
    if keep_p < 0:
        raise ValueError(f"max_seq_len leaves {budget} text tokens, fewer than the {len(a)} answer tokens kept")
    return p[len(p) - keep_p :], a, True


def _assemble(tok, segments, has_image, truncated):
    """Lay out [BOS] prefix [placeholders] (prompt answer)* with labels only on the answer ids (EOS included)."""
    head, vis_start = _head(tok, has_image)
    tokens, labels = list(head), [IGNORE] * len(head)
    for p, a in segments:
        tokens += p + a
        labels += [IGNORE] * len(p) + a
    vis_mask = torch.zeros(len(tokens), dtype=torch.bool)
    if has_image:
        vis_mask[vis_start : vis_start + N_VISUAL] = True
    return dict(
        tokens=torch.tensor(tokens, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        vis_mask=vis_mask,  # (T,) True at the six placeholders; collate pads it
        truncated=truncated,
    )


def encode_example(tok, prompt: str, answer: str, has_image: bool, max_seq_len: int = 512) -> dict:
    """One training sample: dict(tokens (T,), labels (T,), vis_mask (T,), truncated bool).

    tokens = [BOS] enc(prefix) ([0]*6 if image) enc(prompt+answer) [EOS]; labels are IGNORE except answer + EOS.
    max_seq_len counts the modality token the model prepends, so T <= max_seq_len - 1.
    """
    head, _ = _head(tok, has_image)
    p, a = _split_body(tok, prompt, answer)
    p, a, truncated = _fit(p, a, max_seq_len - 1 - len(head))
    return _assemble(tok, [(p, a)], has_image, truncated)


def encode_prompt(tok, prompt: str, has_image: bool) -> list[int]:
    """Inference input: the training layout up to and including "Response:" (no answer, no EOS; spec §2.2)."""
    head, _ = _head(tok, has_image)
    return head + tok.encode(prompt, bos=False, eos=False)


def encode_dialogue(tok, turns: list, has_image: bool, max_seq_len: int = 512) -> dict:
    """A multi-turn conversation: [BOS] prefix [vis] ("Instruction: u\nResponse:" a [EOS])* , loss on every a + EOS.

    `turns` is a list of (user, assistant); the last assistant may be None for inference (the sequence then ends
    in "Response:"). The official pipeline never trains on a dialogue: it keeps only the first turn, or makes every
    turn its own sample without history (spec §6.7). Keeping the history is what a chat front-end needs, so this
    is the single place the chat template lives (sample.py uses it). A 1-turn dialogue equals encode_example of
    build_instruction(user, None).

    Too long: for training, whole turns are dropped from the end (keeping the conversation's start, like the
    official tail cut); for inference, from the start (keeping the newest question). A lone turn is cut by _fit.
    """
    if not turns:
        raise ValueError("encode_dialogue needs at least one turn")
    segments = []
    for i, (user, assistant) in enumerate(turns):
        if assistant is None and i != len(turns) - 1:
            raise ValueError(f"turn {i}: only the last turn may lack an assistant answer")
        segments.append(_split_body(tok, build_instruction(user, None), assistant))
    head, _ = _head(tok, has_image)
    budget = max_seq_len - 1 - len(head)
    inference = turns[-1][1] is None
    truncated = False
    while len(segments) > 1 and sum(len(p) + len(a) for p, a in segments) > budget:
        segments.pop(0 if inference else -1)
        truncated = True
    p, a, cut = _fit(*segments[-1], budget - sum(len(p) + len(a) for p, a in segments[:-1]))
    segments[-1] = (p, a)
    return _assemble(tok, segments, has_image, truncated or cut)


def prompt_lengths(problems, tok, fmt: str = "QCM-ALE") -> list[int]:
    """Untruncated length of each problem's training sequence as the model sees it: modality token + BOS + prefix
    (+ 6 visual) + prompt + answer + EOS. So "> 512" means "truncated at max_seq_len=512". Takes a list of records
    or a {pid: record} dict."""
    records = problems.values() if isinstance(problems, dict) else problems
    out = []
    for rec in records:
        prompt, answer = build_prompt(rec, fmt)
        out.append(1 + len(encode_example(tok, prompt, answer, bool(rec.get("image")), 10**9)["tokens"]))
    return out


# Training-length distribution of real ScienceQA for bench.py: {percentile: modality + BOS ... EOS tokens},
# QCM-ALE, LLaMA tokenizer. The full train records are not available offline (shared/data/README.md), so this is an
# estimate: every (prompt side of one of the 4,241 complete test problems) + (answer side of one of the 150 full
# records, which have lectures and solutions) pair, i.e. assuming the answer length is independent of the prompt.
# About 11% exceed 512 (the 150 full records alone: 17%). The extreme tail pairs the longest prompt with the longest
# answer, so p100 overstates the real maximum (1,040 among the 150 full records).
# Recompute with test_all.py::test_scienceqa_length_percentiles (it asserts these values and prints new ones).
SCIENCEQA_TRAIN_LENGTH_PERCENTILES = {
    0: 44, 5: 111, 10: 167, 20: 207, 30: 229, 40: 253, 50: 282,
    60: 315, 70: 367, 80: 419, 90: 530, 95: 606, 99: 937, 100: 1435,
}


# -----------------------------------------------------------------------------
# Datasets


def image_path(data_dir, split: str, pid: str) -> Path:
    """Where ScienceQA keeps a problem's picture. The official loader always opens this file, whatever the record's
    "image" field says."""
    return Path(data_dir) / "images" / split / pid / "image.png"


def load_image_tensor(path, pid, image_size, norm):
    """Image file -> normalised (3, S, S) tensor, as in training (spec §6.4); errors name the problem id and the path."""
    try:
        return clip_vit.preprocess(clip_vit.load_image(path), size=image_size, norm=norm)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"problem {pid}: cannot load image {path}: {e}") from e


class _EncodedDataset(torch.utils.data.Dataset):
    """Shared machinery: pre-encoded token/label tensors, images read lazily (or cached), bad images skipped."""

    def __init__(self, image_size, norm, skip_bad, cache_images):
        self.image_size, self.norm = image_size, norm
        self.skip_bad, self.cache_images = skip_bad, cache_images
        self.samples = []  # dict(tokens, labels, vis_mask, image_path or None, pid)
        self.lengths = []  # len(tokens) per sample: for length grouping and bench.py
        self.n_truncated = 0
        self.skipped = []  # (pid, reason) of records left out with skip_bad=True
        self._cache = {}

    def _add(self, enc, path, pid):
        if path is not None:
            try:
                if not path.is_file():
                    raise ValueError(f"problem {pid}: image file missing: {path}")
                if self.skip_bad or self.cache_images:
                    # Decoding every image up front costs time; it is the only way to find corrupt files before
                    # training starts, so do it only when asked (skip_bad) or when the result is kept (cache).
                    img = load_image_tensor(path, pid, self.image_size, self.norm)
                    if self.cache_images:
                        self._cache[len(self.samples)] = img
            except ValueError as e:
                if not self.skip_bad:
                    raise
                self.skipped.append((pid, str(e)))
                return False
        self.samples.append(dict(enc, image_path=path, pid=pid))
        self.lengths.append(len(enc["tokens"]))
        self.n_truncated += enc["truncated"]
        return True

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        image = None
        if s["image_path"] is not None:
            image = self._cache.get(i)
            if image is None:
                image = load_image_tensor(s["image_path"], s["pid"], self.image_size, self.norm)  # (3, S, S)
        return dict(tokens=s["tokens"], labels=s["labels"], vis_mask=s["vis_mask"], image=image,
                    has_image=image is not None, pid=s["pid"])


class ScienceQADataset(_EncodedDataset):
    """ScienceQA (or the quiz) in the official layout: items dict(tokens, labels, vis_mask, image, has_image, pid).

    As util/datasets.py, except: text-only items carry image=None instead of a zero image (the model skips the
    visual path for them, spec §12a), and tokens are not padded here (collate pads per batch).
    """

    def __init__(self, data_dir, split, tokenizer, fmt="QCM-ALE", max_seq_len=512, image_size=224, norm="imagenet",
                 skip_bad=False, cache_images=False):
        super().__init__(image_size, norm, skip_bad, cache_images)
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        self.split, self.fmt = split, fmt
        self.problems = {}  # pid -> record, for scoring
        for rec in load_scienceqa(data_dir, split):
            prompt, answer = build_prompt(rec, fmt)
            has_image = bool(rec.get("image"))
            path = image_path(data_dir, split, rec["pid"]) if has_image else None
            if self._add(encode_example(tok, prompt, answer, has_image, max_seq_len), path, rec["pid"]):
                self.problems[rec["pid"]] = rec


class InstructionDataset(_EncodedDataset):
    """Chatbot data (spec §6.7): a JSON list mixing two record kinds, detected per record.

    - LLaVA-Instruct-150K: {"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}. The whole
      conversation becomes one sample (encode_dialogue). The image file is image_dir / record["image"], the name
      used as given (the official loader prefixes "COCO_train2014_" because its JSON lists bare COCO ids).
    - Alpaca: {"instruction", "input", "output"}, text-only, a single turn with build_instruction(instruction, input).
    """

    def __init__(self, json_path, tokenizer, image_dir=None, max_seq_len=512, image_size=224, norm="imagenet",
                 skip_bad=False, cache_images=False):
        super().__init__(image_size, norm, skip_bad, cache_images)
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        json_path = Path(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"instruction data not found: {json_path}")
        for i, rec in enumerate(json.loads(json_path.read_text())):
            pid = str(rec.get("id", i))
            if "conversations" in rec:
                turns = _llava_turns(rec["conversations"], pid)
                path = None
                if rec.get("image"):
                    if image_dir is None:
                        raise ValueError(f"record {pid} has image {rec['image']!r} but no image_dir was given")
                    path = Path(image_dir) / rec["image"]
                self._add(encode_dialogue(tok, turns, path is not None, max_seq_len), path, pid)
            elif "instruction" in rec and "output" in rec:
                prompt = build_instruction(rec["instruction"], rec.get("input") or "")
                self._add(encode_example(tok, prompt, rec["output"], False, max_seq_len), None, f"alpaca_{i}")
            else:
                raise ValueError(f"{json_path} record {pid}: has neither 'conversations' (LLaVA-Instruct) "
                                 f"nor 'instruction' + 'output' (Alpaca)")


def _llava_turns(conversations, pid):
    """[{"from": "human"}, {"from": "gpt"}, ...] -> [(user, assistant)], with the <image> tags removed."""
    if len(conversations) % 2 or not conversations:
        raise ValueError(f"record {pid}: conversations must alternate human/gpt, got {len(conversations)} messages")
    turns = []
    for j in range(0, len(conversations), 2):
        h, g = conversations[j], conversations[j + 1]
        if h.get("from") != "human" or g.get("from") != "gpt":
            raise ValueError(f"record {pid}: message {j} must be from 'human' and {j + 1} from 'gpt'")
        # The official code removes "<image>\n" and "\n<image>"; a bare "<image>" elsewhere is removed too here.
        user = h["value"].replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "")
        turns.append((user, g["value"]))
    return turns


# -----------------------------------------------------------------------------
# Batching


def collate(samples: list[dict]) -> dict:
    """Stack dataset items into a batch (the layout model.LaVIN.forward takes). Pads on the right to the longest row of *this* batch.

    The official loader pads every sample to max_seq_len=512 up front; the attention and loss ignore the pads either
    way, so padding to the batch maximum gives the same loss for a fraction of the compute (quiz samples are ~60
    tokens). Pads are token 0 with label IGNORE.
    """
    B, T = len(samples), max(len(s["tokens"]) for s in samples)
    tokens = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)  # (B, T)
    vis_mask = torch.zeros(B, T, dtype=torch.bool)  # (B, T)
    images = []
    for b, s in enumerate(samples):
        n = len(s["tokens"])
        tokens[b, :n], labels[b, :n], vis_mask[b, :n] = s["tokens"], s["labels"], s["vis_mask"]
        if s["has_image"]:
            if s["image"] is None:
                raise ValueError(f"sample {s['pid']} has has_image=True but no image tensor")
            images.append(s["image"])
    return dict(
        tokens=tokens,
        labels=labels,
        vis_mask=vis_mask,
        images=torch.stack(images) if images else None,  # (N_img, 3, H, W), image rows in batch order
        has_image=torch.tensor([int(s["has_image"]) for s in samples], dtype=torch.long),  # (B,)
        pids=[s["pid"] for s in samples],
    )


def length_grouped_order(lengths, batch_size: int, seed: int) -> list[int]:
    """An epoch's sample order whose consecutive batch_size-blocks have similar lengths (less padding).

    Shuffle, sort within mega-chunks of 50 batches by length, cut into batches, shuffle the batches. Randomness
    stays (which samples meet in a chunk, batch order); only the within-batch length spread shrinks.
    Optional: the official code shuffles without grouping, and grouping changes which samples share a batch.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = 50 * batch_size
    batches = []
    for c in range(0, len(order), mega):
        chunk = sorted(order[c : c + mega], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


# -----------------------------------------------------------------------------
# Scoring (eval.py, ScienceQA's evaluate_acc.py; spec §7.1)

# The official pattern. The final "." matches any character, and the first match wins.
_ANSWER_RE = re.compile(r"The answer is ([A-Z]).")


def parse_answer(text: str, n_choices: int, rng: random.Random) -> tuple[int, bool]:
    """Generated text -> (choice index, used_fallback).

    A letter outside the first n_choices, or no match at all ("FAILED" in eval.py), becomes a uniformly random
    choice. The official code draws it from Python's unseeded global `random`, so its scores wobble from run to run
    (spec §11 quirk 5); here the caller passes a seeded rng and counts the fallbacks.
    """
    m = _ANSWER_RE.search(text)
    if m and m.group(1) in OPTIONS[:n_choices]:
        return OPTIONS.index(m.group(1)), False
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


# -----------------------------------------------------------------------------
# The quiz: a generated ScienceQA look-alike (the default dataset of the CPU runs)
#
# Same files, same 14 fields, same three kinds of problem as ScienceQA, but short and drawn from a tiny world, so a
# dim-128 LLaMA learns it on a 2-core CPU in minutes:
#  (a) image questions (~45%): one large flat shape in a quadrant of a white picture ("What color is the circle?",
#      "Which shape is red?", "Where is the blue square?"), or 1-4 of them ("How many shapes are in the picture?").
#      The question text and options do not depend on the answer, so a model that ignores the image is at chance
#      (1/5 or 1/4). Some carry a non-informative hint, so TXT and IMG overlap as in ScienceQA.
#  (b) text-context questions (~30%): the hint holds the answer, once ("Ann has a red kite. Ben lives in Oslo.").
#  (c) no-context questions (~25%): a small fixed fact base (animal groups, continents, word types, opposites)
#      that reappears across splits.
# Every question type lists the same options in the same order (see _choices): easy on purpose.
# captions.json describes every drawing completely (colours, shapes, count, positions): a tiny CLIP stand-in is
# pre-trained contrastively on those captions.

QUIZ_VERSION = 4  # bump when the generator changes, so ensure_quiz regenerates stale folders
QUIZ_VOCAB = 768  # quiz tokenizer size (a soft limit): ~250 words + their pieces; more does not shorten the text
# Five saturated colours far apart in RGB, so even a 32x32 input keeps them distinguishable.
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (240, 200, 20),
          "purple": (140, 50, 180)}
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = ("top left", "top right", "bottom left", "bottom right")  # the four quadrants, in reading order
NAMES = ("Ann", "Ben", "Cal", "Dee", "Eva", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Leo")
TEXT_COLORS = ("red", "green", "blue", "yellow", "purple")
OBJECTS = ("kite", "ball", "hat", "cup", "bike", "book", "bag", "boat")
CITIES = ("Paris", "Tokyo", "Cairo", "Lima", "Oslo")
CRITTERS = ("birds", "frogs", "ducks", "dogs", "cats", "bees")
PETS = ("dog", "cat", "fish", "rabbit", "parrot")
# The fact base of the no-context questions: the model can only answer these by memorising them from train.
ANIMALS = {"mammal": ("dog", "cat", "horse", "whale", "bat", "lion"),
           "bird": ("eagle", "owl", "duck", "robin", "penguin"),
           "fish": ("shark", "salmon", "trout", "tuna"),
           "reptile": ("snake", "lizard", "turtle", "crocodile"),
           "insect": ("ant", "bee", "beetle", "butterfly")}
COUNTRIES = {"Egypt": "Africa", "Kenya": "Africa", "Brazil": "South America", "Peru": "South America",
             "France": "Europe", "Spain": "Europe", "Japan": "Asia", "India": "Asia", "Canada": "North America",
             "Mexico": "North America"}
WORDS = {"noun": ("apple", "chair", "river", "teacher", "pencil", "garden"),
         "verb": ("run", "jump", "sing", "write", "swim", "build"),
         "adjective": ("happy", "tall", "soft", "bright", "quiet", "cold")}
OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"),
             ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("loud", "quiet"))
# Hints that say nothing about the answer: they put some image problems in the TXT column too, as in ScienceQA.
IMAGE_HINTS = ("Look at the picture.", "Use the picture to answer the question.", "The picture has a white background.")

# family -> (subject, topic, category, skill, grade range, lectures). A lecture is sometimes left empty; some hold a
# real newline so the "\n" escape of spec §6.2 shows up in training text.
FAMILIES = {
    "img_color": ("natural science", "colors", "Colors", "Identify the color of a shape", (1, 8), (
        "Look at the picture to see the color of each shape.",
        "Red, green, blue, yellow and purple are colors.")),
    "img_shape": ("natural science", "shapes", "Shapes", "Identify a shape by its color", (1, 8), (
        "A circle is round.\nA square has four equal sides.",
        "A triangle has three sides. A diamond is a tilted square.")),
    "img_count": ("natural science", "counting", "Counting", "Count the shapes in a picture", (1, 8), (
        "Count each shape in the picture once.",)),
    "img_place": ("social science", "geography", "Positions", "Find where a shape is in a picture", (1, 8), (
        "A picture has a top and a bottom.\nIt has a left side and a right side.",)),
    "txt_color": ("language science", "reading", "Read for details", "Find a color in a text", (3, 10), (
        "Read the text carefully. The answer is in the text.",)),
    "txt_city": ("social science", "geography", "Places", "Find where someone lives in a text", (3, 10), (
        "Read the text carefully. The answer is in the text.",)),
    "txt_count": ("natural science", "counting", "Counting", "Find a number in a text", (3, 10), (
        "The text tells you how many there are.",)),
    "txt_pet": ("language science", "reading", "Read for details", "Find an animal in a text", (3, 10), (
        "The text tells you the answer.",)),
    "fact_animal": ("natural science", "biology", "Classification", "Identify groups of animals", (2, 12), (
        "Mammals have fur. Birds have feathers.\nFish have fins.",
        "Reptiles have dry scales. Insects have six legs.")),
    "fact_continent": ("social science", "geography", "Continents", "Identify the continent of a country", (2, 12), (
        "Earth has seven continents.",
        "A continent is a very large area of land.")),
    "fact_word": ("language science", "grammar", "Word types", "Identify nouns, verbs and adjectives", (2, 12), (
        "A noun names a thing. A verb names an action.\nAn adjective describes a noun.",)),
    "fact_opposite": ("language science", "vocabulary", "Opposites", "Find the opposite of a word", (2, 12), (
        "Opposites are words with very different meanings.",)),
}
KINDS = {"image": 0.45, "text": 0.30, "fact": 0.25}  # ScienceQA train: 49% image, TXT 48%, NO 34%


def _a(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def _choices(correct, pool):
    """The whole pool (at most 5, ScienceQA's maximum), in its fixed order: like many ScienceQA question types (solid /
    liquid / gas, north / south / east / west), each quiz question type lists the same options in the same order.
    A tiny model then needs no in-context search for the option letter, which it cannot learn in a CPU-minute budget;
    it still has to look at the image or read the hint, since the answer is uniform over the options."""
    assert len(pool) <= 5
    return list(pool), list(pool).index(correct)


def _image_question(rng, family):
    """Draw a picture spec and a question about it."""
    # One shape for the questions about a shape, so that the answer is a property of the whole picture (binding a
    # colour to a shape to a place in a crowded picture is beyond what a tiny ViT + LLaMA learn in CPU minutes);
    # 1-4 shapes for counting.
    n = rng.randint(1, 4) if family == "img_count" else 1
    places = sorted(rng.sample(range(4), n))
    # Each shape: (color, shape, quadrant, dx, dy, size) with jitter as fractions of a quadrant. Colour and shape are
    # drawn independently and uniformly, and the quadrants are a uniform subset, so every answer below is uniform
    # over its options whatever the question's wording.
    spec = [(rng.choice(list(COLORS)), rng.choice(SHAPES), q,
             rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08), rng.uniform(0.6, 0.75)) for q in places]
    if family == "img_count":
        choices, ans = _choices(str(n), ("1", "2", "3", "4"))
        solution = "There is 1 shape." if n == 1 else f"There are {n} shapes."
        return spec, "How many shapes are in the picture?", choices, ans, solution
    col, shp, q = spec[0][:3]  # the one shape
    if family == "img_color":
        choices, ans = _choices(col, list(COLORS))
        return spec, f"What color is the {shp}?", choices, ans, f"The {shp} is {col}."
    if family == "img_shape":
        choices, ans = _choices(shp, SHAPES)
        return spec, f"Which shape is {col}?", choices, ans, f"The {col} shape is {_a(shp)}."
    choices, ans = _choices(PLACES[q], PLACES)
    return spec, f"Where is the {col} {shp}?", choices, ans, f"The {col} {shp} is at the {PLACES[q]}."


def _text_fact(rng, family, who):
    """One sentence about `who` for a text family -> (sentence, question, answer, options, solution)."""
    if family == "txt_color":
        obj, col = rng.choice(OBJECTS), rng.choice(TEXT_COLORS)
        return (f"{who} has {_a(col)} {obj}.", f"What color is {who}'s {obj}?", col, TEXT_COLORS,
                f"{who}'s {obj} is {col}.")
    if family == "txt_city":
        city = rng.choice(CITIES)
        return f"{who} lives in {city}.", f"Where does {who} live?", city, CITIES, f"{who} lives in {city}."
    if family == "txt_count":
        kind, num = rng.choice(CRITTERS), str(rng.randint(2, 6))
        return (f"{who} sees {num} {kind}.", f"How many {kind} does {who} see?", num, [str(i) for i in range(2, 7)],
                f"{who} sees {num} {kind}.")
    pet = rng.choice(PETS)
    return f"{who} has a pet {pet}.", f"What pet does {who} have?", pet, PETS, f"{who} has a pet {pet}."


def _text_question(rng, family):
    """A two-sentence hint: the fact the question asks about, and a fact of another kind about someone else, in random
    order. The answer is uniform over the options and appears in the hint only, once: reading the hint is necessary
    and sufficient. (Two facts of the same kind, which need binding names to values, proved too hard for a tiny model
    to learn in the quick start's CPU minutes.)"""
    a, b = rng.sample(NAMES, 2)
    fact, question, value, options, solution = _text_fact(rng, family, a)
    other = rng.choice([f for f in FAMILIES if f.startswith("txt_") and f != family])
    hint = " ".join(rng.sample([fact, _text_fact(rng, other, b)[0]], 2))
    choices, ans = _choices(value, options)
    return hint, question, choices, ans, solution


def _fact_question(rng, family):
    """A question whose answer is a fact of the fixed base, which recurs across splits (options in a fixed order but
    for the opposites, whose candidates are drawn each time and listed alphabetically)."""
    if family == "fact_animal":
        group = rng.choice(list(ANIMALS))
        animal = rng.choice(ANIMALS[group])
        pool = [animal if g == group else rng.choice(xs) for g, xs in ANIMALS.items()]  # one of each group
        choices, ans = _choices(animal, pool)
        return f"Which animal is {_a(group)}?", choices, ans, f"{_a(animal).capitalize()} is {_a(group)}."
    if family == "fact_continent":
        country = rng.choice(list(COUNTRIES))
        cont = COUNTRIES[country]
        choices, ans = _choices(cont, sorted(set(COUNTRIES.values())))
        return f"Which continent is {country} in?", choices, ans, f"{country} is in {cont}."
    if family == "fact_word":
        kind = rng.choice(list(WORDS))
        picks = {k: rng.choice(v) for k, v in WORDS.items()}  # one word of each type
        choices, ans = _choices(picks[kind], list(picks.values()))
        return f"Which word is {_a(kind)}?", choices, ans, f"The word {picks[kind]} is {_a(kind)}."
    word, opp = rng.choice(OPPOSITES)[:: rng.choice((1, -1))]
    others = rng.sample([w for pair in OPPOSITES for w in pair if word not in pair], 2)
    choices, ans = _choices(opp, sorted([opp, *others]))  # alphabetical: the one family that needs a look-up
    return f"What is the opposite of {word}?", choices, ans, f"The opposite of {word} is {opp}."


def _caption(spec):
    parts = [f"{_a(c)} {s} at the {PLACES[q]}" for c, s, q, *_ in spec]
    n = len(spec)
    return f"{n} shape{'s' if n > 1 else ''} on a white background: " + ", ".join(parts) + "."


def _draw(spec, size):
    """Flat shapes, one per quadrant, on white. Large and well apart so a tiny ViT can tell them apart."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    half = size / 2
    for col, shp, q, dx, dy, scale in spec:
        cx, cy = (q % 2 + 0.5 + dx) * half, (q // 2 + 0.5 + dy) * half  # quadrant centre + jitter, in pixels
        r = scale * half / 2
        box = (round(cx - r), round(cy - r), round(cx + r), round(cy + r))
        if shp == "circle":
            draw.ellipse(box, fill=COLORS[col])
        elif shp == "square":
            draw.rectangle(box, fill=COLORS[col])
        elif shp == "triangle":
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLORS[col])
        else:  # diamond
            draw.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=COLORS[col])
    return img


def _quiz_record(rng, split):
    """One problem in ScienceQA's schema, plus (spec, key); spec is None for text-only problems."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    family = rng.choice([f for f in FAMILIES if f.startswith({"image": "img", "text": "txt", "fact": "fact"}[kind])])
    subject, topic, category, skill, (g_lo, g_hi), lectures = FAMILIES[family]
    spec, hint = None, ""
    if kind == "image":
        spec, question, choices, answer, solution = _image_question(rng, family)
        if rng.random() < 0.4:
            hint = rng.choice(IMAGE_HINTS)
        key = (question, tuple(spec))  # the drawing itself: jitter and size make every picture new
    elif kind == "text":
        hint, question, choices, answer, solution = _text_question(rng, family)
        key = (hint, question)
    else:
        question, choices, answer, solution = _fact_question(rng, family)
        key = None  # facts are meant to reappear across splits
    rec = dict(question=question, choices=choices, answer=answer, hint=hint, image="image.png" if spec else None,
               task="closed choice", grade=f"grade{rng.randint(g_lo, g_hi)}", subject=subject, topic=topic,
               category=category, skill=skill, lecture="" if rng.random() < 0.15 else rng.choice(lectures),
               solution=solution, split=split)
    return rec, spec, key


def make_quiz(out_dir, seed=0, n_train=3000, n_val=300, n_test=600, image_size=64):
    """Write the quiz in ScienceQA's layout: problems.json, pid_splits.json, captions.json, images/{split}/{pid}/.

    Deterministic: the same arguments give byte-identical files. Each split draws from its own RNG stream, and
    val/test image and text problems that coincide with a train problem are redrawn, so held-out questions are new
    combinations (facts, by design, recur).
    """
    out = Path(out_dir)
    problems, splits, captions = {}, {}, {}
    train_keys = set()
    pid = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rng = random.Random(f"quiz-{seed}-{split}")  # str seeds hash deterministically (not via PYTHONHASHSEED)
        splits[split] = []
        for _ in range(n):
            rec, spec, key = _quiz_record(rng, split)
            while split != "train" and key in train_keys:
                rec, spec, key = _quiz_record(rng, split)
            if split == "train" and key is not None:
                train_keys.add(key)
            pid += 1
            problems[str(pid)] = rec
            splits[split].append(str(pid))
            if spec:
                captions[str(pid)] = _caption(spec)
                folder = out / "images" / split / str(pid)
                folder.mkdir(parents=True, exist_ok=True)
                _draw(spec, image_size).save(folder / "image.png", format="PNG")
    out.mkdir(parents=True, exist_ok=True)
    (out / "problems.json").write_text(json.dumps(problems, indent=1))
    (out / "pid_splits.json").write_text(json.dumps(splits))
    meta = {"model": f"quiz generator v{QUIZ_VERSION}", "captions": captions}  # ScienceQA's captions.json layout
    (out / "captions.json").write_text(json.dumps(meta, indent=1))
    return out


def quiz_corpus(quiz_dir, n: int, seed: int = 1) -> list[dict]:
    """
    Text for the quick start's LLaMA stand-in (train.py): n fresh quiz problems drawn with another seed, image problems
    carrying their caption as context (what ScienceQA's caption option does, spec §6.1: context = hint + caption), so a
    language model can learn the quiz's language and reasoning without images. Every problem that coincides with a
    val/test *text* problem of the quiz in `quiz_dir` is left out, so those held-out questions stay unseen. (A caption
    may match a held-out image problem's drawing: the model is tested on reading the picture, which it never sees.)
    """
    quiz_dir = Path(quiz_dir)
    problems = json.loads((quiz_dir / "problems.json").read_text())

    held_out = {(r["hint"], r["question"]) for r in problems.values()
                if r["split"] != "train" and r["hint"] and not r["image"]}  # _quiz_record's key of a text problem
    rng = random.Random(f"corpus-{seed}")
    corpus = []
    while len(corpus) < n:
        rec, spec, _ = _quiz_record(rng, "train")
        caption = _caption(spec) if spec else None
        if not spec and (rec["hint"], rec["question"]) in held_out:
            continue
        if caption:
            rec = dict(rec, hint=f"{rec['hint']} {caption}".strip(), image=None)
        corpus.append(rec)
    return corpus


def train_quiz_tokenizer(out_dir, vocab_size=QUIZ_VOCAB):
    """Train a small BPE SentencePiece model on the quiz's training texts -> out_dir/tokenizer.model.

    Settings mirror what matters of LLaMA's tokenizer: unk/bos/eos = 0/1/2, no pad piece, a dummy-prefix space,
    no whitespace collapsing. Differences: identity normalisation and a "\n" piece (LLaMA encodes newlines with byte
    fallback, which stays off here so every id is a real piece). Frequent words ("The", "answer", "is", "A"..."E")
    become single pieces; hard_vocab_limit=False lets a small quiz end up with fewer pieces than asked.
    """
    out = Path(out_dir)
    problems = json.loads((out / "problems.json").read_text())
    texts = [IMAGE_PREFIX, TEXT_PREFIX, build_instruction("Describe the picture.", None) + "The picture shows shapes."]
    texts += ["".join(build_prompt(rec)) for rec in problems.values()]
    model = io.BytesIO()  # write the model to memory: no stray tokenizer.vocab file next to it
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return out / "tokenizer.model"


def ensure_quiz(out_dir="quiz", **kw) -> Path:
    """Generate the quiz and its tokenizer on first use; reuse a complete folder made with the same settings."""
    out = Path(out_dir)
    defaults = {k: p.default for k, p in inspect.signature(make_quiz).parameters.items() if k != "out_dir"}
    unknown = set(kw) - set(defaults)
    if unknown:
        raise TypeError(f"ensure_quiz got unknown settings {sorted(unknown)}; valid: {sorted(defaults)}")
    config = dict(defaults, **kw, version=QUIZ_VERSION, vocab_size=QUIZ_VOCAB)
    stamp = out / "quiz_config.json"
    files = ("problems.json", "pid_splits.json", "captions.json", "tokenizer.model")
    if stamp.is_file() and json.loads(stamp.read_text()) == config and all((out / f).is_file() for f in files):
        return out
    print(f"generating the quiz in {out}/ ...")
    stamp.unlink(missing_ok=True)  # an interrupted regeneration must not pass for the old, stamped quiz
    make_quiz(out, **{k: config[k] for k in defaults})
    train_quiz_tokenizer(out)
    stamp.write_text(json.dumps(config))  # written last: an interrupted run is regenerated next time
    return out


if __name__ == "__main__":
    folder = ensure_quiz()
    tok = Tokenizer(folder / "tokenizer.model")
    records = load_scienceqa(folder, "train")
    prompt, answer = build_prompt(records[0])
    print(f"{len(records)} train problems, tokenizer with {tok.n_words} pieces. Example:\n{prompt}{answer}\n")
    lengths = np.array(prompt_lengths(records, tok))
    print(f"sequence length (modality token .. EOS): mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}")
