"""
weights.py: every file format the project reads or writes, in one place. It sits at the bottom of the import stack
and imports only torch and the standard library, so that model.py, clip_vit.py and adapters.py are networks: their
front doors (model.load_llama, clip_vit.load_clip, adapters.load_trainable, model.load_trained) read files through
here, and none of them imports another for a file format.

- Weight files: safetensors read (`SafeTensors`: a lazy, memory-mapped {name: tensor} mapping whose whole header is
  checked on opening) and written (`save_safetensors`, laid out as the reference writer does), without the
  `safetensors` package; torch files in torch.load's safe mode (`torch_load`); OpenAI's TorchScript archive and the
  wrappers of training checkpoints (`read_weights`); the files of a Hugging Face folder and its shard index
  (`hf_weight_files`); the one check every loader makes before load_state_dict (`check_state_dict`); and DDP's
  `module.` prefix, stripped (`strip_module_prefix`).
- LLaMA (`read_llama`): Meta's layout, params.json + consolidated.*.pth, model-parallel shards merged as
  meta-llama/llama's fairscale layers split them; Hugging Face's, config.json + model*.safetensors or
  pytorch_model*.bin, names mapped and q/k un-permuted (transformers' convert_llama_weights_to_hf.py). What this
  LLaMA cannot compute (RoPE scaling, biases, other architectures) is refused with the reason.
- CLIP (`read_clip`): OpenAI's names (openai/CLIP clip/model.py) and Hugging Face's (transformers' modeling_clip.py,
  q/k/v fused again) -> clip_vit's; and back to OpenAI's (`to_openai_state_dict`), the layout in which the quick start
  saves its CLIP stand-in.
- LaVIN: the official adapter files (luogen1996/LaVIN's checkpoint-*.pth: `convert_official_lavin`) and our own
  checkpoints, written atomically (`save_checkpoint`, `load_checkpoint`).

The readers return plain dicts ({name: tensor}, config fields); the networks build the modules. Every command that
reads or writes weights comes through here: `python train.py` (--llama_dir, --clip_path, --resume, its ckpt.pt, and
with no flags the quick start's stand-ins, saved in Meta's and OpenAI's layouts), `python sample.py` and
`python evaluate.py` (--adapter: ours or an official file), `python bench.py --load_memory` (a sharded Hugging Face
folder). Tests:
    python -m pytest -q test_all.py -k test_weights_
"""

import argparse
import json
import math
import mmap
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------------------
# Weight files: safetensors, torch, Hugging Face folders; checking a state dict (for every loader)

# safetensors' dtype strings (huggingface/safetensors, the format's README and its Rust `Dtype`) -> torch dtypes.
# The sub-byte F4 / F6_* types have no torch dtype that frombuffer can fill, so they are refused as unknown.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "BOOL": torch.bool,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
if hasattr(torch, "float8_e8m0fnu"):  # newer than the torch 2.6 that requirements.txt allows
    SAFETENSORS_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


class SafeTensors(Mapping):
    """
    A .safetensors file as a read-only {name: tensor} mapping, without the `safetensors` package (torch.load hands
    such files to it). Layout: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end)}} (plus an optional "__metadata__" of strings), then the tensors' bytes, C order.
    The whole header is checked on opening. The file is memory-mapped copy-on-write, and each tensor is made on access
    as a view of the map: nothing is read until used, and a 7B load never holds a second copy.
    """

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 8:
            raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, not even the header length)")
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 100_000_000):  # the reference reader refuses headers over 100 MB
                raise ValueError(f"{self.path}: bad safetensors header length {n} for a file of {size} bytes "
                                 f"(truncated, or not a safetensors file)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
                raise ValueError(f"{self.path}: the safetensors header is not valid JSON ({e})") from None
            # ACCESS_COPY, not ACCESS_READ: torch.frombuffer wants a writable buffer; pages are still read lazily
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: the safetensors header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start, self._entries = 8 + n, {}
        for name, e in header.items():
            self._entries[name] = self._check(name, e, size - 8 - n)
        spans = sorted((b, end, name) for name, (_, _, b, end) in self._entries.items() if end > b)
        for (_, end, a), (b, _, name) in zip(spans, spans[1:]):
            if b < end:
                raise ValueError(f"{self.path}: entry {name!r} overlaps entry {a!r} in the data section")

    def _check(self, name, e, data_size):
        """One header entry -> (dtype, shape, begin, end), or a ValueError naming the file and the entry."""
        def bad(problem):
            return ValueError(f"{self.path}: entry {name!r}: {problem} (truncated or malformed safetensors file)")
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise bad(f"expected {{dtype, shape, data_offsets}}, got {e!r}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"unknown dtype {dtype!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
        ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and x >= 0 for x in xs)
        if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise bad(f"malformed shape {shape!r} or data_offsets {offsets!r}")
        begin, end = offsets
        if end > data_size:
            raise bad(f"bytes [{begin}, {end}) lie outside the data section of {data_size} bytes")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise bad(f"shape {shape} of {dtype} needs {nbytes} bytes, but data_offsets span {end - begin}")
        return SAFETENSORS_DTYPES[dtype], shape, begin, end

    def __getitem__(self, name):
        dtype, shape, begin, end = self._entries[name]
        if end == begin:  # an empty tensor: frombuffer refuses a count of 0
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=self._start + begin)
        return t.reshape(shape)  # a view of the mapped file (a 0-d shape [] gives a scalar)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)

    def release(self, name):
        """The caller copied this tensor out: let the kernel drop its pages from memory (they are read again from
        the file if touched), so that converting a checkpoint tensor by tensor never holds it twice. Only whole
        pages inside the tensor's bytes are dropped, and nothing is ever written to the map, so no data changes."""
        _, _, begin, end = self._entries[name]
        page = mmap.PAGESIZE
        lo, hi = -(-(self._start + begin) // page) * page, (self._start + end) // page * page
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def save_safetensors(tensors: dict, path, metadata: dict | None = None):
    """Write {name: tensor} as a .safetensors file, laid out as the reference writer does: tensors largest item size
    first, then by name (which aligns each to its item size), header padded with spaces to a multiple of 8."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, offset = {"__metadata__": metadata} if metadata else {}, 0
    for k in order:
        t = tensors[k]
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for k in order:  # the raw bytes, via a uint8 view (numpy has no bfloat16 but writes bytes without a copy)
            f.write(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def torch_load(path, what: str, **kw):
    """torch.load in its safe mode (tensors and plain containers only), for every pickled torch file the project reads,
    with errors that name the file. A file holding other Python objects is refused without torch's advice to retry with
    weights_only=False, which would run whatever code the file carries."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except Exception as e:  # torch raises many types here (RuntimeError, UnpicklingError, EOFError...)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))  # torch's refusal names it
        if refused:
            raise ValueError(f"cannot read {what} {path}: it holds a pickled {refused.group(1)}, which the safe "
                             f"loader refuses (not a file of the kind expected here)") from e
        raise ValueError(f"cannot read {what} {path}: corrupt or truncated ({str(e).split('. ')[0]}); copy it again "
                         f"or use another") from e


def read_weights(path, what: str = "checkpoint") -> Mapping:
    """A weight file -> a flat {name: tensor} mapping: a .safetensors file (SafeTensors: lazy views of the mapped
    file), OpenAI's TorchScript archive, or a torch.save'd state dict (read with weights_only=True, memory-mapped
    when it is a zip archive, as every torch.save since torch 1.6 is)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return SafeTensors(path)
    try:
        with zipfile.ZipFile(path) as z:
            torchscript = any(name.endswith("/constants.pkl") for name in z.namelist())  # torch.save has none
        zipped = True
    except zipfile.BadZipFile:
        torchscript = zipped = False  # a legacy (pre-1.6) torch.save file, or not a checkpoint at all
    if torchscript:
        # OpenAI's release format. torch.jit is deprecated but remains the only reader of these archives; its
        # state_dict() has the same keys that build_model sees. Silence only that warning.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as e:
            raise ValueError(f"cannot read {what} {path}: {e}") from e
    obj = torch_load(path, what, mmap=zipped)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):  # common wrappers of training checkpoints
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def check_state_dict(expected: Mapping, got: Mapping, what: str, hint: str, allowed: Mapping | None = None):
    """Before load_state_dict gives a vaguer error: every tensor of `expected` must be in `got`, and every tensor
    of `got` must be in `allowed` (default `expected`) with that shape. Lists each kind of mismatch (a count, the
    first 8) in one ValueError whose first line is `what` and `hint` (how to fix it). Values: tensors, or
    anything with .shape."""
    allowed = expected if allowed is None else allowed
    found = {"missing": [f"{k} {tuple(v.shape)}" for k, v in expected.items() if k not in got],
             "unexpected": [k for k in got if k not in allowed],
             "wrong shape": [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(allowed[k].shape)}"
                             for k, v in got.items() if k in allowed and tuple(v.shape) != tuple(allowed[k].shape)]}
    lines = [f"  {kind} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")
             for kind, items in found.items() if items]
    if lines:
        raise ValueError("\n".join([f"{what} ({hint})"] + lines))


def hf_weight_files(folder) -> list[Path]:
    """The weight files of a Hugging Face folder as save_pretrained writes them: model.safetensors, or the shards
    that model.safetensors.index.json maps every tensor to; the same for the older pytorch_model*.bin."""
    folder = Path(folder)
    for single in ("model.safetensors", "pytorch_model.bin"):  # safetensors first: Hub repos often carry both
        if (folder / single).is_file():
            return [folder / single]
        index = folder / f"{single}.index.json"
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not in {folder}: {', '.join(missing)} "
                                        f"(an incomplete download?)")
            return [folder / n for n in names]
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, or model.safetensors.index.json "
                            f"and its shards (or pytorch_model*.bin)")


def strip_module_prefix(sd: Mapping) -> dict:
    """The names without the `module.` that DDP's wrapper puts in front of each (official LaVIN files carry it)."""
    return {k.removeprefix("module."): v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------------
# LLaMA: Meta's layout and Hugging Face's

# Meta's model-parallel checkpoints split each tensor across shards: column-parallel weights on dim 0, row-parallel ones
# and the embedding on dim 1, norms replicated (fairscale layers of meta-llama/llama model.py).
_SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def merge_shards(shards: list[dict]) -> dict:
    if len(shards) == 1:
        return dict(shards[0])  # no copy of the memory-mapped tensors
    dims = {k: _SHARD_DIM.get(k.split(".")[-2]) for k in shards[0]}  # e.g. "wq" of layers.0.attention.wq.weight
    return {k: shards[0][k] if d is None else torch.cat([s[k] for s in shards], dim=d) for k, d in dims.items()}


# Hugging Face's layout (transformers' LlamaForCausalLM, as its convert_llama_weights_to_hf.py writes it from Meta's)
_HF_LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                   "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                   "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",  # up is w3, not w2
                   "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
                   "post_attention_layernorm": "ffn_norm"}
_HF_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}


def hf_to_meta_name(name: str) -> str | None:
    """model.layers.3.mlp.up_proj.weight -> layers.3.feed_forward.w3.weight; None for a name LLaMA does not have."""
    p = name.split(".")  # model, layers, N, <module>, weight
    if p[:2] == ["model", "layers"] and p[-1] == "weight" and ".".join(p[3:-1]) in _HF_LAYER_NAMES:
        return f"layers.{p[2]}.{_HF_LAYER_NAMES['.'.join(p[3:-1])]}.weight"
    return _HF_NAMES.get(name)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's q or k rows -> Meta's: convert_llama_weights_to_hf.py lists each head's even rows, then its odd ones, so
    that HF's rotate_half, pairing (i, i + D/2), rotates Meta's pairs (2i, 2i + 1). k takes the key/value head count."""
    rows, cols = w.shape
    w = w.view(n_heads, 2, rows // n_heads // 2, cols)  # (H, 2, D/2, C): [even rows; odd rows] of each head
    return w.transpose(1, 2).reshape(rows, cols)  # (H, D/2, 2, C) -> (H·D, C): rows 0, 1, 2, ... interleaved again


def hf_llama_args(cfg: dict, where: Path, max_seq_len: int) -> dict:
    """config.json -> model.ModelArgs's fields (vocab size, FFN width: from the tensors), refusing what this LLaMA
    cannot compute."""
    arch = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type") != "llama" or arch != ["LlamaForCausalLM"]:
        raise ValueError(f"{where} describes a {cfg.get('model_type')} model {arch}, not LLaMA: only "
                         f"LlamaForCausalLM folders (LLaMA-1/2, Vicuna) load here")
    # transformers 4.x writes rope_theta and rope_scaling at the top level, 5.x both inside rope_parameters
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{where} asks for RoPE scaling of type {kind!r} (e.g. Llama-3.1), which this model does not "
                         f"implement: loading it without would rotate every position wrongly")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    odd = {k: cfg[k] for k in ("attention_bias", "mlp_bias") if cfg.get(k)}
    odd |= {k: cfg[k] for k, ok in (("hidden_act", "silu"), ("head_dim", dim // heads)) if cfg.get(k, ok) != ok}
    if odd:
        raise ValueError(f"{where} has {odd}: not LLaMA's architecture (no biases, SwiGLU, head size hidden/heads)")
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return dict(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=heads,
                n_kv_heads=cfg.get("num_key_value_heads") or heads, norm_eps=cfg["rms_norm_eps"],
                rope_theta=theta, max_seq_len=max_seq_len)


def read_hf_llama(folder: Path, params: dict, tied: bool, device, dtype) -> dict:
    """The tensors of an HF folder under Meta's names, q/k un-permuted, each cast and moved as soon as it is read, so
    that the peak stays near one copy of the weights (the mapped file's pages of a copied tensor are dropped)."""
    sd = {}
    for file in hf_weight_files(folder):
        shard = read_weights(file, "LLaMA checkpoint")
        for name in list(shard):
            meta = hf_to_meta_name(name)
            if meta is None:
                if name.endswith("rotary_emb.inv_freq"):  # saved by 2023-era transformers; the model computes it
                    continue
                raise ValueError(f"{file}: tensor {name} has no counterpart in LLaMA (biases or other norms mean "
                                 f"another architecture); refusing rather than dropping it")
            src = shard[name]
            heads = {"wq": params["n_heads"], "wk": params["n_kv_heads"]}.get(meta.split(".")[-2])  # k: kv heads
            t = src if heads is None else unpermute(src, heads)
            sd[meta] = t.to(device=device, dtype=dtype or t.dtype)
            if isinstance(shard, SafeTensors) and sd[meta].data_ptr() != src.data_ptr():
                shard.release(name)  # copied out: its pages of the mapped file are not needed again
    if tied and "output.weight" not in sd:  # tie_word_embeddings: the head is the embedding, not saved twice
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def read_meta_llama(ckpt_dir: Path, max_seq_len: int, known: set[str]) -> tuple[dict, dict]:
    """Meta's layout: params.json + consolidated.00.pth (+ .01 ... for model-parallel shards, merged here) -> (the
    values of params.json, whose keys must be among `known`, model.ModelArgs's fields; the tensors, memory-mapped)."""
    params_path = ckpt_dir / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"neither params.json nor config.json in {ckpt_dir}: --llama_dir is Meta's layout "
                                f"(params.json + consolidated.*.pth, e.g. .../LLaMA/7B) or Hugging Face's (config.json "
                                f"+ model*.safetensors, e.g. meta-llama/Llama-2-7b-hf)")
    shard_paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not shard_paths:
        raise FileNotFoundError(f"no consolidated.*.pth in {ckpt_dir}: expected Meta's checkpoint shards there")
    try:
        params = json.loads(params_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{params_path} is not valid JSON ({e})") from e
    if params.get("use_scaled_rope"):
        raise ValueError(f"{params_path} sets use_scaled_rope (Llama-3.1/3.2), a RoPE scaling this model does not "
                         f"implement: loading it without would rotate every position wrongly")
    unknown = sorted(params.keys() - known - {"use_scaled_rope"})
    if unknown:
        raise ValueError(f"{params_path} has keys this loader does not understand: {unknown}; refusing rather than "
                         f"ignoring what they may change")
    sd = merge_shards([torch_load(p, "LLaMA checkpoint", mmap=True) for p in shard_paths])
    sd.pop("rope.freqs", None)  # old checkpoints store the RoPE frequencies; we compute them
    args = {k: v for k, v in params.items() if k in known and v is not None}
    args["max_seq_len"] = max(max_seq_len, params.get("max_seq_len") or 0)
    return args, sd


def read_llama(ckpt_dir: Path, known: set[str], max_seq_len: int, device, dtype) -> tuple[dict, dict]:
    """Meta's layout (params.json + consolidated.*.pth, shards merged) or, given config.json, Hugging Face's (LLaMA-1/2,
    Vicuna) -> (model.ModelArgs's fields that the config gives, `known` naming them; the tensors under Meta's names).
    Hugging Face's arrive on `device` in `dtype` (None keeps theirs), Meta's stay memory-mapped as stored."""
    if (ckpt_dir / "config.json").is_file():
        cfg = json.loads((ckpt_dir / "config.json").read_text())
        params = hf_llama_args(cfg, ckpt_dir / "config.json", max_seq_len)
        sd = read_hf_llama(ckpt_dir, params, cfg.get("tie_word_embeddings", False), device, dtype)
    else:
        params, sd = read_meta_llama(ckpt_dir, max_seq_len, known)
    if "tok_embeddings.weight" not in sd or "layers.0.feed_forward.w1.weight" not in sd:
        raise ValueError(f"the checkpoint in {ckpt_dir} does not look like LLaMA (no tok_embeddings / w1 tensors)")
    return params, sd


# ----------------------------------------------------------------------------------------------------------------
# CLIP: OpenAI's names and Hugging Face's (clip/clip.py load, clip/model.py build_model)

VIT_L14_SHA256 = "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"
VIT_L14_URL = f"https://openaipublic.azureedge.net/clip/models/{VIT_L14_SHA256}/ViT-L-14.pt"  # as in clip/clip.py


def convert_openai_state_dict(sd):
    """OpenAI CLIP state dict (full model with `visual.` keys, or the vision tower alone) -> our key names.
    Tensors are passed through untouched: the layouts already agree, only the names differ."""
    # A full CLIP state dict also holds the text tower, whose keys (transformer.resblocks.*, positional_embedding)
    # collide with the visual ones once the prefix is gone: when `visual.` keys exist, keep only those.
    prefix = "visual." if any(k.startswith("visual.") for k in sd) else ""
    out = {}
    for key, value in sd.items():
        # skip other keys and the scalar entries (input_resolution, context_length, vocab_size), as build_model does
        if not key.startswith(prefix) or not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        key = key[len(prefix):]
        key = key.replace("transformer.resblocks.", "blocks.")  # OpenAI wraps the blocks in a Transformer module
        key = key.replace("attn.in_proj_weight", "attn.in_proj.weight")  # MHA's raw parameters -> our nn.Linear
        key = key.replace("attn.in_proj_bias", "attn.in_proj.bias")
        out[key] = value  # attn.out_proj.*, ln_*, mlp.c_fc.*, mlp.c_proj.* and the rest keep their names
    return out


def to_openai_state_dict(sd):
    """Our key names -> OpenAI's (with the `visual.` prefix), the inverse of convert_openai_state_dict: how the quick
    start saves its CLIP stand-in, so that it is read back through the very path OpenAI's weights take."""
    out = {}
    for key, value in sd.items():
        key = key.replace("blocks.", "transformer.resblocks.", 1) if key.startswith("blocks.") else key
        key = (key.replace("attn.in_proj.weight", "attn.in_proj_weight")
                  .replace("attn.in_proj.bias", "attn.in_proj_bias"))
        out["visual." + key] = value
    return out


# Hugging Face's CLIP names (transformers' modeling_clip.py) -> ours, applied in order to what follows `vision_model.`
_HF_CLIP_NAMES = [("embeddings.patch_embedding.", "conv1."), ("embeddings.class_embedding", "class_embedding"),
                  ("embeddings.position_embedding.weight", "positional_embedding"),
                  ("pre_layrnorm.", "ln_pre."),  # sic: HF's spelling
                  ("post_layernorm.", "ln_post."), ("encoder.layers.", "blocks."), (".self_attn.", ".attn."),
                  (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
                  (".mlp.fc2.", ".mlp.c_proj.")]


def convert_hf_state_dict(sd):
    """Hugging Face CLIPModel or CLIPVisionModelWithProjection tensors -> our key names. The text tower and the
    legacy position_ids buffer are left out; q, k and v (weights and biases) are fused into in_proj."""
    out = {}
    for key, value in sd.items():
        if key == "visual_projection.weight":
            out["proj"] = value.t()  # HF: a bias-free Linear(W, out), weight (out, W); OpenAI: x @ proj, (W, out)
        elif key.startswith("vision_model.") and not key.endswith("position_ids"):
            key = key[len("vision_model."):]
            for old, new in _HF_CLIP_NAMES:
                key = key.replace(old, new)
            out[key] = value
    for key in [k for k in out if ".attn.q_proj." in k]:
        parts = [out.pop(key.replace("q_proj", p), None) for p in ("q_proj", "k_proj", "v_proj")]
        if all(p is not None for p in parts):  # else in_proj is reported missing below
            out[key.replace("q_proj", "in_proj")] = torch.cat(parts)  # (3W, W) or (3W,): q, k, v rows as MHA
    return out


def read_clip(path) -> tuple[dict, dict]:
    """OpenAI's TorchScript archive (ViT-L-14.pt) or a state dict in OpenAI's layout, or Hugging Face's: a CLIP folder
    (config.json + model.safetensors, e.g. openai/clip-vit-large-patch14) or a lone .safetensors file, of a CLIPModel
    (its text tower is ignored) or a CLIPVisionModelWithProjection -> (Hugging Face's vision config, {} where there is
    none; the vision tower's tensors under clip_vit's names, lazy views where the file allows)."""
    path, config, cfg = Path(path), Path(path) / "config.json", {}
    if path.is_dir():
        cfg = json.loads(config.read_text()) if config.is_file() else {}
        raw = {}
        for file in hf_weight_files(path):
            raw.update(read_weights(file, "CLIP checkpoint"))  # lazy views: nothing is read yet
    elif path.is_file():
        raw = read_weights(path, "CLIP checkpoint")
    else:
        raise FileNotFoundError(
            f"CLIP checkpoint not found: {path}. Expected OpenAI's ViT-L-14.pt TorchScript archive "
            f"(sha256 {VIT_L14_SHA256}, from {VIT_L14_URL}), a state dict of a CLIP vision tower, or a Hugging Face "
            f"CLIP folder or .safetensors file (e.g. openai/clip-vit-large-patch14)")
    vision = cfg.get("vision_config", cfg)  # CLIPModel nests it; CLIPVisionModelWithProjection's is top-level
    hf = any(k.startswith("vision_model.") for k in raw)
    sd = convert_hf_state_dict(raw) if hf else convert_openai_state_dict(raw)
    if vision.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"{config} says hidden_act {vision['hidden_act']!r}, but this tower computes QuickGELU, "
                         f"as OpenAI's CLIP was trained: it would load, and give other features")
    shapes_needed = {"conv1.weight": 4, "positional_embedding": 2, "class_embedding": 1, "proj": 2,
                     "blocks.0.attn.in_proj.weight": 2}
    missing = [k for k, ndim in shapes_needed.items() if k not in sd or sd[k].dim() != ndim]
    if missing:
        raise ValueError(f"{path} is not a CLIP ViT vision checkpoint: missing or malformed {missing} (names "
                         f"after convert_{'hf' if hf else 'openai'}_state_dict)")
    return vision, sd


# ----------------------------------------------------------------------------------------------------------------
# LaVIN: official adapter files and our checkpoints

def convert_official_lavin(sd: dict) -> dict:
    """
    Official LaVIN adapter keys (the released checkpoint-*.pth) -> ours. The official modules are 1x1 Conv1d, so their
    weights carry a trailing kernel axis of size 1 that we drop; names map as:
      layers.{i}.adapter_attn.conv_A / conv_B / conv_D / expert_weights
          -> llama.layers.{i}.adapter_attn.down/up0/up1/router.proj
      backbone.visual.transformer.resblocks.{j}.adapter_attn.*
          -> visual.blocks.{j}.adapter_attn.*
      adapter_proj.conv_A / conv_B (plain linears despite the name)
          -> adapter_proj.fc1 / fc2
      adapter_modality_embedding.weight
          -> unchanged
    """
    parts = {"conv_A": "down", "conv_B": "up0", "conv_D": "up1", "expert_weights": "router.proj"}
    out = {}
    for k, v in strip_module_prefix(sd).items():
        if k.startswith("adapter_proj."):
            k = k.replace("conv_A", "fc1").replace("conv_B", "fc2")
        elif k.startswith("adapter_modality_embedding."):
            pass
        else:
            m = re.fullmatch(r"(layers\.\d+|backbone\.visual\.transformer\.resblocks\.\d+)\.adapter_attn\."
                             r"(conv_A|conv_B|conv_D|expert_weights)\.(weight|bias)", k)
            if m is None:
                out[k] = v  # not an adapter key: kept as is, so load_trainable reports it as unexpected
                continue
            where, part, kind = m.groups()
            where = ("llama." + where) if where.startswith("layers") else where.replace(
                "backbone.visual.transformer.resblocks", "visual.blocks")
            k = f"{where}.adapter_attn.{parts[part]}.{kind}"
            if v.dim() == 3:
                v = v.squeeze(-1)  # Conv1d [out, in/groups, 1] -> [out, in/groups]
        out[k] = v
    return out


def save_checkpoint(path, obj: dict):
    """Write a temporary file (named by the pid, so writers never share one; removed if the write fails), fsync it and
    rename it over the old one: the rename is atomic, so a run killed mid-save leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a full disk: name the checkpoint that could not be written
        raise


def load_checkpoint(path) -> dict:
    """train.py's checkpoint, or an official LaVIN adapter file (checkpoint-{epoch}.pth), whose argparse.Namespace the
    safe torch.load refuses: rather than unpickling arbitrary code (weights_only=False) we allow-list that class."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (train.py writes {{out_dir}}/ckpt.pt; "
                                f"run `python train.py` first for the quick start's)")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} is neither a train.py checkpoint nor an official LaVIN adapter file (no 'model' "
                         f"dict of tensors)")
    return ckpt

