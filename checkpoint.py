"""
Checkpoints and weight files in and out, for every stage: our .pt checkpoints (written atomically, read with
weights_only=True), safetensors files, and Hugging Face model folders (names and RoPE layouts mapped to ours).

    model, tokenizer, checkpoint = load_checkpoint("out/sft/best.pt")    # the one way to load a model for use
    load_checkpoint("hf:HuggingFaceTB/SmolLM2-135M-Instruct")             # a Hugging Face folder or Hub id

A checkpoint is a plain dict (see docs/formats.md): model_args, model (or LoRA adapters and their base),
tokenizer, tokenizer_sha256, config, data_format, and for ckpt.pt the training state.
"""

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import asdict, fields

import torch

from common import file_sha256
from model import ModelArgs, Transformer, apply_lora, merge_lora
from tokenizer import Tokenizer, hf_folder, read_json_file

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

    def flush(self):
        self.f.flush()


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


def checkpoint_sha256(path):
    """sha256 of a checkpoint file; of an 'hf:DIR' folder, the sha256 of its config's and weight files' sha256s."""
    if path.startswith("hf:"):
        folder = hf_folder(path[len("hf:"):])
        names = ["config.json"] + sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        return hashlib.sha256("".join(file_sha256(os.path.join(folder, n)) for n in names).encode()).hexdigest()
    return file_sha256(path)



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
    return {"model_args": asdict(args), "model": state, "tokenizer": tokenizer.to_json(),
            "tokenizer_sha256": tokenizer.sha256, "iter_num": 0,
            "data_format": "text" if tokenizer.chat_format == "none" else "chat",
            "config": {"init_from": f"hf:{folder}"}}


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
    'hf:DIR' (a Hugging Face model folder) and our own .safetensors export, as checkpoints of the same shape.
    """
    if path.startswith("hf:"):
        return read_hf_checkpoint(path[len("hf:"):])
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
    prefix = "hf:" if base.startswith("hf:") else ""  # a Hugging Face folder: 'hf:' + its path
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
    it): the base's absolute path ('hf:' + the folder of an imported model or Hub id), the same path relative
    to out_dir (a folder moved together with its base still finds it), and the base's sha256. A new adapter
    run passes the base as given (it is resolved and hashed here); a resumed one its recorded path and sha256.
    """
    prefix = "hf:" if base.startswith("hf:") else ""
    path = base[len(prefix):]
    if sha256 is None:
        path = os.path.abspath(hf_folder(path) if prefix else path)
        sha256 = checkpoint_sha256(prefix + path)
    relative = os.path.relpath(path, os.path.abspath(out_dir))
    return {"base_checkpoint": prefix + path, "base_checkpoint_relative": prefix + relative, "base_sha256": sha256}

def build_model(checkpoint, path, device="cpu"):
    """
    The model a checkpoint describes. A LoRA checkpoint is applied on its verified base model and left
    unmerged (for training); load_checkpoint merges it.
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
        apply_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
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
    Full checkpoints and LoRA adapter checkpoints alike (adapters are merged into the weights).
    """
    checkpoint = read_checkpoint(path, device)
    model = merge_lora(build_model(checkpoint, path, device)).eval()
    tokenizer = Tokenizer.from_json(checkpoint["tokenizer"])
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}")
    return model, tokenizer, checkpoint

