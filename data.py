"""
Data for LaVIN: the tokenizer, the sequence layout, ScienceQA reading and prompts, token/label encoding, instruction
data, images and batching. Everything that turns a JSON record into the integer tensors the model trains on.

It follows the official code (github.com/luogen1996/LaVIN) file by file:
- `util/base_prompt.py`        -> build_prompt / PROMPT_FORMATS (strings reproduced exactly)
- `util/datasets.py`           -> encode_example / ScienceQADataset / InstructionDataset (the masking rule)
- `tools/data_processing.py`   -> build_instruction (the "Instruction: ...\nResponse:" template)
Scoring generated answers is evaluate.py's; the generated quiz of the quick start is quiz.py's.

Deliberate departures from the official code, commented where they happen and numbered in the README's "Differences
from the official code": ignore index -100 (8), visual placeholders inside `tokens` (9), batches padded to their
longest row (10), truncation that keeps the answer's start (11), whole multi-turn conversations (12), QCM-ALE by
default (17). Text-only items carry image=None rather than a zero image (2).

Used by train.py, sample.py, evaluate.py, cli.py, quiz.py; tests: `python -m pytest -q test_all.py -k test_data_`.
"""

import json
import random
import re
from pathlib import Path

import sentencepiece as spm
import torch

import clip_vit  # only load_image (RGB, clear errors) and preprocess (bicubic squash + normalisation)
from model import IGNORE

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
# The sequence layout (paper §3.2; lavin/model.py): built by sequence_head, and nowhere else

IMAGE_PREFIX = "Image: "  # LLaMA: ▁Image : ▁ = [7084, 29901, 29871]; the visual tokens follow
TEXT_PREFIX = "Image: N/A"  # LLaMA: ▁Image : ▁N / A = [7084, 29901, 405, 29914, 29909]
# LLaMA's encodings of the two prefixes (test_data_llama_prefixes_and_label_boundary checks them against the real
# tokenizer); bench.py's synthetic batches take their lengths, to lay sequences out as LLaMA's without a tokenizer.
LLAMA_PREFIX_IDS = {True: [7084, 29901, 29871], False: [7084, 29901, 405, 29914, 29909]}
OPTIONS = "ABCDE"  # ScienceQA has at most 5 choices; the official `args.options`
MIN_ANSWER_TOKENS = 8  # what truncation always keeps of an answer: "The answer is X." is 5-6 LLaMA tokens


def sequence_head(bos_id: int, prefix: list[int], n_visual: int) -> list[int]:
    """
    The start of every sequence, after the modality token the model prepends: [BOS] prefix [0] * n_visual, with the
    prefix "Image: " (n_visual = the vision tower's token count, 6 for ViT-L/14) or "Image: N/A" (n_visual = 0).
    The 0s are placeholders whose embeddings the model overwrites with the visual tokens (README, difference 9).
    """
    return [bos_id] + list(prefix) + [0] * n_visual


def visual_slots(tokens: torch.Tensor, has_image: torch.Tensor, n_visual: int,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
    """sequence_head's inverse: where it put the placeholders of image rows, the first n_visual `0` ids after each
    row's BOS (at slot `pad`, 0 without left padding); the "Image: " prefix never encodes to id 0, <unk>. tokens
    (B, T), has_image (B,) -> bool (B, T). For generate.generate, where no collate'd vis_mask is at hand."""
    B, T = tokens.shape
    pad = torch.zeros(B, dtype=torch.long, device=tokens.device) if pad is None else pad
    idx = torch.arange(T, device=tokens.device)[None, :]  # (1, T)
    zeros = (tokens == 0) & (idx > pad[:, None])  # (B, T): placeholders, and nothing else in a well-formed prompt
    rank = zeros.long().cumsum(1)  # 1, 2, ... along each row's zeros
    return zeros & (rank <= n_visual) & has_image.bool()[:, None]


def _head(tok, has_image, n_visual):
    """The head for this tokenizer -> (ids, index of the first placeholder)."""
    if has_image and not n_visual:
        raise ValueError("an image sample needs n_visual, the vision tower's token count (VisionArgs.n_tokens)")
    prefix = tok.encode(IMAGE_PREFIX if has_image else TEXT_PREFIX, bos=False, eos=False)
    return sequence_head(tok.bos_id, prefix, n_visual if has_image else 0), 1 + len(prefix)


# -----------------------------------------------------------------------------
# ScienceQA: files and prompts


def read_json(path):
    """json.loads of a file, with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e


def read_records(path) -> list[dict]:
    """Instruction data: a JSON list of records, or JSONL (one record per line, the layout many instruction sets ship
    in), told apart by content: a list opens with "[", JSONL with its first record's "{". A line that fails is named."""
    try:
        text = Path(path).read_text()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from e
    start = text.lstrip()[:1]
    if start == "[":
        records = [(f"record {i}", rec) for i, rec in enumerate(read_json(path))]
    elif start == "{":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                records += [(f"line {n}", json.loads(line))] if line.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not a JSON record ({e.msg}, column {e.colno}); a file that starts "
                                 f"with {{ is read as JSONL, one record per line") from None
    else:
        raise ValueError(f"{path}: neither a JSON list of records (starts with [) nor JSONL (one {{...}} record per "
                         f"line); it starts with {start or 'nothing'!r}")
    for where, rec in records:
        if not isinstance(rec, dict):
            raise ValueError(f"{path} {where}: a record must be a JSON object {{...}}, not {type(rec).__name__}")
    return [rec for _, rec in records]


SCIENCEQA_LAYOUT = "expected <data_dir>/problems.json, pid_splits.json and images/<split>/<pid>/image.png"


def read_splits(data_dir) -> dict:
    """pid_splits.json of a ScienceQA root: {split: [pid, ...]} (scripts check --split against it before any work)."""
    path = Path(data_dir) / "pid_splits.json"
    if not path.is_file():
        raise FileNotFoundError(f"missing {path} ({SCIENCEQA_LAYOUT})")
    return read_json(path)


def load_scienceqa(data_dir, split) -> list[dict]:
    """The records of one split, in pid_splits order, each a copy with its "pid" added. Validates what we use."""
    data_dir = Path(data_dir)
    splits = read_splits(data_dir)
    if split not in splits:
        raise ValueError(f"split {split!r} not in {data_dir / 'pid_splits.json'} (has: {', '.join(splits)})")
    if not (data_dir / "problems.json").is_file():
        raise FileNotFoundError(f"missing {data_dir / 'problems.json'} ({SCIENCEQA_LAYOUT})")
    problems = read_json(data_dir / "problems.json")
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
    command-line default (and the paper's wording) is CQM-A, which nothing actually ran (README, difference 17).
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
    # (empty lecture and solution) but assigns the result to an unused variable, so "BECAUSE:" stays.
    prompt = prompt.replace("  ", " ").strip()
    answer = answer.replace("  ", " ").strip()
    # Joined with no separator: "...\nResponse:The answer is A. BECAUSE: ..." (as util/datasets.py joins them).
    return prompt, answer


def build_instruction(instruction: str, input: str | None = "") -> str:
    """The chatbot prompt of tools/data_processing.py; it always ends in "Response:" (the official demo's
    "Responese:" typo is not reproduced: README, difference 18).

    Alpaca records use `input` (possibly ""): "Instruction: {instruction} {input}\nResponse: " -> fold + strip, so an
    empty input leaves "Instruction: {instruction} \nResponse:" with a space before the newline, as the official
    data has. LLaVA-Instruct turns have no input slot at all; pass input=None for that form
    ("Instruction: {instruction}\nResponse:").
    """
    slot = "" if input is None else " " + input
    return ("Instruction: " + instruction + slot + "\n" + "Response: ").replace("  ", " ").strip()


# -----------------------------------------------------------------------------
# Tokens and labels (util/datasets.py)


def _split_body(tok, prompt, answer):
    """Joint encoding of prompt + answer + EOS, split at the official boundary len(enc(prompt)).

    Boundary caveat: the boundary is measured on the prompt encoded *alone* but applied to the joint
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
    and for a very long prompt the whole answer, leaving a sample that teaches nothing. Instead (README, 11):
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


def _assemble(tok, segments, has_image, n_visual, truncated):
    """Lay out [BOS] prefix [placeholders] (prompt answer)* with labels only on the answer ids (EOS included)."""
    head, vis_start = _head(tok, has_image, n_visual)
    tokens, labels = list(head), [IGNORE] * len(head)
    for p, a in segments:
        tokens += p + a
        labels += [IGNORE] * len(p) + a
    vis_mask = torch.zeros(len(tokens), dtype=torch.bool)
    if has_image:
        vis_mask[vis_start : vis_start + n_visual] = True
    return dict(
        tokens=torch.tensor(tokens, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        vis_mask=vis_mask,  # (T,) True at the placeholders; collate pads it
        truncated=truncated,
    )


def encode_example(tok, prompt: str, answer: str, has_image: bool, max_seq_len: int = 512, *,
                   n_visual: int = 0) -> dict:
    """One training sample: dict(tokens (T,), labels (T,), vis_mask (T,), truncated bool).

    tokens = sequence_head + enc(prompt+answer) [EOS]; labels are IGNORE except answer + EOS. n_visual: the vision
    tower's token count (image samples). max_seq_len counts the modality token the model prepends: T < max_seq_len.
    """
    head, _ = _head(tok, has_image, n_visual)
    p, a = _split_body(tok, prompt, answer)
    p, a, truncated = _fit(p, a, max_seq_len - 1 - len(head))
    return _assemble(tok, [(p, a)], has_image, n_visual, truncated)


def encode_prompt(tok, prompt: str, has_image: bool, *, n_visual: int = 0) -> list[int]:
    """Inference input: the training layout up to and including "Response:" (no answer, no EOS)."""
    head, _ = _head(tok, has_image, n_visual)
    return head + tok.encode(prompt, bos=False, eos=False)


def fit_prompt(tok, ids: list[int], has_image: bool, budget: int, *, n_visual: int = 0) -> list[int]:
    """Cut an encoded prompt to `budget` tokens the way training cuts an over-long sample (_fit): from the start of
    its text, keeping the head (BOS, prefix, placeholders) and the "Options: ... Response:" end the answer needs."""
    if len(ids) <= budget:
        return ids
    head = len(_head(tok, has_image, n_visual)[0])
    return ids[:head] + ids[len(ids) - (budget - head):]


def encode_dialogue(tok, turns: list, has_image: bool, max_seq_len: int = 512, *, n_visual: int = 0) -> dict:
    """A multi-turn conversation: [BOS] prefix [vis] ("Instruction: u\nResponse:" a [EOS])* , loss on every a + EOS.

    `turns` is a list of (user, assistant); the last assistant may be None for inference (the sequence then ends
    in "Response:"). The official pipeline never trains on a dialogue: it keeps only the first turn, or makes every
    turn its own sample without history (README, difference 12). Keeping the history is what a chat front-end needs,
    so this is the single place the chat template lives (sample.py uses it). A 1-turn dialogue equals encode_example
    of build_instruction(user, None).

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
    head, _ = _head(tok, has_image, n_visual)
    budget = max_seq_len - 1 - len(head)
    inference = turns[-1][1] is None
    truncated = False
    while len(segments) > 1 and sum(len(p) + len(a) for p, a in segments) > budget:
        segments.pop(0 if inference else -1)
        truncated = True
    p, a, cut = _fit(*segments[-1], budget - sum(len(p) + len(a) for p, a in segments[:-1]))
    segments[-1] = (p, a)
    return _assemble(tok, segments, has_image, n_visual, truncated or cut)


def prompt_lengths(problems, tok, fmt: str = "QCM-ALE", *, n_visual: int) -> list[int]:
    """Untruncated length of each problem's training sequence as the model sees it: modality token + BOS + prefix
    (+ n_visual) + prompt + answer + EOS. So "> 512" means "truncated at max_seq_len=512". Takes a list of records
    or a {pid: record} dict."""
    records = problems.values() if isinstance(problems, dict) else problems
    out = []
    for rec in records:
        prompt, answer = build_prompt(rec, fmt)
        enc = encode_example(tok, prompt, answer, bool(rec.get("image")), 10**9, n_visual=n_visual)
        out.append(1 + len(enc["tokens"]))
    return out


# Training-length distribution of real ScienceQA for bench.py: {percentile: modality + BOS ... EOS tokens},
# QCM-ALE, LLaMA tokenizer. The full train records were not available to us (only the test split in full), so this is an
# estimate: every (prompt side of one of the 4,241 complete test problems) + (answer side of one of the 150 full
# records, which have lectures and solutions) pair, i.e. assuming the answer length is independent of the prompt.
# About 11% exceed 512 (the 150 full records alone: 17%). The extreme tail pairs the longest prompt with the longest
# answer, so p100 overstates the real maximum (1,040 among the 150 full records).
# Recompute with test_all.py::test_data_scienceqa_length_percentiles (it asserts these values and prints new ones).
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


def load_image_tensor(path, image_size: int, norm: str) -> torch.Tensor:
    """An image file -> normalised (3, S, S) tensor, as in training and at inference alike (bicubic squash to the
    tower's size, then the normalisation; lavin's transforms). clip_vit.load_image's errors name the file."""
    return clip_vit.preprocess(clip_vit.load_image(path), size=image_size, norm=norm)


def _problem_image(path, pid, image_size, norm):
    """load_image_tensor for a dataset record: errors name the problem id too."""
    try:
        return load_image_tensor(path, image_size, norm)
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
                    img = _problem_image(path, pid, self.image_size, self.norm)
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
                image = _problem_image(s["image_path"], s["pid"], self.image_size, self.norm)  # (3, S, S)
        return dict(tokens=s["tokens"], labels=s["labels"], vis_mask=s["vis_mask"], image=image,
                    has_image=image is not None, pid=s["pid"])


class ScienceQADataset(_EncodedDataset):
    """ScienceQA (or the quiz) in the official layout: items dict(tokens, labels, vis_mask, image, has_image, pid).

    As util/datasets.py, except: text-only items carry image=None instead of a zero image (the model skips the
    visual path for them; README, difference 2), and tokens are not padded here (collate pads per batch).
    """

    def __init__(self, data_dir, split, tokenizer, fmt="QCM-ALE", max_seq_len=512, image_size=224, norm="imagenet", *,
                 n_visual: int, skip_bad=False, cache_images=False):
        super().__init__(image_size, norm, skip_bad, cache_images)
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        self.split, self.fmt = split, fmt
        self.problems = {}  # pid -> record, for scoring
        for rec in load_scienceqa(data_dir, split):
            prompt, answer = build_prompt(rec, fmt)
            has_image = bool(rec.get("image"))
            path = image_path(data_dir, split, rec["pid"]) if has_image else None
            enc = encode_example(tok, prompt, answer, has_image, max_seq_len, n_visual=n_visual)
            if self._add(enc, path, rec["pid"]):
                self.problems[rec["pid"]] = rec


class InstructionDataset(_EncodedDataset):
    """Chatbot data (the official chatbot setting, tools/data_processing.py): a JSON list or JSONL (read_records)
    mixing two record kinds, detected per record.

    - LLaVA-Instruct-150K: {"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}. The whole
      conversation becomes one sample (encode_dialogue). The image file is image_dir / record["image"], the name
      used as given (the official loader prefixes "COCO_train2014_" because its JSON lists bare COCO ids).
    - Alpaca: {"instruction", "input", "output"}, text-only, a single turn with build_instruction(instruction, input).
    """

    def __init__(self, json_path, tokenizer, image_dir=None, max_seq_len=512, image_size=224, norm="imagenet", *,
                 n_visual: int, skip_bad=False, cache_images=False):
        super().__init__(image_size, norm, skip_bad, cache_images)
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        json_path = Path(json_path)
        if not json_path.is_file():
            raise FileNotFoundError(f"instruction data not found: {json_path}")
        for i, rec in enumerate(read_records(json_path)):
            pid = str(rec.get("id", i))
            if "conversations" in rec:
                turns = _llava_turns(rec["conversations"], pid)
                path = None
                if rec.get("image"):
                    if image_dir is None:
                        raise ValueError(f"record {pid} has image {rec['image']!r} but no image_dir was given")
                    path = Path(image_dir) / rec["image"]
                self._add(encode_dialogue(tok, turns, path is not None, max_seq_len, n_visual=n_visual), path, pid)
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
    """Stack dataset items into a batch (the layout model.LaVIN.forward takes). Pads on the right to the longest row
    of *this* batch.

    The official loader pads every sample to max_seq_len=512 up front; the attention and loss ignore the pads either
    way, so padding to the batch maximum gives the same loss for a fraction of the compute (quiz samples are ~60
    tokens; README, difference 10). Pads are token 0 with label IGNORE.
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
