"""
Talk to a trained LaVIN: an interactive, streaming chat and a one-shot prompt, on the one generation path that
evaluation uses too (generate.py; Luo et al., NeurIPS 2023, §4.1; luogen1996/LaVIN demo.py,
lavin/generator.py).

    python sample.py                                          # chat with the quick start's out/ckpt.pt (CPU is fine)
    python sample.py --prompt "What color is the circle?" --image quiz/images/test/3301/image.png   # one answer
    python sample.py --adapter LaVIN-7B/checkpoint-19.pth --llama_dir /data/LLaMA/7B \
        --clip_path /data/clip/ViT-L-14.pt                                         # an official adapter file
    python sample.py --eval --split test                      # = python evaluate.py --split test

In the chat, type a question; `/image PATH` attaches an image (`/image` alone removes it), `/temp T`, `/top_p P` and
`/max N` change the sampling, `/reset` starts a new conversation, `/quit` or Ctrl-D leaves. Answers stream token by
token. Piped stdin works the same way, so a session can be scripted.

What generation does, and where it departs from the official code (details in generate.generate): a static
KV cache, with the routing weights of every layer read once, at prefill, from the modality token; correct RoPE
positions and an early stop at EOS (README, differences 3 and 5); by default the LLaMA-side adapters folded into
q/k/v for the answer's modality (difference 6), so they cost nothing, `--no_merge` runs them as separate modules;
greedy by default, `--temperature 0.1 --top_p 0.75` is what the official demo samples with.

Tests: `python -m pytest -q test_all.py -k test_sample_`.
"""

import argparse
import os
from pathlib import Path

import torch

import data
from cli import UserError, add_model_flags, cli, teardown_distributed
from evaluate import add_eval_flags, inference_setup, run
from generate import Sampling, answer, chat_prompt, prompt_budget
from model import LaVIN


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_flags(p)
    g = p.add_argument_group("one-shot")
    g.add_argument("--prompt", help="one-shot: answer this and exit")
    g.add_argument("--image", help="the image that goes with --prompt (without --prompt: attached as the chat starts)")
    p.add_argument("--eval", action="store_true", help="score a ScienceQA split instead (the same as evaluate.py)")
    add_eval_flags(p)
    return p.parse_args(argv)


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
    outgrows the window. The sequence has one image slot, right after BOS (data.sequence_head), so attaching or
    removing an image starts a new conversation: earlier answers were about another picture. image_path (--image) is
    attached first.
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
                    image = data.load_image_tensor(path, info["image_size"], info["norm"]).to(device)
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

def main(argv=None):
    args = get_args(argv)
    if not args.eval and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("torchrun is for --eval (the split is sharded over the ranks); chat runs in one process")
    # torchrun sets RANK/WORLD_SIZE: one process per GPU (NCCL) or per CPU process (gloo); plain python: a single one
    rank, world, device, model, tok, info = inference_setup(args, evaluating=args.eval)
    if args.eval:
        run(args, rank, world, model, tok, info)
    elif args.prompt is not None:  # one-shot: the answer alone on stdout (messages go to stderr), for scripts
        try:
            image = data.load_image_tensor(args.image, info["image_size"], info["norm"]) if args.image else None
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--image: {e}") from None
        # The same template as one chat turn, so a question gets the same answer here and as a chat's first question
        prompt = chat_prompt(tok, info, [], args.prompt, image is not None, prompt_budget(model))
        generator = torch.Generator(device=device).manual_seed(args.seed)
        s = Sampling(args.temperature, args.top_p, args.max_new_tokens)
        image = image.to(device) if image is not None else None
        answer(model, tok, prompt, image, s, generator, not args.no_merge,
               on_text=lambda t: print(t, end="", flush=True))
        print()
    else:
        chat(model, tok, info, Sampling(args.temperature, args.top_p, args.max_new_tokens), not args.no_merge,
             args.seed, args.image)
    teardown_distributed()


if __name__ == "__main__":
    cli(main)
