"""
Export a checkpoint: for C inference (the model file and the tokenizer file that run.c reads), for the
Hugging Face ecosystem, or for NumPy (run_numpy.py runs it without torch).

    python export.py --ckpt=out/ckpt.pt                              # model.bin (fp32) + tokenizer.bin
    python export.py --ckpt=out/ckpt.pt --quantize=int8 --out=model_q8.bin
    python export.py --ckpt=out/ckpt.pt --legacy=True                # + llama2.c's own version-0 files
    python export.py --ckpt=out/sft/ckpt.pt --format=hf --out=out/hf # a folder transformers loads
    python export.py --ckpt=out/sft/ckpt.pt --format=safetensors --out=model.safetensors
    python export.py --ckpt=out/sft/ckpt.pt --format=npz --out=model.npz   # python run_numpy.py model.npz
    python export.py --ckpt=hf:models/SmolLM2-135M-Instruct          # an imported model, for run.c
    python export.py --ckpt=gguf:SmolLM2-135M-Instruct.Q4_1.gguf --format=hf --out=smollm2   # GGUF -> float32

LoRA checkpoints are merged into their base weights by model.load_checkpoint before export.

--format=hf writes config.json (LlamaForCausalLM, or Qwen2ForCausalLM for a model with attention biases),
model.safetensors (float32, Hugging Face's names and RoPE layout), tokenizer.json, tokenizer_config.json
(with the chat template) and generation_config.json. --format=safetensors writes the weights under our own
names with the model arguments and the tokenizer in the file's metadata: every stage reads it back as a
checkpoint (--ckpt=model.safetensors, --init_from=model.safetensors). --format=npz writes one NumPy .npz file
(np.load reads it, no pickle): every weight as a float32 array under our names (model.state_dict()'s, the tied
head left out as in safetensors), and string entries: format "nanollama", model_args (JSON of model.py's
ModelArgs), tokenizer (the tokenizer file's JSON), tokenizer_sha256, data_format and iter_num.

The model file (little-endian; every section starts at a multiple of 64 bytes, zero-padded):

    header, 256 bytes:
        0  char[4] magic "NLLM"         4  int32 version (2; run.c reads version 1 too)
        8  int32 dim                   12  int32 hidden_dim
       16  int32 n_layers              20  int32 n_heads
       24  int32 n_kv_heads            28  int32 vocab_size
       32  int32 max_seq_len           36  float32 rope_theta
       40  float32 norm_eps            44  int32 tied (1: the output head is the token embedding)
       48  int32 weight_type (0 fp32, 1 int8)   52  int32 group_size (int8 only, else 0)
       56  uint64 tokenizer_id (first 8 bytes of the tokenizer's sha256, also in the tokenizer file)
       64  uint64 file_size (the whole file, in bytes)
       72  int32 attention_bias (1: wq, wk and wv have biases, Qwen2)            (version 2; version 1: zero)
       76  float32 rope_scaling (Llama 3.1's RoPE scaling factor; 0 = plain RoPE)  (version 2)
       80  float32 rope_low_freq_factor    84  float32 rope_high_freq_factor     (version 2; 0 without scaling)
       88  int32 rope_original_max_seq_len                                       (version 2; 0 without scaling)
       92..255 zero
    weights, in this order (L = n_layers, hd = dim / n_heads, kv = n_kv_heads * hd):
        attention_norm (L, dim)    ffn_norm (L, dim)    norm (dim)                  always float32
        bq (L, dim)   bk (L, kv)   bv (L, kv)                   only with attention_bias; always float32
        tok_embeddings (vocab_size, dim)
        wq (L, dim, dim)   wk (L, kv, dim)   wv (L, kv, dim)   wo (L, dim, dim)
        w1 (L, hidden_dim, dim)   w2 (L, dim, hidden_dim)   w3 (L, hidden_dim, dim)
        output (vocab_size, dim)                                                    only if not tied
    A matrix is row-major (out_features, in_features), as nn.Linear stores it. In an int8 file each matrix is
    two sections: int8 values, then one float32 scale per group of group_size consecutive values of a row
    (symmetric: value = int8 * scale, int8 in -127..127). Version 1 is version 2 without the fields at 72..91
    (zero there) and without the biases.

Weights that are not finite numbers (NaN, infinity: training that diverged) are refused, naming the tensor, in
every format.

The tokenizer file (tokenizer.bin):

    header, 64 bytes:
        0  char[4] magic "NLTK"         4  int32 version (2; run.c reads version 1 too)
        8  int32 vocab_size            12  int32 bos_id
       16  int32 n_special             20  int32 max_token_bytes
       24  uint64 tokenizer_id
       32  int32 n_letter_ranges       36  int32 n_number_ranges       40  int32 n_space_ranges
       44  int32 split, the pre-split pattern: 0 GPT-4's (Llama 3's splits the same), 1 Qwen2's, 2 GPT-2's,
           3 SmolLM2's                                                           (version 2; version 1: GPT-4's)
       48  int32 unk_id: -1, a byte with no token of its own is left out of the text (tokenizer.py's choice,
           Hugging Face's); else the token that stands for each run of such bytes      (version 2; version 1: -1)
       52  int32 default_system_bytes                                            (version 2; version 1: none)
       56..63 zero
    the Unicode classes of the pre-split, as inclusive (first, last) uint32 code point pairs: \\p{L}, \\p{N},
        \\s (taken from the `regex` package here, so run.c splits non-ASCII text like tokenizer.py does)
    every token by id: uint8 kind (0 ordinary, 1 special, 2 unused id), uint32 length, its bytes
        (a special token's bytes are its name, e.g. <|bos|>); an ordinary token's id is its BPE merge rank.
    (version 2:) the chat template's default system message, UTF-8 (default_system_bytes; SmolLM2's and
        Qwen2.5's templates add one to a conversation that has none, and so does ./run -m chat without -y)
    Version 1 is version 2 with GPT-4's split, every byte a token and no default system message.
"""

import json
import os
import shlex
import struct
import sys
from dataclasses import asdict

import numpy as np
import regex
import torch

from configurator import ConfigError, configure
from checkpoint import (hf_config, hf_state_dict, load_checkpoint, write_atomically, write_model_safetensors,
                        write_safetensors)
from tokenizer import hf_tokenizer_files
from tokenizer import GPT2_DIGITS_SPLIT_PATTERN, GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN

# -----------------------------------------------------------------------------------------------------
ckpt = "out/ckpt.pt"  # the checkpoint to export (a LoRA checkpoint is merged into its base), hf:DIR or gguf:FILE
format = "run"  # 'run' (run.c's files) | 'hf' (a Hugging Face model folder) | 'safetensors' (one weights file)
#                 | 'npz' (one NumPy file, for run_numpy.py)
out = ""  # the model file for run.c (default model.bin), the folder for hf (default hf_model), the
#           .safetensors file (default model.safetensors), the .npz file (default model.npz)
tokenizer_out = "tokenizer.bin"  # the tokenizer file for run.c ("" = do not write it)
quantize = ""  # "" = float32 weights; "int8" = symmetric group-wise int8 (about 4x smaller and faster)
group_size = 64  # int8: values per scale; halved until it divides dim and hidden_dim
legacy = False  # also write llama2.c's version-0 float32 layout and its tokenizer format
legacy_out = "model_llama2c.bin"  # --legacy: the model file for llama2.c's run.c
legacy_tokenizer_out = "tokenizer_llama2c.bin"  # --legacy: the tokenizer file for llama2.c's run.c (-z)
# -----------------------------------------------------------------------------------------------------

MAGIC = b"NLLM"
VERSION = 2
HEADER_BYTES = 256
ALIGN = 64
TOKENIZER_MAGIC = b"NLTK"
TOKENIZER_VERSION = 2
TOKENIZER_HEADER_BYTES = 64
# the pre-splits run.c has written out by hand (the tokenizer file's split), by the regex tokenizer.py splits with;
# Llama 3's and Qwen2's as their own tokenizer.json files write them
LLAMA3_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_SPLIT_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
RUN_C_SPLITS = {GPT4_SPLIT_PATTERN: 0, LLAMA3_SPLIT_PATTERN: 0, QWEN2_SPLIT_PATTERN: 1, GPT2_SPLIT_PATTERN: 2,
                GPT2_DIGITS_SPLIT_PATTERN: 3}


def tokenizer_id(tokenizer):
    """First 8 bytes of the tokenizer's sha256 as an integer: ties a model file to its tokenizer file."""
    return int.from_bytes(bytes.fromhex(tokenizer.sha256)[:8], "little")


def pad_to_alignment(f):
    f.write(b"\0" * (-f.tell() % ALIGN))


def quantize_int8(w, group_size):
    """w (rows, cols) float -> int8 values (rows, cols) and float32 scales (rows * cols / group_size)."""
    groups = w.float().reshape(-1, group_size)
    scale = groups.abs().amax(dim=1) / 127.0
    q = torch.round(groups / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-127, 127)
    return q.to(torch.int8).reshape(w.shape), scale


def choose_group_size(args, requested):
    group = requested
    while group > 1 and (args.dim % group or args.hidden_dim % group):
        group //= 2
    if group != requested:
        print(f"group_size {requested} does not divide dim={args.dim} and hidden_dim={args.hidden_dim}; "
              f"using {group}", file=sys.stderr)
    return group


def model_matrices(model):
    """The matrices in file order: (name, tensor stacked over layers or a single matrix)."""
    layers = model.layers
    stack = lambda get: torch.stack([get(layer) for layer in layers])
    matrices = [("tok_embeddings", model.tok_embeddings.weight),
                ("wq", stack(lambda l: l.attention.wq.weight)), ("wk", stack(lambda l: l.attention.wk.weight)),
                ("wv", stack(lambda l: l.attention.wv.weight)), ("wo", stack(lambda l: l.attention.wo.weight)),
                ("w1", stack(lambda l: l.feed_forward.w1.weight)), ("w2", stack(lambda l: l.feed_forward.w2.weight)),
                ("w3", stack(lambda l: l.feed_forward.w3.weight))]
    if not model.args.tie_embeddings:
        matrices.append(("output", model.output.weight))
    return matrices


def check_finite(model, source):
    """Refuse weights that are not finite numbers (training that diverged): run.c would print garbage from them."""
    for name, tensor in model.state_dict().items():
        bad = tensor.numel() - torch.isfinite(tensor).sum().item()
        if bad:
            sys.exit(f"error: {source}: {name} has {bad} of its {tensor.numel()} values NaN or infinite (did training "
                     "diverge?); refusing to export it")


def write_model(model, tokenizer, path, weight_type, group_size):
    args = model.args
    tied = args.tie_embeddings
    vectors = [torch.stack([l.attention_norm.weight for l in model.layers]),
               torch.stack([l.ffn_norm.weight for l in model.layers]), model.norm.weight]
    if args.attention_bias:
        vectors += [torch.stack([getattr(l.attention, w).bias for l in model.layers]) for w in ("wq", "wk", "wv")]
    # Llama 3.1's RoPE scaling, or zeros
    scaling = (args.rope_scaling, args.rope_low_freq_factor, args.rope_high_freq_factor,
               args.rope_original_max_seq_len) if args.rope_scaling else (0.0, 0.0, 0.0, 0)
    tmp_path = f"{path}.tmp{os.getpid()}"
    max_error = 0.0
    with open(tmp_path, "wb") as f:
        f.write(b"\0" * HEADER_BYTES)  # written last, when the file size is known
        for vector in vectors:
            f.write(vector.detach().float().numpy().astype("<f4").tobytes())
            pad_to_alignment(f)
        for name, w in model_matrices(model):
            w = w.detach().float()
            if weight_type == 0:
                f.write(w.numpy().astype("<f4").tobytes())
                pad_to_alignment(f)
            else:
                q, scale = quantize_int8(w.reshape(-1, w.shape[-1]), group_size)
                dequantized = (q.float().reshape(-1, group_size) * scale[:, None]).reshape(w.shape)
                max_error = max(max_error, (dequantized - w).abs().max().item())
                f.write(q.numpy().tobytes())
                pad_to_alignment(f)
                f.write(scale.numpy().astype("<f4").tobytes())
                pad_to_alignment(f)
        file_size = f.tell()
        header = MAGIC + struct.pack("<i7i2f3iQQi3fi", VERSION, args.dim, args.hidden_dim, args.n_layers,
                                     args.n_heads, args.n_kv_heads, args.vocab_size, args.max_seq_len,
                                     args.rope_theta, args.norm_eps, int(tied), weight_type,
                                     group_size if weight_type else 0, tokenizer_id(tokenizer), file_size,
                                     int(args.attention_bias), *scaling)
        f.seek(0)
        f.write(header.ljust(HEADER_BYTES, b"\0"))
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            # drop the file from the page cache: read back from disk, run.c's mmap gets 2 MB pages (+6-15% tok/s
            # measured); pages cached from the writing are 4 KB ones
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.replace(tmp_path, path)
    return file_size, max_error


def unicode_ranges(pattern):
    """Inclusive (first, last) code point ranges matching a one-character regex class, e.g. \\p{L}."""
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    ranges = []
    for m in regex.finditer(pattern + "+", everything):
        first, last = ord(m.group()[0]), ord(m.group()[-1])
        if ranges and ranges[-1][1] + 1 == first:
            ranges[-1][1] = last
        elif first <= 0xD7FF < last:  # a run that skipped the surrogates in the string
            ranges += [[first, 0xD7FF], [0xE000, last]]
        else:
            ranges.append([first, last])
    return ranges


def write_tokenizer(tokenizer, path):
    split = RUN_C_SPLITS.get(tokenizer.pattern)
    if split is None:
        split = 0
        print(f"warning: this tokenizer pre-splits with {tokenizer.pattern!r}; run.c implements GPT-4's, Llama 3's, "
              "Qwen2's, GPT-2's and SmolLM2's and will split with GPT-4's, so its prompt encoding may differ from "
              "tokenizer.py's", file=sys.stderr)
    if tokenizer.normalizer:
        print(f"warning: this tokenizer normalizes text to {tokenizer.normalizer} before encoding and run.c does not: "
              f"a prompt not already in {tokenizer.normalizer} (rare: e.g. accents typed as separate combining marks) "
              "encodes differently in run.c", file=sys.stderr)
    unk_id = getattr(tokenizer, "unk_id", None)  # the token for a byte with no token of its own; None: left out
    vocab_size = tokenizer.vocab_size
    kinds, pieces = [2] * vocab_size, [b""] * vocab_size
    for token, rank in tokenizer.mergeable_ranks.items():
        kinds[rank], pieces[rank] = 0, token
    for name, i in tokenizer.special_tokens.items():
        kinds[i], pieces[i] = 1, name.encode("utf-8")
    classes = [unicode_ranges(p) for p in (r"\p{L}", r"\p{N}", r"\s")]
    system = tokenizer.default_system.encode("utf-8")
    header = TOKENIZER_MAGIC + struct.pack("<5iQ6i", TOKENIZER_VERSION, vocab_size, tokenizer.bos_id,
                                           len(tokenizer.special_tokens), max(map(len, pieces)),
                                           tokenizer_id(tokenizer), *map(len, classes), split,
                                           -1 if unk_id is None else unk_id, len(system))
    with open(path, "wb") as f:
        f.write(header.ljust(TOKENIZER_HEADER_BYTES, b"\0"))
        for ranges in classes:
            f.write(np.array(ranges, dtype="<u4").tobytes())
        for kind, piece in zip(kinds, pieces):
            f.write(struct.pack("<BI", kind, len(piece)) + piece)
        f.write(system)


# ----------------------------------------------------------------------------------------------------
# llama2.c's version-0 layout


def check_legacy(args, tokenizer):
    """llama2.c's run.c hard-codes some settings; refuse models it would run wrongly."""
    problems = []
    if args.rope_theta != 10000.0:
        problems.append(f"rope_theta={args.rope_theta:g} (llama2.c uses 10000)")
    if abs(args.norm_eps - 1e-5) > 1e-12:
        problems.append(f"norm_eps={args.norm_eps:g} (llama2.c uses 1e-5)")
    if args.attention_bias:
        problems.append("attention biases (llama2.c has none)")
    if args.rope_scaling:
        problems.append("Llama 3.1's RoPE scaling (llama2.c has plain RoPE)")
    if tokenizer.vocab_size > args.vocab_size:
        problems.append("the tokenizer is larger than the model's vocabulary")
    byte_ids = [tokenizer.mergeable_ranks.get(bytes([b])) for b in range(256)]
    if None in byte_ids:
        problems.append("the tokenizer lacks some of the 256 single-byte tokens (llama2.c's byte fallback needs them)")
    if problems:
        sys.exit("error: llama2.c's version-0 layout cannot express this model: " + "; ".join(problems))


def legacy_order(tokenizer, vocab_size):
    """
    New id -> old id. llama2.c assumes <unk>=0, BOS=1, EOS=2 and byte b = 3 + b (sentencepiece's layout):
    our <|bos|> goes to 1, the 256 byte tokens to 3..258, two other special tokens fill 0 and 2, and every
    other token keeps its relative order.
    """
    byte_ids = [tokenizer.mergeable_ranks[bytes([b])] for b in range(256)]
    specials = [i for _, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1]) if i != tokenizer.bos_id]
    placed = set(byte_ids) | {tokenizer.bos_id} | set(specials[:2])
    rest = [i for i in range(vocab_size) if i not in placed]
    return [specials[0], tokenizer.bos_id, specials[1]] + byte_ids + rest


def write_legacy(model, tokenizer, model_path, tokenizer_path):
    args = model.args
    check_legacy(args, tokenizer)
    order = torch.tensor(legacy_order(tokenizer, args.vocab_size))
    vocab_field = args.vocab_size if args.tie_embeddings else -args.vocab_size  # negative: separate head
    stack = lambda get: torch.stack([get(layer) for layer in model.layers])
    tensors = [model.tok_embeddings.weight[order],
               stack(lambda l: l.attention_norm.weight),
               stack(lambda l: l.attention.wq.weight), stack(lambda l: l.attention.wk.weight),
               stack(lambda l: l.attention.wv.weight), stack(lambda l: l.attention.wo.weight),
               stack(lambda l: l.ffn_norm.weight),
               stack(lambda l: l.feed_forward.w1.weight), stack(lambda l: l.feed_forward.w2.weight),
               stack(lambda l: l.feed_forward.w3.weight),
               model.norm.weight,
               model.rope_cos[:args.max_seq_len], model.rope_sin[:args.max_seq_len]]  # llama2.c skips these
    if not args.tie_embeddings:
        tensors.append(model.output.weight[order])
    with open(model_path, "wb") as f:
        f.write(struct.pack("<7i", args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
                            vocab_field, args.max_seq_len))
        for t in tensors:
            f.write(t.detach().float().numpy().astype("<f4").tobytes())
    # llama2.c's tokenizer: int32 max_token_length, then per token float32 score, int32 length, bytes.
    # Its encoder merges the pair with the highest score, so score = -rank reproduces the BPE merge order.
    # Bytes that are not printable ASCII are written <0xXX>, which its decoder turns back into the byte.
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    pieces, scores = [], []
    for new_id, old_id in enumerate(order.tolist()):
        if old_id in names:
            piece, score = names[old_id].encode("utf-8"), -1e9
        elif old_id < tokenizer.vocab_size:
            piece = tokenizer.decode_bytes([old_id])
            if len(piece) == 1 and not 32 <= piece[0] < 127:
                piece = f"<0x{piece[0]:02X}>".encode("ascii")
            score = -float(old_id)
        else:
            piece, score = f"<unused{old_id}>".encode("ascii"), -1e9  # model rows beyond the tokenizer
        pieces.append(piece)
        scores.append(score)
    with open(tokenizer_path, "wb") as f:
        f.write(struct.pack("<i", max(map(len, pieces))))
        for piece, score in zip(pieces, scores):
            f.write(struct.pack("<fi", score, len(piece)) + piece)
    return order



# ----------------------------------------------------------------------------------------------------
# Hugging Face folder and bare safetensors


def write_json(path, d):
    write_atomically(path, lambda f: f.write((json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode("utf-8")))


def write_hf(model, tokenizer, folder):
    """A folder that transformers' AutoModelForCausalLM / AutoTokenizer load with the same logits and ids."""
    os.makedirs(folder, exist_ok=True)
    config = hf_config(model.args, tokenizer)
    write_json(os.path.join(folder, "config.json"), config)
    write_json(os.path.join(folder, "generation_config.json"),
               {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    write_safetensors({name: t.float() for name, t in hf_state_dict(model).items()},
                      os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tokenizer_json, tokenizer_config = hf_tokenizer_files(tokenizer, model.args.max_seq_len)
    write_json(os.path.join(folder, "tokenizer.json"), tokenizer_json)
    write_json(os.path.join(folder, "tokenizer_config.json"), tokenizer_config)


def write_bare_safetensors(model, tokenizer, checkpoint, path):
    """Our weights under our names; the model arguments and the tokenizer ride along in the metadata."""
    write_model_safetensors(model, tokenizer, path, checkpoint.get("data_format", "text"),
                            checkpoint.get("iter_num", 0))


def write_npz(model, tokenizer, checkpoint, path):
    """Our weights as float32 arrays under our names, and the model arguments and tokenizer as strings (0-d
    unicode arrays, which np.load reads without pickle), written atomically."""
    arrays = {name: t.detach().float().cpu().numpy() for name, t in model.state_dict().items()
              if not (name == "output.weight" and model.args.tie_embeddings)}  # a tied head is the embedding
    metadata = {"format": "nanollama", "model_args": json.dumps(asdict(model.args)),
                "tokenizer": tokenizer.to_json(), "tokenizer_sha256": tokenizer.sha256,
                "data_format": checkpoint.get("data_format", "text"),
                "iter_num": str(checkpoint.get("iter_num", 0))}
    # weight names all have a dot, these none: they never clash
    arrays.update({key: np.array(value) for key, value in metadata.items()})
    write_atomically(path, lambda f: np.savez(f, **arrays))


# ----------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    try:
        configure(globals())
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if quantize not in ("", "fp32", "int8"):
        sys.exit(f"error: --quantize={quantize!r}: expected '' (float32) or 'int8'")
    if format not in ("run", "hf", "safetensors", "npz"):
        sys.exit(f"error: --format={format!r}: expected run (run.c's files), hf (a Hugging Face folder), "
                 "safetensors or npz (NumPy, for run_numpy.py)")
    try:
        model, tokenizer, checkpoint = load_checkpoint(ckpt)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    args = model.args
    check_finite(model, ckpt)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if format == "hf":
        out = out or "hf_model"
        write_hf(model, tokenizer, out)
        print(f"wrote {out}/: config.json, model.safetensors ({n_params / 1e6:.2f}M parameters, float32), "
              f"tokenizer.json, tokenizer_config.json ({tokenizer.chat_format} chat format); load it with "
              f"transformers' AutoModelForCausalLM.from_pretrained({out!r})")
        sys.exit(0)
    if format == "safetensors":
        out = out or "model.safetensors"
        write_bare_safetensors(model, tokenizer, checkpoint, out)
        print(f"wrote {out}: {n_params / 1e6:.2f}M parameters, float32, model arguments and tokenizer in its metadata")
        sys.exit(0)
    if format == "npz":
        out = out or "model.npz"
        write_npz(model, tokenizer, checkpoint, out)
        mode = " --mode=chat" if checkpoint.get("data_format") == "chat" else ""  # run_numpy.py's settings
        print(f"wrote {out}: {n_params / 1e6:.2f}M parameters, float32, model arguments and tokenizer inside; "
              f"run it without torch: python run_numpy.py {out}{mode} --prompt=\"Hello\"")
        sys.exit(0)
    out = out or "model.bin"
    weight_type = 1 if quantize == "int8" else 0
    group = choose_group_size(args, group_size) if weight_type else 0
    file_size, max_error = write_model(model, tokenizer, out, weight_type, group)
    kind = f"int8, group size {group}, max abs rounding error {max_error:.2e}" if weight_type else "float32"
    print(f"wrote {out}: {n_params / 1e6:.2f}M parameters, {kind}, {file_size / 1e6:.1f} MB")
    if tokenizer_out:
        write_tokenizer(tokenizer, tokenizer_out)
        print(f"wrote {tokenizer_out}: {tokenizer.vocab_size} tokens ({len(tokenizer.special_tokens)} special)")
    if legacy:
        write_legacy(model, tokenizer, legacy_out, legacy_tokenizer_out)
        print(f"wrote {legacy_out} and {legacy_tokenizer_out} for llama2.c's run.c "
              f"(ids remapped: <|bos|> is 1, byte b is 3 + b)")
    tokenizer_file = tokenizer_out or "tokenizer.bin"
    if checkpoint.get("data_format") == "chat":
        # an imported ChatML template's default system message (in the tokenizer file too: ./run uses it without -y)
        system = f" -y {shlex.quote(tokenizer.default_system)}" if tokenizer.default_system else ""
        print(f"a chat model ({tokenizer.chat_format} chat format): ./run {out} -z {tokenizer_file} -m chat{system}")
    else:
        print(f"run it: ./run {out} -z {tokenizer_file} -i \"Once upon a time\"")
