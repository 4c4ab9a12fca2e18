"""
Checkpoints and weight files in and out, for every stage: our .pt checkpoints (written atomically, read with
weights_only=True), safetensors files, Hugging Face model folders (names and RoPE layouts mapped to ours) and
GGUF files (llama.cpp's format, dequantized to float32).

    model, tokenizer, checkpoint = load_checkpoint("out/sft/best.pt")    # the one way to load a model for use
    load_checkpoint("hf:HuggingFaceTB/SmolLM2-135M-Instruct")             # a Hugging Face folder or Hub id
    load_checkpoint("gguf:SmolLM2-135M-Instruct.Q4_1.gguf")               # a GGUF file (llama.cpp's format)

A checkpoint is a plain dict (see docs/formats.md): model_args, model (or LoRA adapters and their base),
tokenizer, tokenizer_sha256, config, data_format, and for ckpt.pt the training state.
"""

import hashlib
import json
import math
import mmap
import os
import re
import struct
from dataclasses import asdict, fields

import numpy as np
import torch

from common import file_sha256
from model import ModelArgs, Transformer, apply_lora, merge_lora
from tokenizer import Tokenizer, gguf_tokenizer_args, hf_folder, read_json_file

# ----------------------------------------------------------------------------------------------------
# .pt checkpoints


def save_checkpoint(checkpoint, path):
    """torch.save, atomically: a crash or kill mid-save leaves the old file."""
    write_atomically(path, lambda f: torch.save(checkpoint, f))


class RecordingFile:
    """A file that remembers the OSError of a failed write: torch.save reports a disk that filled up as
    'unexpected pos 704 vs 598', so the real cause (No space left on device) would be lost."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):  # everything else (tell, seek, read: zipfile needs them) is the file's own
        return getattr(self.f, name)


def write_atomically(path, write):
    """
    write(f) into a temporary file (path.tmp<pid>), fsync, then rename it to path: readers see the old file
    or the new one. A write that fails (a full disk) removes the temporary file and raises OSError naming
    path and the cause; path itself is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    f = None
    try:
        with open(tmp_path, "wb") as raw:
            f = RecordingFile(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:  # Ctrl-C mid-save too: no temporary file is left behind
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        cause = (f.error if f is not None else None) or (e if isinstance(e, OSError) else None)
        if cause is None:
            raise
        reason = cause.strerror or str(cause)
        raise OSError(f"could not write {path}: {reason} ({path} itself is unchanged)") from e
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


STALE_TEMPORARY = re.compile(r".+\.tmp(\d+)$")  # write_atomically's path.tmp<pid>


def remove_stale_temporary_files(directory):
    """
    Remove the temporary files of saves that never finished (the process was killed: SIGKILL, a power cut)
    from directory; a file whose process still runs is left alone. Returns the names removed.
    """
    removed = []
    for name in sorted(os.listdir(directory)):
        match = STALE_TEMPORARY.fullmatch(name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            pass
        except PermissionError:  # it exists, and belongs to someone else
            continue
        os.remove(os.path.join(directory, name))
        removed.append(name)
    return removed
def checkpoint_prefix(path):
    """'hf:' (a Hugging Face folder or Hub id) or 'gguf:' (a GGUF file) for an imported model, else ''."""
    return next((prefix for prefix in ("hf:", "gguf:") if path.startswith(prefix)), "")


def absolute_checkpoint_path(path):
    """path made absolute, its 'hf:' or 'gguf:' kept in front (a Hub id becomes its downloaded folder)."""
    prefix = checkpoint_prefix(path)
    location = hf_folder(path[len(prefix):]) if prefix == "hf:" else path[len(prefix):]
    return prefix + os.path.abspath(location)


def checkpoint_sha256(path):
    """sha256 of a checkpoint file; of an 'hf:DIR' folder, the sha256 of its config's and weight files' sha256s."""
    if path.startswith("hf:"):
        folder = hf_folder(path[len("hf:"):])
        names = ["config.json"] + sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        return hashlib.sha256("".join(file_sha256(os.path.join(folder, n)) for n in names).encode()).hexdigest()
    return file_sha256(path[len(checkpoint_prefix(path)):])


# ----------------------------------------------------------------------------------------------------
# safetensors and Hugging Face model folders
#
# A .safetensors file: 8 bytes (little-endian u64) giving the length of a JSON header, the header
# ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the raw
# little-endian tensor bytes. Nothing in it can run code. Read and written here without the safetensors
# package: the format is that small.

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path):
    """({name: tensor}, metadata) of a .safetensors file, with an error naming the file when it is malformed."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_len is None or 8 + header_len > size:
            raise ValueError(f"{path}: not a safetensors file (truncated, or the header length is wrong)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
        metadata = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, entry in header.items():
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise ValueError(f"{path}: tensor {name}: dtype {entry.get('dtype')} is not supported")
            begin, end = entry["data_offsets"]
            expected = math.prod(entry["shape"]) * torch.empty((), dtype=dtype).element_size()
            if end - begin != expected:
                raise ValueError(f"{path}: tensor {name}: {end - begin} bytes, but its dtype and shape need {expected} "
                                 "(corrupt header)")
            if 8 + header_len + end > size:
                raise ValueError(f"{path}: tensor {name} ends at byte {8 + header_len + end} of a {size}-byte file "
                                 "(truncated: download or copy it again)")
            f.seek(8 + header_len + begin)
            tensors[name] = torch.frombuffer(bytearray(f.read(expected)), dtype=dtype).reshape(entry["shape"]) \
                if expected else torch.empty(entry["shape"], dtype=dtype)
    return tensors, metadata


def write_safetensors(tensors, path, metadata=None):
    """{name: tensor} (+ string metadata) -> a .safetensors file, written atomically."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    header_bytes = json.dumps(header).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned

    def write(f):
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for t in tensors.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    write_atomically(path, write)


# Hugging Face's Llama layout, by our names: model.layers.N.self_attn.q_proj.weight is layers.N.attention.wq.weight
HF_LAYER_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
                  "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
                  "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
                  "post_attention_layernorm": "ffn_norm"}
HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "output.weight"}


def hf_name_to_ours(name):
    if name in HF_TOP_NAMES:
        return HF_TOP_NAMES[name]
    parts = name.split(".")  # model.layers.N.<module>.<submodule>.weight|bias
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        module = ".".join(parts[3:-1])
        if module in HF_LAYER_NAMES:
            return f"layers.{parts[2]}.{HF_LAYER_NAMES[module]}.{parts[-1]}"
    return None


def rope_halves_to_pairs(w, n_heads):
    """
    Rows of a q/k projection from Hugging Face's RoPE layout (each head rotates dimension i with i + head_dim/2)
    to ours (it rotates 2i with 2i+1): row i goes to 2i, row i + head_dim/2 to 2i+1. q.k is unchanged because
    q and k are permuted alike. Works on weights (rows, dim) and biases (rows,).
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_pairs_to_halves(w, n_heads):
    """The inverse of rope_halves_to_pairs, for exports that transformers reads."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_model_args(config, path):
    """config.json of a LlamaForCausalLM or Qwen2ForCausalLM -> ModelArgs, refusing what model.py does not run."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "qwen2"):
        raise ValueError(f"{path}: model_type {model_type!r}: only Llama-family models (llama, qwen2) can be imported")
    if config.get("hidden_act", "silu") != "silu" or config.get("mlp_bias"):
        raise ValueError(f"{path}: hidden_act {config.get('hidden_act')!r} / mlp_bias: model.py's SwiGLU is silu without biases")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise ValueError(f"{path}: use_sliding_window=true: sliding-window attention is not implemented")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{path}: head_dim {config['head_dim']} differs from hidden_size / num_attention_heads "
                         f"= {dim // n_heads}; model.py needs them equal")
    scaling = {}
    rope_scaling = config.get("rope_scaling") or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "llama3":
        scaling = {"rope_scaling": float(rope_scaling["factor"]),
                   "rope_low_freq_factor": float(rope_scaling["low_freq_factor"]),
                   "rope_high_freq_factor": float(rope_scaling["high_freq_factor"]),
                   "rope_original_max_seq_len": int(rope_scaling["original_max_position_embeddings"])}
    elif rope_type != "default":
        raise ValueError(f"{path}: rope_scaling type {rope_type!r} is not implemented (plain RoPE and 'llama3' are)")
    return ModelArgs(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
                     hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
                     rope_theta=float(config.get("rope_theta", 10000.0)),
                     max_seq_len=config.get("max_position_embeddings", 2048),
                     tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                     attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)), **scaling)


def read_hf_checkpoint(folder):
    """
    A Hugging Face model folder (config.json, model.safetensors or its shards with model.safetensors.index.json,
    tokenizer.json, tokenizer_config.json) as a checkpoint dict like train.py's: weights renamed and their
    RoPE rows reordered for model.py, in float32; the tokenizer with the model's own chat format.
    """
    folder = hf_folder(folder)
    config_path = os.path.join(folder, "config.json")
    args = hf_model_args(read_json_file(config_path), config_path)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        shards = sorted(set(read_json_file(index_path)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors (or model.safetensors.index.json); pytorch_model.bin "
                                "files are pickles and are not read")
    state = {}
    for shard in shards:
        tensors, _ = read_safetensors(os.path.join(folder, shard))
        for name, tensor in tensors.items():
            ours = hf_name_to_ours(name)
            if ours is None:
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a cached RoPE table some older exports carry
                raise ValueError(f"{folder}/{shard}: unexpected tensor {name} (not part of a Llama/Qwen2 model)")
            if ours == "output.weight" and args.tie_embeddings:
                continue  # the same matrix as the embedding
            tensor = tensor.float()
            if ".attention.wq." in ours:
                tensor = rope_halves_to_pairs(tensor, args.n_heads)
            elif ".attention.wk." in ours:
                tensor = rope_halves_to_pairs(tensor, args.n_kv_heads)
            state[ours] = tensor
    tokenizer = Tokenizer.from_hf(folder)
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's vocab_size "
                         f"is {args.vocab_size}")
    return imported_checkpoint(args, state, tokenizer, f"hf:{folder}")


def imported_checkpoint(args, state, tokenizer, source):
    """The checkpoint dict of an imported model (hf: or gguf:), shaped like one train.py writes at step 0."""
    return {"model_args": asdict(args), "model": state, "tokenizer": tokenizer.to_json(),
            "tokenizer_sha256": tokenizer.sha256, "iter_num": 0,
            "data_format": "text" if tokenizer.chat_format == "none" else "chat",
            "config": {"init_from": source}}


def hf_config(args, tokenizer):
    """config.json for transformers: LlamaForCausalLM, or Qwen2ForCausalLM when the model has attention biases."""
    model_type = "qwen2" if args.attention_bias else "llama"
    config = {"architectures": ["Qwen2ForCausalLM" if args.attention_bias else "LlamaForCausalLM"],
              "model_type": model_type, "hidden_size": args.dim, "intermediate_size": args.hidden_dim,
              "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
              "num_key_value_heads": args.n_kv_heads, "head_dim": args.dim // args.n_heads,
              "vocab_size": args.vocab_size, "max_position_embeddings": args.max_seq_len,
              "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "tie_word_embeddings": args.tie_embeddings,
              "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
              "torch_dtype": "float32", "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.assistant_end_id}
    if model_type == "llama":
        config.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    else:
        config.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": args.n_layers})
    config["rope_scaling"] = None if not args.rope_scaling else {
        "rope_type": "llama3", "factor": args.rope_scaling, "low_freq_factor": args.rope_low_freq_factor,
        "high_freq_factor": args.rope_high_freq_factor, "original_max_position_embeddings": args.rope_original_max_seq_len}
    return config


def hf_state_dict(model):
    """Our weights under Hugging Face's names, q/k rows back in its RoPE layout (a tied head is left out)."""
    ours_to_hf = {ours: hf for hf, ours in HF_TOP_NAMES.items()}
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "output.weight" and model.args.tie_embeddings:
            continue
        if name in ours_to_hf:
            state[ours_to_hf[name]] = tensor
            continue
        parts = name.split(".")  # layers.N.attention.wq.weight, layers.N.ffn_norm.weight
        module = ".".join(parts[2:-1])
        hf_module = next(hf for hf, o in HF_LAYER_NAMES.items() if o == module)
        if module == "attention.wq":
            tensor = rope_pairs_to_halves(tensor, model.args.n_heads)
        elif module == "attention.wk":
            tensor = rope_pairs_to_halves(tensor, model.args.n_kv_heads)
        state[f"model.layers.{parts[1]}.{hf_module}.{parts[-1]}"] = tensor
    return state


# ----------------------------------------------------------------------------------------------------
# GGUF files (llama.cpp's format): how most open weights reach CPUs
#
# Read here with numpy rather than with the gguf package: the format is small (below), the package's reader
# takes ~100 s on SmolLM2's metadata where this one takes well under a second, and no dependency is added.
#
#   magic "GGUF", uint32 version (2 or 3), uint64 tensor count, uint64 metadata count      all little-endian
#   metadata: count x (string key, uint32 value type, value); a string is uint64 length + UTF-8 bytes, an array
#             uint32 element type + uint64 count + elements
#   tensor table: count x (string name, uint32 n_dims, uint64 dims[n_dims] innermost first, uint32 ggml type,
#             uint64 offset from the start of the data)
#   data: from the end of the table rounded up to general.alignment (default 32); each tensor at its offset
#
# A tensor of a quantized type is a row of blocks, each block a fixed number of values with its own scales.
# dequantize() turns every type below into float32 with numpy, all blocks of a tensor at once.

GGUF_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                11: "<i8", 12: "<f8"}
GGUF_STRING, GGUF_ARRAY = 8, 9

# ggml type -> (name, values per block, the block as a numpy record). The K-quants pack 256 values in a
# super-block of 8 (Q4_K, Q5_K: 32 values each, 6-bit scales and mins) or 16 (Q6_K: 16 values, int8 scales)
# sub-blocks, themselves scaled by the float16 d (and dmin for the mins).
GGML_TYPES = {
    0: ("F32", 1, np.dtype("<f4")),
    1: ("F16", 1, np.dtype("<f2")),
    30: ("BF16", 1, np.dtype("<u2")),
    8: ("Q8_0", 32, np.dtype([("d", "<f2"), ("qs", "i1", 32)])),
    2: ("Q4_0", 32, np.dtype([("d", "<f2"), ("qs", "u1", 16)])),
    3: ("Q4_1", 32, np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])),
    12: ("Q4_K", 256, np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])),
    13: ("Q5_K", 256, np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32),
                                ("qs", "u1", 128)])),
    14: ("Q6_K", 256, np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])),
}
# names of the types this reader does not dequantize, for the error message
GGML_OTHER_TYPES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS",
                    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
                    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0",
                    35: "TQ2_0"}


def read_gguf(path):
    """
    (metadata, tensors) of a GGUF file: metadata {key: value} (arrays as lists, numeric arrays as numpy
    arrays), tensors {name: (ggml type, shape outermost first, raw bytes: a read-only uint8 array on the mapped
    file)}. Nothing is dequantized yet; errors name the file and what is wrong.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path} not found")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""
    size, pos = len(buf), 0

    def take(n, what):
        nonlocal pos
        if pos + n > size:
            raise ValueError(f"{path}: truncated GGUF file ({what} runs past the end at byte {size})")
        pos += n
        return pos - n

    def scalar(fmt, what="metadata"):
        return struct.unpack_from(fmt, buf, take(struct.calcsize(fmt), what))[0]

    def string(what="metadata"):
        n = scalar("<Q", what)
        start = take(n, what)
        return buf[start:start + n].decode("utf-8", errors="replace")

    def value(kind, key):
        if kind in GGUF_SCALARS:
            dtype = np.dtype(GGUF_SCALARS[kind])
            return np.frombuffer(buf, dtype, 1, take(dtype.itemsize, f"metadata {key}"))[0].item()
        if kind == GGUF_STRING:
            return string(f"metadata {key}")
        if kind == GGUF_ARRAY:
            element, count = scalar("<I"), scalar("<Q")
            if element in GGUF_SCALARS:  # numbers: one slice of the file
                dtype = np.dtype(GGUF_SCALARS[element])
                return np.frombuffer(buf, dtype, count, take(count * dtype.itemsize, f"metadata {key}"))
            return [value(element, key) for _ in range(count)]
        raise ValueError(f"{path}: metadata {key} has value type {kind}, not one of GGUF's (0 to 12)")

    if buf[take(4, "header"):4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    version = scalar("<I", "header")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise ValueError(f"{path}: GGUF version {version}{hint}; this reader reads versions 2 and 3")
    n_tensors, n_metadata = scalar("<Q", "header"), scalar("<Q", "header")
    metadata = {}
    for _ in range(n_metadata):
        key = string()
        metadata[key] = value(scalar("<I", f"metadata {key}"), key)
    infos = []
    for _ in range(n_tensors):
        name = string("tensor table")
        n_dims = scalar("<I", "tensor table")
        dims = [scalar("<Q", "tensor table") for _ in range(n_dims)]
        infos.append((name, scalar("<I", "tensor table"), dims[::-1], scalar("<Q", "tensor table")))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = pos + (-pos % alignment)
    tensors = {}
    for name, ggml_type, shape, offset in infos:
        if ggml_type not in GGML_TYPES:
            kind = GGML_OTHER_TYPES.get(ggml_type, f"type {ggml_type}")
            raise ValueError(f"{path}: tensor {name} is {kind}, a type this reader does not dequantize "
                             "(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)")
        type_name, block_values, block = GGML_TYPES[ggml_type]
        n_values = math.prod(shape)
        if shape and shape[-1] % block_values:
            raise ValueError(f"{path}: tensor {name}: rows of {shape[-1]} values do not fill {type_name} "
                             f"blocks of {block_values}")
        begin, n_bytes = data_start + offset, n_values // block_values * block.itemsize
        if begin + n_bytes > size:
            raise ValueError(f"{path}: tensor {name} ends at byte {begin + n_bytes} of a {size}-byte file "
                             "(truncated: download or copy it again)")
        tensors[name] = (ggml_type, shape, np.frombuffer(buf, np.uint8, n_bytes, begin))
    return metadata, tensors


def dequantize(ggml_type, shape, raw):
    """A GGUF tensor's raw bytes -> float32 numpy array of shape."""
    name, _, block = GGML_TYPES[ggml_type]
    b = raw.view(block)  # one record per block (a plain number for F32, F16, BF16)
    n = len(b)
    # the quantized values go straight into the float32 result, which is then scaled in place: the fewest
    # passes over ~100M values (3x faster than building the same with temporaries)
    if name in ("F32", "F16"):
        values = b.astype(np.float32)
    elif name == "BF16":  # the top half of a float32
        values = (b.astype(np.uint32) << 16).view(np.float32)
    elif name == "Q8_0":  # d * q, q int8
        values = b["qs"].astype(np.float32)
        values *= b["d"].astype(np.float32)[:, None]
    elif name in ("Q4_0", "Q4_1"):  # byte j holds value j (low nibble) and value j + 16 (high nibble)
        values = np.empty((n, 2, 16), np.float32)
        values[:, 0], values[:, 1] = b["qs"] & 0xF, b["qs"] >> 4
        values = values.reshape(n, 32)
        if name == "Q4_0":  # d * (q - 8)
            values -= 8
            values *= b["d"].astype(np.float32)[:, None]
        else:  # d * q + m
            values *= b["d"].astype(np.float32)[:, None]
            values += b["m"].astype(np.float32)[:, None]
    elif name in ("Q4_K", "Q5_K"):  # d * scale * q - dmin * min, per sub-block of 32
        scale, minimum = k_quant_scales_and_mins(b)  # (blocks, 8) each
        # 4 groups of 32 bytes: low nibbles are sub-block 2i, high nibbles 2i+1
        qs = b["qs"].reshape(n, 4, 32)
        values = np.empty((n, 4, 2, 32), np.float32)
        if name == "Q4_K":
            values[:, :, 0], values[:, :, 1] = qs & 0xF, qs >> 4
        else:  # the fifth bit of value l of sub-block j is bit j of qh[l]
            bit = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
            high = ((b["qh"][:, None, None, :] >> bit) & 1) << 4  # (blocks, 4, 2, 32)
            values[:, :, 0], values[:, :, 1] = (qs & 0xF) | high[:, :, 0], (qs >> 4) | high[:, :, 1]
        values = values.reshape(n, 8, 32)
        values *= scale[:, :, None]
        values -= minimum[:, :, None]
    elif name == "Q6_K":
        # two halves of 128 values; in half h, value 32k + l (k = 0..3) takes its low 4 bits from ql[64h + l]
        # (k = 0, 2) or ql[64h + 32 + l] (k = 1, 3), the low nibble for k < 2 and the high one for k >= 2, and
        # its top 2 bits from bits 2k, 2k+1 of qh[32h + l]; it is stored minus 32. Sub-block (h, k, l // 16) of
        # 16 values has the scale scales[8h + 2k + l // 16].
        ql = b["ql"].reshape(n, 2, 2, 32)  # (blocks, half, ql group, l)
        shift = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
        high = ((b["qh"].reshape(n, 2, 1, 32) >> shift) & 3) << 4  # (blocks, half, k, l)
        values = np.empty((n, 2, 4, 32), np.float32)
        values[:, :, 0:2] = (ql & 0xF) | high[:, :, 0:2]  # k = 0, 1: low nibbles of groups 0, 1
        values[:, :, 2:4] = (ql >> 4) | high[:, :, 2:4]  # k = 2, 3: high nibbles
        values -= 32
        values = values.reshape(n, 2, 4, 2, 16)
        values *= (b["d"].astype(np.float32)[:, None] * b["scales"]).reshape(n, 2, 4, 2, 1)
    return values.reshape(shape)


def k_quant_scales_and_mins(b):
    """
    Q4_K and Q5_K: the 12 scale bytes hold 8 six-bit scales and 8 six-bit mins. Sub-blocks 0-3: the low 6 bits
    of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7: the nibbles of bytes 8-11 (low: scale, high: min)
    with the top 2 bits of bytes 0-3 (scales) and 4-7 (mins) above them. Returns d * scale and dmin * min.
    """
    s = b["scales"]
    scale = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    minimum = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return (b["d"].astype(np.float32)[:, None] * scale, b["dmin"].astype(np.float32)[:, None] * minimum)


# GGUF's tensor names, by ours: blk.N.attn_q.weight is layers.N.attention.wq.weight
GGUF_LAYER_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
                    "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3",
                    "ffn_down": "feed_forward.w2", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
GGUF_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "output.weight"}


def gguf_model_args(metadata, tensors, path):
    """A GGUF file's llama or qwen2 hyperparameters -> ModelArgs, refusing what model.py does not run."""
    arch = metadata.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: general.architecture is {arch!r}; only llama and qwen2 can be imported")

    def get(key, default=None):
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata has no {arch}.{key}")
        if not isinstance(value, (int, float)):
            raise ValueError(f"{path}: {arch}.{key} is not one number (per-layer values are not supported)")
        return value

    dim, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = dim // n_heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, head_dim) != head_dim:
            raise ValueError(f"{path}: {arch}.{key} is {get(key)}, but model.py needs embedding_length / "
                             f"head_count = {head_dim}")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: scaled RoPE ({'rope_freqs' if scaling == 'none' else scaling}) is not "
                         "implemented for GGUF files; import the model's Hugging Face folder (hf:DIR) instead")
    vocab_size = metadata.get(f"{arch}.vocab_size") or (tensors["token_embd.weight"][1][0]
                                                       if "token_embd.weight" in tensors else 0)
    return ModelArgs(dim=dim, n_layers=get("block_count"), n_heads=n_heads,
                     n_kv_heads=get("attention.head_count_kv", n_heads), vocab_size=vocab_size,
                     hidden_dim=get("feed_forward_length"), norm_eps=get("attention.layer_norm_rms_epsilon"),
                     rope_theta=float(get("rope.freq_base", 10000.0)), max_seq_len=get("context_length"),
                     tie_embeddings="output.weight" not in tensors,
                     attention_bias=any(name.endswith("attn_q.bias") for name in tensors))


def read_gguf_checkpoint(path):
    """
    A GGUF file (llama or qwen2) as a checkpoint dict like read_hf_checkpoint's: weights dequantized to float32
    under our names, the tokenizer from the file's metadata with the model's own chat format. llama.cpp stores
    Llama's q/k rows in the interleaved RoPE layout model.py uses, Qwen2's in Hugging Face's (rotated halves).
    """
    metadata, tensors = read_gguf(path)
    args = gguf_model_args(metadata, tensors, path)
    state = {}
    for name, (ggml_type, shape, raw) in tensors.items():
        parts = name.split(".")  # blk.N.attn_q.weight
        if name in GGUF_TOP_NAMES:
            ours = GGUF_TOP_NAMES[name]
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LAYER_NAMES:
            ours = f"layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
        else:
            raise ValueError(f"{path}: unexpected tensor {name} (not part of a llama/qwen2 model)")
        tensor = torch.from_numpy(dequantize(ggml_type, shape, raw))
        if metadata["general.architecture"] == "qwen2" and ".attention.wq." in ours:
            tensor = rope_halves_to_pairs(tensor, args.n_heads)
        elif metadata["general.architecture"] == "qwen2" and ".attention.wk." in ours:
            tensor = rope_halves_to_pairs(tensor, args.n_kv_heads)
        state[ours] = tensor
    tokenizer = Tokenizer(**gguf_tokenizer_args(metadata, path))
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size "
                         f"is {args.vocab_size}")
    return imported_checkpoint(args, state, tokenizer, f"gguf:{path}")


def model_args_from_dict(d, source="checkpoint"):
    known = {f.name for f in fields(ModelArgs)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{source}: unknown model arguments {sorted(unknown)}; expected some of {sorted(known)}")
    return ModelArgs(**d)


def load_state_dict_checked(model, state_dict, source):
    """
    load_state_dict with an error that names the mismatched tensors and their shapes. A tied head may be left
    out (safetensors files store the shared matrix once, under the embedding's name).
    """
    if model.args.tie_embeddings and "output.weight" not in state_dict and "tok_embeddings.weight" in state_dict:
        state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong_shape = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        lines = [f"{source}: weights do not match the model shape"]
        if wrong_shape:
            lines.append("  wrong shape: " + "; ".join(wrong_shape[:5]))
        if missing:
            lines.append(f"  missing: {missing[:5]}")
        if unexpected:
            lines.append(f"  unexpected: {unexpected[:5]}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict)


def write_model_safetensors(model, tokenizer, path, data_format="text", iter_num=0):
    """
    A model as one .safetensors file, written atomically: our weights under our names (a tied head is stored
    once, as the embedding), and in its metadata what read_checkpoint needs to rebuild it: the model
    arguments, the tokenizer, the data format and the step (docs/formats.md). Merge LoRA adapters first.
    """
    state = {name: t for name, t in model.state_dict().items()
             if not (name == "output.weight" and model.args.tie_embeddings)}
    metadata = {"format": "nanollama", "model_args": json.dumps(asdict(model.args)),
                "tokenizer": tokenizer.to_json(), "tokenizer_sha256": tokenizer.sha256,
                "data_format": data_format, "iter_num": str(iter_num)}
    write_safetensors(state, path, metadata)


def read_checkpoint(path, device="cpu"):
    """
    torch.load with weights_only=True (no code in a checkpoint can run) and clear errors. Also reads
    'hf:DIR' (a Hugging Face model folder), 'gguf:FILE' (a GGUF file) and our own .safetensors export, as
    checkpoints of the same shape.
    """
    if path.startswith("hf:"):
        return read_hf_checkpoint(path[len("hf:"):])
    if path.startswith("gguf:"):
        return read_gguf_checkpoint(path[len("gguf:"):])
    if path.endswith(".safetensors") and os.path.exists(path):
        tensors, metadata = read_safetensors(path)
        if metadata.get("format") != "nanollama":
            raise ValueError(f"{path}: not written by export.py --format safetensors (no nanollama metadata); "
                             "for a Hugging Face folder use hf:DIR")
        return {"model_args": json.loads(metadata["model_args"]), "model": tensors, "tokenizer": metadata["tokenizer"],
                "tokenizer_sha256": metadata["tokenizer_sha256"], "data_format": metadata["data_format"],
                "iter_num": int(metadata.get("iter_num", 0))}
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found (train.py writes out_dir/ckpt.pt and out_dir/best.pt)")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    required = ("model_args", "tokenizer") + (("adapters",) if "lora" in checkpoint else ("model",))
    for key in required:
        if key not in checkpoint:
            raise ValueError(f"{path}: checkpoint has no '{key}' entry; was it written by train.py?")
    return checkpoint


def find_base_checkpoint(checkpoint, path):
    """
    The base checkpoint an adapter checkpoint was trained on: its recorded path (absolute, or relative to the
    adapter checkpoint's folder), checked against the recorded sha256 so adapters never land on another model.
    """
    base, relative = checkpoint["base_checkpoint"], checkpoint["base_checkpoint_relative"]
    prefix = checkpoint_prefix(base)  # an imported model: 'hf:' or 'gguf:' + its path
    candidates = [base, prefix + os.path.join(os.path.dirname(os.path.abspath(path)), relative[len(prefix):])]
    base_path = next((c for c in candidates if os.path.exists(c[len(prefix):])), None)
    if base_path is None:
        raise FileNotFoundError(f"{path}: its base checkpoint {checkpoint['base_checkpoint']} is gone; LoRA adapters "
                                "need the exact base model they were trained on")
    sha = checkpoint_sha256(base_path)
    if sha != checkpoint["base_sha256"]:
        raise ValueError(f"{path}: adapters were trained on a base checkpoint with sha256 "
                         f"{checkpoint['base_sha256'][:16]}..., but {base_path} has sha256 {sha[:16]}... "
                         "(it was overwritten or retrained); use the original base checkpoint")
    return base_path


def lora_base_entries(base, out_dir, sha256=None):
    """
    What an adapter checkpoint written to out_dir records about its base model (find_base_checkpoint reads
    it): the base's absolute path ('hf:' + the folder or 'gguf:' + the path of an imported model), the same path relative
    to out_dir (a folder moved together with its base still finds it), and the base's sha256. A new adapter
    run passes the base as given (it is resolved and hashed here); a resumed one its recorded path and sha256.
    """
    if sha256 is None:
        base = absolute_checkpoint_path(base)
        sha256 = checkpoint_sha256(base)
    prefix = checkpoint_prefix(base)
    path = base[len(prefix):]
    relative = os.path.relpath(path, os.path.abspath(out_dir))
    return {"base_checkpoint": prefix + path, "base_checkpoint_relative": prefix + relative, "base_sha256": sha256}

def build_model(checkpoint, path, device="cpu"):
    """
    The model a checkpoint describes. A LoRA checkpoint is applied on its verified base model and left
    unmerged (for training); load_checkpoint merges it. A QLoRA checkpoint (lora's base_quantize 'nf4' or
    'int8') quantizes the base again, the same deterministic way, so a resumed run continues exactly.
    """
    args = model_args_from_dict(checkpoint["model_args"], path)
    model = Transformer(args)
    if "lora" in checkpoint:
        base_path = find_base_checkpoint(checkpoint, path)
        base = read_checkpoint(base_path)
        if "lora" in base:
            raise ValueError(f"{base_path}: the base of a LoRA checkpoint must be a full checkpoint")
        load_state_dict_checked(model, base["model"], base_path)
        lora = checkpoint["lora"]
        apply_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"],
                   lora.get("base_quantize", ""))
        load_state_dict_checked(model, {**model.state_dict(), **checkpoint["adapters"]}, path)
    else:
        load_state_dict_checked(model, checkpoint["model"], path)
    return model.to(device)


def checkpoint_in(out_dir):
    """The checkpoint a stage uses when given only a folder: best.pt (lowest val loss), else ckpt.pt (latest)."""
    best = os.path.join(out_dir, "best.pt")
    return best if os.path.exists(best) else os.path.join(out_dir, "ckpt.pt")


def load_checkpoint(path, device="cpu"):
    """
    The one way to load a checkpoint for use: returns (model in eval mode, tokenizer, checkpoint dict).
    Full checkpoints and LoRA adapter checkpoints alike (adapters are merged into the weights). QLoRA
    adapters are merged into the dequantized base: the merged model carries the base's quantization error
    (NF4 or int8), the model the adapters were trained with, not the float base plus the adapters.
    """
    checkpoint = read_checkpoint(path, device)
    model = merge_lora(build_model(checkpoint, path, device)).eval()
    tokenizer = Tokenizer.from_json(checkpoint["tokenizer"])
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}")
    return model, tokenizer, checkpoint

