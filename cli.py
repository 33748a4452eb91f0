"""
What every script shares: the one-line report of user errors (`cli`), the checks of flags, the distributed set-up and
tear-down, stopping on Ctrl-C or SIGTERM, the one device and dtype default, and the flag groups more than one script
takes: the model and generation flags of sample.py, evaluate.py and demo.py, and the adapter flags of train.py,
derived from adapters.AdapterArgs so that each default is written once (Luo et al., NeurIPS 2023, §4.2 for the
adapter settings; the official LaVIN train.py and eval.py for what the flags do).

    python train.py --epochs 0          # error: --epochs 0: must be >= 1   (one line, exit status 1)
    python train.py ... --debug         # the same mistake with its traceback (also LAVIN_DEBUG=1)
    kill -TERM <pid of train.py>        # finishes the step, saves it, prints the resume command, exit status 143

The layer between the networks and the scripts: it imports adapters and data, and generate.py, evaluate.py and every
script (train.py, sample.py, bench.py, demo.py) import it.

Tests: `python -m pytest -q test_all.py -k test_cli_` (and the one-line errors of every script: `-k test_robust_`).
"""

import argparse
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from adapters import METHODS, ROUTERS, AdapterArgs


# =====================================================================================================================
# User errors: every script checks its flags before any work, and reports a mistake in one line

class UserError(Exception):
    """A mistake in the flags or in the files they name: `cli` prints its one line, without a traceback."""


def cli(main):
    """
    Run a script's main() as a command. A user error (UserError; a missing, unreadable or malformed file, which the
    loaders report as FileNotFoundError or ValueError; an OSError such as a full or read-only disk; Ctrl-C or SIGTERM)
    prints one line, with what to do next when the failure added a note (train.py's resume command), and exits
    non-zero (128 + the signal's number for a signal: 130 for Ctrl-C). Under torchrun every rank meets the same error,
    so rank 0 alone prints it and the others exit quietly with the same status (torchrun then adds its own summary);
    an error of one rank's own (a file it cannot read) names that rank. --debug or LAVIN_DEBUG=1 shows the traceback
    instead. Anything else is a bug and shows its traceback.
    """
    try:
        main()
    except (UserError, OSError, ValueError, FloatingPointError, KeyboardInterrupt) as e:
        if "--debug" in sys.argv[1:] or os.environ.get("LAVIN_DEBUG") == "1":
            raise
        code = 128 + getattr(e, "signum", signal.SIGINT) if isinstance(e, KeyboardInterrupt) else 1
        rank = int(os.environ.get("RANK", 0))
        if rank and isinstance(e, (UserError, KeyboardInterrupt)):
            sys.exit(code)
        what = (str(e) or "interrupted" if isinstance(e, KeyboardInterrupt) else
                f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror and e.filename else str(e))
        line = "; ".join(part.strip() for part in [what, *getattr(e, "__notes__", [])] if part.strip())
        # One line, whatever the message held; tqdm.write moves an open progress bar out of its way.
        tqdm.write(f"error: {f'rank {rank}: ' if rank else ''}{' '.join(line.split())}", file=sys.stderr)
        sys.exit(code)


def check_flags(args, rules):
    """rules: (flag, allowed(value) -> bool, what is allowed). A flag at None (optional, not given) passes, and so
    does one the script does not take (sample.py, evaluate.py and demo.py share their rules, not every flag)."""
    for flag, ok, allowed in rules:
        value = getattr(args, flag, None)
        if value is not None and not ok(value):
            raise UserError(f"--{flag} {value}: must be {allowed}")


def check_paths(args, rules):
    """rules: (flag, "file" or "folder"): a given path must exist and be one."""
    for flag, kind in rules:
        value = getattr(args, flag, None)  # sample.py and evaluate.py share the rules, not every flag
        if value is not None and not (Path(value).is_file() if kind == "file" else Path(value).is_dir()):
            raise UserError(f"--{flag} {value}: no such {kind}")


def check_device(device: str | None, dtype: str | None):
    """--device must name a device this machine has (None: default_device()), and bf16/fp16 are for GPUs."""
    try:
        dev = torch.device(device) if device else default_device()
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


def check_vocab(tok: data.Tokenizer, vocab_size: int, tokenizer, llama_dir):
    """The tokenizer and the LLaMA must belong together: as many pieces as the embedding has rows."""
    if vocab_size != tok.n_words:
        raise UserError(f"--tokenizer {tokenizer} has {tok.n_words} pieces but the LLaMA at {llama_dir} has a "
                        f"{vocab_size}-row embedding: they do not belong together; pass the --tokenizer of that "
                        f"--llama_dir")


# =====================================================================================================================
# Device, dtype, processes: one code path for CPU, one GPU and torchrun

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> str:
    """--dtype when not given: bf16 on GPU (half the memory, what the official code trains in, autocast for compute),
    fp32 on CPU, where bf16 matmuls are slow."""
    return "bf16" if device.type == "cuda" else "fp32"


def setup_distributed():
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them we are a single process. NCCL on GPUs, gloo on CPU.
    Returns (rank, local_rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 0, 1, default_device()
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
# Stopping on a signal: Ctrl-C (SIGINT) and a scheduler's SIGTERM (SLURM preemption, `timeout`, a container stop)

class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal: cli reports it in one line and exits with 128 + the signal's number, as the
    signal itself would have (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """
    SIGINT and SIGTERM, handled alike (train.py installs them; a signal ignored when the process started, as for a
    background job, stays ignored). Outside `deferred` the first one stops at once (Stopped). Inside, in the training
    loop, it is only recorded in `got`: the loop finishes the optimizer step, agrees with every rank to stop
    (stop_signal), saves and stops. Later signals are ignored: the stop is under way (torchrun forwards a Ctrl-C to
    its workers once more, and sends SIGTERM to the ranks still running once one has exited).
    """

    def __init__(self):
        self.got, self.defer = 0, False

    @contextmanager
    def installed(self):
        """The handlers while the command runs, and afterwards the previous ones; but after a stop they stay, so that
        further signals (torchrun's to the ranks still running) are ignored while the process reports and exits."""
        before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig, handler in before.items():
            if handler is not signal.SIG_IGN:
                signal.signal(sig, self.handle)
        try:
            yield
        finally:
            if not self.got:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.got:
            return
        self.got = signum
        if not self.defer:
            raise Stopped(signum)

    @contextmanager
    def deferred(self):
        self.defer = True
        try:
            yield
        finally:
            self.defer = False


STOPS = StopSignals()  # one per process: signal handlers are per process


def stop_signal(got: int, device) -> int:
    """The signal any rank has received (0: none), agreed by every rank after every step (a max over ranks), so that
    all of them stop after the same step and save one consistent checkpoint."""
    if not dist.is_initialized():
        return got
    t = torch.tensor([got], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


# =====================================================================================================================
# Flag groups more than one script takes

# The adapter flags: one per AdapterArgs field, its default AdapterArgs' own. (help, choices) per field; one --dropout
# stands for both adapter_dropout and lora_dropout, whose defaults differ by method.
ADAPTER_HELP = {
    "method": ("", METHODS),
    "adapter_dim": ("bottleneck width of the MM-Adapter, as the official scripts", None),
    "adapter_scale": ("s of the MM-Adapter, as the official code", None),
    "router": ("MMA's modality router (paper §3.2), or none: the routing ablation, one adapter path for both "
               "modalities", ROUTERS),
    "tau": ("router temperature (default: 10 for 7B, 5 for 13B, as the official scripts; router.default_tau)", None),
    "lora_rank": ("", None),
    "lora_alpha": ("LoRA alpha (default: 2 x rank, as LLaVA)", None),
    "lora_targets": ("which LLaMA linears get LoRA", None),
    "mix_pool": ("MixLoRA's pool of rank-1 factors", None),
    "mix_rank": ("MixLoRA's factors chosen per input", None),
    "mix_alpha": ("MixLoRA alpha (default: 2 x pool, the released script)", None),
    "mix_cfs": ("MixLoRA's conditional factor selection: the paper's dot product, the released code's separable form, "
                "or none (README, difference 21)", ("dot", "separable", "none")),
    "mix_mode": ("weighted: factors scaled by their scores, so the routers learn; hard: the released code",
                 ("weighted", "hard")),
    "mix_lambda": ("weight of the CFS score (the released ifs_weight)", None),
}
DROPOUTS = ("adapter_dropout", "lora_dropout")


def add_adapter_flags(p: argparse.ArgumentParser):
    g = p.add_argument_group("method")
    for f in fields(AdapterArgs):
        if f.name in DROPOUTS:
            if f.name == DROPOUTS[0]:
                g.add_argument("--dropout", type=float, default=None, help=(
                    f"adapter dropout (default: {AdapterArgs.adapter_dropout} in MM-Adapters as official, "
                    f"{AdapterArgs.lora_dropout} in LoRA/MixLoRA as LLaVA)"))
            continue
        kind = f.type if isinstance(f.type, type) else f.type.__args__[0]  # float | None -> float
        help_, choices = ADAPTER_HELP[f.name]
        shown = f"(default: {f.default})" if f.default is not None else ""  # None: the help says what it means
        g.add_argument(f"--{f.name}", type=kind, default=f.default, choices=choices, help=f"{help_} {shown}".strip())


def adapter_args_from(args) -> AdapterArgs:
    """The AdapterArgs of parsed add_adapter_flags (its own checks: --lora_targets and the method's settings)."""
    dropout = {} if args.dropout is None else dict.fromkeys(DROPOUTS, args.dropout)
    return AdapterArgs(**{f.name: getattr(args, f.name) for f in fields(AdapterArgs) if f.name not in DROPOUTS},
                       **dropout)


def add_model_flags(p: argparse.ArgumentParser):
    """A trained model and how it generates (sample.py and evaluate.py)."""
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
