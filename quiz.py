"""
The quick start's world: a generated quiz in ScienceQA's exact file layout, and pre-trained tiny stand-ins for LLaMA
and CLIP, so that the whole pipeline runs on a laptop CPU with nothing to download. The paper has no such thing: it
exists so that `python train.py` with no flags trains and evaluates LaVIN for real, in minutes.

One call gives what a real run passes as flags:

    data_dir, tokenizer, llama_dir, clip_path = quiz.quick_start("quiz")

- `make_quiz`: problems.json, pid_splits.json, captions.json and images/{split}/{pid}/image.png, exactly as
  ScienceQA lays them out, read back by data.py like the real thing; `train_quiz_tokenizer` a SentencePiece model.
- `pretrain_llama_standin` / `pretrain_clip_standin`: a tiny LLaMA language model on quiz text and a tiny CLIP ViT
  trained contrastively on the quiz's pictures and captions, saved in Meta's and OpenAI's layouts and loaded back
  through the loaders real weights use (model.load_llama, clip_vit.load_clip). Labelled as stand-ins everywhere.

Commands:
    python quiz.py          # generate ./quiz and its tokenizer, print an example and length statistics
    python quiz.py --mme    # a small MME-format folder, quiz/mme (make_mme), for evaluate.py --benchmark mme
    python train.py         # the quick start, which calls quick_start()
    python -m pytest -q test_all.py -k test_quiz_
"""

import inspect
import io
import json
import math
import random
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from clip_vit import VISION_PRESETS, VisionTransformer
from data import (IMAGE_PREFIX, TEXT_PREFIX, Tokenizer, build_instruction, build_prompt, collate, encode_example,
                  image_path, load_image_tensor, load_scienceqa, prompt_lengths)
from model import IGNORE, LLAMA_PRESETS, ModelArgs, Transformer, warmup_cosine
from weights import load_checkpoint, save_checkpoint, to_openai_state_dict

# =====================================================================================================================
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
# real newline so the "\n" escape of base_prompt.py shows up in training text.
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


SPLITS = ("train", "val", "test")  # the quiz's, in pid_splits.json (train.py checks --eval_split against them)


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
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
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
    carrying their caption as context (what ScienceQA's caption option does: context = hint + caption), so a
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


# =====================================================================================================================
# A small MME: the quiz's pictures asked about in MME's release layout and yes/no form (evaluate.py --benchmark mme)
#
# MME's perception subtasks existence, count, color and position, each a folder of pictures with a question file of the
# same stem beside each (the release's first layout), two lines `question<TAB>Yes|No` per picture: one question
# true of the picture, one false, each ending "Please answer yes or no." as MME's do. Only the quiz's own colours,
# shapes, places and counts are used, so a model trained on the quiz knows every word; a yes/no question it has never
# been asked, though, unless it was trained on such questions (README, "MME").

MME_SUFFIX = " Please answer yes or no."


def _mme_item(rng, task):
    """One picture spec and its (true, false) questions for a subtask."""
    n = rng.randint(1, 4) if task == "count" else 1
    spec = [(rng.choice(list(COLORS)), rng.choice(SHAPES), q, rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08),
             rng.uniform(0.6, 0.75)) for q in sorted(rng.sample(range(4), n))]
    col, shp, q = spec[0][:3]
    if task == "existence":
        other = rng.choice([s for s in SHAPES if s != shp])
        return spec, f"Is there {_a(shp)} in the picture?", f"Is there {_a(other)} in the picture?"
    if task == "count":
        other = rng.choice([k for k in range(1, 5) if k != n])
        ask = ("Is there 1 shape", "Are there 2 shapes", "Are there 3 shapes", "Are there 4 shapes")
        return spec, f"{ask[n - 1]} in the picture?", f"{ask[other - 1]} in the picture?"
    if task == "color":
        other = rng.choice([c for c in COLORS if c != col])
        return spec, f"Is the {shp} {col}?", f"Is the {shp} {other}?"
    other = rng.choice([p for p in range(4) if p != q])
    return spec, f"Is the {col} {shp} at the {PLACES[q]}?", f"Is the {col} {shp} at the {PLACES[other]}?"


def make_mme(out_dir, seed=0, n_images=25, image_size=64) -> Path:
    """Write `n_images` pictures per subtask (existence, count, color, position) with their question files, in MME's
    release layout: out_dir/<subtask>/<stem>.png beside <stem>.txt. Deterministic for a seed; 2 x n_images questions
    per subtask, the true one first, as in MME's files."""
    out = Path(out_dir)
    for task in ("existence", "count", "color", "position"):
        rng = random.Random(f"mme-{seed}-{task}")
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_images):
            spec, yes, no = _mme_item(rng, task)
            _draw(spec, image_size).save(folder / f"{i:04d}.png", format="PNG")
            (folder / f"{i:04d}.txt").write_text(f"{yes}{MME_SUFFIX}\tYes\n{no}{MME_SUFFIX}\tNo\n")
    return out


# =====================================================================================================================
# The quick start's stand-ins for downloading LLaMA and CLIP

def _pretrain_batches(n: int, batch: int, steps: int, seed: int) -> list[list[int]]:
    """The whole run's batches, drawn up front from the seed alone, so a resumed run sees the same ones. Uniform draws,
    not length-grouped: length follows the question type, so grouped batches hold one type each, and with them the
    stand-in learnt the fact base worse (NO column 78-84% after 1,000-1,400 steps; 2,500 uniform steps gave 100%)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(n, (batch,), generator=g).tolist() for _ in range(steps)]


def pretrain_llama_standin(quiz: Path, tok: Tokenizer, out: Path, fmt: str, steps: int = 600, batch: int = 32,
                           lr: float = 5e-3, corpus: int = 20_000, save_every: int = 100, seed: int = 0) -> Path:
    """
    Stand-in for LLaMA's pre-training, labelled as such: a tiny LLaMA (the `tiny` preset) learns the quiz's language
    and reasoning from `corpus` freshly drawn quiz problems (quiz_corpus: another seed than the quiz, its held-out
    val/test questions excluded), image problems described by their caption in the context since a language model
    has no eyes. It learns the quiz's language, to read a context and to name the fact and its option letter; it never
    sees the quiz's images. Saved in Meta's layout and read back by load_llama, like real weights.
    Survives an interrupt: every `save_every` steps it writes out/pretrain_ckpt.pt (model, optimizer, step, RNG) and a
    rerun continues from there, bit for bit as if never stopped; the file goes once consolidated.00.pth is written.
    """
    if (out / "consolidated.00.pth").is_file():
        return out
    torch.manual_seed(seed)
    # The corpus's problems are 51-100 tokens (captions included): 128 positions cut none.
    args = ModelArgs(**{**asdict(LLAMA_PRESETS["tiny"]), "vocab_size": tok.n_words, "max_seq_len": 128})
    model = Transformer(args)
    examples = [dict(encode_example(tok, *build_prompt(rec, fmt), False, 128), has_image=False, pid=i)
                for i, rec in enumerate(quiz_corpus(quiz, corpus, seed=seed + 1))]
    batches = _pretrain_batches(len(examples), batch, steps, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    ckpt_path, start = out / "pretrain_ckpt.pt", 0
    config = dict(steps=steps, batch=batch, lr=lr, corpus=corpus, seed=seed, fmt=fmt, quiz=QUIZ_VERSION)
    if ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("config") != config:  # another run's: start over (the next save replaces it)
            print(f"{ckpt_path} is from pre-training with other settings ({ckpt.get('config')}): starting over")
        else:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"])
            start = ckpt["step"]
            print(f"resuming the stand-in LLaMA's pre-training at step {start} of {steps} from {ckpt_path}")
    bar = tqdm(range(start, steps), initial=start, total=steps, dynamic_ncols=True,
               desc="stand-in LLaMA (pre-training on generated quiz text)")
    for step in bar:
        tokens = collate([examples[i] for i in batches[step]])["tokens"]  # (B, T)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step + 1, 50, steps, lr)
        # A language model's loss on every real token (pads excluded): the questions and hints, where names and
        # objects recur, are what teaches it to look things up in its context.
        target = tokens[:, 1:].masked_fill(tokens[:, 1:] == 0, IGNORE)  # (B, T-1)
        logits = model(tokens[:, :-1])  # (B, T-1, V): token t predicts token t+1
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                                        "rng": torch.get_rng_state(), "config": config})
    out.mkdir(parents=True, exist_ok=True)
    params = {k: v for k, v in asdict(args).items() if k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of",
                                                           "norm_eps", "rope_theta")}
    (out / "params.json").write_text(json.dumps(params, indent=1))
    save_checkpoint(out / "consolidated.00.pth", model.state_dict())
    ckpt_path.unlink(missing_ok=True)
    return out


def pretrain_clip_standin(quiz: Path, tok: Tokenizer, out: Path, steps: int = 300, seed: int = 0) -> Path:
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
    recs = [r for r in load_scienceqa(quiz, "train") if r.get("image")]
    size = vit.args.image_size
    images = torch.stack([load_image_tensor(image_path(quiz, "train", r["pid"]), size, "imagenet")
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
            group["lr"] = warmup_cosine(step + 1, 50, steps, 1e-3)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, to_openai_state_dict(vit.state_dict()))  # OpenAI's key names, as ViT-L-14.pt
    return path


# =====================================================================================================================
# The one call

def quick_start(root="quiz", fmt="QCM-EA", seed=0) -> tuple[str, str, str, str]:
    """Generate the quiz and pre-train the stand-ins on first use (each step is skipped when its files exist) ->
    (data_dir, tokenizer, llama_dir, clip_path), the four paths a real run passes as flags."""
    root = Path(root)
    ensure_quiz(root)
    tok = Tokenizer(root / "tokenizer.model")
    llama = pretrain_llama_standin(root, tok, root / "backbones" / "llama", fmt, seed=seed)
    clip = pretrain_clip_standin(root, tok, root / "backbones", seed=seed)
    return str(root), str(root / "tokenizer.model"), str(llama), str(clip)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--mme"]:  # python quiz.py --mme [FOLDER]: the small MME folder (default quiz/mme)
        folder = make_mme(sys.argv[2] if len(sys.argv) > 2 else "quiz/mme")
        print(f"MME-format folder written to {folder}: python evaluate.py --benchmark mme --data_dir {folder}")
        sys.exit()
    folder = ensure_quiz()
    tok = Tokenizer(folder / "tokenizer.model")
    records = load_scienceqa(folder, "train")
    prompt, answer = build_prompt(records[0])
    print(f"{len(records)} train problems, tokenizer with {tok.n_words} pieces. Example:\n{prompt}{answer}\n")
    lengths = np.array(prompt_lengths(records, tok, n_visual=VISION_PRESETS["tiny"].n_tokens))
    print(f"sequence length (modality token .. EOS): mean {lengths.mean():.1f}, median {np.median(lengths):.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}")
