"""
The test suite: every test runs on CPU in seconds, asserts behaviour (equivalences, exact counts, round trips, error
messages) and never timings; speed lives in bench.py. Tests that read the real ScienceQA records, images and LLaMA
checkpoints in ../shared skip cleanly where that folder is absent.

    python -m pytest -q test_all.py                 # everything (what CI runs)
    python -m pytest -q test_all.py -k test_clip_   # one file's tests: test_<file>_ (test_robust_: errors)
"""
import ast
import base64
import dataclasses
import errno
import io
import json
import math
import os
import random
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from argparse import Namespace
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import bench
import cli
import data
import demo
import evaluate
import generate
import quiz as quizgen
import train
from adapters import (DYN_MAP, DYN_MIDPOINTS, NF4_LEVELS, NF4_THRESHOLDS, AdapterArgs, LoRALinear, MMAdapter, NF4Linear,
                      NF4Weight, dynamic_codes, load_trainable, nf4_nbytes, quantize_llama_, quantize_nf4,
                      trainable_state_dict)
from bench import param_table
from clip_vit import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VISION_PRESETS, VisionArgs, VisionTransformer,
                      load_clip, load_image, preprocess)
from generate import PackedLinear
from model import (IGNORE, LLAMA_PRESETS, LaVIN, ModelArgs, Transformer, apply_rope, build_lavin, count_params,
                   load_llama, rope_tables)
from router import FactorRouter, default_tau
from train import wrap_model
from weights import (SAFETENSORS_DTYPES, SafeTensors, convert_official_lavin, convert_openai_state_dict,
                     load_checkpoint, save_checkpoint, save_safetensors, to_openai_state_dict)


# =====================================================================================================================
# Fixtures and shared helpers: ../shared, the one quiz, the one tiny LaVIN, process runners
# =====================================================================================================================

NV = VISION_PRESETS["ViT-L/14"].n_tokens  # 6 visual tokens, as ViT-L/14 and the tiny preset give

SHARED = Path(__file__).resolve().parent.parent / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (real checkpoints and data) is absent")


def save_meta_layout(path: Path, sd: dict, params: dict, shards: int = 1):
    """Write a checkpoint the way Meta ships it, split into model-parallel shards as meta-llama/llama's
    fairscale layers split them: column-parallel weights on dim 0, row-parallel ones and the embedding on dim 1."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    dims = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
    for s in range(shards):
        part = {}
        for k, v in sd.items():
            d = dims.get(k.split(".")[-2])
            part[k] = v.clone() if d is None else v.chunk(shards, dim=d)[s].clone()
        torch.save(part, path / f"consolidated.{s:02d}.pth")


def tiny_lavin(method="mma", noise=0.05, vocab_size=64, max_seq_len=64, **kw):
    """The one tiny LaVIN of the tests (tiny LLaMA and CLIP presets). `noise` moves the trainable tensors away from
    their initialisation, as training does: the zero-initialised up-projections make fresh adapters the identity."""
    torch.manual_seed(0)
    model = build_lavin(adapter_args=AdapterArgs(method=method, lora_rank=4, **kw), vocab_size=vocab_size,
                        max_seq_len=max_seq_len)
    if noise:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad and p.ndim >= 1:
                    p.add_(noise * torch.randn_like(p))
    return model


def hf_libs():
    """transformers and peft, for the tests that check against them (.ci/run installs both), or a skip saying so."""
    try:
        import peft
        import transformers
    except ImportError:
        pytest.skip("needs transformers and peft (test-only): pip install transformers peft")
    transformers.logging.disable_progress_bar()
    return transformers, peft


def make_batch(B=3, T=14, vocab=64):
    torch.manual_seed(1)
    tokens = torch.randint(3, vocab, (B, T))
    tokens[:, 0] = 1
    has_image = torch.tensor([0, 1, 1])[:B]
    vis_mask = torch.zeros(B, T, dtype=torch.bool)
    vis_mask[1:, 4:10] = True
    tokens[vis_mask] = 0
    labels = torch.full((B, T), IGNORE)
    labels[:, 10:] = tokens[:, 10:]
    images = torch.randn(int(has_image.sum()), 3, 64, 64)
    return tokens, has_image, vis_mask, images, labels


SQA = SHARED / "data" / "scienceqa"
LLAMA_TOK = SHARED / "models" / "llama-tokenizer" / "tokenizer.model"
needs_sqa = pytest.mark.skipif(not (SQA / "problems_sample150.json").is_file(), reason="shared ScienceQA data absent")
needs_llama = pytest.mark.skipif(not LLAMA_TOK.is_file(), reason="LLaMA tokenizer absent")


ROOT = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def away_from_checkout(tmp_path, monkeypatch):
    """Every test runs in an empty folder of its own: the quick start's defaults are relative paths (out/, quiz/),
    so a test never reads or writes what a user's run left in the checkout (README: run the tests after the quick
    start)."""
    monkeypatch.chdir(tmp_path)


MAX_SEQ_LEN = 128


QUIZ = dict(n_train=96, n_val=16, n_test=24)  # the one test quiz: 12 batches of 8 per epoch; images 64 x 64


@pytest.fixture(scope="session")
def quiz(tmp_path_factory):
    """The one generated quiz (its folder) that the data, train, evaluate and sample tests read."""
    return quizgen.ensure_quiz(tmp_path_factory.mktemp("quiz"), **QUIZ)


@pytest.fixture(scope="session")
def tok(quiz):
    return data.Tokenizer(quiz / "tokenizer.model")


@pytest.fixture
def model(tok):
    """A fresh tiny LaVIN on the quiz's vocabulary for each test (built in milliseconds), so a test that merges,
    trains or edits it changes nothing another test reads; `ckpt` saves the same weights (one seed)."""
    return tiny_lavin(noise=0.2, vocab_size=tok.n_words, max_seq_len=MAX_SEQ_LEN).eval()  # routing matters


def images(n, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))  # (n, 3, 64, 64)


def prompt(tok, text, has_image):
    return data.encode_dialogue(tok, [(text, None)], has_image, n_visual=NV)["tokens"].tolist()


# ---- the command line: a checkpoint in train.py's format, on base weights saved in Meta's and OpenAI's layouts

@pytest.fixture(scope="module")
def ckpt(tok, quiz, tmp_path_factory):
    model = tiny_lavin(noise=0.2, vocab_size=tok.n_words, max_seq_len=MAX_SEQ_LEN)  # the `model` fixture's weights
    root = tmp_path_factory.mktemp("ckpt")
    llama_dir = root / "llama"
    a = model.llama.args
    base = lambda module: {k: v for k, v in module.state_dict().items() if "adapter_attn" not in k}  # noqa: E731
    save_meta_layout(llama_dir, base(model.llama), dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads,
                                                        vocab_size=a.vocab_size, multiple_of=a.multiple_of,
                                                        norm_eps=a.norm_eps))
    torch.save(base(model.visual), root / "clip.pt")
    args = dict(llama_dir=str(llama_dir), clip_path=str(root / "clip.pt"), tokenizer=str(quiz / "tokenizer.model"),
                data_dir=str(quiz), image_size=64, norm="imagenet", prompt_format="QCM-ALE", max_seq_len=MAX_SEQ_LEN)
    path = root / "out" / "ckpt.pt"
    save_checkpoint(path, dict(model=trainable_state_dict(model), config=model.config(), args=args, step=0))
    return path


def run(cmd, stdin=None, nproc=None, timeout=300):
    """Run a script of this folder (`python` or `torchrun --nproc_per_node nproc`), 1 thread per process; its stdout.
    One that does not end in `timeout` s is ended, ranks and all, and the test fails with its output (finish)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # 1 thread each: the CI box has 2 cores
    cmd = [str(ROOT / cmd[0]), *cmd[1:]]  # run from the test's own folder (away_from_checkout), not the checkout
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd
    else:
        cmd = [sys.executable] + cmd
    proc = subprocess.Popen(cmd, stdin=None if stdin is None else subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out, err = finish(proc, timeout, stdin=stdin)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def spawn(worker, *args, world=2):
    """Run worker(rank, world, *args) in `world` processes joined by a gloo process group, 1 thread each."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.start_processes(_in_group, args=(world, port, worker, args), nprocs=world,
                                                join=False, start_method="spawn")
    deadline = time.time() + 300  # bounded: a rank stuck in a collective fails the test instead of hanging the suite
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} gloo ranks did not finish within 300 s")


def _in_group(rank, world, port, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


# =====================================================================================================================
# weights.py: every file format: safetensors, torch files, Meta's and Hugging Face's LLaMA and CLIP, checkpoints
# =====================================================================================================================

def test_weights_imports_no_project_file():
    """weights.py is the bottom of the import stack: torch and the standard library only, anywhere in the file (no
    function-local import either), so that every network imports it and it imports none of them."""
    tree = ast.parse((ROOT / "weights.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" in roots and not roots & {p.stem for p in ROOT.glob("*.py")}, roots
    assert roots - {"torch"} <= sys.stdlib_module_names, roots - {"torch"} - sys.stdlib_module_names


# ---------------------------------------------------------------------------------------------------------------------
# safetensors, read and written by hand

def _raw_safetensors(path, header: dict, data: bytes, n=None):
    """A hand-made file: header length (or a forced, wrong one), JSON header, data bytes."""
    head = json.dumps(header).encode()
    path.write_bytes((len(head) if n is None else n).to_bytes(8, "little") + head + data)
    return path


def test_weights_safetensors_round_trip_every_dtype(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t_{name}": torch.randint(0, 256, (3, 4 * dt.itemsize), dtype=torch.uint8, generator=gen).view(dt)
               for name, dt in SAFETENSORS_DTYPES.items() if dt != torch.bool}  # random bit patterns, NaNs included
    tensors |= {"t_BOOL": torch.rand(2, 5, generator=gen) > 0.5, "scalar": torch.tensor(2.5),  # CLIP's logit_scale
                "empty": torch.zeros(0, 7, dtype=torch.float16), "int64_ids": torch.arange(5)[None]}
    save_safetensors(tensors, tmp_path / "all.safetensors", metadata={"format": "pt"})
    f = SafeTensors(tmp_path / "all.safetensors")
    assert f.metadata == {"format": "pt"} and sorted(f) == sorted(tensors)
    for name, want in tensors.items():
        got = f[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name  # bit-exact
    assert f["t_F32"].data_ptr() == f["t_F32"].data_ptr()  # a view of the mapped file each time, never a copy
    # the reference writer's layout: header padded to a multiple of 8, every tensor aligned to its item size
    n = int.from_bytes((tmp_path / "all.safetensors").read_bytes()[:8], "little")
    assert n % 8 == 0 and all(f._entries[k][2] % f[k].element_size() == 0 for k in f)


def test_weights_safetensors_errors_name_file_and_entry(tmp_path):
    save_safetensors({"a": torch.ones(4, 4), "b": torch.ones(3)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(ValueError, match=r"cut\.safetensors: entry 'b': bytes \[64, 76\) lie outside the data section"):
        SafeTensors(tmp_path / "cut.safetensors")
    f32 = lambda shape, b, e: {"dtype": "F32", "shape": shape, "data_offsets": [b, e]}
    _raw_safetensors(tmp_path / "overlap.safetensors", {"x": f32([4], 0, 16), "y": f32([4], 8, 24)}, bytes(24))
    with pytest.raises(ValueError, match=r"overlap\.safetensors: entry 'y' overlaps entry 'x'"):
        SafeTensors(tmp_path / "overlap.safetensors")
    _raw_safetensors(tmp_path / "shape.safetensors", {"w": f32([2, 3], 0, 16)}, bytes(16))
    with pytest.raises(ValueError, match=r"shape\.safetensors: entry 'w': shape \[2, 3\] of F32 needs 24 bytes, but "
                                         r"data_offsets span 16"):
        SafeTensors(tmp_path / "shape.safetensors")
    _raw_safetensors(tmp_path / "dtype.safetensors", {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}},
                     bytes(1))
    with pytest.raises(ValueError, match=r"dtype\.safetensors: entry 'w': unknown dtype 'F4'"):
        SafeTensors(tmp_path / "dtype.safetensors")
    _raw_safetensors(tmp_path / "length.safetensors", {"w": f32([1], 0, 4)}, bytes(4), n=10**6)
    with pytest.raises(ValueError, match=r"length\.safetensors: bad safetensors header length 1000000"):
        SafeTensors(tmp_path / "length.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match=r"tiny\.safetensors: truncated"):
        SafeTensors(tmp_path / "tiny.safetensors")
    _raw_safetensors(tmp_path / "json.safetensors", {"w": f32([1], 0, 4)}, bytes(4), n=5)  # cuts the JSON short
    with pytest.raises(ValueError, match=r"json\.safetensors: the safetensors header is not valid JSON"):
        SafeTensors(tmp_path / "json.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# LLaMA: Meta's layout (model-parallel shards) and Hugging Face's (names, q/k permutation, config)

def test_weights_meta_shard_merge(tmp_path):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=16)
    sd = Transformer(args).state_dict()
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 16, "norm_eps": 1e-6, "vocab_size": -1}
    save_meta_layout(tmp_path / "one", sd, params, 1)
    save_meta_layout(tmp_path / "two", sd, params, 2)
    a, b = load_llama(tmp_path / "one"), load_llama(tmp_path / "two")
    assert a.args.vocab_size == 96  # completed from the embedding, params.json says -1
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_weights_llama_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_llama(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1}))
    with pytest.raises(FileNotFoundError, match="consolidated"):
        load_llama(tmp_path)
    sd = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=96, multiple_of=16)).state_dict()
    sd["layers.1.attention.wq.weight"] = torch.zeros(32, 64)  # disagrees with params.json
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"layers\.1\.attention\.wq\.weight.*\(32, 64\).*\(64, 64\)"):
        load_llama(tmp_path)


def test_weights_meta_llama_refusals(tmp_path):
    args, sd, params = _random_llama()
    save_meta_layout(tmp_path / "scaled", sd, dict(params, use_scaled_rope=True))
    with pytest.raises(ValueError, match=r"use_scaled_rope \(Llama-3\.1/3\.2\), a RoPE scaling this model does not"):
        load_llama(tmp_path / "scaled")
    save_meta_layout(tmp_path / "moe", sd, dict(params, moe={"num_experts": 8}))
    with pytest.raises(ValueError, match=r"params\.json has keys this loader does not understand: \['moe'\]"):
        load_llama(tmp_path / "moe")
    save_meta_layout(tmp_path / "plain", sd, dict(params, use_scaled_rope=False))  # false is plain RoPE
    assert load_llama(tmp_path / "plain").args.rope_theta == 1e6


def hf_permute(w, n_heads):
    """convert_llama_weights_to_hf.py's permute(w, n_heads, dim1, dim2), as written there: Meta's q/k rows -> HF's."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


_TO_HF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
          "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
          "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def save_hf_llama(path: Path, sd: dict, args: ModelArgs, shards=1, fmt="safetensors", tied=False, permute=True,
                  config=None, extra=None):
    """Write Meta-named weights as transformers' save_pretrained lays out a LlamaForCausalLM: q/k permuted, tied head
    left out, shards filled so that one layer straddles files, an index naming each tensor's shard."""
    top = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    hf = {}
    for k, v in sd.items():
        if k in top:
            name = top[k]
        else:
            _, i, *module, _ = k.split(".")
            name = f"model.layers.{i}.{_TO_HF['.'.join(module)]}.weight"
        heads = {"wq": args.n_heads, "wk": args.n_kv_heads or args.n_heads}.get(k.split(".")[-2])
        hf[name] = hf_permute(v, heads) if heads and permute else v
    if tied:
        del hf["lm_head.weight"]
    hf |= extra or {}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
           "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
           "num_key_value_heads": args.n_kv_heads or args.n_heads, "intermediate_size": args.ffn_dim,
           "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "rope_scaling": None,
           "vocab_size": args.vocab_size, "tie_word_embeddings": tied, "hidden_act": "silu",
           "max_position_embeddings": 2048, "torch_dtype": "float16"}  # torch_dtype: the headers' dtypes win
    cfg = {k: v for k, v in (cfg | (config or {})).items() if v is not None or k == "rope_scaling"}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    write = save_safetensors if fmt == "safetensors" else torch.save
    if shards == 1:
        write(hf, path / f"{stem}.{ext}")
        return
    weight_map = {}
    for s in range(shards):
        part = {k: v for j, (k, v) in enumerate(hf.items()) if j % shards == s}
        write(part, path / f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}")
        weight_map |= dict.fromkeys(part, f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}")
    total = sum(v.nbytes for v in hf.values())
    (path / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                "weight_map": weight_map}))


def _random_llama(n_kv_heads=None, dtype=torch.float32, tied=False, seed=0):
    """Random LLaMA weights (norms too, so that nothing is the identity) and their Meta params.json."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, multiple_of=16,
                     norm_eps=1e-5, rope_theta=1e6)  # eps and theta off their defaults: both must be read
    sd = {k: (v + 0.1 * torch.randn_like(v)).to(dtype) for k, v in Transformer(args).state_dict().items()}
    if tied:
        sd["output.weight"] = sd["tok_embeddings.weight"].clone()
    params = {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": n_kv_heads, "multiple_of": 16, "norm_eps": 1e-5,
              "rope_theta": 1e6, "vocab_size": -1}
    return args, sd, params


@pytest.mark.parametrize("n_kv_heads, dtype, tied, shards, fmt, config", [
    (None, torch.float32, False, 1, "safetensors", None),  # LLaMA-1 / Vicuna v1.x: one file, 4.x config
    (2, torch.bfloat16, False, 3, "safetensors",  # GQA (Llama-2 70B style), sharded, transformers 5.x config
     {"rope_theta": None, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "dtype": "bfloat16"}),
    (None, torch.bfloat16, True, 2, "safetensors", None),  # tied head: no lm_head.weight in the files
    (2, torch.float32, True, 1, "safetensors", None),
    (None, torch.float16, False, 2, "bin", None),  # the older pytorch_model-*.bin shards
])
def test_weights_hf_llama_equals_meta_layout(tmp_path, n_kv_heads, dtype, tied, shards, fmt, config):
    args, sd, params = _random_llama(n_kv_heads, dtype, tied)
    save_meta_layout(tmp_path / "meta", sd, params)
    save_hf_llama(tmp_path / "hf", sd, args, shards, fmt, tied, config=config)
    meta, hf = load_llama(tmp_path / "meta"), load_llama(tmp_path / "hf")
    assert replace(hf.args, multiple_of=16) == meta.args  # multiple_of is moot: both take the FFN width as stored
    for k, v in meta.state_dict().items():
        assert v.dtype == dtype and torch.equal(hf.state_dict()[k], v), k
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(hf(tokens), meta(tokens))
    # the same through the dtype conversion done tensor by tensor while reading
    a, b = load_llama(tmp_path / "meta", dtype=torch.float32), load_llama(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_weights_hf_llama_permutation_is_undone_with_the_kv_head_count(tmp_path):
    args, sd, params = _random_llama(n_kv_heads=2)
    save_meta_layout(tmp_path / "meta", sd, params)
    # negative controls, which load without error: rows not permuted at all, or k permuted with the query head count
    save_hf_llama(tmp_path / "raw", sd, args, permute=False)
    by_h = {k: hf_permute(v, 4) if k.endswith(("wq.weight", "wk.weight")) else v for k, v in sd.items()}
    save_hf_llama(tmp_path / "by_h", by_h, args, permute=False)
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        want = load_llama(tmp_path / "meta")(tokens)
        for wrong in ("raw", "by_h"):
            assert (load_llama(tmp_path / wrong)(tokens) - want).abs().max() > 1e-2, wrong
    # the index form (HF lists a head's even Meta rows, then its odd ones), for one head of size 8
    assert hf_permute(torch.arange(8.0)[:, None], 1)[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_weights_hf_llama_missing_shard_is_named(tmp_path):
    args, sd, _ = _random_llama()
    save_hf_llama(tmp_path, sd, args, shards=3)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json names shards that are not in .*: "
                                                r"model-00002-of-00003\.safetensors"):
        load_llama(tmp_path)


@pytest.mark.parametrize("config, message", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}},
     r"RoPE scaling of type 'llama3' \(e\.g\. Llama-3\.1\)"),
    ({"rope_theta": None, "rope_parameters": {"rope_type": "llama3", "factor": 32.0, "rope_theta": 5e5}},
     r"RoPE scaling of type 'llama3'"),  # transformers 5.x keeps it in rope_parameters
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"RoPE scaling of type 'linear'"),  # older 4.x spelling
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, r"a mistral model .* not LLaMA"),
    ({"attention_bias": True}, r"\{'attention_bias': True\}: not LLaMA's architecture"),
    ({"hidden_act": "gelu"}, r"\{'hidden_act': 'gelu'\}: not LLaMA's architecture"),
])
def test_weights_hf_llama_refusals(tmp_path, config, message):
    args, sd, _ = _random_llama()
    save_hf_llama(tmp_path, sd, args, config=config)
    with pytest.raises(ValueError, match=message):
        load_llama(tmp_path)


def test_weights_hf_llama_refuses_tensors_llama_lacks(tmp_path):
    args, sd, _ = _random_llama()
    for name in ("model.layers.1.self_attn.q_proj.bias", "model.layers.0.self_attn.q_norm.weight"):  # Qwen2, Qwen3
        save_hf_llama(tmp_path / name, sd, args, extra={name: torch.zeros(64)})
        with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} has no counterpart in LLaMA"):
            load_llama(tmp_path / name)
    # 2023-era transformers saved rotary_emb.inv_freq in every layer: dropped, as it is recomputed
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    save_hf_llama(tmp_path / "inv_freq", sd, args, extra=inv_freq)
    assert load_llama(tmp_path / "inv_freq").args.n_layers == 3


# ---------------------------------------------------------------------------------------------------------------------
# CLIP: OpenAI's names and Hugging Face's

def test_weights_clip_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)missing\.pt.*ViT-L-14\.pt.*b8cca3fd"):
        load_clip(tmp_path / "missing.pt")
    sd = _ref_clip().state_dict()
    sd["visual.ln_pre.weight"] = torch.ones(129)
    torch.save(sd, tmp_path / "bad_shape.pt")
    with pytest.raises(ValueError, match=r"ln_pre\.weight.*\(129,\).*\(128,\)"):
        load_clip(tmp_path / "bad_shape.pt")
    sd = _ref_clip().visual.state_dict()  # no prefix: the vision tower alone
    del sd["transformer.resblocks.3.mlp.c_fc.bias"]
    torch.save(sd, tmp_path / "missing_key.pt")
    with pytest.raises(ValueError, match=r"blocks\.3\.mlp\.c_fc\.bias"):
        load_clip(tmp_path / "missing_key.pt")
    torch.save({"foo": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a CLIP ViT vision checkpoint.*conv1.weight"):
        load_clip(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match=r"cannot read CLIP checkpoint .*junk\.pt: corrupt or truncated"):
        load_clip(tmp_path / "junk.pt")


def test_weights_openai_clip_names_round_trip(tmp_path):
    model = VisionTransformer(VISION_PRESETS["tiny"])
    sd = model.state_dict()
    openai = to_openai_state_dict(sd)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in openai and "visual.conv1.weight" in openai
    assert convert_openai_state_dict(openai).keys() == sd.keys()
    torch.save(openai, tmp_path / "clip.pt")
    loaded = load_clip(tmp_path / "clip.pt")
    assert loaded.args == dataclasses.replace(model.args, feature_every=4)  # the stride is not in the weights
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k


def to_hf_clip(openai: dict, text_tower=True) -> dict:
    """OpenAI CLIP weights (`visual.*`) -> the names and layouts of transformers' CLIPModel (text_tower=True, with
    stand-in text tensors and the legacy position_ids of both towers) or CLIPVisionModelWithProjection."""
    ren = [("conv1.", "embeddings.patch_embedding."), ("class_embedding", "embeddings.class_embedding"),
           ("positional_embedding", "embeddings.position_embedding.weight"), ("ln_pre.", "pre_layrnorm."),
           ("ln_post.", "post_layernorm."), ("transformer.resblocks.", "encoder.layers."), (".attn.", ".self_attn."),
           (".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."), (".c_fc.", ".fc1."), (".c_proj.", ".fc2.")]
    hf = {}
    for key, v in openai.items():
        if not key.startswith("visual."):
            continue
        key = key[len("visual."):]
        if key == "proj":
            hf["visual_projection.weight"] = v.t().contiguous()  # a Linear(W, out) weight
            continue
        for old, new in ren:
            key = key.replace(old, new)
        if key.endswith(("in_proj_weight", "in_proj_bias")):
            kind = "weight" if key.endswith("weight") else "bias"
            for name, part in zip("qkv", v.chunk(3)):
                hf["vision_model." + key.replace(f"in_proj_{kind}", f"{name}_proj.{kind}")] = part.contiguous()
        else:
            hf["vision_model." + key] = v
    if text_tower:
        n = hf["vision_model.embeddings.position_embedding.weight"].shape[0]
        hf |= {"vision_model.embeddings.position_ids": torch.arange(n)[None],
               "text_model.embeddings.position_ids": torch.arange(7)[None],
               "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(32, 32),
               "text_projection.weight": torch.randn(48, 32), "logit_scale": torch.tensor(4.6052)}
    return hf


def test_weights_hf_clip_folder_and_file_equal_openai_layout(tmp_path, monkeypatch):
    ref = _ref_clip()
    torch.save(ref.state_dict(), tmp_path / "openai.pt")
    hf_dir = tmp_path / "clip-vit-hf"
    hf_dir.mkdir()
    save_safetensors(to_hf_clip(ref.state_dict()), hf_dir / "model.safetensors", metadata={"format": "pt"})
    vision = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 12, "num_attention_heads": 2,
              "patch_size": 8, "image_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    (hf_dir / "config.json").write_text(json.dumps({"architectures": ["CLIPModel"], "model_type": "clip",
                                                    "projection_dim": 48, "vision_config": vision}))
    save_safetensors(to_hf_clip(ref.state_dict(), text_tower=False), tmp_path / "vision_only.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)  # the package is not needed (and not importable here)
    images = torch.randn(3, 3, 32, 32)
    want = load_clip(tmp_path / "openai.pt")
    with torch.no_grad():
        want_emb, want_tokens = want.encode_image(images), want(images)
        for path in (hf_dir, tmp_path / "vision_only.safetensors"):
            model = load_clip(path)
            assert model.args == want.args
            assert torch.equal(model.encode_image(images), want_emb) and torch.equal(model(images), want_tokens)
    vision["hidden_act"] = "gelu"  # e.g. an OpenCLIP conversion
    (hf_dir / "config.json").write_text(json.dumps({"vision_config": vision}))
    with pytest.raises(ValueError, match=r"config\.json says hidden_act 'gelu', but this tower computes QuickGELU"):
        load_clip(hf_dir)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: ours (written atomically, read safely) and the official LaVIN adapter files

def test_weights_checkpoint_round_trip(tmp_path):
    """The trainable tensors through a file: save_checkpoint, load_checkpoint, load_trainable give the model back, bit
    for bit, and the atomic write leaves no temporary file behind."""
    a, b = tiny_lavin("mma"), tiny_lavin("mma", noise=0)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": trainable_state_dict(a), "step": 3})
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 3 and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    load_trainable(b, ckpt["model"])
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    assert count_params(a) == count_params(b)


def test_weights_checkpoint_corrupt_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_checkpoint_interrupted_save_keeps_last_good(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and torch.equal(ck["model"]["w"], torch.ones(3))


def official_state_dict(model: LaVIN) -> dict:
    """Our trainable tensors renamed and reshaped into the official LaVIN checkpoint layout
    (the released checkpoint-*.pth; the inverse of adapters.convert_official_lavin)."""
    out = {}
    for k, v in trainable_state_dict(model).items():
        k = k.replace("llama.layers", "module.layers").replace("visual.blocks", "backbone.visual.transformer.resblocks")
        k = (k.replace(".down.", ".conv_A.").replace(".up0.", ".conv_B.").replace(".up1.", ".conv_D.")
             .replace(".router.proj.", ".expert_weights.").replace("adapter_proj.fc1", "adapter_proj.conv_A")
             .replace("adapter_proj.fc2", "adapter_proj.conv_B"))
        if (("conv_A" in k and "adapter_proj" not in k) or ".conv_B." in k and "adapter_proj" not in k
                or ".conv_D." in k):
            v = v[..., None] if k.endswith("weight") else v  # Conv1d weights carry a kernel axis of 1
        out[k] = v
    return out


def test_weights_official_lavin_checkpoint_loads():
    src = tiny_lavin("mma")
    sd = official_state_dict(src)
    assert sd["module.layers.0.adapter_attn.conv_A.weight"].shape == (8, 128, 1)
    assert sd["module.layers.0.adapter_attn.conv_B.weight"].shape == (128, 4, 1)
    dst = tiny_lavin("mma", noise=0)
    load_trainable(dst, sd)
    for k, v in trainable_state_dict(src).items():
        assert torch.equal(v, trainable_state_dict(dst)[k]), k
    bad = dict(sd)
    bad.pop("module.layers.1.adapter_attn.conv_D.bias")
    bad["module.layers.0.adapter_attn.conv_B.weight"] = torch.zeros(128, 8, 1)
    bad["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_trainable(dst, bad)
    msg = str(e.value)
    assert "missing (1): llama.layers.1.adapter_attn.up1.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "llama.layers.0.adapter_attn.up0.weight: checkpoint (128, 8) vs model (128, 4)" in msg
    assert convert_official_lavin({"adapter_modality_embedding.weight": torch.zeros(2, 4)}).keys() == {
        "adapter_modality_embedding.weight"}


# =====================================================================================================================
# router.py: the modality router and its temperature
# =====================================================================================================================

def test_router_temperature_is_one_rule_of_the_llama_width():
    """router.default_tau gives 10 for 7B and 5 for 13B (the official scripts), and every model built without an
    explicit tau, on either tower, asks it; an official adapter file loaded by evaluate.py goes through the same."""
    for size, tau in (("7B", 10.0), ("13B", 5.0), ("tiny", 10.0)):
        m = build_lavin(size, "ViT-L/14" if size != "tiny" else "tiny", device="meta")
        assert default_tau(m.llama.args.dim) == tau
        assert {b.adapter_attn.router.tau for b in [*m.llama.layers, *m.visual.blocks]} == {tau}
    m = build_lavin("tiny", "tiny", AdapterArgs(tau=3.0), device="meta")
    assert m.llama.layers[0].adapter_attn.router.tau == m.visual.blocks[0].adapter_attn.router.tau == 3.0


# =====================================================================================================================
# clip_vit.py: parity with OpenAI CLIP, visual tokens, per-image routing, preprocessing
# =====================================================================================================================

# ----------------------------------------------------------------------------------------------------------------
# A faithful minimal copy of openai/CLIP clip/model.py (LayerNorm, QuickGELU, ResidualAttentionBlock, Transformer,
# VisionTransformer), sequence-first with nn.MultiheadAttention, as the reference.


class RefLayerNorm(nn.LayerNorm):
    def forward(self, x):
        orig_type = x.dtype
        ret = super().forward(x.type(torch.float32))
        return ret.type(orig_type)


class RefQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = RefLayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", RefQuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = RefLayerNorm(d_model)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=None)[0]
        x = x + self.mlp(self.ln_2(x))
        return x


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefVisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = RefLayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.ln_post = RefLayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)  # shape = [*, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1)  # shape = [*, width, grid ** 2]
        x = x.permute(0, 2, 1)  # shape = [*, grid ** 2, width]
        x = torch.cat([self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype),
                       x], dim=1)  # shape = [*, grid ** 2 + 1, width]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x)
        x = x.permute(1, 0, 2)  # LND -> NLD
        x = self.ln_post(x[:, 0, :])
        return x @ self.proj


class RefCLIP(nn.Module):
    """Just enough of OpenAI's CLIP for the archive's real key layout: `visual.*`, text-tower keys that collide
    with the visual ones once the prefix is stripped, and a scalar entry."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.positional_embedding = nn.Parameter(torch.randn(7, 32))
        self.transformer = RefTransformer(32, 1, 1)
        self.register_buffer("input_resolution", torch.tensor(32))

    def forward(self, image):
        return self.visual(image)


# Small reference: 128 wide so that OpenAI's heads = width // 64 rule gives 2 heads (exercises the head split);
# 12 layers so that the official rule (the class token after every 4th block) gives 3 features, not every block's.
REF = dict(input_resolution=32, patch_size=8, width=128, layers=12, heads=2, output_dim=48)


def _ref_clip():
    torch.manual_seed(0)
    ref = RefCLIP(RefVisionTransformer(**REF)).eval()
    with torch.no_grad():  # perturb everything, so zero biases and unit LayerNorm weights are tested too
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def test_clip_parity_with_openai_reference(tmp_path):
    ref = _ref_clip()
    images = torch.randn(3, 3, 32, 32)
    # both formats: a plain state dict (wrapped, with a Python scalar like OpenAI's) and a TorchScript archive
    sd = dict(ref.state_dict(), vocab_size=49408)
    torch.save({"state_dict": sd}, tmp_path / "sd.pt")
    with warnings.catch_warnings():
        # torch.jit is deprecated, yet it is OpenAI's format; tracing nn.MultiheadAttention also emits TracerWarnings
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(ref, images, check_trace=False), str(tmp_path / "ts.pt"))
    with torch.no_grad():
        want = ref(images)  # (3, 48)
        # CLS after each reference block, through hooks: the output is (L, N, D), so row 0 is the CLS of every image
        cls = []
        hooks = [b.register_forward_hook(lambda m, i, o: cls.append(o[0].clone()))
                 for b in ref.visual.transformer.resblocks]
        ref(images)
        for h in hooks:
            h.remove()
        want_feats = torch.stack(cls[3::4], dim=1)  # blocks 4, 8, 12 (1-indexed), the official rule: (3, 3, 128)
    for name in ("sd.pt", "ts.pt"):
        model = load_clip(tmp_path / name)
        assert model.args == VisionArgs(image_size=32, patch_size=8, width=128, layers=12, heads=2, output_dim=48)
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), want, atol=1e-5, rtol=1e-5)
            feats = model(images)
        assert feats.shape == (3, 3, 128)
        torch.testing.assert_close(feats, want_feats, atol=1e-5, rtol=1e-5)


def test_clip_vit_l14_keys_and_shapes_match_openai():
    # On the meta device: no memory, no compute. Every OpenAI ViT-L/14 tensor has a counterpart of the same shape.
    with torch.device("meta"):
        ref = RefVisionTransformer(224, 14, 1024, 24, 16, 768)
        ours = VisionTransformer(VISION_PRESETS["ViT-L/14"])
    theirs = {k: v.shape for k, v in convert_openai_state_dict(ref.state_dict()).items()}
    assert theirs == {k: v.shape for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("layers,n_tokens", [(8, 2), (12, 3), (24, 6)])
def test_clip_visual_tokens_follow_the_official_every_4th_block_rule(tmp_path, layers, n_tokens):
    """Any CLIP tower loads; its visual tokens are the class token after blocks 4, 8, ... of a plain loop."""
    torch.manual_seed(layers)
    args = VisionArgs(image_size=32, patch_size=16, width=64, layers=layers, heads=1, output_dim=16)
    tower = VisionTransformer(args).eval()
    torch.save(to_openai_state_dict(tower.state_dict()), tmp_path / "clip.pt")
    loaded = load_clip(tmp_path / "clip.pt")
    assert loaded.args.n_tokens == n_tokens
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x, want = loaded.tokens(images), []
        for i, block in enumerate(loaded.blocks):
            x = block(x)
            if i + 1 in (4, 8, 12, 16, 20, 24):
                want.append(x[:, 0])
        got = loaded(images)
    assert got.shape == (2, n_tokens, 64)
    torch.testing.assert_close(got, torch.stack(want, dim=1), rtol=0, atol=0)


def test_clip_tiny_preset_shapes():
    torch.manual_seed(0)
    model = VisionTransformer(VISION_PRESETS["tiny"])
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # any float dtype is accepted
    with torch.no_grad():
        assert model(x).shape == (2, 6, 128)
        assert model.encode_image(x).shape == (2, 64)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------------------------
# Per-image routing (README, difference 1)


class StubAdapter(nn.Module):
    """forward(x, r) with an output that depends on the router input r (B, W)."""

    def __init__(self, width, official=False):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.official = official  # route from batch element 0, as official LaVIN effectively does

    def forward(self, x, r):
        if self.official:
            r = r[:1].expand_as(r)
        return x + 0.5 * torch.tanh(self.lin(r))[:, None, :]  # (B, T, W)


def _routing_case(make_adapter):
    torch.manual_seed(0)
    model = VisionTransformer(VISION_PRESETS["tiny"]).eval()
    image = torch.randn(1, 3, 64, 64)
    batch = torch.cat([torch.zeros(1, 3, 64, 64), image, torch.randn(1, 3, 64, 64)])  # zero image first
    with torch.no_grad():
        plain = model(image)
        for block in model.blocks:
            block.adapter_attn = make_adapter(model.args.width)
        alone, in_batch = model(image), model(batch)[1:2]
    return plain, alone, in_batch


def test_clip_per_image_routing_stub():
    plain, alone, in_batch = _routing_case(StubAdapter)
    assert not torch.allclose(plain, alone, atol=1e-3)  # the adapters do act
    assert torch.allclose(alone, in_batch, atol=1e-6)
    # control: official-style routing from batch element 0 (the zero image) would fail the check above
    _, alone, in_batch = _routing_case(lambda w: StubAdapter(w, official=True))
    assert not torch.allclose(alone, in_batch, atol=1e-3)


def test_clip_per_image_routing_mmadapter():
    adapters = pytest.importorskip("adapters")

    def make(width):
        ad = adapters.MMAdapter(width).eval()  # eval: no dropout
        with torch.no_grad():  # leave the identity init, so the routing matters
            for p in ad.parameters():
                p.normal_(0, 0.2)
        return ad

    plain, alone, in_batch = _routing_case(make)
    assert not torch.allclose(plain, alone, atol=1e-3)
    assert torch.allclose(alone, in_batch, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing (the official transform: torchvision Resize((224, 224), BICUBIC), ToTensor, Normalize)


def _expected(rgb, mean, std):
    # (c / 255 - mean) / std per channel, in fp32 like torchvision's ToTensor + Normalize
    c = torch.tensor(rgb, dtype=torch.float32) / 255
    return (c - torch.tensor(mean)) / torch.tensor(std)  # (3,)


def test_clip_preprocess_all_modes():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    grey16 = rng.integers(0, 65536, (30, 40))
    pt = base.convert("P")
    pt.info["transparency"] = bytes(range(256))  # palette transparency: Pillow warns unless handled
    images = {m: base.convert(m) for m in ("RGB", "RGBA", "P", "L", "1", "CMYK", "LA")}
    images.update({"P+transparency": pt, "I;16": Image.fromarray(grey16.astype(np.uint16)),
                   "I": Image.fromarray(grey16.astype(np.int32)),
                   "F": Image.fromarray(grey16.astype(np.float32) / 257)})
    assert images["I;16"].mode == "I;16" and images["I"].mode == "I" and images["F"].mode == "F"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = {m: preprocess(img) for m, img in images.items()}
    for m, x in out.items():
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all(), m
    # alpha is dropped, not composited; the 16-bit and float versions of one grey image agree
    assert torch.equal(out["RGBA"], out["RGB"])
    assert torch.equal(out["I;16"], out["I"]) and torch.equal(out["I;16"], out["F"])


def test_clip_preprocess_uniform_pixel_values():
    img = Image.new("RGB", (50, 30), (10, 128, 250))  # non-square on purpose
    for norm, mean, std in (("imagenet", IMAGENET_MEAN, IMAGENET_STD), ("clip", CLIP_MEAN, CLIP_STD)):
        x = preprocess(img, norm=norm)
        want = _expected((10, 128, 250), mean, std)[:, None, None].expand(3, 224, 224)
        torch.testing.assert_close(x, want, atol=1e-6, rtol=0)
    # the CLIP constants shift every value the expected way: x_clip = (x_in * std_in + mean_in - mean_c) / std_c
    x_in, x_clip = preprocess(img), preprocess(img, norm="clip")
    m_in, s_in, m_c, s_c = (torch.tensor(v)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD, CLIP_MEAN, CLIP_STD))
    torch.testing.assert_close(x_clip, (x_in * s_in + m_in - m_c) / s_c, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="imagenet"):
        preprocess(img, norm="openai")


def test_clip_preprocess_geometry_squash_vs_crop():
    # 300 x 100: three 100-px vertical bands, red | green | blue
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100, 0] = arr[:, 100:200, 1] = arr[:, 200:, 2] = 255
    img = Image.fromarray(arr)
    red, green, blue = (_expected(c, IMAGENET_MEAN, IMAGENET_STD) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    squash = preprocess(img, size=60)  # the whole image, squashed: all three bands, 20 columns each
    for col, want in ((5, red), (30, green), (55, blue)):
        torch.testing.assert_close(squash[:, 30, col], want, atol=1e-6, rtol=0)
    crop = preprocess(img, size=60, crop=True)  # resized to 180 x 60, centre 60 x 60 crop = the green band only
    assert crop.shape == (3, 60, 60)
    torch.testing.assert_close(crop[:, 30, 30], green, atol=1e-6, rtol=0)
    torch.testing.assert_close(crop[:, 10, 5], green, atol=0.05, rtol=0)  # only a bicubic ring at the band edge


def test_clip_preprocess_is_pil_bicubic_squash():
    # The official transform is torchvision Resize((224, 224), BICUBIC) on a PIL image, i.e. PIL's bicubic resize
    # to exactly 224 x 224 whatever the aspect ratio; then ToTensor and Normalize (official
    # util/datasets.py).
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 91, 3), dtype=np.uint8))
    ref = np.asarray(img.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255  # (224, 224, 3)
    ref = (torch.from_numpy(ref) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(preprocess(img), ref.permute(2, 0, 1), atol=1e-6, rtol=0)
    # and an independent resize: on a smooth image (no edges to ring at) the two agree to about one 8-bit level
    yy, xx = np.mgrid[0:37, 0:91]
    smooth = np.stack([xx * 2.8, yy * 6.9, (xx + yy) * 2.0], axis=-1).astype(np.uint8)  # (37, 91, 3) ramps
    d = (preprocess(Image.fromarray(smooth)) - torch_bicubic_reference(smooth)).abs()
    assert d.max() < 2.5 / 255 / min(IMAGENET_STD), d.max()


def test_clip_16bit_full_range(tmp_path):
    for v16, v8 in ((65535, 255), (255, 1), (32896, 128)):  # scaled by 257, not clipped at 255
        img = Image.fromarray(np.full((20, 20), v16, dtype=np.uint16))
        torch.testing.assert_close(preprocess(img)[:, 0, 0], _expected((v8,) * 3, IMAGENET_MEAN, IMAGENET_STD),
                                   atol=1e-6, rtol=0)
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(tmp_path / "grey16.png")
    img = load_image(tmp_path / "grey16.png")
    assert img.mode == "RGB" and img.getpixel((3, 3)) == (255, 255, 255)


def torch_bicubic_reference(rgb: np.ndarray, size=224) -> torch.Tensor:
    """An independent preprocessing: torch's antialiased bicubic (Keys a=-0.5, PIL's kernel and support, computed in
    float instead of PIL's 8-bit fixed point), then ToTensor + ImageNet Normalize.
    (H, W, 3) uint8 -> (3, size, size)."""
    t = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)[None]  # (1, 3, H, W)
    t = F.interpolate(t, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
    return (t - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def close_to_float_bicubic(x: torch.Tensor, ref: torch.Tensor):
    """PIL rounds to 8 bits between its two passes; a float resize differs by a few levels at sharp edges only."""
    d = (x - ref).abs()
    assert d.mean() < 0.01 and d.max() < 0.25, (d.mean().item(), d.max().item())  # 0.25 ~ 14/255 of one pixel


@needs_sqa
def test_clip_scienceqa_images():
    """Real ScienceQA test images (sizes from 188 x 200 to 750 x 429): load_image keeps every pixel PIL reads, and
    preprocess agrees with an independent float bicubic; distinct images give distinct inputs."""
    paths = sorted((SQA / "images" / "test").glob("*/image.png"))[:4]
    assert paths, SQA
    xs = []
    for p in paths:
        img = load_image(p)
        raw = np.asarray(Image.open(p).convert("RGB"))  # (H, W, 3) uint8
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), raw)
        x = preprocess(img)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32
        close_to_float_bicubic(x, torch_bicubic_reference(raw))
        xs.append(x)
    assert all((a - b).abs().mean() > 0.05 for i, a in enumerate(xs) for b in xs[i + 1:])


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_clip_image_errors(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(missing)
    junk = tmp_path / "junk.png"
    junk.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ValueError, match="cannot read image .*junk.png"):
        load_image(junk)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # valid header, truncated pixel data
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")


def test_clip_load_clip_reads_transformers_save_pretrained(tmp_path):
    # A CLIPModel written by transformers' own save_pretrained loads through load_clip and gives transformers'
    # features: the class token after every block (LaVIN's visual tokens) and the projected image embedding.
    transformers, _ = hf_libs()
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=8, projection_dim=24)
    theirs = transformers.CLIPModel(transformers.CLIPConfig(
        vision_config=vision, projection_dim=24, text_config=dict(hidden_size=16, intermediate_size=32,
                                                                  num_hidden_layers=1, num_attention_heads=2))).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.2)  # norms and biases too: a name mapped wrongly shows
    theirs.save_pretrained(tmp_path)
    ours = load_clip(tmp_path, feature_every=1)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = theirs.vision_model(pixel_values=images,
                                     output_hidden_states=True).hidden_states  # (1 + L) x (B, T, W)
        torch.testing.assert_close(ours(images), torch.stack([h[:, 0] for h in hidden[1:]], 1), rtol=1e-5, atol=1e-5)
        want = theirs.get_image_features(pixel_values=images)
        want = getattr(want, "pooler_output", want)  # transformers 5 wraps it in an output object
        torch.testing.assert_close(ours.encode_image(images), want, rtol=1e-5, atol=1e-5)


def test_router_none_builds_and_trains_a_step_with_exact_parameter_count(tiny_setup, tmp_path):
    """--router none (the routing ablation): each MM-Adapter keeps conv_A and one up-projection, 13C + 8 parameters
    (the official RepAdapter) instead of 20C + 10, and the modality token, which reaches the loss only through
    routers, is frozen. Exact counts at 7B shapes and for the test model; one training step moves the adapters."""
    none = AdapterArgs(router="none")
    m7 = build_lavin("7B", "ViT-L/14", none, device="meta")
    # 3,781,296 less, per LLaMA layer (C = 4096) and CLIP block (1024): conv_D (5C) + router (2C + 2); less the
    # modality embedding (2 x 4096)
    assert count_params(m7)[0] == 3_781_296 - 32 * (7 * 4096 + 2) - 24 * (7 * 1024 + 2) - 2 * 4096 == 2_683_456
    assert 32 * (13 * 4096 + 8) + 24 * (13 * 1024 + 8) + 659_584 == 2_683_456  # the same, built up
    ad = m7.llama.layers[0].adapter_attn
    assert ad.router is None and ad.up1 is None and not m7.adapter_modality_embedding.weight.requires_grad
    with pytest.raises(ValueError, match="needs method 'mma'"):
        AdapterArgs(method="lora", router="none")
    out = tmp_path / "none"
    train.main(tiny_setup["flags"] + ["--router", "none", "--out_dir", str(out), "--max_steps", "1",
                                      "--warmup_epochs", "0"])
    ck = load_checkpoint(out / "ckpt.pt")
    # LLaMA width 64, 2 layers; the tiny CLIP's first 4 of 6 blocks (--clip_every 4: later ones never reach the loss)
    C, W, L, B = 64, VISION_PRESETS["tiny"].width, 2, 4
    neck = W * 128 + 128 + 128 * C + C
    assert sum(v.numel() for v in ck["model"].values()) == L * (13 * C + 8) + B * (13 * W + 8) + neck
    assert ck["config"]["adapter"]["router"] == "none" and not any("router" in k or "up1" in k for k in ck["model"])
    assert ck["model"]["llama.layers.0.adapter_attn.up0.weight"].abs().sum() > 0  # zero-initialised, moved by 1 step


def test_router_none_is_one_path_whatever_the_modality():
    """Without routers an adapter ignores its router input, and merged equals unmerged for both modalities."""
    model = tiny_lavin(router="none").eval()
    ad = model.llama.layers[0].adapter_attn
    x = torch.randn(2, 5, ad.down.in_features)
    assert torch.equal(ad(x, torch.randn(2, x.shape[-1])), ad(x, torch.randn(2, x.shape[-1])))
    tokens, has_image, vis_mask, imgs, _ = make_batch()
    ref = model(tokens, has_image, vis_mask, imgs)
    for m in (0, 1):
        rows = has_image == m
        model.merge(m)
        out = model(tokens[rows], has_image[rows], vis_mask[rows], imgs if m else None)
        model.unmerge()
        torch.testing.assert_close(out, ref[rows], atol=2e-5, rtol=1e-4)


# =====================================================================================================================
# adapters.py: MM-Adapter, LoRA, MixLoRA, NF4 / QLoRA
# =====================================================================================================================

def test_adapters_mm_adapter_param_count_and_identity():
    ad = MMAdapter(64)
    # conv_A 8 x 64 + 8, conv_B and conv_D 2 x (4 x 64 + 64), the router 2 x 64 + 2 (official lavin/mm_adapter.py)
    assert sum(p.numel() for p in ad.parameters()) == 20 * 64 + 10
    x, r = torch.randn(2, 5, 64), torch.randn(2, 64)
    assert torch.equal(ad.eval()(x, r), x)  # zero-initialised up-projections: the exact identity


@pytest.mark.parametrize("method", ["mma", "lora", "mixlora", "full"])
def test_adapters_fresh_adapters_keep_llama_logits(method):
    """Freshly injected adapters (any method): LaVIN's text-only logits on the text positions equal plain LLaMA's."""
    model = tiny_lavin(method, noise=0).eval()
    tokens = torch.randint(3, 64, (2, 10))
    tokens[:, 0] = 1
    with torch.no_grad():
        ours = model(tokens, torch.zeros(2, dtype=torch.long))[:, 1:]  # drop the modality slot
        plain = Transformer(model.llama.args)
        plain.load_state_dict({k: v for k, v in model.llama.state_dict().items()
                               if "adapter" not in k and "lora" not in k and "router" not in k})
        ref = plain.eval()(tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mma", "lora"])
def test_adapters_merged_equals_unmerged(method):
    model = tiny_lavin(method).eval()
    tokens, has_image, vis_mask, images, _ = make_batch()
    with torch.no_grad():
        ref = model(tokens, has_image, vis_mask, images)
        for m in (0, 1):
            rows = (has_image == m).nonzero()[:, 0]
            imgs = images[(has_image[has_image == 1].cumsum(0) - 1)[: int(m) * len(rows)]] if m else None
            model.merge(m)
            got = model(tokens[rows], has_image[rows], vis_mask[rows], imgs)
            model.unmerge()
            torch.testing.assert_close(got, ref[rows], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(tokens, has_image, vis_mask, images), ref, rtol=0, atol=0)  # exact restore


@pytest.mark.parametrize("method", ["mma", "lora"])
def test_adapters_merge_on_a_bf16_base(method):
    """On GPU the frozen base is bf16 (load_lavin's dtype) while the adapters keep fp32 masters: merging reads the
    routers in their own dtype, folds into bf16 weights, and gives the unmerged logits to bf16 rounding."""
    model = tiny_lavin(method).eval()
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)  # as load_lavin(dtype=torch.bfloat16) leaves the backbones
    tokens, has_image = make_batch()[0][:2], torch.zeros(2, dtype=torch.long)  # two text-only rows
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(tokens, has_image)
        model.merge(0)
        got = model(tokens, has_image)
    assert model.llama.layers[0].attention.wq.weight.dtype == torch.bfloat16 and model.merged_modality == 0
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)
    assert (got - ref).abs().mean() < 0.01 * ref.abs().mean()


@pytest.mark.parametrize("mode,router_grad", [("weighted", True), ("hard", False)])
def test_adapters_mixlora_router_gradients(mode, router_grad):
    model = tiny_lavin("mixlora", mix_mode=mode).train()
    tokens, has_image, vis_mask, images, labels = make_batch()
    model(tokens, has_image, vis_mask, images, labels=labels).backward()
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    assert routers
    if router_grad:
        assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    else:
        assert all(not p.requires_grad and p.grad is None for p in routers)


def test_adapters_mixlora_uniform_scores_reproduce_unweighted_update():
    fr = FactorRouter(8, pool=6, rank=3, cfs="dot", mode="weighted")
    with torch.no_grad():
        fr.route_a.weight.zero_()
        fr.route_b.weight.zero_()
        fr.route_ab.zero_()
    _, _, w = fr(torch.randn(2, 8), torch.randn(6, 8))
    torch.testing.assert_close(w, torch.ones(2, 3))


def _hex(values: str) -> torch.Tensor:
    return torch.tensor([int(h, 16) for h in values.split()], dtype=torch.int64).to(torch.int32).view(torch.float32)


def _scales(q) -> torch.Tensor:
    """The per-block scale â a quantized weight dequantizes with, from its stored state."""
    if q.nested_absmax is None:
        return q.absmax
    return DYN_MAP[q.absmax.long()] * q.nested_absmax.repeat_interleave(256)[:len(q.absmax)] + q.nested_offset


def test_adapters_nf4_tables():
    assert torch.equal(NF4_THRESHOLDS, _hex("bf591cd8 bf1c5270 beeb8480 beadea76 be703cec be0d38bc bd3a7871 3d22faff "
                                            "3df64862 3e5067e0 3e9582d4 3ec753f9 3f006d04 3f248daf 3f5c89da"))
    # bnb's create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), every step in fp32
    vals = [torch.zeros(1), torch.ones(1)]
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        vals += [10 ** (i - 6) * means, -(10 ** (i - 6)) * means]
    assert torch.equal(DYN_MAP, torch.cat(vals).sort().values)
    assert DYN_MAP[0] == _hex("bf7e3333") and DYN_MAP[127] == 0 and DYN_MAP[255] == 1  # -0.99296875: no -1
    m = DYN_MIDPOINTS
    y = torch.stack([m[126], m[127], torch.nextafter(m[127], torch.tensor(1.0)), torch.tensor(-1.0), torch.tensor(1.0)])
    assert dynamic_codes(y).tolist() == [126, 128, 128, 0, 255]  # exact ties go to the even index


def test_adapters_nf4_golden_codes_and_values():
    """Hand-computed: block absmax 1 (so x·(1/absmax) = x exactly), values on every threshold (a tie takes the lower
    code) and one ulp above; a block of absmax 2; a partial, odd-length last block of absmax 3."""
    up = torch.nextafter(NF4_THRESHOLDS, torch.tensor(2.0))
    b0 = torch.cat([torch.tensor([1.0]), NF4_THRESHOLDS, up, torch.tensor([0.0, -1.0]), torch.zeros(31)])  # (64,)
    last = torch.tensor([3.0, -3.0, 0.0, 1.5, 0.0])  # 1.5/3 = 0.5 < T_12 = 0.50166: code 12
    w = torch.cat([b0, 2 * b0, last])  # (133,): blocks of absmax 1, 2, 3
    c0 = [15] + list(range(15)) + list(range(1, 16)) + [7, 0] + [7] * 31
    codes = c0 + c0 + [15, 0, 7, 12, 7] + [7]  # + the padding nibble of an odd length
    q = quantize_nf4(w, double_quant=False)
    assert q.packed.shape == (67, 1) and q.packed.dtype == torch.uint8
    assert q.packed[:3, 0].tolist() == [0xF0, 0x12, 0x34]  # the earlier element in the high nibble
    assert q.packed[-3:, 0].tolist() == [0xF0, 0x7C, 0x77]
    assert q.packed.view(-1).tolist() == [a << 4 | b for a, b in zip(codes[0::2], codes[1::2])]
    assert q.absmax.tolist() == [1.0, 2.0, 3.0]
    d = q.dequantize()
    assert d[:3].tolist() == [1.0, -1.0, _hex("bf3239b1").item()]  # T_0 -> code 0 (-1), T_1 -> code 1 (-0.6961928)
    assert d[16].item() == _hex("bf3239b1").item() and d[31].item() == 0 and d[32].item() == -1.0  # T_0 + 1 ulp -> 1
    assert d[-5:].tolist() == [3.0, -3.0, 0.0, (_hex("3ee1a4b8") * 3).item(), 0.0]
    # Double quantization: mean(absmax) = 2, v = (-1, 0, 1), one group of scale 1 -> 8-bit codes 0, 127, 255. The map
    # has no -1, so block 0 is rescaled by 2 - 0.99296875 ≈ 1.00703; block 2, the group's largest, keeps 3 exactly.
    q2 = quantize_nf4(w)
    assert torch.equal(q2.packed, q.packed)
    assert q2.absmax.tolist() == [0, 127, 255] and q2.nested_absmax.tolist() == [1.0] and q2.nested_offset == 2.0
    d2 = q2.dequantize()
    a0 = _hex("bf7e3333") * 1.0 + 2.0  # fp32, two roundings
    assert d2[0] == a0 and d2[2] == _hex("bf3239b1") * a0 and d2[-5] == 3.0
    assert torch.equal(d2[64:128], d[64:128]) and torch.equal(d2[128:], d[128:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 64), (96, 160), (300, 70), (7, 33), (1000,), (2, 3, 100), (129, 256)])
def test_adapters_nf4_round_trip(shape, dtype):
    """|Ŵ - W| ≤ half the widest level gap × the block's absmax, plus |â - absmax| with double quantization;
    bf16 is quantized as its exact fp32 widening and dequantizes with one rounding of the fp32 result."""
    torch.manual_seed(0)
    w = (0.02 * torch.randn(shape)).to(dtype)
    x = F.pad(w.float().flatten(), (0, -w.numel() % 64)).view(-1, 64)  # (blocks, 64)
    absmax = x.abs().amax(1, keepdim=True)
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2  # 0.152, between -1 and -0.696
    for dq in (False, True):
        q = quantize_nf4(w, double_quant=dq)
        assert q.dequantize().dtype == dtype and q.dequantize().shape == w.shape
        d = F.pad(q.dequantize(torch.float32).flatten(), (0, -w.numel() % 64)).view(-1, 64)
        bound = half_gap * absmax + (_scales(q)[:, None] - absmax).abs()
        assert ((d - x).abs() <= bound * (1 + 1e-6)).all()
        assert torch.equal(q.dequantize(torch.bfloat16), q.dequantize(torch.float32).to(torch.bfloat16))
        assert torch.equal(quantize_nf4(w.float(), double_quant=dq).packed, q.packed)
        assert q.nbytes == sum(t.numel() * t.element_size() for t in q.state_dict().values())


def test_adapters_nf4_zeros_stay_zero():
    torch.manual_seed(0)
    w = torch.randn(5 * 64 + 10)
    w[::7] = 0
    w[64:128] = 0  # an all-zero block
    w[-10:] = 0  # an all-zero partial last block
    for dq in (False, True):
        d = quantize_nf4(w, double_quant=dq).dequantize()
        assert (d[w == 0] == 0).all()
        assert (quantize_nf4(torch.zeros(3, 50), double_quant=dq).dequantize() == 0).all()


def test_adapters_nf4_size():
    for dq, bits in ((True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4.5)):
        q = quantize_nf4(torch.randn(4096, 4096), double_quant=dq)
        assert abs(8 * q.nbytes / 4096 ** 2 - bits) < 1e-5  # ≈ 4.127 and 4.5 (+ the 4-byte offset)
    with torch.device("meta"):
        lin = nn.Linear(11008, 4096, bias=False)  # shapes only
    assert nf4_nbytes(lin.weight.shape) == 11008 * 4096 // 2 + 11008 * 64 + 4 * 11008 * 64 // 256 + 4


def test_adapters_nf4_linear_forward_backward():
    torch.manual_seed(0)
    lin = NF4Linear.from_linear(nn.Linear(70, 33, bias=False))
    assert list(lin.parameters()) == [] and sorted(lin.state_dict()) == [
        "weight.absmax", "weight.nested_absmax", "weight.nested_offset", "weight.packed"]
    W = lin.weight.dequantize(torch.float32)
    x = torch.randn(2, 5, 70, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = lin(x)
    assert saved == []  # neither a dequantized weight nor the input waits for backward
    assert torch.equal(y, F.linear(x, W))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g @ W)
    xb = x.detach().bfloat16()
    assert torch.equal(lin(xb), F.linear(xb, lin.weight.dequantize(torch.bfloat16)))
    lin.to(torch.bfloat16)  # casting the module keeps the fp32 statistics exact
    assert lin.weight.nested_absmax.dtype == torch.float32 and torch.equal(lin.weight.dequantize(torch.float32), W)
    with pytest.raises(ValueError, match="bias-free"):
        NF4Linear.from_linear(nn.Linear(4, 4))


def _frozen_weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".packed")}


@pytest.mark.parametrize("method", ["lora", "mma"])
def test_adapters_qlora_and_lite_train(method):
    """QLoRA (LoRA on NF4) and LaVIN-lite (MMA on NF4) train with a falling loss; checkpoints and requires_grad are
    exactly those of the full-precision model, the 4-bit base never changes."""
    model = tiny_lavin(method)
    keys = trainable_state_dict(model).keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    quantize_llama_(model)
    att = model.llama.layers[0].attention
    assert isinstance(att.wq.weight, NF4Weight) and isinstance(model.llama.layers[1].feed_forward.w2.weight, NF4Weight)
    assert isinstance(att.wq, LoRALinear if method == "lora" else NF4Linear)
    assert trainable_state_dict(model).keys() == keys == trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    base = _frozen_weights(model)
    tokens, has_image, vis_mask, images, labels = make_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ls = []
    for _ in range(4):
        loss = model.train()(tokens, has_image, vis_mask, images, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ls.append(loss.item())
    assert ls[-1] < ls[0], ls
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())


def test_adapters_quantize_before_or_after_injection():
    """Quantizing the loaded base before LaVIN injects LoRA (the load path) equals quantizing a built model."""
    after = tiny_lavin("lora", noise=0)
    llama = Transformer(after.llama.args)
    llama.load_state_dict({k: v for k, v in after.llama.state_dict().items() if "lora" not in k})
    quantize_llama_(after)
    before = LaVIN(quantize_llama_(llama), after.visual, AdapterArgs(method="lora", lora_rank=4))
    load_trainable(before, trainable_state_dict(after))
    before.adapter_modality_embedding.load_state_dict(after.adapter_modality_embedding.state_dict())  # frozen in LoRA
    tokens, has_image, vis_mask, images, _ = make_batch()
    with torch.no_grad():
        a, b = before.eval()(tokens, has_image, vis_mask, images), after.eval()(tokens, has_image, vis_mask, images)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="--method full"):
        quantize_llama_(tiny_lavin("full"))
    with pytest.raises(ValueError, match="--method full"):
        LaVIN(llama, after.visual, AdapterArgs(method="full"))


@pytest.mark.parametrize("method", ["mma", "lora"])
def test_adapters_fold_into_a_4bit_base(method):
    """merge() dequantizes the affected weights once and folds into them; unmerge() puts the 4-bit weights back."""
    model = quantize_llama_(tiny_lavin(method)).eval()
    tokens, has_image, _, _, _ = make_batch()
    with torch.no_grad():
        ref = model(tokens[:1], has_image[:1])
        # the KV cache takes the 4-bit weight's dtype
        gen = generate.generate(model, [[1, 5, 6, 7]], [0], max_new_tokens=4)
        model.merge(0)
        assert isinstance(model.llama.layers[0].attention.wq.weight, nn.Parameter)  # a dense, merged copy
        torch.testing.assert_close(model(tokens[:1], has_image[:1]), ref, rtol=1e-4, atol=1e-4)
        assert generate.generate(model, [[1, 5, 6, 7]], [0], max_new_tokens=4) == gen
        model.unmerge()
        assert isinstance(model.llama.layers[0].attention.wq.weight, NF4Weight)
        assert torch.equal(model(tokens[:1], has_image[:1]), ref)


def _nf4_steps(model, rows, world=1, steps=3):
    """A few SGD steps of a 4-bit model on the given rows of a fixed batch; the loss is the sum over this rank's
    labelled tokens divided by the global count (× world: DDP and FSDP2 average the gradients over ranks)."""
    tokens, has_image, vis_mask, images, labels = make_batch()
    rows = torch.tensor(rows)
    img_idx = has_image.cumsum(0) - 1  # each image row's index into `images`
    imgs = images[img_idx[rows][has_image[rows] == 1]]
    n_global = (labels != data.IGNORE).sum() * 4 // 3  # the global batch of 4 rows: (0, 1) and (0, 2)
    # SGD: its update is linear in the gradient, so summation-order noise stays noise (Adam's first steps would blow a
    # 1e-9 gradient difference on a near-zero gradient up to a full learning-rate step)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = []
    for _ in range(steps):
        loss = model(tokens[rows], has_image[rows], vis_mask[rows], imgs, labels=labels[rows], reduction="sum")
        opt.zero_grad()
        (loss * world / n_global).backward()
        opt.step()
        out.append(loss.detach() / n_global)
    return torch.stack(out)


def _nf4_worker(rank, world):
    """Every rank: one process's reference on the global batch, then DDP and FSDP2 (train.py's wrap_model) on half
    each, for QLoRA and LaVIN-lite. Losses and the trained adapters must agree; the 4-bit base stays whole."""
    for method in ("lora", "mma"):
        make = lambda: quantize_llama_(tiny_lavin(method, lora_dropout=0.0, adapter_dropout=0.0)).train()  # noqa
        ref_model = make()
        ref = _nf4_steps(ref_model, [0, 1, 0, 2])
        for fsdp in (False, True):
            model = make()
            wrapped = wrap_model(model, Namespace(fsdp=fsdp, grad_ckpt=False, compile=False), torch.device("cpu"),
                                 world)
            got = _nf4_steps(wrapped, [[0, 1], [0, 2]][rank], world)
            dist.all_reduce(got)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
            a, b = trainable_state_dict(model), trainable_state_dict(ref_model)
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
            packed = model.llama.layers[0].attention.wq.weight.packed  # replicated, not a DTensor shard
            assert type(packed) is torch.Tensor
            assert torch.equal(packed, ref_model.llama.layers[0].attention.wq.weight.packed)


def test_adapters_nf4_under_ddp_and_fsdp2():
    spawn(_nf4_worker)


def test_adapters_fused_lora_equals_its_formula_and_plain_causal_skips_the_mask():
    lin = LoRALinear(nn.Linear(8, 6, bias=False), rank=2, alpha=4.0, dropout=0.0)
    nn.init.normal_(lin.lora_B)
    x = torch.randn(3, 5, 8)
    ref = x @ lin.weight.T + 2.0 * (x @ lin.lora_A.T) @ lin.lora_B.T
    torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
    llama = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=20, multiple_of=16))
    assert llama.tables(2, 0, 5)[2] is None  # -> SDPA's is_causal (parity: test_model_llama_matches_meta_reference)
    assert llama.tables(2, 0, 5, mask_first=True)[2].shape == (2, 1, 5, 5)


# =====================================================================================================================
# model.py: LLaMA, loaders, LaVIN, generation
# =====================================================================================================================

# ---------------------------------------------------------------------------------------------------------------------
# An independent transcription of Meta's reference LLaMA (meta-llama/llama llama/model.py, inference path without
# fairscale): complex RoPE, explicit fp32 softmax, repeat_kv for grouped-query attention.

def meta_reference_logits(sd: dict, args: ModelArgs, tokens: torch.Tensor) -> torch.Tensor:
    def rmsnorm(x, w):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + args.norm_eps)).type_as(x) * w

    hd = args.dim // args.n_heads
    n_kv = args.n_kv_heads or args.n_heads
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(tokens.shape[1], hd // 2), torch.outer(torch.arange(tokens.shape[1]), freqs))

    def rope(x):  # (B, T, H, D)
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)

    B, T = tokens.shape
    h = sd["tok_embeddings.weight"][tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = rmsnorm(h, sd[p + "attention_norm.weight"])
        q = (x @ sd[p + "attention.wq.weight"].T).view(B, T, args.n_heads, hd)
        k = (x @ sd[p + "attention.wk.weight"].T).view(B, T, n_kv, hd)
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, n_kv, hd)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(args.n_heads // n_kv, dim=2)
        v = v.repeat_interleave(args.n_heads // n_kv, dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + mask
        att = F.softmax(scores.float(), dim=-1).type_as(q) @ v
        h = h + att.transpose(1, 2).reshape(B, T, -1) @ sd[p + "attention.wo.weight"].T
        x = rmsnorm(h, sd[p + "ffn_norm.weight"])
        ff = (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T))
        h = h + ff @ sd[p + "feed_forward.w2.weight"].T
    return (rmsnorm(h, sd["norm.weight"]) @ sd["output.weight"].T).float()


# ---------------------------------------------------------------------------------------------------------------------
# A second oracle, for LoRA, the KV cache and generation: transformers' eager LlamaForCausalLM + peft's LoRA, written
# out by hand (so it runs without either library): rotate_half RoPE (wq/wk rows permuted as HF's
# convert_llama_weights_to_hf.py does), repeat_kv, an explicit additive mask, a KV cache grown by concatenation, the
# head on the last position only at generation (their logits_to_keep), and peft-style LoRA with its own dropout and
# scaling per linear. A correctness check only: bench.py --compare times the real libraries.

def reference_weights(model) -> dict:
    """Our LaVIN's LLaMA weights in transformers' layout: {name: (W, A, B, scaling, dropout)} per layer; A is None
    for a merged LoRA, which is then a plain linear (peft's merge_and_unload)."""
    llama = model.llama
    H, D = llama.args.n_heads, llama.args.head_dim
    perm = lambda w: w.view(H, D // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)  # interleaved -> halves
    layers = []
    for layer in llama.layers:
        a, f = layer.attention, layer.feed_forward
        lins = {"q": a.wq, "k": a.wk, "v": a.wv, "o": a.wo, "gate": f.w1, "up": f.w3, "down": f.w2}
        layers.append({n: ((perm(m.weight) if n in "qk" else m.weight), None if m.merged else m.lora_A,
                           perm(m.lora_B) if n in "qk" else m.lora_B, m.scaling, m.dropout.p) for n, m in lins.items()})
        layers[-1].update(ln1=layer.attention_norm.weight, ln2=layer.ffn_norm.weight)
    return {"layers": layers, "emb": llama.tok_embeddings.weight, "norm": llama.norm.weight,
            "head": llama.output.weight, "H": H, "eps": llama.args.norm_eps, "theta": llama.args.rope_theta}


def reference_forward(R, ids, pos0: int, cache=None, train=False, last_only=False):
    """ids (B, T) at RoPE positions pos0.. (ours puts the modality token at 0, so prompts start at 1) -> logits."""
    def lora(x, w):  # peft's Linear: base(x) + lora_B(lora_A(dropout(x))) * scaling
        W, A, Bm, s, p = w
        y = F.linear(x, W)
        return y if A is None else y + F.linear(F.linear(F.dropout(x, p, train), A), Bm) * s

    def rms(x, w):
        return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + R["eps"])).to(x.dtype)

    def rot(x):  # rotate_half
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)

    B, T = ids.shape
    H = R["H"]
    h = R["emb"][ids]  # (B, T, C)
    D = h.shape[-1] // H
    past = cache[0][0].shape[2] if cache else 0
    inv = 1.0 / (R["theta"] ** (torch.arange(0, D, 2).float() / D))
    fr = torch.outer(torch.arange(pos0 + past, pos0 + past + T).float(), inv)
    cos, sin = torch.cat((fr, fr), -1).cos(), torch.cat((fr, fr), -1).sin()  # (T, D)
    mask = torch.full((T, past + T), float("-inf")).triu(past + 1)  # (T, S) additive causal mask
    for i, L in enumerate(R["layers"]):
        x = rms(h, L["ln1"])
        q, k, v = (lora(x, L[n]).view(B, T, -1, D).transpose(1, 2) for n in ("q", "k", "v"))  # (B, H, T, D)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        if cache is not None:
            if len(cache) > i:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
                cache[i] = (k, v)
            else:
                cache.append((k, v))
        k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))  # repeat_kv
        att = torch.softmax((q @ k.transpose(2, 3) / math.sqrt(D) + mask).float(), -1).to(q.dtype) @ v
        h = h + lora(att.transpose(1, 2).reshape(B, T, -1), L["o"])
        x = rms(h, L["ln2"])
        h = h + lora(F.silu(lora(x, L["gate"])) * lora(x, L["up"]), L["down"])
    h = rms(h, R["norm"])
    return F.linear(h[:, -1:] if last_only else h, R["head"]).float()


def reference_generate(R, ids, new: int) -> list[list[int]]:
    cache, out, x = [], [], ids
    for _ in range(new):
        out.append(reference_forward(R, x, 1, cache, last_only=True)[:, -1].argmax(-1))  # (B,)
        x = out[-1][:, None]
    return torch.stack(out, 1).tolist()


def reference_loss(R, ids, labels, train=True):
    logits = reference_forward(R, ids, 1, train=train)  # transformers: position t predicts label t + 1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


def oracle_models(cfg: dict, seed: int = 0):
    """Ours (LaVIN with LoRA r=8 on the seven linears, tiny CLIP) with random weights, and the oracle's view."""
    torch.manual_seed(seed)
    model = LaVIN(Transformer(ModelArgs(**cfg)), VisionTransformer(VISION_PRESETS["tiny"]),
                  AdapterArgs(method="lora", lora_rank=8))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)  # the LoRA B too, so the updates are not zero
    return model, reference_weights(model)


def test_model_lora_loss_and_greedy_tokens_match_transformers_style_oracle():
    # LoRA forward, label-only head and cached greedy decoding against the eager oracle above: same loss and tokens
    cfg = dict(dim=64, n_layers=2, n_heads=4, hidden_dim=96, vocab_size=300)
    model, R = oracle_models(cfg)
    model.eval()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    labels = torch.full_like(ids, data.IGNORE)
    labels[:, 8:] = ids[:, 8:]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.zeros(2, dtype=torch.long), labels=labels),
                                   reference_loss(R, ids, labels, train=False), rtol=1e-5, atol=1e-5)
    model.merge(0)
    assert generate.generate(model, ids.tolist(), [False, False], None, max_new_tokens=8, eos_id=-1) == \
        reference_generate(reference_weights(model), ids, 8)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_model_llama_matches_meta_reference(n_kv_heads):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, multiple_of=16)
    model = Transformer(args).eval()
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours = model(tokens)
    ref = meta_reference_logits(model.state_dict(), args, tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_model_rope_equals_complex_reference():
    D, T = 16, 9
    cos, sin = rope_tables(D, T, 10000.0)
    x = torch.randn(2, T, 3, D)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    cis = torch.polar(torch.ones(T, D // 2), torch.outer(torch.arange(T).float(), inv))
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, T, 3, D // 2, 2)) * cis[None, :, None]).flatten(3)
    torch.testing.assert_close(apply_rope(x, cos[None], sin[None]), ref, rtol=1e-6, atol=1e-6)


def test_model_kv_cache_equals_full_recompute():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)).eval()
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(2, 12)
        parts = [model(tokens[:, :7], 0)] + [model(tokens[:, t:t + 1], t) for t in range(7, 12)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_model_ffn_width_rule():
    assert LLAMA_PRESETS["7B"].ffn_dim == 11008 and LLAMA_PRESETS["13B"].ffn_dim == 13824
    assert ModelArgs(dim=64, multiple_of=4).ffn_dim == 172  # stories260K's hidden_dim


def test_model_meta_device_build_costs_nothing():
    with torch.device("meta"):
        model = Transformer(LLAMA_PRESETS["13B"])
    assert sum(p.numel() for p in model.parameters()) == 13_015_864_320  # LLaMA-13B
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_model_load_llama_reads_transformers_save_pretrained(tmp_path, kv_heads):
    # transformers' own save_pretrained (safetensors, its q/k row order, GQA too) -> load_llama -> transformers' logits
    transformers, _ = hf_libs()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=kv_heads, intermediate_size=96, vocab_size=97,
                                   rms_norm_eps=1e-5, max_position_embeddings=64)
    theirs = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.2)  # the norms too
    theirs.save_pretrained(tmp_path)
    ours = load_llama(tmp_path)
    assert (ours.args.n_kv_heads, ours.args.ffn_dim, ours.args.vocab_size) == (kv_heads, 96, 97)
    tokens = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)


def test_model_lora_matches_peft_and_greedy_tokens_match_transformers_generate():
    # bench.py --compare's pair at a tiny shape: our LaVIN with LoRA on the LLaMA transformers wrote, and that model
    # under a peft LoRA with the same factors. Same logits, same loss gradients on every LoRA factor, and after
    # merging (ours: merge, theirs: merge_and_unload) the same greedy tokens as transformers' generate.
    hf_libs()
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, vocab_size=97)
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = bench.compare_pair(cfg, folder, seed=0)
    ours.eval(), theirs.eval()  # dropout off; gradients still flow
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, 0] = IGNORE  # transformers shifts: nothing predicts the first token
    text = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(ours(ids, text)[:, 1:], theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    ours(ids, text, labels=labels).backward()
    theirs(input_ids=ids, labels=labels).loss.backward()
    mine = dict(ours.llama.named_parameters())
    grads = {n: p.grad for n, p in theirs.named_parameters() if ".lora_" in n}
    assert len(grads) == 2 * 7 * 2  # A and B of seven linears in two layers
    for name, g in grads.items():
        ours_name, to_ours = bench.peft_twin(name, ours.llama.args)
        torch.testing.assert_close(mine[ours_name].grad, to_ours(g), rtol=1e-4, atol=1e-6)
    ours.merge(0)
    hf = theirs.merge_and_unload()
    prompts = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(1))
    prompts[:, 0] = 1
    with torch.no_grad():
        want = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8, do_sample=False)
    assert generate.generate(ours, prompts.tolist(), [False] * 3, None, max_new_tokens=8, eos_id=-1) == \
        want[:, 7:].tolist()


@needs_shared
def test_model_real_checkpoint_generates_fluent_text():
    model = load_llama(SHARED / "models" / "stories260K").eval()
    tok = data.Tokenizer(SHARED / "models" / "stories260K" / "tokenizer.model")
    ids = tok.encode("Once upon a time", bos=True, eos=False)
    assert ids == [1, 403, 407, 261, 378]
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    text = tok.decode(ids)
    # Greedy decoding of Karpathy's stories260K, as llama2.c's run.c produces it with -t 0.
    assert text.startswith("Once upon a time, there was a little girl named Lily."), text


# ---------------------------------------------------------------------------------------------------------------------
# LaVIN

def test_model_importing_model_leaves_data_and_quiz_alone():
    code = ("import sys, model; bad = {'data', 'quiz', 'sentencepiece', 'PIL.ImageDraw'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent)


def test_model_modality_token_hidden_from_other_positions():
    """With no routers to read it (LoRA), the modality embedding cannot change any other position."""
    model = tiny_lavin("lora").eval()
    tokens, has_image, vis_mask, images, _ = make_batch()
    with torch.no_grad():
        a = model(tokens, has_image, vis_mask, images)
        model.adapter_modality_embedding.weight.add_(3.0)
        b = model(tokens, has_image, vis_mask, images)
    torch.testing.assert_close(a[:, 1:], b[:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 0], b[:, 0])


def test_model_gradients_reach_every_trainable_parameter():
    model = tiny_lavin("mma", noise=0).train()
    tokens, has_image, vis_mask, images, labels = make_batch()
    # At init the up-projections are zero, so conv_A (down), the routers and the modality embedding get exactly zero
    # gradient on the first backward (the chain rule); the up-projections and the neck do learn.
    model(tokens, has_image, vis_mask, images, labels=labels).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif ".up0." in name or ".up1." in name or name.startswith("adapter_proj"):
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad.abs().sum() == 0, name
    # After the up-projections move away from zero, one backward on a mixed batch reaches every trainable parameter.
    model = tiny_lavin("mma").train()
    model(tokens, has_image, vis_mask, images, labels=labels).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if p.requires_grad else p.grad is None, name


def test_model_text_only_batch_still_touches_visual_parameters():
    model = tiny_lavin("mma").train()
    tokens, has_image, _, _, labels = make_batch()
    model(tokens[:1], has_image[:1], None, None, labels=labels[:1]).backward()
    for name, p in model.visual.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() == 0, name  # zeros, but present on every rank


def test_model_hf_bf16_rope_tables_stay_fp32(tmp_path):
    args, sd, params = _random_llama(dtype=torch.bfloat16)
    save_hf_llama(tmp_path / "hf", sd, args)
    save_meta_layout(tmp_path / "meta", sd, params)
    want = Transformer(replace(args, hidden_dim=args.ffn_dim))  # fp32 tables, as built
    bf16 = torch.bfloat16
    for model in (load_llama(tmp_path / "hf", dtype=bf16), load_llama(tmp_path / "meta", dtype=bf16),
                  Transformer(args).to(bf16), Transformer(args).half()):
        assert model.tok_embeddings.weight.dtype != torch.float32
        assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
        assert torch.equal(model.rope_cos, want.rope_cos) and torch.equal(model.rope_sin, want.rope_sin)


def test_model_label_only_head_equals_full_logits_loss():
    model = tiny_lavin("lora").eval()
    tokens, has_image, vis_mask, images, labels = make_batch()
    with torch.no_grad():
        logits = model(tokens, has_image, vis_mask, images)[:, :-1]  # (B, T, V): slot t predicts token t
        full = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=data.IGNORE, reduction="sum")
        ours = model(tokens, has_image, vis_mask, images, labels=labels, reduction="sum")
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)


# =====================================================================================================================
# data.py: ScienceQA prompts, tokenisation, batching
# =====================================================================================================================

# -----------------------------------------------------------------------------
# Prompts


def _official_prompt(problem, fmt):
    """An independent transcription of util/base_prompt.py's build_prompt (use_caption=False).

    Built from the format letters instead of data.py's template tables: Q/C/M name the input lines, the L/E letters
    of the input make one "BECAUSE:" line at their position; the output is letter-driven too, with the official
    swap for the single-letter AL/AE outputs (AL -> solution, AE -> lecture).
    """
    # get_*_text
    question = problem["question"]
    context = " ".join([problem["hint"] or "", ""]).strip() or "N/A"
    choice = " ".join("({}) {}".format("ABCDE"[i], c) for i, c in enumerate(problem["choices"]))
    answer = "ABCDE"[problem["answer"]]
    lecture = (problem["lecture"] or "").replace("\n", "\\n")
    solution = (problem["solution"] or "").replace("\n", "\\n")
    text_of = {"L": lecture, "E": solution}
    # create_training_example: inputs
    in_fmt, out_fmt = fmt.split("-")
    lines, because_done = [], False
    for letter in in_fmt:
        if letter == "Q":
            lines.append(f"Question: {question}")
        elif letter == "C":
            lines.append(f"Context: {context}")
        elif letter == "M":
            lines.append(f"Options: {choice}")
        elif not because_done:
            because_done = True
            lines.append("BECAUSE: " + " ".join(text_of[x] for x in in_fmt if x in "LE"))
    inp = "\n" + "\n".join(lines) + "\n" + "Response:"
    # outputs
    explain = [x for x in out_fmt if x in "LE"]
    if out_fmt in ("AL", "AE"):
        explain = ["E" if out_fmt == "AL" else "L"]
    expl = " ".join(text_of[x] for x in explain)
    if out_fmt.startswith("A"):
        out = f"The answer is {answer}." + (f" BECAUSE: {expl}" if explain else "")
    else:
        out = f"{expl} The answer is {answer}."
    return inp.replace("  ", " ").strip(), out.replace("  ", " ").strip()


@needs_sqa
def test_data_build_prompt_matches_official_on_sample150():
    problems = json.loads((SQA / "problems_sample150.json").read_text())
    assert len(problems) == 150
    for pid, rec in problems.items():
        for fmt in ("QCM-ALE", "CQM-A"):
            assert data.build_prompt(rec, fmt) == _official_prompt(rec, fmt), (pid, fmt)
    # The whole official family on a handful of records (empty lecture/solution, hint with newlines, ...).
    for pid in ("1", "11", "33", "58"):
        for fmt in data.PROMPT_FORMATS:
            assert data.build_prompt(problems[pid], fmt) == _official_prompt(problems[pid], fmt), (pid, fmt)


@needs_sqa
def test_data_build_prompt_golden_strings():
    p = json.loads((SQA / "problems_sample150.json").read_text())
    # pid 1: lecture with newlines -> the two-character escape; empty hint -> N/A
    # (official util/base_prompt.py, get_context_text).
    assert data.build_prompt(p["1"]) == (
        "Question: Which of these states is farthest north?\nContext: N/A\n"
        "Options: (A) West Virginia (B) Louisiana (C) Arizona (D) Oklahoma\nResponse:",
        "The answer is A. BECAUSE: Maps have four cardinal directions, or main directions. Those directions are "
        "north, south, east, and west.\\nA compass rose is a set of arrows that point to the cardinal directions. "
        "A compass rose usually shows only the first letter of each cardinal direction.\\nThe north arrow points to "
        "the North Pole. On most maps, north is at the top of the map. To find the answer, look at the compass rose. "
        "Look at which way the north arrow is pointing. West Virginia is farthest north.",
    )
    # pid 58: lecture and solution both empty -> the residual "BECAUSE:" stays: official
    # util/base_prompt.py, create_one_example, tests endswith("BECAUSE:") before it strips the trailing spaces.
    assert data.build_prompt(p["58"])[1] == "The answer is D. BECAUSE:"
    # pid 11: empty lecture -> "BECAUSE:  {solution}" folds to one space.
    assert data.build_prompt(p["11"])[1] == (
        "The answer is B. BECAUSE: The colony is New Hampshire.\\nDuring the colonial era, New Hampshire and New York "
        "both claimed the territory that would later become the state of Vermont. Vermont was never its own colony."
    )
    # pid 33: hint with a real newline (kept), empty solution (trailing space stripped).
    prompt, answer = data.build_prompt(p["33"])
    assert prompt == (
        "Question: What information supports the conclusion that Logan inherited this trait?\n"
        "Context: Read the description of a trait.\nLogan has blue eyes.\n"
        "Options: (A) Logan's mother has blue eyes. She passed this trait down to Logan. "
        "(B) Logan likes to wear a blue sweater to match his blue eyes.\nResponse:"
    )
    assert answer.endswith("such as scars, are caused by the environment.")
    # CQM-A, the CLI default nobody trained with.
    assert data.build_prompt(p["58"], "CQM-A") == (
        "Context: N/A\nQuestion: Which organ controls the function of other body organs?\n"
        "Options: (A) skeleton (B) lungs (C) heart (D) brain\nResponse:",
        "The answer is D.",
    )


def test_data_build_prompt_fold_and_nulls():
    rec = dict(question="Pick   one.", choices=["x", "y", "z"], answer=2, hint="  Some  text \n", image=None,
               lecture=None, solution="Line 1\nLine 2")  # fmt: skip
    prompt, answer = data.build_prompt(rec)
    # A single pass of "  " -> " ": three spaces become two. The hint is stripped. Null lecture reads as "".
    assert prompt == "Question: Pick  one.\nContext: Some text\nOptions: (A) x (B) y (C) z\nResponse:"
    assert answer == "The answer is C. BECAUSE: Line 1\\nLine 2"
    assert data.build_instruction("Say hi.", "") == "Instruction: Say hi. \nResponse:"
    assert data.build_instruction("Say hi.", "Bob") == "Instruction: Say hi. Bob\nResponse:"
    assert data.build_instruction("Say hi.", None) == "Instruction: Say hi.\nResponse:"
    with pytest.raises(ValueError, match="QCM-ALE"):
        data.build_prompt(rec, "QMC-X")


# -----------------------------------------------------------------------------
# Real tokenizer and real data


@needs_llama
@needs_sqa
def test_data_llama_prefixes_and_label_boundary():
    tok = data.Tokenizer(LLAMA_TOK)
    assert tok.encode(data.IMAGE_PREFIX, bos=False, eos=False) == data.LLAMA_PREFIX_IDS[True] == [7084, 29901, 29871]
    assert tok.encode(data.TEXT_PREFIX, bos=False, eos=False) == data.LLAMA_PREFIX_IDS[False] == \
        [7084, 29901, 405, 29914, 29909]
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (1, 2, 32000)
    problems = json.loads((SQA / "problems_sample150.json").read_text())
    for pid, rec in problems.items():
        prompt, answer = data.build_prompt(rec)
        has_image = rec["image"] is not None
        enc = data.encode_example(tok, prompt, answer, has_image, max_seq_len=10**6, n_visual=NV)
        tokens, labels = enc["tokens"], enc["labels"]
        head = 1 + (3 + 6 if has_image else 5)
        lab = labels != IGNORE
        assert lab.sum() > 0 and lab[-1] and tokens[-1] == tok.eos_id, pid
        start = int(lab.nonzero()[0])
        assert lab[start:].all(), pid  # one contiguous labelled run: answer + EOS
        assert tok.decode(tokens[start:]) == answer, pid
        assert tok.decode(tokens[head:start]) == prompt, pid
        assert tokens[head:start].tolist() == tok.encode(prompt, bos=False, eos=False), pid  # no boundary shift
        assert enc["vis_mask"].sum() == (6 if has_image else 0)


@needs_llama
@needs_sqa
def test_data_scienceqa_test_split_prompts_lengths_and_images(tmp_path):
    tok = data.Tokenizer(LLAMA_TOK)
    test = json.loads((SQA / "problems_test_reconstructed.json").read_text())
    full = json.loads((SQA / "problems_sample150.json").read_text())
    assert len(test) == 4241
    for name, probs in (("test split (4,241, most without lecture/solution)", test), ("150 full records", full)):
        L = np.array(data.prompt_lengths(probs, tok, n_visual=NV))
        print(f"\n{name}: mean {L.mean():.1f} median {np.median(L):.0f} p90 {np.percentile(L, 90):.0f} "
              f"max {L.max()} >512: {(L > 512).sum()}")  # fmt: skip
        assert L.min() > 10
    # The real images through the dataset: the 50 sample test records in the official layout.
    pids = [pid for pid, r in full.items() if r["split"] == "test"]
    (tmp_path / "problems.json").symlink_to(SQA / "problems_sample150.json")
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": pids}))
    (tmp_path / "images").symlink_to(SQA / "images")
    ds = data.ScienceQADataset(tmp_path, "test", tok, n_visual=NV)
    too_long = sum(n > 512 for n in data.prompt_lengths([full[p] for p in pids], tok, n_visual=NV))
    assert len(ds) == 50 and ds.n_truncated == too_long > 0 and max(ds.lengths) == 511
    n_img = 0
    for i in range(len(ds)):
        item = ds[i]
        if item["has_image"]:
            n_img += 1
            assert item["image"].shape == (3, 224, 224) and torch.isfinite(item["image"]).all()
    assert n_img == 24


@needs_llama
@needs_sqa
def test_data_scienceqa_length_percentiles():
    """Recomputes data.SCIENCEQA_TRAIN_LENGTH_PERCENTILES (see its comment); prints the values on failure."""
    tok = data.Tokenizer(LLAMA_TOK)
    test = json.loads((SQA / "problems_test_reconstructed.json").read_text())
    full = json.loads((SQA / "problems_sample150.json").read_text())
    prompt_side = [1 + len(data.encode_prompt(tok, data.build_prompt(r)[0], bool(r["image"]), n_visual=NV))
                   for r in test.values()]
    answer_side = []
    for r in full.values():
        prompt, answer = data.build_prompt(r)
        answer_side.append(int((data.encode_example(tok, prompt, answer, False, 10**6, n_visual=NV)["labels"]
                                != IGNORE).sum()))
    pairs = np.add.outer(np.array(prompt_side), np.array(answer_side)).ravel()  # every prompt with every answer
    got = {q: int(round(np.percentile(pairs, q))) for q in data.SCIENCEQA_TRAIN_LENGTH_PERCENTILES}
    print("\nSCIENCEQA_TRAIN_LENGTH_PERCENTILES =", got, f"(> 512: {(pairs > 512).mean():.2%})")
    assert got == data.SCIENCEQA_TRAIN_LENGTH_PERCENTILES


# -----------------------------------------------------------------------------
# The quiz: round trip through dataset -> collate, determinism, design


def test_data_quiz_round_trip(quiz, tok):
    folder = quiz
    records = {r["pid"]: r for r in data.load_scienceqa(folder, "train")}
    ds = data.ScienceQADataset(folder, "train", tok, image_size=32, max_seq_len=256, n_visual=NV)
    assert len(ds) == QUIZ["n_train"] and ds.n_truncated == 0 and ds.lengths == [len(s["tokens"]) for s in ds.samples]
    seen_img = seen_txt = 0
    for start in range(0, len(ds), 16):
        items = [ds[i] for i in range(start, min(start + 16, len(ds)))]
        batch = data.collate(items)
        B, T = batch["tokens"].shape
        assert T == max(len(it["tokens"]) for it in items)  # padded to the batch's longest, not max_seq_len
        assert batch["images"] is None or batch["images"].shape == (int(batch["has_image"].sum()), 3, 32, 32)
        img_rows = [b for b in range(B) if batch["has_image"][b]]
        for k, b in enumerate(img_rows):  # images stacked in batch order of the image rows
            assert torch.equal(batch["images"][k], items[b]["image"])
        for b in range(B):
            rec = records[batch["pids"][b]]
            prompt, answer = data.build_prompt(rec)
            n = len(items[b]["tokens"])
            tokens, labels, vis = batch["tokens"][b], batch["labels"][b], batch["vis_mask"][b]
            assert (tokens[n:] == 0).all() and (labels[n:] == IGNORE).all() and not vis[n:].any()
            prefix = data.IMAGE_PREFIX if rec["image"] else data.TEXT_PREFIX
            assert tokens[0] == tok.bos_id and tokens[n - 1] == tok.eos_id
            # The body is encoded on its own, so SentencePiece's dummy-prefix space ("▁Question") sits between
            # prefix and prompt, as in the official layout; decode drops BOS/EOS and the 0 placeholders.
            assert tok.decode(tokens[:n]) == prefix + " " + prompt + answer
            lab = labels != IGNORE
            start_ans = int(lab.nonzero()[0])
            assert lab[start_ans:n].all() and not lab[:start_ans].any()
            assert tok.decode(tokens[start_ans:n]) == answer and labels[n - 1] == tok.eos_id
            assert tok.decode(tokens[:start_ans]).endswith(prompt)
            if rec["image"]:
                seen_img += 1
                head = data.sequence_head(tok.bos_id, tok.encode(prefix, bos=False, eos=False), NV)  # the layout
                assert vis.sum() == NV and tokens[:len(head)].tolist() == head
                assert vis.nonzero().squeeze(1).tolist() == list(range(len(head) - NV, len(head)))
            else:
                seen_txt += 1
                assert not vis.any()
    assert seen_img > 0 and seen_txt > 0


def test_data_quiz_decodes_exactly(quiz, tok):
    """Without the image placeholders, the decoded row is exactly prefix + prompt + answer."""
    folder = quiz
    for rec in data.load_scienceqa(folder, "test"):
        prompt, answer = data.build_prompt(rec)
        enc = data.encode_example(tok, prompt, answer, bool(rec["image"]), 512, n_visual=NV)
        prefix = data.IMAGE_PREFIX if rec["image"] else data.TEXT_PREFIX
        assert tok.decode(enc["tokens"]) == prefix + " " + prompt + answer, rec["pid"]  # see test_data_quiz_round_trip
        n_prompt = len(tok.encode(prompt, bos=False, eos=False))
        body = tok.encode(prompt + answer, bos=False, eos=True)
        assert body[:n_prompt] == tok.encode(prompt, bos=False, eos=False), rec["pid"]  # stable boundary


# -----------------------------------------------------------------------------
# Encoding details


def test_data_truncation_keeps_answer_start(quiz, tok):
    prompt = "Question: What color is the circle?\nContext: N/A\nOptions: (A) red (B) blue (C) green\nResponse:"
    answer = "The answer is B. BECAUSE: " + "The circle is blue. " * 20
    full = data.encode_example(tok, prompt, answer, True, 10**6, n_visual=NV)
    n_head = 1 + len(tok.encode(data.IMAGE_PREFIX, False, False)) + 6
    n_prompt = len(tok.encode(prompt, False, False))
    # 1. Cut the answer's tail (EOS first) ...
    enc = data.encode_example(tok, prompt, answer, True, max_seq_len=n_head + n_prompt + 12 + 1, n_visual=NV)
    assert enc["truncated"] and len(enc["tokens"]) == n_head + n_prompt + 12
    assert torch.equal(enc["tokens"], full["tokens"][: len(enc["tokens"])]) and enc["tokens"][-1] != tok.eos_id
    # 2. ... but keep 8 answer tokens, cutting the prompt from its start (BOS, prefix, placeholders stay).
    enc = data.encode_example(tok, prompt, answer, True, max_seq_len=n_head + 10 + 1, n_visual=NV)
    assert len(enc["tokens"]) == n_head + 10 and (enc["labels"] != IGNORE).sum() == data.MIN_ANSWER_TOKENS
    assert torch.equal(enc["tokens"][:n_head], full["tokens"][:n_head]) and enc["vis_mask"].sum() == 6
    assert tok.decode(enc["tokens"][-8:]).startswith("The answer is B.")
    assert tok.decode(enc["tokens"][n_head:-8]) == "Response:"
    with pytest.raises(ValueError):
        data.encode_example(tok, prompt, answer, True, max_seq_len=n_head + 3, n_visual=NV)
    assert data.encode_prompt(tok, prompt, True, n_visual=NV) == full["tokens"][: n_head + n_prompt].tolist()


def test_data_visual_slots_invert_sequence_head_and_embed_needs_them(tok):
    # Left-padded prompts, as generate.generate lays them out: visual_slots finds what encode_example marks.
    prompt, answer = "Question: What color is the circle?\nResponse:", "The answer is B."
    encs = [data.encode_example(tok, prompt, answer, img, max_seq_len=512, n_visual=NV) for img in (True, False)]
    P = max(len(e["tokens"]) for e in encs) + 2
    pad = torch.tensor([P - len(e["tokens"]) for e in encs])  # (2,)
    tokens, want = torch.zeros(2, P, dtype=torch.long), torch.zeros(2, P, dtype=torch.bool)
    for b, e in enumerate(encs):
        tokens[b, pad[b]:], want[b, pad[b]:] = e["tokens"], e["vis_mask"]
    assert want.sum() == NV and torch.equal(data.visual_slots(tokens, torch.tensor([True, False]), NV, pad), want)
    tokens, has_image, _, imgs, _ = make_batch()
    with pytest.raises(ValueError, match="images need vis_mask"):
        tiny_lavin().embed(tokens, has_image, None, imgs)


def test_data_encode_dialogue(quiz, tok):
    turns = [("What color is the circle?", "The circle is red."), ("Where is the circle?", "It is at the top left.")]
    enc = data.encode_dialogue(tok, turns, has_image=True, max_seq_len=512, n_visual=NV)
    tokens, labels = enc["tokens"], enc["labels"]
    lab = labels != IGNORE
    # Exactly two labelled runs: each answer + its EOS.
    runs, i = [], 0
    while i < len(lab):
        if lab[i]:
            j = i
            while j < len(lab) and lab[j]:
                j += 1
            runs.append((i, j))
            i = j
        else:
            i += 1
    assert len(runs) == 2
    for (s, e), (_, answer) in zip(runs, turns):
        assert tokens[e - 1] == tok.eos_id and tok.decode(tokens[s:e]) == answer
    assert torch.equal(labels[lab], tokens[lab])
    assert tok.decode(tokens[runs[0][1] : runs[1][0]]) == "Instruction: Where is the circle?\nResponse:"
    # One turn == encode_example with the LLaVA-form instruction; inference ends at "Response:" with no labels.
    one = data.encode_dialogue(tok, turns[:1], False, 512, n_visual=NV)
    ref = data.encode_example(tok, data.build_instruction(turns[0][0], None), turns[0][1], False, 512, n_visual=NV)
    assert torch.equal(one["tokens"], ref["tokens"]) and torch.equal(one["labels"], ref["labels"])
    inf = data.encode_dialogue(tok, turns + [("How many shapes are there?", None)], True, 512, n_visual=NV)
    assert tok.decode(inf["tokens"]).endswith("Response:") and inf["tokens"][-1] != tok.eos_id
    assert (inf["labels"] != IGNORE).sum() == lab.sum()
    # Too long for inference: the oldest turns go, the new question stays.
    short = data.encode_dialogue(tok, turns + [("How many shapes are there?", None)], True, len(inf["tokens"]) - 3,
                                 n_visual=NV)
    assert short["truncated"] and tok.decode(short["tokens"]).endswith("How many shapes are there?\nResponse:")


def test_data_instruction_dataset(tmp_path, quiz, tok):
    folder = quiz
    image = next((folder / "images" / "train").rglob("image.png"))
    recs = [
        {"id": "x1", "image": image.name, "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "It is red."},
            {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "At the top left."}]},
        {"instruction": "Which word is a noun?", "input": "", "output": "The word apple is a noun."},
    ]  # fmt: skip
    (tmp_path / "mix.json").write_text(json.dumps(recs))
    ds = data.InstructionDataset(tmp_path / "mix.json", tok, image_dir=image.parent, image_size=32, n_visual=NV)
    a, b = ds[0], ds[1]
    assert a["has_image"] and a["image"].shape == (3, 32, 32) and not b["has_image"] and b["image"] is None
    assert ("<image>" not in tok.decode(a["tokens"])
            and "Instruction: What color is the circle?\nResponse:" in tok.decode(a["tokens"]))
    assert tok.decode(b["tokens"]).endswith("Instruction: Which word is a noun? \nResponse:The word apple is a noun.")
    batch = data.collate([a, b])
    assert batch["images"].shape == (1, 3, 32, 32) and batch["has_image"].tolist() == [1, 0]
    # JSONL, one record per line, told apart from a list by content: the same samples
    (tmp_path / "mix.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n")
    lines = data.InstructionDataset(tmp_path / "mix.jsonl", tok, image_dir=image.parent, image_size=32, n_visual=NV)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip([a, b], [lines[0], lines[1]])) and len(lines) == 2
    for text, message in [(json.dumps(recs[1]) + "\n{oops\n", "bad.jsonl line 2: not a JSON record"),
                          (json.dumps(recs[1]) + "\n[1]\n", "bad.jsonl line 2: a record must be a JSON object"),
                          ("hello", "bad.jsonl: neither a JSON list of records (starts with [) nor JSONL"),
                          ('[{"a": 1},\n oops]', "bad.jsonl is not valid JSON (Expecting value: line 2 column 2")]:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            data.read_records(tmp_path / "bad.jsonl")


def test_data_length_grouped_order():
    lengths = [random.Random(i).randint(10, 500) for i in range(1000)]
    order = data.length_grouped_order(lengths, batch_size=8, seed=0)
    assert sorted(order) == list(range(1000)) and order == data.length_grouped_order(lengths, 8, 0)
    assert order != data.length_grouped_order(lengths, 8, 1)
    spread = np.mean([np.ptp([lengths[i] for i in order[j : j + 8]]) for j in range(0, 1000, 8)])
    assert spread < 40  # random batches of 8 would spread ~380


# -----------------------------------------------------------------------------
# Bad input


def test_data_bad_inputs(tmp_path, quiz, tok):
    folder = quiz
    with pytest.raises(FileNotFoundError, match="problems.json"):
        data.load_scienceqa(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        data.Tokenizer(tmp_path / "tokenizer.model")
    # A copy of the quiz with one malformed record, one missing image, one corrupt PNG.
    problems = json.loads((folder / "problems.json").read_text())
    splits = json.loads((folder / "pid_splits.json").read_text())
    img_pids = [p for p in splits["train"] if problems[p]["image"]]
    missing, corrupt = img_pids[:2]
    root = tmp_path / "sqa"
    for p in img_pids[2:]:
        (root / "images" / "train" / p).mkdir(parents=True)
        (root / "images" / "train" / p / "image.png").write_bytes(
            (folder / "images" / "train" / p / "image.png").read_bytes())
    (root / "images" / "train" / corrupt).mkdir(parents=True)
    (root / "images" / "train" / corrupt / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "pid_splits.json").write_text(json.dumps(splits))
    bad = dict(problems)
    bad[splits["train"][5]] = dict(bad[splits["train"][5]], answer=7)
    (root / "problems.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"pid {splits['train'][5]}: field 'answer'"):
        data.load_scienceqa(root, "train")
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(ValueError, match=rf"problem {missing}: .*{missing}/image.png"):
        data.ScienceQADataset(root, "train", tok, image_size=32, n_visual=NV)
    with pytest.raises(ValueError, match="split 'dev'"):
        data.load_scienceqa(root, "dev")
    ds = data.ScienceQADataset(root, "train", tok, image_size=32, skip_bad=True, n_visual=NV)
    assert [p for p, _ in ds.skipped] == [missing, corrupt] and len(ds) == QUIZ["n_train"] - 2
    assert corrupt in ds.skipped[1][1] and "image.png" in ds.skipped[1][1]
    # Without skip_bad the corrupt file is found when the item is read, and the error names pid and path.
    (root / "images" / "train" / missing).mkdir(parents=True)
    (root / "images" / "train" / missing / "image.png").write_bytes(
        (folder / "images" / "train" / missing / "image.png").read_bytes())
    ds = data.ScienceQADataset(root, "train", tok, image_size=32, n_visual=NV)
    i = [s["pid"] for s in ds.samples].index(corrupt)
    with pytest.raises(ValueError, match=rf"problem {corrupt}: cannot load image .*{corrupt}/image.png"):
        ds[i]
    with pytest.raises(ValueError, match="unknown prompt format"):
        data.ScienceQADataset(root, "train", tok, fmt="QCM-XYZ", n_visual=NV)


def test_data_tokenizer_found_in_an_hf_folder_and_tiktoken_refused(tmp_path, quiz, tok):
    hf, meta = tmp_path / "Llama-2-7b-hf", tmp_path / "LLaMA" / "7B"
    hf.mkdir()
    meta.mkdir(parents=True)
    (hf / "tokenizer.model").write_bytes((quiz / "tokenizer.model").read_bytes())
    (meta.parent / "tokenizer.model").write_bytes((quiz / "tokenizer.model").read_bytes())
    assert data.tokenizer_path(hf) == hf / "tokenizer.model"  # Hugging Face: inside the folder
    assert data.tokenizer_path(meta) == meta.parent / "tokenizer.model"  # Meta's LLaMA-1: next to 7B/
    assert data.Tokenizer(hf).encode("a b", True, True) == tok.encode("a b", True, True)
    llama3 = tmp_path / "Llama-3-8B"
    llama3.mkdir()
    (llama3 / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json but no tokenizer\.model: .*tiktoken.* cannot read"):
        data.Tokenizer(llama3)
    (llama3 / "original").mkdir()
    (llama3 / "original" / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken's rank format
    with pytest.raises(ValueError, match=r"tokenizer\.model is a tiktoken BPE rank file \(Llama-3's tokenizer\)"):
        data.Tokenizer(llama3 / "original")


# =====================================================================================================================
# generate.py: the one decoding path (batched, cached, packed, merged), streaming, chat prompts
# =====================================================================================================================

def test_generate_batched_equals_alone_and_cache_equals_recompute():
    model = tiny_lavin("mma").eval()
    tokens, has_image, vis_mask, images, _ = make_batch()
    prompts = [tokens[0, :7].tolist(), tokens[1].tolist(), tokens[2, :12].tolist()]
    batched = generate.generate(model, prompts, has_image, images, max_new_tokens=5, eos_id=-1)
    for b in range(3):
        img = images[b - 1:b] if has_image[b] else None
        assert (generate.generate(model, [prompts[b]], has_image[b:b + 1], img, max_new_tokens=5, eos_id=-1)[0]
                == batched[b])
        seq = list(prompts[b])
        for _ in range(5):  # full recomputation, no cache
            t = torch.tensor([seq])
            vm = torch.zeros_like(t, dtype=torch.bool)
            if has_image[b]:
                vm[0, 4:10] = True
            seq.append(int(model(t, has_image[b:b + 1], vm, img)[0, -1].argmax()))
        assert seq[len(prompts[b]):] == batched[b]


def test_generate_takes_packed_path_with_the_same_tokens():
    # The fast path is the one generate (and so sample.py's chat, one-shot and --eval) runs: every LLaMA linear is
    # a PackedLinear while tokens come out, the originals are back afterwards, and the tokens equal a plain
    # recomputation without cache or packing (the transformers-style oracle, merged LoRA).
    model = tiny_lavin("lora").eval()
    model.merge(0)
    seen = []
    p = torch.randint(3, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    p[:, 0] = 1
    layer = model.llama.layers[1]
    out = generate.generate(model, p.tolist(), [False] * 3, None, max_new_tokens=6, eos_id=-1,
                            on_token=lambda _: seen.append(all(
                                isinstance(m, PackedLinear) for m in (model.llama.output, layer.feed_forward.w2,
                                                                      layer.attention.wqkv, layer.feed_forward.w13))))
    assert seen == [True] * 6
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert layer.attention.wqkv is None and layer.feed_forward.w13 is None  # q/k/v and w1/w3 stacked only meanwhile
    assert out == reference_generate(reference_weights(model), p, 6)
    # The packed weights are kept for the next call, and packed again once a weight changes in place
    first = dict(model.llama.packed)
    assert len(first) == 2 * 4 + 2 * 4 + 1  # q/k/v and w1/w3 of each of 4 layers stacked; wo, w2; the head
    assert generate.generate(model, p.tolist(), [False] * 3, None, max_new_tokens=6, eos_id=-1) == out
    assert all(model.llama.packed[k] is v for k, v in first.items())
    with torch.no_grad():
        layer.feed_forward.w3.weight.mul_(3.0)
    assert generate.generate(model, p.tolist(), [False] * 3, None, max_new_tokens=6, eos_id=-1) == \
        reference_generate(reference_weights(model), p, 6)
    fresh = [k for k, v in model.llama.packed.items() if v is not first[k]]
    assert fresh == [(id(layer.feed_forward.w1), id(layer.feed_forward.w3))]
    lengths = [p[0, :4].tolist(), p[1].tolist()]  # different lengths in one batch: as each alone
    both = generate.generate(model, lengths, [False, False], None, max_new_tokens=6, eos_id=-1)
    assert both == [generate.generate(model, [q], [False], None, max_new_tokens=6, eos_id=-1)[0] for q in lengths]


def test_generate_streaming_equals_plain(model, tok):
    """The streamed pieces join to the non-streamed answer for the same seed (sampling, not greedy), and the seed
    decides the answer."""
    s = generate.Sampling(temperature=1.0, top_p=0.9, max_new_tokens=24)
    p, img = prompt(tok, "What color is the circle?", True), images(1)[0]
    pieces = []
    streamed = generate.answer(model, tok, p, img, s, torch.Generator().manual_seed(3), on_text=pieces.append)
    plain = generate.answer(model, tok, p, img, s, torch.Generator().manual_seed(3))
    assert "".join(pieces) == streamed == plain
    assert len(pieces) > 1  # it really streamed
    assert generate.answer(model, tok, p, img, s, torch.Generator().manual_seed(4)) != plain


def test_generate_merged_equals_unmerged(model, tok):
    """Greedy generation with the adapters folded into q/k/v (README, difference 6) equals running them as modules,
    for both modalities, and unmerging restores the modules."""
    s = generate.Sampling(max_new_tokens=16)
    for has_image in (False, True):
        p = prompt(tok, "Which shape is red?", has_image)
        img = images(1)[0] if has_image else None
        unmerged = generate.answer(model, tok, p, img, s, None, merge=False)
        merged = generate.answer(model, tok, p, img, s, None, merge=True)
        assert model.merged_modality == int(has_image) and model.llama.layers[0].adapter_attn is None  # really folded
        again = generate.answer(model, tok, p, img, s, None, merge=False)
        assert model.merged_modality is None and model.llama.layers[0].adapter_attn is not None
        assert unmerged == merged == again and len(merged) > 0, has_image


def test_generate_batch_equals_alone(model, tok):
    """A batch of prompts of four different lengths, mixing modalities, gives each prompt's tokens alone (greedy)."""
    texts = ["hi", "Which shape is red? Look at the picture carefully.", "What is the capital of Peru?", "Where?"]
    has = [True, False, True, False]
    ps = [prompt(tok, t, h) for t, h in zip(texts, has)]
    assert len({len(p) for p in ps}) == 4
    imgs = images(2)  # (2, 3, 64, 64): the two image rows, in batch order
    batch = generate.generate(model, ps, has, imgs, max_new_tokens=12)
    alone = [generate.generate(model, [ps[0]], [True], imgs[:1], 12)[0],
             generate.generate(model, [ps[1]], [False], None, 12)[0],
             generate.generate(model, [ps[2]], [True], imgs[1:], 12)[0],
             generate.generate(model, [ps[3]], [False], None, 12)[0]]
    assert batch == alone


def test_generate_chat_prompt_follows_the_training_format(tok):
    """A ScienceQA-trained model is prompted exactly as in training; a chatbot with the instruction template."""
    line = "What color is the circle? (A) red (B) green"
    ids = generate.chat_prompt(tok, {"chat": "scienceqa", "prompt_format": "QCM-EA", "n_visual": NV}, [], line,
                               True, 200)
    expected = "Question: What color is the circle?\nContext: N/A\nOptions: (A) red (B) green\nResponse:"
    assert ids == data.encode_prompt(tok, expected, True, n_visual=NV)
    ids = generate.chat_prompt(tok, {"chat": "instruction", "n_visual": NV}, [("hi", "hello")], line, False, 200)
    assert ids == data.encode_dialogue(tok, [("hi", "hello"), (line, None)], False, 201, n_visual=NV)["tokens"].tolist()


# =====================================================================================================================
# evaluate.py: answer parsing, the score table, batched and sharded evaluation
# =====================================================================================================================

# -----------------------------------------------------------------------------
# Scoring


def test_evaluate_parse_answer():
    rng = random.Random(0)
    assert evaluate.parse_answer("...Response:The answer is B. BECAUSE: x", 3, rng) == (1, False)
    # first match; "." is any char
    assert evaluate.parse_answer("The answer is C? The answer is A.", 3, rng) == (2, False)
    assert evaluate.parse_answer("The answer is B", 3, rng)[1]  # needs a character after the letter
    idx, fb = evaluate.parse_answer("The answer is D.", 3, rng)  # letter beyond the choices
    assert fb and 0 <= idx < 3
    draws = [evaluate.parse_answer("no idea", 4, random.Random(7))[0] for _ in range(3)]
    assert len(set(draws)) == 1  # seeded


def test_evaluate_score_table():
    def rec(answer, subject, hint, image, grade):
        return dict(answer=answer, subject=subject, hint=hint, image=image, grade=grade, choices=["a", "b", "c"])

    problems = {
        "1": rec(0, "natural science", "", "image.png", "grade1"),  # IMG
        "2": rec(1, "natural science", "ctx", None, "grade8"),  # TXT
        "3": rec(2, "social science", "ctx", "image.png", "grade3"),  # TXT + IMG
        "4": rec(0, "social science", "", None, "grade12"),  # NO
        "5": rec(1, "language science", "", None, "grade5"),  # NO
        "6": rec(2, "language science", "ctx", None, "grade7"),  # TXT
        "7": rec(0, None, "", "image.png", None),  # IMG, no subject/grade (reconstructed test record)
        "8": rec(1, "natural science", "", None, "grade2"),  # NO, answered by the random fallback
    }
    texts = {"1": "The answer is A.", "2": "The answer is B.", "3": "The answer is A.", "4": "The answer is A.",
             "5": "The answer is C.", "6": "The answer is C.", "7": "The answer is B.",
             "8": "I do not know"}  # fmt: skip
    rng = random.Random(0)
    preds, n_fb = {}, 0
    for pid, t in texts.items():
        preds[pid], fb = evaluate.parse_answer(t, 3, rng)
        n_fb += fb
    preds["8"] = 0  # pin the fallback's draw to a wrong answer for the hand computation
    s = evaluate.score_table(problems, preds, n_fb)
    # correct: 1, 2, 4, 6  (3, 5, 7, 8 wrong)
    expect = {"NAT": 2 / 3, "SOC": 1 / 2, "LAN": 1 / 2, "TXT": 2 / 3, "IMG": 1 / 3, "NO": 1 / 3,
              "G1-6": 1 / 4, "G7-12": 3 / 3, "Avg": 4 / 8}  # fmt: skip
    for col, v in expect.items():
        assert s[col] == pytest.approx(100 * v), col
    assert s["counts"] == {"NAT": 3, "SOC": 2, "LAN": 2, "TXT": 3, "IMG": 3, "NO": 3, "G1-6": 4, "G7-12": 3, "Avg": 8}
    assert s["n_fallback"] == 1
    table = evaluate.format_table(s)
    assert "G7-12" in table and "100.00" in table and "50.00" in table and "fallback): 1" in table
    with pytest.raises(ValueError, match="no prediction"):
        evaluate.score_table(problems, {"1": 0}, 0)


def test_evaluate_merged_equals_unmerged(model, tok, quiz):
    """evaluate() batches per modality and merges per batch: the same predictions and texts as unmerged."""
    problems = data.load_scienceqa(quiz, "test")
    kw = dict(batch_size=5, max_new_tokens=6)
    merged = evaluate.evaluate(model, tok, problems, quiz, "test", merge=True, **kw)
    assert merged == evaluate.evaluate(model, tok, problems, quiz, "test", merge=False, **kw)
    assert model.merged_modality is None and not model.training  # left as it came


def test_evaluate_eval_single_and_two_processes(ckpt, quiz, tmp_path):
    """--eval prints the score table and writes the predictions; under torchrun with two (gloo) processes, the table
    and the predictions are the same as with one."""
    flags = ["sample.py", "--adapter", str(ckpt), "--eval", "--split", "test", "--batch_size", "4",
             "--max_new_tokens", "6"]
    one = run(flags + ["--out", str(tmp_path / "one.json")])
    two = run(flags + ["--out", str(tmp_path / "two.json")], nproc=2)
    table = lambda out: out[out.index("   NAT"):out.index("predictions written")]  # noqa: E731
    assert "acc %" in table(one) and table(one) == table(two)
    p1, p2 = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert p1 == p2 and len([k for k in p1 if k.isdigit()]) == 24 and "fallbacks" in p1


def _fsdp_worker(rank, world, quiz):
    """One rank: evaluate a plain model, then the same model sharded by train.py's FSDP2 wrapper, as train.py does."""
    tok = data.Tokenizer(quiz / "tokenizer.model")
    model = tiny_lavin(noise=0.2, vocab_size=tok.n_words, max_seq_len=MAX_SEQ_LEN).eval()
    problems = data.load_scienceqa(quiz, "test")[:12]
    kw = dict(batch_size=4, max_new_tokens=4, merge=False)
    _, _, alone = evaluate.evaluate(model, tok, problems, quiz, "test", **kw)  # the whole split on each rank
    wrap_model(model, Namespace(fsdp=True, grad_ckpt=False, compile=False), torch.device("cpu"), world)
    _, _, sharded = evaluate.evaluate(model, tok, problems, quiz, "test", rank=rank, world=world, **kw)
    assert sharded == alone
    assert type(model.llama.layers[0].attention.wq.weight).__name__ == "DTensor"  # sharded again afterwards


def test_evaluate_eval_under_fsdp2(quiz):
    """train.py's end-of-training evaluation of an FSDP2-sharded model: ranks generate different batches, for
    different numbers of steps, without deadlocking, and agree with the unsharded model."""
    spawn(_fsdp_worker, quiz)


def mme_folder(root: Path, files: dict) -> Path:
    """An MME release folder by hand: {"task/stem": [(question, answer), ...]} -> each subtask in one of the two layouts
    (artwork, as in the release, in images/ + questions_answers_YN/, .jpg), a 16 x 16 image per question file."""
    for key, lines in files.items():
        task, stem = key.split("/")
        split = task in ("artwork", "celebrity", "landmark", "posters", "scene")
        qdir = root / task / ("questions_answers_YN" if split else "")
        idir = root / task / ("images" if split else "")
        qdir.mkdir(parents=True, exist_ok=True)
        idir.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (200, 30, 30)).save(idir / (stem + (".jpg" if split else ".png")))
        (qdir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in lines))
    return root


MME_HAND = {  # three subtasks in both layouts; the reply each question gets
    "existence/e1": [("Is there a dog? Please answer yes or no.", "Yes", "Yes"), ("Is there a cat?", "No", "No.")],
    "existence/e2": [("Is there a car?", "Yes", "The answer is yes"), ("Is there a bus?", "No", "no")],
    "artwork/a1": [("Is it by Monet?", "Yes", "Yes, it is"), ("Is it by Goya?", "No", "yes")],
    "artwork/a2": [("Is it a fresco?", "Yes", "not sure"), ("Is it a print?", "No", "No")],
    "code_reasoning/c1": [("Does it print 3?", "Yes", "YES"), ("Does it print 4?", "No", "Nope")],
}


def test_evaluate_mme_hand_built_folder_scores_as_calculation_py(tmp_path):
    """Both release layouts read; known replies give the hand-computed acc, acc+, scores and totals, and the results
    folder round-trips through calculation.py's layout."""
    root = mme_folder(tmp_path / "MME", {k: [(q, a) for q, a, _ in v] for k, v in MME_HAND.items()})
    tasks = evaluate.read_mme(root)
    assert list(tasks) == ["existence", "artwork", "code_reasoning"]  # MME's order: perception, then cognition
    assert [q["image_name"] for q in tasks["artwork"]] == ["a1.jpg", "a1.jpg", "a2.jpg", "a2.jpg"]
    replies = iter(r for k in ("existence/e1", "existence/e2", "artwork/a1", "artwork/a2", "code_reasoning/c1")
                   for *_, r in MME_HAND[k])
    results = {t: [(q["image_name"], q["question"], q["answer"], next(replies)) for q in qs] for t, qs in tasks.items()}
    scores = evaluate.mme_scores(results)
    per = {t: (v["acc"], v["acc_plus"], v["score"], v["unparsed"]) for t, v in scores["subtasks"].items()}
    # existence: 3 of 4 right ("The answer is yes" is other), 1 of 2 images both right: 75 + 50
    # artwork: "Yes, it is" right, "yes" wrong, "not sure" reads as no (its first four characters hold "no"), "No"
    # right: 2 of 4, no image both right: 50 + 0; code_reasoning: "YES" and "Nope" right: 100 + 100
    assert per == {"existence": (75.0, 50.0, 125.0, 1), "artwork": (50.0, 0.0, 50.0, 0),
                   "code_reasoning": (100.0, 100.0, 200.0, 0)}
    assert (scores["Perception"], scores["Cognition"], scores["unparsed"]) == (175.0, 200.0, 1)
    assert len(scores["missing"]) == 11 and "OCR" in scores["missing"] and "existence" not in scores["missing"]
    table = evaluate.format_mme(scores)
    assert "\nPerception (2 of 10 subtasks)           175.00\nCognition (1 of 4 subtasks)             200.00\n" in table
    assert "missing subtasks (left out of the totals): count, position" in table and table.endswith(": 1")
    out = tmp_path / "results"
    (out / "OCR.txt").parent.mkdir()
    (out / "OCR.txt").write_text("stale\tfrom\tan\told run\n")  # gone: the folder holds exactly this run
    evaluate.write_mme_results(out, results)
    assert sorted(p.name for p in out.iterdir()) == ["artwork.txt", "code_reasoning.txt", "existence.txt"]
    assert (out / "code_reasoning.txt").read_text() == ("c1.png\tDoes it print 3?\tYes\tYES\n"
                                                        "c1.png\tDoes it print 4?\tNo\tNope\n")
    assert evaluate.read_mme_results(out) == results and evaluate.mme_scores(evaluate.read_mme_results(out)) == scores
    assert evaluate.mme_label("no") == "no" and evaluate.mme_label("Yes") == "yes" and evaluate.mme_label("") == "other"


@pytest.mark.parametrize("case, files, message", [
    ("not MME", {"cats/x": [("q", "Yes"), ("q", "No")]}, r"not MME's release layout: none of its subtask folders"),
    ("no tab", {"count/x": [("q", "Yes"), ("q No", None)]}, r"count/x\.txt, line 2: expected question<TAB>Yes or No"),
    ("not yes/no", {"OCR/x": [("q", "Maybe"), ("q", "No")]}, r"OCR/x\.txt, line 1: expected question<TAB>Yes or No"),
    ("one line", {"scene/x": [("q", "Yes")]}, r"scene/questions_answers_YN/x\.txt: 1 questions; MME asks two"),
    ("bad image", {"color/x": [("q", "Yes"), ("q", "No")]}, r"color/x\.png: the image of x\.txt will not open"),
    ("no image", {"color/x": [("q", "Yes"), ("q", "No")]}, r"color/x\.txt: no image x\.png or \.jpg beside it"),
])
def test_evaluate_mme_bad_input_is_one_line_naming_file_and_line(tmp_path, case, files, message):
    root = tmp_path / "MME"
    mme_folder(root, {"existence/ok": [("q", "Yes"), ("q", "No")], **{k: [] for k in files}})
    for key, lines in files.items():
        task, stem = key.split("/")
        txt = next((root / task).rglob(f"{stem}.txt"))
        txt.write_text("".join(q + ("" if a is None else f"\t{a}") + "\n" for q, a in lines))
    if case == "not MME":
        shutil.rmtree(root / "existence")
    if case == "bad image":
        (root / "color" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    if case == "no image":
        (root / "color" / "x.png").unlink()
    with pytest.raises(evaluate.UserError, match=message) as e:
        evaluate.read_mme(root)
    assert "\n" not in str(e.value)


def test_evaluate_mme_prompts_for_either_training(tok):
    """A ScienceQA-trained model gets its own prompt with options (A) yes (B) no, and its letter is mapped to the
    option; a chatbot gets the question verbatim in its instruction template, and its reply as it is, on one line."""
    q = [dict(question="Is the circle red? Please answer yes or no.", image_name="0.png")]
    sqa, chat = (evaluate.mme_prompts(tok, q, dict(chat=c, prompt_format="QCM-A"), 100, NV)
                 for c in ("scienceqa", "instruction"))
    assert tok.decode(sqa[0]).endswith("Options: (A) yes (B) no\nResponse:")
    assert chat[0] == data.encode_dialogue(tok, [(q[0]["question"], None)], True, 101, n_visual=NV)["tokens"].tolist()
    assert evaluate.mme_reply("The answer is B.", "scienceqa") == "no"
    assert evaluate.mme_reply("The answer is B.", "instruction") == "The answer is B."
    assert evaluate.mme_reply("maybe\tnot\nsure", "scienceqa") == "maybe not sure"


def test_evaluate_mme_single_and_two_processes(ckpt, tmp_path):
    """evaluate.py --benchmark mme on the quiz's MME folder: the table and the results files of two (gloo) ranks, each
    taking whole batches, are those of one; the table is the one the written files score to."""
    folder = quizgen.make_mme(tmp_path / "mme", n_images=3)
    flags = ["evaluate.py", "--benchmark", "mme", "--adapter", str(ckpt), "--data_dir", str(folder),
             "--batch_size", "5", "--max_new_tokens", "6"]
    one = run(flags + ["--out", str(tmp_path / "one")])
    two = run(flags + ["--out", str(tmp_path / "two")], nproc=2)
    table = lambda out: out[out.index("subtask "):out.index("results written")]  # noqa: E731
    assert "existence" in table(one) and "Cognition (0 of 4 subtasks)" in table(one) and table(one) == table(two)
    files = lambda d: {p.name: p.read_text() for p in (tmp_path / d).iterdir()}  # noqa: E731
    assert files("one") == files("two") and sorted(files("one")) == ["color.txt", "count.txt", "existence.txt",
                                                                      "position.txt"]
    scores = evaluate.mme_scores(evaluate.read_mme_results(tmp_path / "one"))
    assert evaluate.format_mme(scores) + "\n" == table(one)[:len(evaluate.format_mme(scores)) + 1]
    assert sum(v["questions"] for v in scores["subtasks"].values()) == 24


# =====================================================================================================================
# quiz.py: the generated quiz and the quick start
# =====================================================================================================================

def test_quiz_deterministic(tmp_path, quiz, tok):
    kw = dict(seed=3, n_train=40, n_val=5, n_test=10, image_size=32)
    a, b = quizgen.make_quiz(tmp_path / "a", **kw), quizgen.make_quiz(tmp_path / "b", **kw)
    quizgen.train_quiz_tokenizer(a), quizgen.train_quiz_tokenizer(b)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) > 10 and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = quizgen.make_quiz(tmp_path / "c", **dict(kw, seed=4))
    assert (c / "problems.json").read_bytes() != (a / "problems.json").read_bytes()
    # ensure_quiz reuses a complete folder with a matching stamp (no rewrite) ...
    folder = quiz
    mtime = (folder / "problems.json").stat().st_mtime_ns
    quizgen.ensure_quiz(folder, **QUIZ)
    assert (folder / "problems.json").stat().st_mtime_ns == mtime
    with pytest.raises(TypeError, match="n_trian"):
        quizgen.ensure_quiz(folder, n_trian=5)


def test_quiz_design(tmp_path):
    folder = quizgen.make_quiz(tmp_path, n_train=1500, n_val=50, n_test=400, image_size=16)
    problems = json.loads((folder / "problems.json").read_text())
    splits = json.loads((folder / "pid_splits.json").read_text())
    captions = json.loads((folder / "captions.json").read_text())["captions"]
    fields = {"question", "choices", "answer", "hint", "image", "task", "grade", "subject", "topic", "category",
              "skill", "lecture", "solution", "split"}  # fmt: skip
    assert all(set(r) == fields for r in problems.values())
    recs = list(problems.values())
    img = [r for r in recs if r["image"]]
    no = [r for r in recs if not r["image"] and not r["hint"]]
    assert 0.40 < len(img) / len(recs) < 0.50 and 0.20 < len(no) / len(recs) < 0.30
    assert any(r["hint"] for r in img)  # TXT and IMG overlap
    assert {r["subject"] for r in recs} == {"natural science", "social science", "language science"}
    grades = {int(r["grade"][5:]) for r in recs}
    assert min(grades) <= 6 < max(grades)
    assert set(captions) == {pid for pid, r in problems.items() if r["image"]}
    for pid in splits["train"][:50]:
        r = problems[pid]
        if r["image"]:
            assert (folder / "images" / "train" / pid / "image.png").is_file()
            assert all(w in captions[pid] for w in ("shape", "at the"))
    # Image questions: >= 4 choices, and the text alone carries no signal. Majority vote of the correct *choice
    # text* per (question, choice set) seen in train scores near chance on test.
    assert all(len(r["choices"]) >= 4 for r in img)
    votes = {}
    for pid in splits["train"]:
        r = problems[pid]
        if r["image"]:
            key = (r["question"], frozenset(r["choices"]))
            votes.setdefault(key, []).append(r["choices"][r["answer"]])
    rng = random.Random(0)
    hits = trials = 0
    for pid in splits["test"]:
        r = problems[pid]
        if r["image"]:
            seen = votes.get((r["question"], frozenset(r["choices"])))
            guess = max(set(seen), key=seen.count) if seen else rng.choice(r["choices"])
            hits += guess == r["choices"][r["answer"]]
            trials += 1
    assert hits / trials < 0.35, hits / trials  # chance is 1/4 or 1/5
    for n in (4, 5):  # every option of an image question is the right answer about equally often
        letters = [r["answer"] for r in img if len(r["choices"]) == n]
        assert letters and min(np.bincount(letters, minlength=n)) > 0.6 * len(letters) / n
    # Held-out text problems are new (hint, question) pairs; held-out pictures are new drawings (jitter and size).
    def key(pid):
        return problems[pid]["hint"], problems[pid]["question"]

    text = [p for p in splits["train"] + splits["test"] if problems[p]["hint"] and not problems[p]["image"]]
    train_keys = {key(p) for p in text if problems[p]["split"] == "train"}
    assert not any(key(p) in train_keys for p in text if problems[p]["split"] == "test")
    # The answer of a text problem is in its hint, once, and nowhere in the question
    for p in text:
        r = problems[p]
        answer = r["choices"][r["answer"]]
        assert sum(c in r["hint"].replace(".", "").split() for c in r["choices"]) == 1, r
        assert answer in r["hint"].replace(".", "").split(), r


def test_quiz_pretrain_batches_are_seeded_draws():
    batches = quizgen._pretrain_batches(100, 8, 40, seed=3)
    assert len(batches) == 40 and all(len(b) == 8 and all(0 <= i < 100 for i in b) for b in batches)
    assert batches == quizgen._pretrain_batches(100, 8, 40, seed=3)  # a function of the seed alone
    assert batches != quizgen._pretrain_batches(100, 8, 40, seed=4)


def test_quiz_pretrain_llama_standin_resumes_bit_exact(tmp_path, quiz, tok, monkeypatch, capsys):
    """Killed mid-interval (after its step-4 checkpoint) and rerun, pre-training ends exactly where an uninterrupted
    run does; a checkpoint made with other settings is not resumed; the checkpoint goes once the weights are saved."""
    folder = quiz
    kw = dict(steps=6, batch=4, corpus=48, save_every=2)
    whole = quizgen.pretrain_llama_standin(folder, tok, tmp_path / "whole", "QCM-EA", **kw)

    def kill_at(n):  # collate runs once per step: raise on the n-th call, as a Ctrl-C would
        calls, real = [0], data.collate
        def collate(samples):
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt
            return real(samples)
        monkeypatch.setattr(quizgen, "collate", collate)

    out = tmp_path / "resumed"
    kill_at(6)  # during step 6: step 5 is lost, the checkpoint holds 4
    with pytest.raises(KeyboardInterrupt):
        quizgen.pretrain_llama_standin(folder, tok, out, "QCM-EA", **kw)
    assert load_checkpoint(out / "pretrain_ckpt.pt")["step"] == 4 and not (out / "consolidated.00.pth").exists()
    kill_at(1)
    with pytest.raises(KeyboardInterrupt):  # other settings: starts over rather than resuming
        quizgen.pretrain_llama_standin(folder, tok, out, "QCM-EA", **dict(kw, lr=1e-3))
    assert "starting over" in capsys.readouterr().out
    monkeypatch.undo()
    quizgen.pretrain_llama_standin(folder, tok, out, "QCM-EA", **kw)
    assert "resuming the stand-in LLaMA's pre-training at step 4 of 6" in capsys.readouterr().out
    assert not (out / "pretrain_ckpt.pt").exists()
    a, b = (torch.load(d / "consolidated.00.pth", weights_only=True) for d in (whole, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (whole / "params.json").read_text() == (out / "params.json").read_text()


def test_quiz_mme_folder_is_mme_layout_with_one_true_one_false_question(tmp_path, tok):
    """quiz.make_mme: MME's perception subtasks existence, count, color and position in the release's first layout,
    two questions per picture (Yes first, then No) about what was drawn, deterministic, every word known to the quiz
    tokenizer (no unknown pieces)."""
    a, b = quizgen.make_mme(tmp_path / "a", n_images=4), quizgen.make_mme(tmp_path / "b", n_images=4)
    tasks = evaluate.read_mme(a)
    assert list(tasks) == ["existence", "count", "position", "color"] and all(len(v) == 8 for v in tasks.values())
    for qs in tasks.values():
        assert [q["answer"] for q in qs] == ["Yes", "No"] * 4
        assert all(q["question"].endswith("? Please answer yes or no.") for q in qs)
        assert all(x["question"] != y["question"] for x, y in zip(qs[::2], qs[1::2]))
    unk = tok.sp.unk_id()
    assert all(unk not in tok.encode(q["question"], bos=False, eos=False) for qs in tasks.values() for q in qs)
    assert {p.relative_to(a): p.read_bytes() for p in a.rglob("*.*")} == {p.relative_to(b): p.read_bytes()
                                                                          for p in b.rglob("*.*")}
    for i in range(4):  # the Yes question is true of the picture, the No question false
        img = np.asarray(Image.open(a / "count" / f"{i:04d}.png"))  # (64, 64, 3), one shape per occupied quadrant
        n = sum(bool((img[r:r + 32, c:c + 32] != 255).any()) for r in (0, 32) for c in (0, 32))
        yes, no = (q["question"] for q in tasks["count"][2 * i:2 * i + 2])
        assert yes.startswith("Is there 1 shape" if n == 1 else f"Are there {n} shapes") and f" {n} " not in no
        drawn = {tuple(px) for px in np.asarray(Image.open(a / "color" / f"{i:04d}.png")).reshape(-1, 3).tolist()}
        colour = next(c for c, rgb in quizgen.COLORS.items() if rgb in drawn)
        yes, no = (q["question"] for q in tasks["color"][2 * i:2 * i + 2])
        assert yes.endswith(f" {colour}? Please answer yes or no.") and f" {colour}?" not in no


# =====================================================================================================================
# train.py: methods, flags, DDP/FSDP2, checkpoints, resume
# =====================================================================================================================

def test_train_every_adapter_setting_is_a_train_flag():
    """Each AdapterArgs field is set by a train.py flag and reaches the modules it configures."""
    args = train.get_args(["--data_dir", "x", "--method", "mixlora", "--mix_pool", "6", "--mix_rank", "2",
                           "--mix_alpha", "7", "--mix_cfs", "separable", "--mix_mode", "hard", "--mix_lambda", "0.5",
                           "--lora_targets", "q,v", "--dropout", "0.2"])
    a = cli.adapter_args_from(args)
    assert {f.name for f in dataclasses.fields(AdapterArgs)} <= set(vars(args)) | {"adapter_dropout", "lora_dropout"}
    m = build_lavin("tiny", "tiny", a, device="meta")
    mix = m.llama.layers[0].attention.wq
    assert mix.scaling == 7 / 2 and mix.router.cfs == "separable" and mix.router.mode == "hard"
    assert mix.router.lam == 0.5 and mix.dropout.p == 0.2 and mix.lora_A.shape[0] == 6
    assert type(m.llama.layers[0].attention.wk) is nn.Linear  # not a target
    a = cli.adapter_args_from(train.get_args(["--data_dir", "x", "--method", "lora", "--lora_rank", "4",
                                                "--lora_alpha", "2"]))
    assert build_lavin("tiny", "tiny", a, device="meta").llama.layers[0].feed_forward.w2.scaling == 0.5
    a = cli.adapter_args_from(train.get_args(["--data_dir", "x", "--adapter_scale", "2", "--adapter_dim", "4"]))
    adapter = build_lavin("tiny", "tiny", a, device="meta").llama.layers[0].adapter_attn
    assert adapter.scale == 2.0 and adapter.down.out_features == 4 and adapter.dropout.p == 0.1


@pytest.fixture(scope="module")
def tiny_setup(quiz, tok, tmp_path_factory):
    """The one quiz plus random tiny backbones saved in the layouts real weights come in."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=2, vocab_size=tok.n_words, multiple_of=32, norm_eps=1e-5)
    llama_dir = root / "llama"
    save_meta_layout(llama_dir, Transformer(args).state_dict(), {"dim": 64, "n_layers": 2, "n_heads": 2,
                                                                 "vocab_size": -1, "multiple_of": 32, "norm_eps": 1e-5})
    clip_path = root / "clip.pt"
    torch.save(VisionTransformer(VISION_PRESETS["tiny"]).state_dict(), clip_path)
    return {"root": root, "flags": ["--llama_dir", str(llama_dir), "--clip_path", str(clip_path), "--tokenizer",
                                    str(quiz / "tokenizer.model"), "--data_dir", str(quiz), "--no_eval",
                                    "--max_seq_len", "160", "--epochs", "2", "--batch_size", "8", "--micro_batch", "4",
                                    "--warmup_epochs", "0.5", "--blr", "0.05"]}


def losses(out_dir):
    """The logged losses, step by step (a resumed run's marker line has none)."""
    return [r["loss"] for r in map(json.loads, open(Path(out_dir) / "log.jsonl")) if "loss" in r]


@pytest.mark.parametrize("method", ["mma", "lora", "mixlora", "full"])
def test_train_every_method_trains(tiny_setup, method, tmp_path):
    blr = {"mma": "0.5", "lora": "0.2", "mixlora": "0.2", "full": "0.02"}[method]  # a few steps must show learning
    flags = tiny_setup["flags"] + ["--method", method, "--out_dir", str(tmp_path), "--lora_rank", "4",
                                   "--max_steps", "8", "--epochs", "4", "--warmup_epochs", "0", "--blr", blr]
    train.main(flags)
    ls = losses(tmp_path)
    assert len(ls) == 8
    assert sum(ls[-2:]) / 2 < sum(ls[:2]) / 2, ls  # falling


@pytest.mark.parametrize("extra", [[], ["--method", "lora", "--lora_rank", "4", "--quant", "nf4"]],
                         ids=["mma", "qlora"])
def test_train_resume_is_exact(tiny_setup, tmp_path, extra):
    full, part = tmp_path / "full", tmp_path / "part"
    train.main(tiny_setup["flags"] + extra + ["--out_dir", str(full), "--max_steps", "5"])
    train.main(tiny_setup["flags"] + extra + ["--out_dir", str(part), "--max_steps", "2"])
    train.main(["--resume", str(part / "ckpt.pt"), "--max_steps", "5", "--out_dir", str(part)])
    a, b = load_checkpoint(full / "ckpt.pt"), load_checkpoint(part / "ckpt.pt")
    assert a["step"] == b["step"] == 5
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert losses(full) == losses(part)  # the resumed run logged the same losses for steps 3..5


def test_train_max_steps_ends_early_and_still_evaluates(tiny_setup, tmp_path, capsys):
    flags = [f for f in tiny_setup["flags"] if f != "--no_eval"]
    train.main(flags + ["--out_dir", str(tmp_path), "--max_steps", "1", "--eval_split", "val",
                        "--eval_max_new_tokens", "4"])
    assert len(losses(tmp_path)) == 1 and "ScienceQA val: 16 problems" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "preds_val.json").read_text())["scores"]["counts"]) == len(evaluate.COLUMNS)


def test_train_lr_schedule():
    args = train.get_args(["--data_dir", "x", "--epochs", "20", "--warmup_epochs", "2"])
    spe = 397
    peak = 9e-3 * 32 / 256
    assert train.lr_at(0, spe, args) == 0.0
    assert abs(train.lr_at(2 * spe, spe, args) - peak) < 1e-12
    assert train.lr_at(20 * spe - 1, spe, args) < 1e-3 * peak
    assert train.lr_at(spe, spe, args) == pytest.approx(peak / 2)


def test_train_quick_start_settings_apply_only_to_flags_not_passed(tiny_setup, tmp_path, monkeypatch):
    """`python train.py --prompt_format QCM-ALE --max_steps 1` on the quiz trains with QCM-ALE (a flag equal to the
    real-run default is still the user's), while the quick start's other settings apply. quiz.quick_start is pointed
    at the small test quiz and backbones, so the run takes seconds instead of pre-training stand-ins."""
    f = tiny_setup["flags"]
    paths = tuple(f[f.index(k) + 1] for k in ("--data_dir", "--tokenizer", "--llama_dir", "--clip_path"))
    monkeypatch.setattr(train.quiz, "quick_start", lambda *a, **kw: paths)
    seen = []
    real = train.data.ScienceQADataset
    monkeypatch.setattr(train.data, "ScienceQADataset", lambda *a, **kw: seen.append(a[3]) or real(*a, **kw))
    train.main(["--prompt_format", "QCM-ALE", "--max_steps", "1", "--no_eval", "--out_dir", str(tmp_path)])
    saved = load_checkpoint(tmp_path / "ckpt.pt")["args"]
    assert seen == ["QCM-ALE"] and saved["prompt_format"] == "QCM-ALE"
    assert saved["epochs"] == train.QUICK["epochs"] and saved["clip_every"] == train.QUICK["clip_every"]
    assert train.get_args([]).prompt_format == train.QUICK["prompt_format"] == "QCM-EA"  # nothing passed: the quick's


QLORA, LITE = ["--method", "lora", "--lora_rank", "4", "--quant", "nf4"], ["--quant", "nf4"]


@pytest.mark.parametrize("fsdp,extra", [(False, []), (True, []), (False, QLORA), (True, QLORA), (False, LITE),
                                        (True, LITE)], ids=["ddp", "fsdp", "ddp-qlora", "fsdp-qlora", "ddp-lite",
                                                            "fsdp-lite"])
def test_train_two_processes_follow_one(tiny_setup, tmp_path, fsdp, extra):
    """DDP / FSDP2 on 2 CPU processes (gloo) follow the single-process loss curve for the same global batch, with a
    full-precision base and with a 4-bit one (QLoRA, LaVIN-lite). Dropout draws differ per rank, so it is off here;
    what remains is the order of floating-point sums."""
    flags = tiny_setup["flags"] + extra + ["--max_steps", "4", "--dropout", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(flags + ["--out_dir", str(one)])
    run(["train.py", *flags + ["--out_dir", str(two)] + (["--fsdp"] if fsdp else [])], nproc=2)
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    wa = load_checkpoint(one / "ckpt.pt")["model"]
    wb = load_checkpoint(two / "ckpt.pt")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:  # the trained weights themselves, not only their names (FSDP2 saves them gathered, unsharded)
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


def _text_only_rank_worker(rank, world, fsdp):
    """Every rank: one process on the global batch (rows 0-2 of make_batch, row 0 text-only) for 6 SGD steps, then DDP
    or FSDP2 (train.py's wrap_model) where, for steps 1-3, rank 0's micro-batch is the text-only row and rank 1's the
    two image rows, and for steps 4-6 the reverse. Losses and trained weights must agree to 1e-5 (relative)."""
    tokens, has_image, vis_mask, imgs, labels = make_batch()
    n_global = int((labels != IGNORE).sum())
    img_idx = has_image.cumsum(0) - 1  # each image row's index into imgs

    def steps(model, rows_of_step, world_=1):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)  # linear in the gradient
        out = []
        for rows in map(torch.tensor, rows_of_step):
            im = has_image[rows] == 1
            loss = model(tokens[rows], has_image[rows], vis_mask[rows], imgs[img_idx[rows][im]] if im.any() else None,
                         labels=labels[rows], reduction="sum")
            opt.zero_grad()
            (loss * world_ / n_global).backward()
            opt.step()
            out.append(loss.detach() / n_global)
        return torch.stack(out)

    text, image = [0], [1, 2]
    mine = [[text, image][rank]] * 3 + [[image, text][rank]] * 3
    cases = {"mma": lambda: tiny_lavin("mma", adapter_dropout=0.0),
             "lora": lambda: tiny_lavin("lora", lora_dropout=0.0),
             "lite-nf4": lambda: quantize_llama_(tiny_lavin("mma", adapter_dropout=0.0))}
    for name, make in cases.items():
        ref_model = make().train()
        ref = steps(ref_model, [[0, 1, 2]] * 6)
        model = make().train()
        wrapped = wrap_model(model, Namespace(fsdp=fsdp, grad_ckpt=False, compile=False), torch.device("cpu"), world)
        got = steps(wrapped, mine, world)
        dist.all_reduce(got)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0, msg=name)
        a, b = trainable_state_dict(model), trainable_state_dict(ref_model)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=f"{name} {k}")


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_train_text_only_rank_beside_image_rank(monkeypatch, fsdp):
    """A rank whose micro-batch holds no image issues the same collectives as one that holds images (the vision tower
    runs on every rank at the same point), and the result equals one process's. TORCH_DISTRIBUTED_DEBUG=DETAIL checks
    every collective's kind and shapes across ranks and raises on a mismatch. DDP: at INFO, because torch 2.13 crashes
    (SIGSEGV) constructing DDP over the DETAIL-wrapped gloo group, even for one nn.Linear; DDP checks by itself that
    every trainable parameter got a gradient on every rank (no find_unused_parameters), and its collectives are the
    gradient buckets, the same on every rank."""
    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "DETAIL" if fsdp else "INFO")
    spawn(_text_only_rank_worker, fsdp)


def test_train_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_setup, tmp_path):
    flags = list(tiny_setup["flags"])
    llama_dir = Path(flags[flags.index("--llama_dir") + 1])
    bad = tmp_path / "llama_nan"
    bad.mkdir()
    (bad / "params.json").write_text((llama_dir / "params.json").read_text())
    sd = torch.load(llama_dir / "consolidated.00.pth")
    sd["output.weight"][0, 0] = float("nan")
    torch.save(sd, bad / "consolidated.00.pth")
    flags[flags.index("--llama_dir") + 1] = str(bad)
    out = tmp_path / "out"
    save_checkpoint(out / "ckpt.pt", {"model": {}, "step": 7})  # an earlier, unrelated run's checkpoint
    with pytest.raises(cli.UserError, match=r"--out_dir .*already holds a checkpoint.*--overwrite"):
        train.main(flags + ["--out_dir", str(out)])  # a fresh run does not write over it
    assert load_checkpoint(out / "ckpt.pt")["step"] == 7  # left alone
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0.*Last good checkpoint: none yet"):
        train.main(flags + ["--out_dir", str(tmp_path / "fresh")])


# =====================================================================================================================
# sample.py: generation, the chat, the command line
# =====================================================================================================================

def test_sample_scripted_session(ckpt, quiz):
    """Questions piped on stdin, with a bad image path, a sampling change, a good image and /quit: every question is
    answered, the bad path is reported and the session goes on, nothing is read after /quit."""
    img = next((quiz / "images" / "test").glob("*/image.png"))
    script = f"hello\n/image /no/such.png\nwhat is this?\n/temp 0.7\n/image {img}\nwhat color?\n/quit\nnever\n"
    out = run(["sample.py", "--adapter", str(ckpt), "--max_new_tokens", "8"], stdin=script)
    assert out.count("lavin> ") == 3, out
    assert "could not attach the image: image not found: /no/such.png" in out
    assert "(image attached:" in out and "temperature 0.7" in out


def test_sample_official_adapter_file(model, tok, quiz, ckpt, tmp_path):
    """An adapter file in the official release's format (Conv1d shapes, official names, `module.` prefix, an
    argparse.Namespace of flags) loads with --llama_dir/--clip_path and answers exactly as the model it came from."""
    official = {}
    for k, v in trainable_state_dict(model).items():
        k = k.replace("llama.layers.", "layers.").replace("visual.blocks.", "backbone.visual.transformer.resblocks.")
        k = k.replace(".down.", ".conv_A.").replace(".up0.", ".conv_B.").replace(".up1.", ".conv_D.")
        k = k.replace(".router.proj.", ".expert_weights.").replace(".fc1.", ".conv_A.").replace(".fc2.", ".conv_B.")
        if ".adapter_attn.conv_" in k and k.endswith("weight"):
            v = v[..., None]  # the official adapters are 1x1 Conv1d: a trailing kernel axis
        official["module." + k] = v
    path = tmp_path / "checkpoint-19.pth"
    torch.save({"model": official, "epoch": 19, "args": Namespace(max_seq_len=512, adapter_dim=8)}, path)
    root = ckpt.parent.parent
    over = dict(llama_dir=str(root / "llama"), clip_path=str(root / "clip.pt"), tokenizer=str(quiz / "tokenizer.model"),
                tau=model.adapter_args.tau, clip_every=1)
    loaded, tok2, info = generate.load_for_inference(path, torch.device("cpu"), None, over)
    assert info["prompt_format"] == "QCM-ALE" and info["norm"] == "imagenet" and info["image_size"] == 64
    p, img = prompt(tok, "Which shape is red?", True), images(1)[0]
    s = generate.Sampling(max_new_tokens=12)
    assert generate.answer(loaded, tok2, p, img, s, None) == generate.answer(model, tok, p, img, s, None)


# =====================================================================================================================
# demo.py: the web demo and its OpenAI-compatible API, against a live server; the page in headless Chromium
# =====================================================================================================================

@pytest.fixture(scope="module")
def demo_server(ckpt):
    """demo.py's server on an ephemeral loopback port, in threads of this process, with the tiny checkpoint loaded
    as sample.py loads it. Before the model is in, /health answers 503. -> (app, base URL)."""
    app = demo.App(generate.Sampling(max_new_tokens=24))
    server = demo.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    assert http_call(url + "/health")[:2] == (503, {"status": "loading"})
    assert http_call(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})[0] == 503
    model, tok, info = generate.load_for_inference(ckpt, torch.device("cpu"))
    app.load(model, tok, info)
    yield app, url
    server.shutdown()
    server.server_close()


def http_call(url, body=None, raw: bytes | None = None):
    """GET (no body) or POST (a JSON body, or raw bytes) -> (status, the JSON answer or None, headers)."""
    data_ = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data_, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, text, headers = r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        status, text, headers = e.code, e.read(), e.headers
    try:
        return status, json.loads(text), headers
    except ValueError:
        return status, None, headers


def sse_events(url, body) -> list:
    """POST with stream: true -> the server-sent events' data, parsed ("[DONE]" as is)."""
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(dict(body, stream=True)).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line[6:] for line in r.read().decode().split("\n\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def streamed_text(events) -> str:
    assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])


def image_message(text, image_url):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_demo_answers_equal_sample_one_shot(demo_server, ckpt, quiz):
    """The API's answers, streamed and not, equal sample.py's greedy one-shot answer for the same image and prompt,
    token for token; the page's examples are the quiz's test problems, and the other endpoints answer."""
    app, url = demo_server
    rec = next(r for r in data.load_scienceqa(quiz, "test") if r.get("image"))
    img = data.image_path(quiz, "test", rec["pid"])
    ex = app.examples[0]
    assert ex["image"] == data_url(img) and ex["question"].startswith(rec["question"] + " (A) ")
    for msgs, flags in [(image_message(ex["question"], ex["image"]), ["--image", str(img)]),
                        ([{"role": "user", "content": "Which shape is red?"}], [])]:
        text = msgs[0]["content"] if not flags else ex["question"]
        want = run(["sample.py", "--adapter", str(ckpt), "--prompt", text, "--max_new_tokens", "24"] + flags)
        status, r, _ = http_call(url + "/v1/chat/completions", {"messages": msgs})
        assert status == 200 and r["object"] == "chat.completion"
        assert r["choices"][0]["message"]["content"] == want[:-1]  # sample.py ends the answer with a newline
        events = sse_events(url, {"messages": msgs})
        assert streamed_text(events) == want[:-1]
        assert events[-2]["usage"] == r["usage"] and events[-2]["choices"][0]["finish_reason"] == \
            r["choices"][0]["finish_reason"]
        # token for token: the count of generate's own tokens for sample.py's prompt
        has = bool(flags)
        ids = generate.chat_prompt(app.tok, app.info, [], text, has, generate.prompt_budget(app.model))
        image = data.load_image_tensor(img, 64, "imagenet") if has else None
        alone = generate.generate(app.model, [ids], [has], image[None] if has else None, 24, eos_id=app.tok.eos_id)
        assert r["usage"]["completion_tokens"] == len(alone[0]) and r["usage"]["prompt_tokens"] == len(ids)
        lv = r["lavin"]
        assert (lv["router_weights"] == app.routing[int(has)]
                and len(lv["router_weights"]) == app.model.llama.args.n_layers)
        assert all(abs(sum(w) - 1) < 1e-5 for w in lv["router_weights"]) and lv["ttft_s"] > 0
    assert http_call(url + "/health")[:2] == (200, {"status": "ok"})
    assert http_call(url + "/v1/models")[1]["data"][0]["id"] == "lavin"
    with urllib.request.urlopen(url + "/", timeout=30) as page:
        assert "default-src 'none'" in page.headers["Content-Security-Policy"] and b"<title>LaVIN" in page.read()


def test_demo_two_concurrent_clients_each_get_their_own_answer(demo_server):
    """Two clients at once, one with an image and one without: each gets the answer it gets alone."""
    app, url = demo_server
    ex = app.examples[1]
    bodies = [{"messages": image_message(ex["question"], ex["image"])},
              {"messages": [{"role": "user", "content": "What color is the circle? (A) red (B) green"}]}]
    alone = [http_call(url + "/v1/chat/completions", b)[1]["choices"][0]["message"]["content"] for b in bodies]
    together = [None, None]

    def client(i):
        together[i] = streamed_text(sse_events(url, bodies[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert together == alone and alone[0] != alone[1]


def _open_stream(url, body) -> socket.socket:
    """A raw streaming request: the socket, its response headers read."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=60)
    payload = json.dumps(dict(body, stream=True)).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    return s


def _read_until(s: socket.socket, marker: bytes) -> bytes:
    got = b""
    while marker not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    return got


def _until(predicate, timeout=60):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_demo_stop_and_disconnect_free_the_model(demo_server):
    """A client that leaves while waiting in line steps out of it (and is told the line first); a client that leaves
    mid-answer ends the generation at the next token; the next request is then served."""
    app, url = demo_server
    msgs = [{"role": "user", "content": "Tell me about shapes."}]
    with app.line.turn(lambda ahead: None):  # the test holds the model: the request waits
        s = _open_stream(url, {"messages": msgs})
        assert b": queue 1\n\n" in _read_until(s, b": queue 1")
        s.close()
        _until(lambda: len(app.line.queue) == 1)
    # A long answer (no EOS within 128 tokens for this seed), left after its first piece of text.
    body = {"messages": msgs, "temperature": 1.0, "max_tokens": 128}
    seed = next(sd for sd in range(20) if http_call(url + "/v1/chat/completions", dict(body, seed=sd))[1][
        "choices"][0]["finish_reason"] == "length")
    n = len(app.served)
    s = _open_stream(url, dict(body, seed=seed))
    _read_until(s, b'"content": "')
    s.close()
    _until(lambda: len(app.served) > n)
    assert app.served[-1]["ended"] == "stopped" and app.served[-1]["completion_tokens"] < 128
    assert http_call(url + "/v1/chat/completions", {"messages": msgs})[0] == 200 and not app.line.queue


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _raw_request(url, head: bytes) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(head)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    status = int(got.split(b" ", 2)[1])
    return status, json.loads(got.split(b"\r\n\r\n", 1)[1])


def test_demo_bad_inputs_get_their_status_and_message(demo_server):
    """Every bad request gets {"error": {"message"}} with its status; the server keeps serving afterwards."""
    app, url = demo_server
    png = _png_bytes()
    b64 = lambda raw: "data:image/png;base64," + base64.b64encode(raw).decode()  # noqa: E731
    user = lambda content: {"messages": [{"role": "user", "content": content}]}  # noqa: E731
    img_part = lambda u: {"type": "image_url", "image_url": u}  # noqa: E731
    cases = [
        (b"{not json", 400, "malformed JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({}, 400, "messages: a non-empty list"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "role 'bot': must be one of system, user"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "a user message was expected"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400,
         "the last message must be the user's"),
        (user("   "), 400, "empty prompt"),
        (user([{"type": "audio"}]), 400, "content[0]: a part is"),
        (user([{"type": "text", "text": "q"}, img_part(b64(b"hello, not a picture"))]), 400, "not a readable image"),
        (user([{"type": "text", "text": "q"}, img_part({"url": b64(png[:len(png) // 2])})]), 400, "truncated"),
        (user([{"type": "text", "text": "q"}, img_part("data:image/png;base64,@@@")]), 400, "bad base64"),
        (user([{"type": "text", "text": "q"}, img_part("/etc/passwd")]), 400, "opens no paths or links"),
        (user([{"type": "text", "text": "q"}, img_part(b64(png)), img_part(b64(png))]), 400,
         "2 images: the model takes one per conversation"),
        (dict(user("q"), temperature=-1), 400, "temperature -1: must be >= 0"),
        (dict(user("q"), top_p=0), 400, "top_p 0: must be in (0, 1]"),
        (dict(user("q"), max_tokens=0), 400, "max_tokens 0: must be an integer in [1, 128]"),
        (dict(user("q"), max_tokens=1.5), 400, "max_tokens 1.5"),
        (dict(user("q"), seed="x"), 400, "seed \"x\""),
        (dict(user("q"), stream="yes"), 400, "stream \"yes\": must be true or false"),
    ]
    for body, status, message in cases:
        got, r, _ = http_call(url + "/v1/chat/completions", raw=body if isinstance(body, bytes) else None,
                              body=None if isinstance(body, bytes) else body)
        assert got == status and message in r["error"]["message"], (body, r)
    big = demo.MAX_BODY + 1
    assert _raw_request(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n{" % big) \
        == (413, {"error": {"message": f"the body is {big} bytes, over the limit of {demo.MAX_BODY} (16 MiB); send "
                                       "a smaller image", "type": "invalid_request_error"}})
    status, r = _raw_request(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 411 and "Content-Length" in r["error"]["message"]
    assert http_call(url + "/nope")[0] == 404
    # Over-long: fitted to the prompt budget as sample.py fits it, and the answer says so
    status, r, _ = http_call(url + "/v1/chat/completions", user("why " * 400))
    assert status == 200 and "no longer fits the model's" in r["lavin"]["note"]
    assert r["usage"]["prompt_tokens"] == generate.prompt_budget(app.model)
    assert http_call(url + "/health")[0] == 200
    assert http_call(url + "/v1/chat/completions", user("hi"))[0] == 200


def test_demo_command_line_errors(monkeypatch, capsys):
    """A missing checkpoint names the command that makes it; a bad port is refused before anything loads."""
    code, err = run_script("demo.py", ["--adapter", "/no/such/ckpt.pt"], monkeypatch, capsys)
    assert code == 1 and "python train.py" in err and err.count("\n") == 1
    code, err = run_script("demo.py", ["--port", "70000"], monkeypatch, capsys)
    assert code == 1 and "--port 70000: must be in [0, 65535]" in err


CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def _chromium():
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are absent (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_demo_page_in_headless_chromium(demo_server, quiz, tmp_path):
    """The real page in headless Chromium: upload a quiz image, ask its question, the streamed answer equals the
    API's; Stop while waiting in line ends the request; Clear empties the chat; a screenshot is written."""
    app, url = demo_server
    driver = _chromium()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(url + "/")
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-busy") == "0")
        rec = next(r for r in data.load_scienceqa(quiz, "test") if r.get("image"))
        img = data.image_path(quiz, "test", rec["pid"])
        question = app.examples[0]["question"]
        driver.find_element(By.ID, "file").send_keys(str(img))
        wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:image/png"))
        driver.find_element(By.ID, "prompt").send_keys(question)
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .routing"))
        shown = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .text").text
        api = http_call(url + "/v1/chat/completions", {"messages": image_message(question, data_url(img))})[1]
        assert shown == api["choices"][0]["message"]["content"].strip()  # .text: the page's text as rendered
        assert "prompt tokens" in driver.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text
        driver.save_screenshot(str(tmp_path / "demo.png"))
        assert (tmp_path / "demo.png").stat().st_size > 0
        # Regenerate replaces the answer (greedy: with the same text); a refused request shows the server's message
        n = len(app.served)
        driver.find_element(By.ID, "regen").click()
        wait.until(lambda d: len(app.served) > n and d.find_element(By.TAG_NAME, "body").get_attribute("data-busy")
                   == "0")
        answers = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert len(answers) == 1 and answers[0].find_element(By.CSS_SELECTOR, ".text").text == shown
        driver.execute_script("document.getElementById('max_tokens').value = 0")
        driver.find_element(By.ID, "prompt").send_keys("And why?")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert "max_tokens 0: must be" in driver.find_element(By.CSS_SELECTOR, ".msg.error .text").text
        driver.execute_script("document.getElementById('max_tokens').value = 24")
        # Stop: the model is held, so the page waits in line (and says so); Stop ends its request on the server
        with app.line.turn(lambda ahead: None):
            driver.find_element(By.ID, "prompt").send_keys("And why?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: "waiting for the model: 1" in d.find_elements(By.CSS_SELECTOR, ".msg .meta")[-1].text)
            driver.find_element(By.ID, "stop").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.stopped"))
            _until(lambda: len(app.line.queue) == 1)
        driver.find_element(By.ID, "clear").click()
        assert driver.find_elements(By.CSS_SELECTOR, "#log .msg") == []
        assert not driver.find_element(By.ID, "preview").is_displayed()
    finally:
        driver.quit()


# =====================================================================================================================
# bench.py: parameter and FLOP tables, the side-by-side run
# =====================================================================================================================

def test_bench_param_table_exact_counts():
    rows = {(r["model"], r["method"]): r["trainable"] for r in param_table()}
    # the MMA totals, to the parameter (the paper's Table 1: 3.8M and 5.4M)
    assert rows[("LaVIN-7B", "MMA (LaVIN)")] == 3_781_296
    assert rows[("LaVIN-13B", "MMA (LaVIN)")] == 5_390_080
    # LoRA r=8 on every LLaMA linear of 7B: 32 layers x 8 x (4 x (4096 + 4096) + 3 x (4096 + 11008)) = 2,498,560 x 8,
    # plus the visual neck kept from LaVIN (131,200 + 528,384)
    assert rows[("LaVIN-7B", "LoRA r=8")] == 2_498_560 * 8 + 659_584


def test_bench_flop_model_matches_worked_example():
    fm = bench.flop_model(build_lavin("7B", "ViT-L/14", AdapterArgs(method="mma"), device="meta"))
    # 32 blocks x 202.4M + the 131.1M head, frozen; the embedding lookup is not a matmul
    assert fm["n_frozen"] == pytest.approx(6.607e9, rel=1e-3)
    # 4 x 6.607e9 + 6 x 3.78e6 + 12 x 32 x 4096 x 512 ≈ 27.3 GFLOP per token: 2 FLOP a multiply-add
    # for the frozen base's forward and input gradient, the trained tensors' forward and both gradients, attention
    # in both passes
    assert bench.flops_per_token(fm, 512) == pytest.approx(27.3e9, rel=0.02)
    # CLIP ViT-L/14 per image: 257 x (4 x 0.303e9 + 12 x 24 x 1024 x 257) ≈ 0.33 TFLOP
    assert fm["vision_per_image"] == pytest.approx(0.33e12, rel=0.03)

    # Full fine-tuning: every LLaMA weight trains (6N); LoRA leaves CLIP frozen and gradient-free (forward only, 2N)
    full = bench.flop_model(build_lavin("7B", "ViT-L/14", AdapterArgs(method="full"), device="meta"))
    assert full["n_frozen"] == 0 and full["n_trainable"] == pytest.approx(fm["n_frozen"])
    lora = bench.flop_model(build_lavin("7B", "ViT-L/14", AdapterArgs(method="lora"), device="meta"))
    assert lora["vision_per_image"] < 0.5 * fm["vision_per_image"]


def test_bench_length_distribution():
    lens = bench.sample_lengths(20_000, np.random.default_rng(0))
    assert lens.max() <= 512  # truncated like the official loader
    assert abs(np.median(lens) - data.SCIENCEQA_TRAIN_LENGTH_PERCENTILES[50]) <= 3


def test_bench_unknown_flag_is_an_error():
    with pytest.raises(SystemExit):
        bench.get_args(["--no_such_flag"])
    with pytest.raises(cli.UserError, match="--methods mma,adapterx: unknown"):
        bench.get_args(["--methods", "mma,adapterx"])


def test_bench_cpu_side_by_side_run(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    # One thread: on a shared CPU, two threads contending with other processes make each step up to 10x slower.
    threads = torch.get_num_threads()
    try:
        result = bench.main(["--methods", "mma,lora,mixlora,full", "--steps", "2", "--warmup", "1", "--batch_size",
                             "2", "--gen_tokens", "4", "--threads", "1", "--quant", "nf4", "--json", str(out_json)])
    finally:
        torch.set_num_threads(threads)  # bench.main sets it process-wide; leave later tests as they were
    text = capsys.readouterr().out
    parsed = json.loads(text.strip().splitlines()[-1])  # the last line is the JSON object
    assert parsed == json.loads(out_json.read_text())
    # each method on the fp32 base, then each adapter method again on a 4-bit one (full FT cannot train on one)
    assert [(r["method"], r["quant"]) for r in parsed["train"]] == [
        ("mma", None), ("lora", None), ("mixlora", None), ("full", None), ("mma", "nf4"), ("lora", "nf4"),
        ("mixlora", "nf4")]
    # Exact trainable counts of the tiny model (LLaMA dim 128, 4 layers, FFN 352; CLIP width 128, 6 blocks), the same
    # on a 4-bit base. Each adapter method also trains the neck (2 x (128 x 128 + 128) = 33,024). MMA: 20 C + 10 per
    # adapter, 4 LLaMA + 6 CLIP ones, and the 2 x 128 modality embedding; LoRA r=64 on 7 linears of 4 layers:
    # 64 x (4 x (128 + 128) + 3 x (128 + 352)) each; MixLoRA: pools of 16 x the same widths plus the factor routers;
    # full: all but CLIP's unused ln_post and projection (8,448) and the modality embedding.
    trainable = {"mma": 10 * (20 * 128 + 10) + 256 + 33_024, "lora": 4 * 64 * 2464 + 33_024, "mixlora": 620_800,
                 "full": 2_398_336 - 8_448 - 256}
    for r in parsed["train"]:
        assert r["trainable"] == trainable[r["method"]], r["label"]
        assert "error" not in r and set(r["extrapolation"]) == {"scienceqa", "pad512"}
        numbers = [r[k] for k in ("step_ms", "tokens_s", "useful_tokens_s", "samples_s", "flops_per_step",
                                  "achieved_flops_s")] + [e["seconds"] for e in r["extrapolation"].values()]
        assert all(math.isfinite(x) and x > 0 for x in numbers), r["label"]
        assert r["tokens_s"] == pytest.approx(r["samples_s"] * parsed["batch"]["padded_to"])
        gen = r["generation"]["unmerged"]
        assert all(math.isfinite(gen[k]) and gen[k] > 0 for k in ("tok_s", "decode_tok_s", "prefill_ms"))
    # every method has a row in the training table, twice in the extrapolation table, and one in generation
    tables = text.split("== 2.")[1].split("== JSON ==")[0]  # parts 2-4
    for label in ("MMA (LaVIN)", "LoRA r=64", "MixLoRA E=16 r=4", "Full"):
        # part 2's table and FLOP breakdown, part 3's two length regimes, part 4's generation row
        assert tables.count(label + " ") == 5, label
    # merging must not change greedy tokens for the two methods that can merge
    gen = {r["method"]: r["generation"] for r in parsed["train"] if r["quant"] is None}
    assert gen["mma"]["agree"] is True and gen["lora"]["agree"] is True
    # part 5: exact frozen bytes of the 7B block linears (32 x (4 x 4096² + 3 x 4096 x 11008) weights), and the
    # 4-bit step measured beside the fp32 one for every method that can train on a 4-bit base
    b7 = parsed["nf4_bytes"][0]
    assert b7["bf16"] == 2 * 32 * (4 * 4096**2 + 3 * 4096 * 11008) and b7["fp32"] == 2 * b7["bf16"]
    assert b7["nf4"] == b7["bf16"] // 4 + 4 * b7["bf16"] // 2 // 64  # 4 bits + one fp32 absmax per 64 weights
    assert 4.12 < 8 * b7["nf4_dq"] / (b7["bf16"] / 2) < 4.13
    base, nf4 = parsed["train"][:3], parsed["train"][4:]
    assert all(q["frozen_gb"] < r["frozen_gb"] and q["dequant_ms"] > 0 and r["dequant_ms"] is None
               for r, q in zip(base, nf4))
    assert "fp32 base against a 4-bit one" in text and "LoRA r=64/NF4 " in tables
    part5 = text.split("fp32 base against a 4-bit one")[1].splitlines()[2:5]  # one row per adapter method
    assert [line.split()[0] for line in part5] == ["mma", "lora", "mixlora"]
    for line, r, q in zip(part5, base, nf4):  # its ratio column is the 4-bit step over the fp32 one, as printed
        assert float(line.split()[3]) == pytest.approx(q["step_ms"] / r["step_ms"], abs=0.006)
    assert gen["mixlora"]["merged"] is None and gen["full"]["merged"] is None
    mma_rows = {r["model"]: r["trainable"] for r in parsed["params"] if r["method"] == "MMA (LaVIN)"}
    assert mma_rows == {"LaVIN-7B": 3_781_296, "LaVIN-13B": 5_390_080}
    assert result["train"][0]["label"] == "MMA (LaVIN)"


def test_bench_compare_against_transformers(capsys, monkeypatch):
    # --compare at a tiny shape: each shape's four rows, their medians and ratios finite, the same loss and greedy
    # tokens on both sides, and the versions, attention and cache it ran against in the header
    transformers, peft = hf_libs()
    args = bench.get_args(["--compare", "--steps", "2", "--warmup", "0"])
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    shapes = {"vocab 300": cfg | {"vocab_size": 300}, "vocab 40": cfg | {"vocab_size": 40}}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        result = bench.compare(args, shapes, batch=(2, 16), prompt=6, new=5)
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert f"transformers {transformers.__version__} LlamaForCausalLM + peft {peft.__version__} LoRA" in text
    first = result["shapes"]["vocab 300"]
    assert f"(attention {first['attention']}, generate's cache {first['cache']})" in text
    assert text.splitlines()[1].split() == ["shape", "ours", "ms", "theirs", "ms", "ours/theirs", "pairwise", "agree"]
    names = ["train, every label", "train, answer only", "generate, batch 1", "generate, batch 8"]
    for shape, s in result["shapes"].items():
        assert list(s["rows"]) == names
        for name, r in s["rows"].items():
            assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("ours_ms", "theirs_ms", "ratio"))
            assert r["ratio"] == pytest.approx(r["ours_ms"] / r["theirs_ms"])
            line = next(x for x in text.splitlines() if x.startswith(shape) and name in x)
            assert f"{r['ratio']:.2f}" in line.split()
            if name.startswith("train"):
                assert float(r["same"].split()[-1]) < 1e-5  # "loss gap 3e-07"
            else:
                assert r["same"] == "same tokens"
    # the head's share of the matmul weights: 300 x 64 against 2 layers of 4 x 64² + 3 x 64 x 96
    assert first["head_%"] == pytest.approx(100 * 300 * 64 / (300 * 64 + 2 * (4 * 64**2 + 3 * 64 * 96)))
    monkeypatch.setitem(sys.modules, "peft", None)  # not installed: one line saying how to get it
    with pytest.raises(evaluate.UserError, match="pip install transformers peft"):
        bench.compare(args, shapes)


# =====================================================================================================================
# Robustness: flags, user errors, resume, locks (train.py, sample.py, evaluate.py)
# =====================================================================================================================

def run_script(script, argv, monkeypatch, capsys):
    """A script as its command runs it (its `if __name__ == "__main__"` block, through cli.cli), in this
    process: -> (exit code, stderr). In-process because every new Python pays seconds to import torch here."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


def bad_input_table(tiny_setup, ckpt, tmp_path):
    """(script, argv, what the one error line must say)."""
    t, out = tiny_setup["flags"], ["--out_dir", str(tmp_path / "out"), "--max_steps", "1"]  # 1 step if one slips by
    train_ = lambda *a: ("train.py", [*t, *out, *a])  # noqa: E731
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"PK\x03\x04 half a zip")
    held = tmp_path / "held"
    save_checkpoint(held / "ckpt.pt", {"model": {}, "optimizer": {}, "step": 3, "args": {"epochs": 2}})
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c" "output": "d"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "pid_splits.json").write_text("{not json")
    llama_dir = Path(t[t.index("--llama_dir") + 1])
    trunc = tmp_path / "llama_trunc"
    trunc.mkdir()
    (trunc / "params.json").write_text((llama_dir / "params.json").read_text())
    (trunc / "consolidated.00.pth").write_bytes((llama_dir / "consolidated.00.pth").read_bytes()[:5000])

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))
    evil = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": Evil()}, evil)
    # The same base weights, but a params.json that says 8 heads where training had 4: no shape can tell.
    base = Path(load_checkpoint(ckpt)["args"]["llama_dir"])
    heads = tmp_path / "llama_heads"
    heads.mkdir()
    params = json.loads((base / "params.json").read_text())
    (heads / "params.json").write_text(json.dumps(dict(params, n_heads=2 * params["n_heads"])))
    (heads / "consolidated.00.pth").symlink_to(base / "consolidated.00.pth")
    c = ["--adapter", str(ckpt)]
    return [
        train_("--micro_batch", "-4", "--batch_size", "8") + ("--micro_batch -4: must be >= 1",),
        train_("--micro_batch", "0") + ("--micro_batch 0: must be >= 1",),
        train_("--batch_size", "0") + ("--batch_size 0: must be >= 1",),
        train_("--epochs", "-3") + ("--epochs -3: must be >= 1",),
        train_("--epochs", "0") + ("--epochs 0: must be >= 1",),
        train_("--tau", "0") + ("--tau 0.0: must be > 0",),
        train_("--dropout", "1.5") + ("--dropout 1.5: must be in [0, 1)",),
        train_("--batch_size", "8", "--micro_batch", "3") + ("--batch_size 8: must be a multiple of --micro_batch",),
        ("train.py", [*t[:t.index("--no_eval")], *t[t.index("--no_eval") + 1:], *out, "--eval_split", "dev"],
         "--eval_split dev: not a split of"),
        train_("--eval_max_new_tokens", "100000")
        + ("--eval_max_new_tokens 100000: must be in [1, --max_seq_len 160]",),
        train_("--dtype", "bf16") + ("--dtype bf16: for GPUs",) if not torch.cuda.is_available() else None,
        train_("--lora_targets", "q,zz", "--method", "lora") + ("zz",),
        train_("--prompt_format", "QQQ-A") + ("--prompt_format QQQ-A: must be INPUT-OUTPUT",),
        train_("--method", "full", "--quant", "nf4") + ("--method full trains the base weights, which a 4-bit base",),
        ("train.py", [*out, "--eval_split", "nosuch"], "--eval_split nosuch: not a split of the quick start's quiz "
                                                       "(has: train, val, test)"),  # before the quiz is generated
        train_("--instruction_json", str(jsonl)) + (f"{jsonl} line 2: not a JSON record",),
        train_("--tokenizer", str(LLAMA_TOK)) + (f"--tokenizer {LLAMA_TOK} has 32000 pieces but the LLaMA at",)
        if LLAMA_TOK.is_file() else None,
        train_("--llama_dir", "/no/such/dir") + ("--llama_dir /no/such/dir: no such folder",),
        train_("--clip_path", "/no/such.pt") + ("--clip_path /no/such.pt: no such file",),
        train_("--data_dir", str(bad_json)) + (f"{bad_json}/pid_splits.json is not valid JSON",),
        train_("--llama_dir", str(trunc)) + (f"cannot read LLaMA checkpoint {trunc}/consolidated.00.pth: corrupt",),
        train_("--clip_path", str(evil)) + (f"cannot read CLIP checkpoint {evil}: it holds a pickled print, which the "
                                            "safe loader refuses",),
        ("train.py", [*t, "--out_dir", str(held)], f"--out_dir {held}: already holds a checkpoint"),
        ("train.py", [*t, "--out_dir", str(a_file)], f"--out_dir {a_file}: cannot write there"),
        ("train.py", ["--llama_dir", str(llama_dir)], "--clip_path: required when training on real data"),
        ("train.py", ["--resume", str(tmp_path / "none.pt")], f"checkpoint {tmp_path}/none.pt not found"),
        ("train.py", ["--resume", str(junk)], f"cannot read checkpoint {junk}: corrupt or truncated"),
        ("train.py", ["--resume", str(held / "ckpt.pt"), "--epochs", "5"],
         "--epochs: a resumed run keeps its checkpoint's value (2)"),
        ("sample.py", [*c, "--temperature", "-1"], "--temperature -1.0: must be >= 0"),
        ("sample.py", [*c, "--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
        ("sample.py", [*c, "--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]"),
        ("sample.py", [*c, "--eval", "--batch_size", "0"], "--batch_size 0: must be >= 1"),
        ("evaluate.py", [*c, "--limit", "-3"], "--limit -3: must be >= 1"),
        ("sample.py", [*c, "--dtype", "bf16", "--device", "cpu"], "--dtype bf16: for GPUs"),
        ("sample.py", [*c, "--dtype", "fp16"], "--dtype fp16: for GPUs") if not torch.cuda.is_available() else None,
        ("sample.py", [*c, "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "GPU(s) here"),
        ("sample.py", [*c, "--device", "gpu"], "--device gpu: not a device name"),
        ("sample.py", [*c, "--max_new_tokens", "100000"], "--max_new_tokens 100000: must be in [1, 128]"),
        ("sample.py", [*c, "--image", "/no/such.png", "--prompt", "hi"], "--image /no/such.png: no such file"),
        ("evaluate.py", [*c, "--split", "nosuch"], "--split nosuch: not a split of"),
        ("evaluate.py", [*c, "--out", str(a_file / "preds.json")], f"--out {a_file}"),
        ("evaluate.py", ["--adapter", str(tmp_path / "none.pt")], "not found"),
        ("sample.py", [*c, "--llama_dir", str(heads)], "llama n_heads 8 (trained with 4)"),
        ("bench.py", ["--batch_size", "0"], "--batch_size 0: must be >= 1"),
        ("bench.py", ["--methods", "mma,nope"], "--methods mma,nope: unknown ['nope']"),
        ("bench.py", ["--json", "/no/such/dir/b.json"], "--json /no/such/dir/b.json: no folder"),
    ]


def test_robust_bad_inputs_are_one_line_errors(tiny_setup, ckpt, tmp_path, monkeypatch, capsys):
    """Each bad input: a non-zero exit, one line naming the flag or file, no traceback, nothing trained."""
    for script, argv, expected in filter(None, bad_input_table(tiny_setup, ckpt, tmp_path)):
        code, err = run_script(script, argv, monkeypatch, capsys)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(lines) == 1 and expected in lines[0], (script, argv, err)
        assert "Traceback" not in err and "weights_only=False" not in err, err
        assert not (tmp_path / "out" / "ckpt.pt").exists() and not (tmp_path / "out" / "log.jsonl").exists()
    # --debug shows the traceback instead
    with pytest.raises(cli.UserError, match="--epochs 0"):
        run_script("train.py", [*tiny_setup["flags"], "--epochs", "0", "--debug"], monkeypatch, capsys)


def test_cli_only_rank_0_reports_an_error_every_rank_meets(tiny_setup, tmp_path, monkeypatch, capsys):
    """Under torchrun (RANK set) a user error or a stop is printed by rank 0 alone; the other ranks exit with the same
    status, silently. An error of a rank's own names the rank."""
    argv = [*tiny_setup["flags"], "--out_dir", str(tmp_path), "--epochs", "0"]
    for rank, expected in (("0", ["error: --epochs 0: must be >= 1"]), ("1", [])):
        monkeypatch.setenv("RANK", rank)
        code, err = run_script("train.py", argv, monkeypatch, capsys)
        assert code == 1 and error_lines(err) == expected and (rank == "0" or err == ""), err

    def stopped():
        raise cli.Stopped(signal.SIGTERM, "stopped by SIGTERM after step 3, saved")

    def unreadable():
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), "/data/img.png")

    for rank, main, code, expected in (("1", stopped, 143, []),
                                       ("0", stopped, 143, ["error: stopped by SIGTERM after step 3, saved"]),
                                       ("1", unreadable, 1, ["error: rank 1: Permission denied: /data/img.png"])):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.cli(main)
        assert exit_info.value.code == code and error_lines(capsys.readouterr().err) == expected


def test_cli_adapter_flags_carry_adapter_args_defaults():
    """train.py's adapter flags are AdapterArgs' fields, with its defaults: nothing given, AdapterArgs() itself."""
    args = train.get_args(["--data_dir", "x"])
    assert cli.adapter_args_from(args) == AdapterArgs()
    assert {f.name for f in dataclasses.fields(AdapterArgs)} - set(cli.DROPOUTS) <= set(vars(args))
    assert cli.adapter_args_from(train.get_args(["--data_dir", "x", "--dropout", "0.3"])) == AdapterArgs(
        adapter_dropout=0.3, lora_dropout=0.3)


def test_robust_quick_start_batch_geometry_fits_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = train.get_args(["--out_dir", str(tmp_path)])  # check_args writes there, not in the checkout's out/
    assert (args.batch_size, args.micro_batch) == (32, 16)  # 16 per rank x 2 ranks = the quick start's 32
    train.check_args(args, 2)  # the geometry divides
    assert train.get_args(["--micro_batch", "8"]).micro_batch == 8  # a value the user gave stays


def wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, finish(proc)
        assert time.time() - t0 < timeout, "timed out: " + str(finish(proc, timeout=0))  # a running child: ended
        time.sleep(0.05)


def start(argv, cwd=None, nproc=None):
    """train.py (under torchrun with nproc) as a child that takes signals: SIGINT and SIGTERM at their defaults, as
    a shell gives them, even where pytest itself runs with SIGINT ignored (a child inherits an ignored signal)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc else []
    reset = lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)]  # noqa: E731
    return subprocess.Popen([sys.executable, *launcher, str(ROOT / "train.py"), *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=reset)


def finish(proc, timeout=120, kill=False, stdin=None):
    """(stdout, stderr) of a child that is ending (SIGKILLed first with `kill`; `stdin`: text to write to it). One that
    does not end in `timeout` s is ended and the test fails with what it printed."""
    if kill:
        proc.kill()
    try:
        return proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: torchrun then ends its ranks (each in a session of its own, which a kill of torchrun
        # alone would leave running, stuck, beside the next tests), with SIGKILL for a rank that does not stop.
        proc.terminate()
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"{proc.args} did not end in {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")


def logged(out_dir):
    path = Path(out_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_robust_kill_resume_lock(tiny_setup, tmp_path):
    """A run killed with SIGKILL resumes with its own --save_every and out_dir (from another folder, flags not
    repeated), losing at most one save interval; stopping that with Ctrl-C (SIGINT) finishes the step, saves it and
    prints one line with the resume command. While a run writes its out_dir, a second is refused with the first's
    pid; the lock a killed run leaves is taken over, and one that ends cleans up its lock and temporary files."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = start(tiny_setup["flags"] + ["--out_dir", str(out), "--save_every", "2", "--epochs", "1000"], elsewhere)
    wait_for(lambda: len(logged(out)) >= 5, first)
    with pytest.raises(cli.UserError, match=rf"--out_dir {out}: another run \(pid {first.pid}\) is writing there"):
        train.main(["--resume", str(out / "ckpt.pt"), "--max_steps", "100"])
    finish(first, kill=True)
    last, saved = logged(out)[-1]["step"], load_checkpoint(out / "ckpt.pt")["step"]
    assert 0 <= last - saved <= 2, (last, saved)

    second = start(["--resume", os.path.relpath(out / "ckpt.pt", elsewhere)], elsewhere)
    wait_for(lambda: len(logged(out)) >= last + 8, second)  # the old steps, the marker, and a few new ones
    second.send_signal(signal.SIGINT)
    stdout, stderr = finish(second)
    assert f"taking over the lock of pid {first.pid}" in stdout
    assert second.returncode == 130 and "Traceback" not in stderr, stderr
    log = logged(out)
    ck = load_checkpoint(out / "ckpt.pt")
    assert error_lines(stderr) == [f"error: stopped by SIGINT after step {ck['step']}, saved; continue with: python "
                                   f"train.py --resume {out}/ckpt.pt"]
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "log.jsonl"]  # no lock, no temporary file
    marker = [r for r in log if "resumed_from" in r]
    assert marker == [{"resumed_from": str(out / "ckpt.pt"), "step": saved}]
    assert ck["args"]["save_every"] == 2 and ck["args"]["out_dir"] == str(out)  # kept, though not passed again
    assert all(os.path.isabs(ck["args"][k]) for k in ("llama_dir", "clip_path", "tokenizer", "data_dir", "out_dir"))
    assert log[-1]["step"] == ck["step"] > saved  # nothing lost: the step the signal came in was saved


def test_robust_sigterm_saves_the_step_and_resumes_exactly(tiny_setup, tmp_path):
    """SIGTERM (a scheduler's preemption) mid-epoch with --save_every 0: the step finishes and is saved, one line
    gives the resume command, the exit status is 143; the resumed run then logs the uninterrupted run's losses."""
    full, part = tmp_path / "full", tmp_path / "part"
    flags = tiny_setup["flags"] + ["--save_every", "0", "--epochs", "1"]
    proc = start(flags + ["--out_dir", str(part)])
    wait_for(lambda: len(logged(part)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = finish(proc)
    step = load_checkpoint(part / "ckpt.pt")["step"]
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert error_lines(stderr) == [f"error: stopped by SIGTERM after step {step}, saved; continue with: python "
                                   f"train.py --resume {part}/ckpt.pt"]
    assert 3 <= step == logged(part)[-1]["step"] < 12  # mid-epoch: 12 steps per epoch
    train.main(["--resume", str(part / "ckpt.pt")])
    train.main(flags + ["--out_dir", str(full)])
    assert losses(part) == losses(full) and len(losses(full)) == 12  # bit for bit


def test_robust_torchrun_stops_every_rank_together_and_reports_once(tiny_setup, tmp_path):
    """Under torchrun, SIGTERM to rank 0 alone (its pid is in the lock) stops both ranks after the same step, with
    one checkpoint of that step and one error line for the job; a second launch into that out_dir is refused with
    one line too, though both ranks meet the error."""
    out = tmp_path / "out"
    proc = start(tiny_setup["flags"] + ["--out_dir", str(out), "--save_every", "0", "--epochs", "1"], nproc=2)
    wait_for(lambda: len(logged(out)) >= 2, proc)
    os.kill(int((out / "lock").read_text()), signal.SIGTERM)
    _, stderr = finish(proc)
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert proc.returncode != 0 and step == logged(out)[-1]["step"] < 12, stderr
    assert error_lines(stderr) == [f"error: stopped by SIGTERM after step {step}, saved; continue with: torchrun "
                                   f"<the same launcher flags> train.py --resume {out}/ckpt.pt"], stderr
    again = start(tiny_setup["flags"] + ["--out_dir", str(out)], nproc=2)
    _, stderr = finish(again)
    assert again.returncode != 0 and len(error_lines(stderr)) == 1, stderr
    assert f"--out_dir {out}: already holds a checkpoint" in error_lines(stderr)[0]


def test_robust_full_disk_keeps_last_good_checkpoint(tiny_setup, tmp_path, monkeypatch, capsys):
    """The writer fails with ENOSPC from the second save on: the first save's checkpoint stays, no temporary file
    is left, the lock is released, and the one error line gives the resume command."""
    real_save, calls = torch.save, []

    def filling_save(obj, f):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f)
        f.write(b"the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", filling_save)
    out = tmp_path / "out"
    code, err = run_script("train.py", tiny_setup["flags"] + ["--out_dir", str(out), "--save_every", "2",
                                                              "--max_steps", "6"], monkeypatch, capsys)
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 1 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: No space left on device: {out}/ckpt.pt; continue with: python train.py --resume {out}/ckpt.pt"]
    assert load_checkpoint(out / "ckpt.pt")["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "log.jsonl"]  # no .tmp, no lock


def test_robust_corrupt_training_image_is_skipped_and_counted(tiny_setup, tmp_path, capsys):
    flags = list(tiny_setup["flags"])
    src = Path(flags[flags.index("--data_dir") + 1])
    quiz_copy = tmp_path / "quiz"
    shutil.copytree(src, quiz_copy)
    splits = json.loads((quiz_copy / "pid_splits.json").read_text())
    problems = json.loads((quiz_copy / "problems.json").read_text())
    pid = next(p for p in splits["train"] if problems[p]["image"])
    (quiz_copy / "images" / "train" / pid / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    flags[flags.index("--data_dir") + 1] = str(quiz_copy)
    train.main(flags + ["--out_dir", str(tmp_path / "out"), "--max_steps", "2"])
    text = capsys.readouterr().out
    assert text.count(f"note: 1 training samples left out, their image unreadable (first: problem {pid}") == 2
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 2
