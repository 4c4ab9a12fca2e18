"""
Train a model: pretraining, midtraining and SFT share this one loop over memmapped token files.

    python train.py config/pretrain_tinystories.py
    python train.py config/pretrain_tinystories.py --batch_size=32 --compile=True
    torchrun --standalone --nproc_per_node=4 train.py config/pretrain_tinystories.py

Every setting below can be changed by a config file or a --key=value override (configurator.py).
"""

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure
from checkpoint import (absolute_checkpoint_path, build_model, checkpoint_prefix, checkpoint_sha256,
                        model_args_from_dict, read_checkpoint, save_checkpoint)
from common import peak_flops, pick_device
from model import (ModelArgs, Transformer, apply_lora, configure_optimizer, count_params, flops_per_token, lora_state_dict)
from data import open_tokens, read_meta
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 200  # evaluate, save ckpt.pt and maybe best.pt every this many steps
log_interval = 10  # print (and log to out_dir/log.jsonl) every this many steps
eval_iters = 20  # batches per split per evaluation
eval_only = False  # evaluate once and exit
keep_all_checkpoints = False  # also write ckpt_<iter>.pt at every evaluation
patience = 0  # stop after this many evaluations without a better val loss; 0 = never
init_from = "scratch"  # 'scratch' | 'resume' (out_dir/ckpt.pt) | a .pt or .safetensors to fine-tune from |
#                       'hf:DIR' a Hugging Face model folder (or Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)
#                       | 'gguf:FILE' a GGUF file (llama.cpp's format)
overwrite = False  # allow a run from scratch to replace an existing out_dir/ckpt.pt
wandb_log = False  # also log to Weights & Biases (works offline with WANDB_MODE=offline)
wandb_project = "nanollama"
wandb_run_name = "run"
# data
data_dir = "data"
data = "tinyshakespeare"  # a prepared source in data_dir, or a weighted mix: 'wikitext:0.5,tinystories:0.5'
#   (text sources: weights are the share of batches; chat sources: weights repeat each conversation per epoch,
#   e.g. 'alpaca,identity:4' sees every identity conversation 4 times per epoch)
batch_size = 16  # sequences per micro-batch
block_size = 256  # tokens per sequence
gradient_accumulation_steps = 1  # micro-batches per step; effective batch = batch_size x this x world size
num_epochs = 0.0  # > 0: train this many passes over the training data (sets max_iters)
# chat data (midtraining, SFT): data_dir/<name>/{split}.mask.bin marks the tokens the model must learn
loss_mask = True  # learn only the assistant's tokens (mask 1); False learns every token of the conversations
overfit_warning_evals = 3  # warn when val loss rose this many evaluations in a row while train loss fell
freeze_embeddings = False  # keep the token embedding (and a head tied to it) fixed while fine-tuning
# LoRA: train low-rank adapters on a frozen model from init_from; checkpoints hold only the adapters
lora_rank = 0  # 0 = off (full fine-tuning)
lora_alpha = 16.0  # adapters are scaled by lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = "q,v"  # any of q, k, v, o (attention), gate, up, down (feed-forward)
# model (ignored when resuming or fine-tuning: the checkpoint decides the shape)
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 0  # 0 = n_heads; fewer = grouped-query attention
hidden_dim = 0  # 0 = llama's rule (about 8/3 x dim)
multiple_of = 32
norm_eps = 1e-5
rope_theta = 10000.0
max_seq_len = 0  # 0 = block_size
dropout = 0.0
tie_embeddings = True
# optimizer (AdamW) and schedule: linear warmup, cosine decay to min_lr, then constant
learning_rate = 1e-3
max_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = no clipping
decay_lr = True
warmup_iters = 100
lr_decay_iters = 0  # 0 = max_iters
min_lr = 1e-4
# system
device = "auto"  # 'auto' (cuda > mps > cpu) | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
dtype = "auto"  # 'auto' | 'float32' | 'bfloat16' | 'float16' (float16 uses a gradient scaler)
compile = False  # torch.compile the model (pays off on GPU; slow to start on CPU)
seed = 1337
deterministic = False  # bitwise-repeatable runs (slower on GPU)
num_threads = 0  # CPU threads for torch; 0 = torch's default (all cores)
# -----------------------------------------------------------------------------------------------------
config = configure(globals())
# -----------------------------------------------------------------------------------------------------

# distributed set-up: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
else:
    rank, local_rank, world_size = 0, 0, 1
master = rank == 0


def log(*args):
    if master:
        print(*args, flush=True)


def fail(message):
    """Stop with a clear message and exit code 1 (no traceback: the message says what to do)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    if ddp and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1)


device = pick_device(device)
if ddp:
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
device_type = device.split(":")[0]
if dtype == "auto":
    dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
if dtype not in ("float32", "bfloat16", "float16"):
    fail(f"dtype={dtype!r}: expected 'auto', 'float32', 'bfloat16' or 'float16'")
ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
if num_threads > 0:
    torch.set_num_threads(num_threads)
torch.manual_seed(seed + rank)
if deterministic:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------------------------------
# data: one or more prepared sources, each data_dir/<name>/{train,val}.bin + meta.json + tokenizer.json


def parse_data_spec(spec):
    """'a' or 'a:0.7,b:0.3' -> [(name, weight)]."""
    sources = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        try:
            weight = float(weight) if weight else 1.0
        except ValueError:
            fail(f"data={spec!r}: weight {weight!r} of source {name!r} is not a number")
        if not name or weight <= 0:
            fail(f"data={spec!r}: expected 'name' or 'name:weight,name:weight' with positive weights")
        sources.append((name, weight))
    return sources


data_sources = parse_data_spec(data)
source_names = [name for name, _ in data_sources]
metas = {}
for name in source_names:
    try:
        metas[name] = read_meta(os.path.join(data_dir, name))
        for split in ("train", "val"):
            open_tokens(os.path.join(data_dir, name), split, metas[name])
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
formats = {metas[name]["format"] for name in source_names}
if len(formats) > 1:
    fail(f"data={data!r} mixes text and chat sources; mix chat data with chat data (or use prepare/mix.py)")
# a model trained on chat data is a chat model: eval.py, chat.py and sample.py read this from the checkpoint
data_format = formats.pop()
tokenizer_shas = {metas[name]["tokenizer_sha256"] for name in source_names}
if len(tokenizer_shas) > 1:
    fail(f"data={data!r}: the sources were prepared with different tokenizers; prepare them with the same one")
data_tokenizer_sha = tokenizer_shas.pop()
tokenizer_path = os.path.join(data_dir, source_names[0], "tokenizer.json")
try:
    tokenizer = Tokenizer.from_file(tokenizer_path)
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
if tokenizer.sha256 != data_tokenizer_sha:
    fail(f"{tokenizer_path} does not match the tokenizer_sha256 in {data_dir}/{source_names[0]}/meta.json")


def to_device(x, y):
    if device_type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# --- text: random windows of block_size + 1 tokens, from a source chosen by weight per batch

text_weights = np.array([w for _, w in data_sources]) / sum(w for _, w in data_sources)
if data_format == "text":
    for name in source_names:
        for split in ("train", "val"):
            n = len(open_tokens(os.path.join(data_dir, name), split, metas[name]))
            if n < block_size + 2:
                fail(f"{data_dir}/{name}/{split}.bin has {n} tokens, too few for block_size={block_size}")


def batch_rng(split, iter_num, micro_step):
    """
    The random generator for one micro-batch, derived from (seed, split, step, global micro-batch index).
    No sampler state to save, so a resumed run draws exactly the batches an uninterrupted one would, and
    DDP rank r's micro-batches are those a single process with world_size x the accumulation would draw.
    """
    global_micro = rank * gradient_accumulation_steps + micro_step
    return np.random.default_rng([seed, {"train": 0, "val": 1}[split], iter_num, global_micro])


def get_text_batch(split, rng, source=None):
    """(x, y) of batch_size random windows of block_size+1 tokens from one source, chosen by weight."""
    if source is None:
        source = source_names[rng.choice(len(source_names), p=text_weights)]
    # a fresh memmap per batch, as nanoGPT does: a long-lived one grows the process's resident memory
    tokens = open_tokens(os.path.join(data_dir, source), split, metas[source])
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    x = torch.from_numpy(np.stack([tokens[i:i + block_size] for i in starts]).astype(np.int64))
    y = torch.from_numpy(np.stack([tokens[i + 1:i + 1 + block_size] for i in starts]).astype(np.int64))
    return to_device(x, y)


# --- chat: whole conversations, one per row, padded to the longest of the batch; the loss only where mask == 1


def conversation_spans(source, split):
    """(starts, lengths) of the conversations of a chat token file: each one begins with <|bos|>."""
    tokens = open_tokens(os.path.join(data_dir, source), split, metas[source])
    starts = np.flatnonzero(tokens == tokenizer.bos_id)
    if len(starts) == 0 or starts[0] != 0:
        fail(f"{data_dir}/{source}/{split}.bin: chat data must start every conversation with <|bos|>")
    return starts, np.diff(np.append(starts, len(tokens)))


def chat_batches_of_epoch(split, epoch):
    """
    The batches of one pass over the chat data: lists of (source index, conversation index). Each source's
    conversations appear weight times (a fraction: a random subset), shuffled, then grouped with conversations
    of similar length so that little of a batch is padding. Deterministic in (seed, split, epoch).
    """
    rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split], epoch])
    items, lengths = [], []
    for s, (name, weight) in enumerate(data_sources):
        n = len(chat_spans[name][split][0])
        repeats = int(weight) if split == "train" else 1
        chosen = list(range(n)) * repeats
        if split == "train" and weight % 1:
            chosen += rng.choice(n, size=round(n * (weight % 1)), replace=False).tolist()
        items += [(s, c) for c in chosen]
        lengths += chat_spans[name][split][1][chosen].tolist()
    order = rng.permutation(len(items)) if split == "train" else np.arange(len(items))
    batches = []
    group = batch_size * 64  # sort by length within groups of 64 batches, keeping the shuffle between groups
    for g in range(0, len(order), group):
        members = sorted(order[g:g + group], key=lambda i: lengths[i])
        batches += [[items[i] for i in members[b:b + batch_size]] for b in range(0, len(members), batch_size)]
    if split == "train":
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def get_chat_batch(conversations, split):
    """(x, y) for a list of (source index, conversation index); y is -1 where nothing is learned or padded."""
    rows = []
    for s, c in conversations:
        name = source_names[s]
        start, length = chat_spans[name][split][0][c], min(chat_spans[name][split][1][c], block_size + 1)
        source_dir = os.path.join(data_dir, name)
        tokens = open_tokens(source_dir, split, metas[name])[start:start + length].astype(np.int64)
        mask = open_tokens(source_dir, split, metas[name], mask=True)[start:start + length]
        targets = tokens[1:].copy()
        if loss_mask:
            targets[mask[1:] == 0] = -1
        rows.append((tokens[:-1], targets))
    width = max(len(x) for x, _ in rows)
    width = min(block_size, -(-width // 8) * 8)  # a multiple of 8 suits the GPU's matmul tiles
    x = torch.zeros((len(rows), width), dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (tokens, targets) in enumerate(rows):
        x[i, :len(tokens)] = torch.from_numpy(tokens)
        y[i, :len(targets)] = torch.from_numpy(targets)
    return to_device(x, y)


chat_epoch_cache = {}


def chat_train_batch(iter_num, micro_step):
    """The step's micro-batch: a pure function of (step, micro-step, rank), like batch_rng for text."""
    index = (iter_num * world_size + rank) * gradient_accumulation_steps + micro_step
    epoch, position = divmod(index, batches_per_epoch)
    if epoch not in chat_epoch_cache:
        chat_epoch_cache.clear()
        chat_epoch_cache[epoch] = chat_batches_of_epoch("train", epoch)
    return get_chat_batch(chat_epoch_cache[epoch][position], "train")


def get_train_batch(iter_num, micro_step):
    if data_format == "chat":
        return chat_train_batch(iter_num, micro_step)
    return get_text_batch("train", batch_rng("train", iter_num, micro_step))


if data_format == "chat":
    if not all(os.path.exists(os.path.join(data_dir, n, f"{sp}.mask.bin")) for n in source_names for sp in ("train", "val")):
        fail(f"data={data!r}: chat data needs {{split}}.mask.bin beside each {{split}}.bin (prepare/chat.py writes both)")
    chat_spans = {name: {split: conversation_spans(name, split) for split in ("train", "val")} for name in source_names}
    first_epoch = chat_batches_of_epoch("train", 0)
    batches_per_epoch = len(first_epoch)
    val_batches = chat_batches_of_epoch("val", 0)
    train_eval_batches = first_epoch[:eval_iters]  # training data, the same batches at every evaluation
    n_conversations = sum(len(chat_spans[n]["train"][0]) for n in source_names)
    n_truncated = sum(int((chat_spans[n]["train"][1] > block_size + 1).sum()) for n in source_names)
    trained = sum(int(open_tokens(os.path.join(data_dir, n), "train", metas[n], mask=True).sum()) for n in source_names)
    total = sum(int(chat_spans[n]["train"][1].sum()) for n in source_names)
    log(f"chat data: {n_conversations:,} conversations ({sum(map(len, first_epoch)):,} per epoch), "
        f"{batches_per_epoch:,} batches per epoch; "
        f"{n_truncated:,} longer than block_size={block_size} are truncated")
    if loss_mask and n_truncated:
        # a conversation cut before its first assistant token trains nothing (a long system prompt can do it)
        untrained = 0
        for n in source_names:
            mask_tokens = open_tokens(os.path.join(data_dir, n), "train", metas[n], mask=True)
            untrained += sum(int(mask_tokens[s:s + min(length, block_size + 1)].sum()) == 0
                             for s, length in zip(*chat_spans[n]["train"]))
        if untrained == n_conversations:
            fail(f"no conversation has an assistant token within block_size={block_size} tokens: nothing would "
                 "train; raise --block_size (a model's default system message can be long)")
        if untrained:
            log(f"warning: {untrained:,} conversations have no assistant token within block_size={block_size}; "
                "they train nothing")
    log(f"loss mask {'ON: the loss counts only the assistant tokens' if loss_mask else 'OFF: the loss counts every token'}"
        f" ({trained if loss_mask else total:,} of {total:,} train tokens)")
    if num_epochs > 0:
        max_iters = math.ceil(num_epochs * batches_per_epoch / (gradient_accumulation_steps * world_size))
elif num_epochs > 0:
    train_tokens = sum(metas[n]["splits"]["train"]["tokens"] for n in source_names)
    max_iters = math.ceil(num_epochs * train_tokens / (batch_size * block_size * gradient_accumulation_steps * world_size))
if num_epochs > 0:
    log(f"num_epochs={num_epochs}: {max_iters} steps")


# -----------------------------------------------------------------------------------------------------
# model, optimizer and state: from scratch, resumed, or initialized from another checkpoint

os.makedirs(out_dir, exist_ok=True) if master else None
ckpt_path = os.path.join(out_dir, "ckpt.pt")
best_ckpt_path = os.path.join(out_dir, "best.pt")
log_path = os.path.join(out_dir, "log.jsonl")
iter_num, best_val_loss, best_iter, evals_without_improvement, tokens_seen = 0, float("inf"), -1, 0, 0
checkpoint = None

if init_from == "scratch":
    if lora_rank:
        fail("LoRA trains adapters on a trained model: set --init_from to its checkpoint")
    if os.path.exists(ckpt_path) and not overwrite and not eval_only:
        fail(f"{ckpt_path} exists: continue it with --init_from=resume, or start over with --overwrite=True "
             "(or another --out_dir)")
    model_args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                           vocab_size=tokenizer.vocab_size, hidden_dim=hidden_dim, multiple_of=multiple_of,
                           norm_eps=norm_eps, rope_theta=rope_theta, max_seq_len=max_seq_len or block_size,
                           dropout=dropout, tie_embeddings=tie_embeddings)
    model = Transformer(model_args)
else:
    load_path = ckpt_path if init_from == "resume" else init_from
    try:
        checkpoint = read_checkpoint(load_path)
        if checkpoint.get("tokenizer_sha256") != data_tokenizer_sha:
            fail(f"{load_path} was trained with another tokenizer than the data in {data_dir}/{source_names[0]} "
                 "(tokenizer_sha256 differs); prepare the data with the checkpoint's tokenizer")
        checkpoint["model_args"]["dropout"] = dropout  # dropout may change between pretraining and fine-tuning
        model = build_model(checkpoint, load_path)  # a LoRA checkpoint comes back on its verified base model
    except (FileNotFoundError, ValueError) as e:
        fail(f"init_from={init_from!r}: {e}")
    model_args = model.args
if block_size > model_args.max_seq_len:
    fail(f"block_size={block_size} is above the model's max_seq_len={model_args.max_seq_len}")

# LoRA: adapters on a frozen model; the checkpoints name the base checkpoint and its sha256
lora_config = None
if lora_rank and init_from != "resume":
    if checkpoint is not None and "lora" in checkpoint:
        fail(f"init_from={init_from!r} is itself a LoRA checkpoint: fine-tune from its base, or merge it first")
    # the base's absolute path ('hf:' or 'gguf:' + its path for an imported model): adapters find it from anywhere
    base_checkpoint_path = absolute_checkpoint_path(init_from)
    lora_config = {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout, "targets": lora_targets,
                   "base_checkpoint": base_checkpoint_path, "base_sha256": checkpoint_sha256(base_checkpoint_path)}
    try:
        apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets)
    except ValueError as e:
        fail(str(e))
elif init_from == "resume" and "lora" in checkpoint:
    lora_config = {**checkpoint["lora"], "base_checkpoint": checkpoint["base_checkpoint"],
                   "base_sha256": checkpoint["base_sha256"]}
if freeze_embeddings:
    model.tok_embeddings.weight.requires_grad = False
model.to(device)
optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
if init_from == "resume":
    optimizer.load_state_dict(checkpoint["optimizer"])
    if "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    iter_num = checkpoint["iter_num"]
    best_val_loss, best_iter = checkpoint["best_val_loss"], checkpoint["best_iter"]
    evals_without_improvement, tokens_seen = checkpoint["evals_without_improvement"], checkpoint["tokens_seen"]
    torch.set_rng_state(checkpoint["rng_state"]["torch"])
    if device_type == "cuda" and checkpoint["rng_state"].get("cuda") is not None:
        torch.cuda.set_rng_state(checkpoint["rng_state"]["cuda"])
    log(f"resuming from {ckpt_path} at step {iter_num}")
elif checkpoint is not None:
    log(f"initialized from {init_from} (fresh optimizer and schedule)")
checkpoint = None  # free the memory
if master and init_from != "resume" and not eval_only and os.path.exists(log_path):
    os.remove(log_path)  # a new run starts a new log; a resumed one appends
n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
if lora_config:
    log(f"LoRA rank {lora_config['rank']} on {lora_config['targets']}: {n_trainable:,} trainable parameters "
        f"({n_trainable / count_params(model):.2%}); base {lora_config['base_checkpoint']}")
elif freeze_embeddings:
    log(f"embeddings frozen: {n_trainable:,} trainable parameters")

raw_model = model  # checkpoints always hold this module's weights, never compile's or DDP's wrapped names
if compile:
    log("compiling the model...")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

# text batches are always full; chat batches vary, so their figures count the real (unpadded) tokens of each step
tokens_per_iter = batch_size * block_size * gradient_accumulation_steps * world_size
flops_per_token_at_block = flops_per_token(model_args, block_size)
peak_flops_per_device = peak_flops(device) if master else 1.0
log(f"model: {count_params(raw_model) / 1e6:.2f}M parameters ({model_args.n_layers} layers, dim {model_args.dim}, "
    f"{model_args.n_heads} heads, {model_args.n_kv_heads} kv heads, hidden {model_args.hidden_dim}, "
    f"vocab {model_args.vocab_size})")
log(f"data: {', '.join(f'{n} x{w:g}' if data_format == 'chat' else f'{n} {w:.0%}' for n, w in zip(source_names, text_weights if data_format == 'text' else [w for _, w in data_sources]))}; "
    f"up to {tokens_per_iter:,} tokens per step "
    f"({batch_size} x {block_size} x {gradient_accumulation_steps} accumulation x {world_size} processes)")
log(f"device {device}, dtype {dtype}, MFU against {peak_flops_per_device / 1e12:.2f} TFLOP/s")


def get_lr(it):
    """Linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not decay_lr:
        return learning_rate
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    """
    Mean loss per token on the same batches at every evaluation. Text: eval_iters random windows per split
    and source. Chat: the first eval_iters batches of the val conversations (in order) and of the first
    training epoch, counting only the learned tokens.
    """
    model.eval()
    result = {}
    for split in ("train", "val"):
        if data_format == "chat":
            batches = val_batches if split == "val" else train_eval_batches
            loss_sum, count = 0.0, 0
            for conversations in batches[:eval_iters]:
                x, y = get_chat_batch(conversations, split)
                with autocast:
                    _, loss = raw_model(x, y, loss_reduction="sum")
                loss_sum, count = loss_sum + loss.item(), count + int((y != -1).sum())
            result[f"{split}_loss"] = loss_sum / max(1, count)
            continue
        per_source = {}
        for s, name in enumerate(source_names):
            rng = np.random.default_rng([seed, 100 + s, {"train": 0, "val": 1}[split]])
            losses = []
            for _ in range(eval_iters):
                x, y = get_text_batch(split, rng, source=name)
                with autocast:
                    _, loss = raw_model(x, y)
                losses.append(loss.item())
            per_source[name] = float(np.mean(losses))
        result[f"{split}_loss"] = float(sum(w * per_source[n] for n, w in zip(source_names, text_weights)))
        if split == "val":
            # bits per byte: nats per token -> bits per token -> x tokens per byte of this source's val split
            bpb = {}
            for name in source_names:
                counts = metas[name]["splits"]["val"]
                bpb[name] = per_source[name] / math.log(2) * counts["tokens"] / max(1, counts["bytes"])
            result["val_bpb"] = float(sum(w * bpb[n] for n, w in zip(source_names, text_weights)))
            if len(source_names) > 1:
                result["val_loss_per_source"] = per_source
    model.train()
    return result


def relative_to(path, folder):
    """path relative to folder, keeping the 'hf:' or 'gguf:' of an imported model in front."""
    prefix = checkpoint_prefix(path)
    return prefix + os.path.relpath(path[len(prefix):], os.path.abspath(folder))


def make_checkpoint(with_training_state):
    checkpoint = {"model_args": asdict(model_args), "tokenizer": tokenizer.to_json(),
                  "tokenizer_sha256": tokenizer.sha256, "config": config, "data_format": data_format,
                  "iter_num": iter_num, "best_val_loss": best_val_loss, "best_iter": best_iter,
                  "tokens_seen": tokens_seen + tokens_since_start}
    if lora_config:
        # only the adapters, and which base they belong to (its path, also relative to out_dir, and sha256)
        base = lora_config["base_checkpoint"]
        checkpoint.update({"lora": {k: lora_config[k] for k in ("rank", "alpha", "dropout", "targets")},
                           "adapters": lora_state_dict(raw_model), "base_checkpoint": base,
                           "base_checkpoint_relative": relative_to(base, out_dir),
                           "base_sha256": lora_config["base_sha256"]})
    else:
        checkpoint["model"] = raw_model.state_dict()
    if with_training_state:
        checkpoint.update({
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "evals_without_improvement": evals_without_improvement,
            "rng_state": {"torch": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}})
    return checkpoint


def append_log(record):
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses():
    """out_dir/loss.png: training loss per log line and train/val loss per evaluation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    train_steps, evals = [], []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            (train_steps if record["type"] == "train" else evals).append(record)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train_steps:
        ax.plot([r["iter"] for r in train_steps], [r["loss"] for r in train_steps], lw=0.8, alpha=0.6, label="train (step)")
    if evals:
        ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{out_dir}: {data}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=100)
    plt.close(fig)


# Ctrl-C and SIGTERM: finish the current step, save ckpt.pt, exit 0
stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    if stop_requested:  # a second Ctrl-C: the user really wants out now
        raise KeyboardInterrupt
    stop_requested = True
    log(f"\n{signal.Signals(signum).name}: finishing this step, then saving {ckpt_path}")


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)

if wandb_log and master:
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True needs wandb: pip install wandb (it runs offline with WANDB_MODE=offline)")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)

# -----------------------------------------------------------------------------------------------------
# the training loop

start_iter = iter_num
train_time, tokens_since_start = 0.0, 0
eval_history = []  # (train loss, val loss) per evaluation, for the overfitting warning
eval_seconds = 0.0  # the last evaluation's duration, for the ETA
log(f"training from step {iter_num} to {max_iters}")
while True:
    last_step = iter_num >= max_iters
    if iter_num % eval_interval == 0 or last_step or eval_only:
        # save first: a crash or out-of-memory during evaluation must not lose the steps since the last one
        if master and iter_num > start_iter:
            save_checkpoint(make_checkpoint(True), ckpt_path)
        t_eval = time.time()
        losses = estimate_loss()
        improved = losses["val_loss"] < best_val_loss
        if improved:
            best_val_loss, best_iter, evals_without_improvement = losses["val_loss"], iter_num, 0
        elif not eval_only:
            evals_without_improvement += 1
        bpb_text = f", val bpb {losses['val_bpb']:.4f}" if "val_bpb" in losses else ""
        log(f"step {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
            f"{bpb_text}{' (best)' if improved else ''} [{time.time() - t_eval:.1f}s]")
        eval_seconds = time.time() - t_eval
        eval_history.append((losses["train_loss"], losses["val_loss"]))
        recent = eval_history[-(overfit_warning_evals + 1):]
        if overfit_warning_evals and len(recent) == overfit_warning_evals + 1 and \
                all(b[1] > a[1] and b[0] < a[0] for a, b in zip(recent, recent[1:])):
            log(f"warning: overfitting? val loss rose for {overfit_warning_evals} evaluations while train loss fell; "
                f"the best checkpoint is step {best_iter} ({best_ckpt_path}, val loss {best_val_loss:.4f})")
        if master and not eval_only:
            append_log({"type": "eval", "iter": iter_num, **losses, "best_val_loss": best_val_loss,
                        "time_s": round(train_time, 3)})
            if improved and iter_num > 0:
                save_checkpoint(make_checkpoint(False), best_ckpt_path)
            if keep_all_checkpoints and iter_num > 0:
                save_checkpoint(make_checkpoint(False), os.path.join(out_dir, f"ckpt_{iter_num:06d}.pt"))
            plot_losses()
            if wandb_log:
                wandb.log({"iter": iter_num, **{k: v for k, v in losses.items() if not isinstance(v, dict)}})
        if eval_only:
            break
        if patience and evals_without_improvement >= patience:
            log(f"early stopping: no better val loss for {patience} evaluations; best {best_val_loss:.4f} "
                f"at step {best_iter} ({best_ckpt_path})")
            break
    if last_step:
        break

    # one optimizer step over gradient_accumulation_steps micro-batches
    t0 = time.time()
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batches = [get_train_batch(iter_num, m) for m in range(gradient_accumulation_steps)]
    # the loss is normalized by the trainable targets of the whole step (all processes), so that every
    # target weighs the same however the targets are spread over micro-batches
    n_targets = sum((y != -1).sum() for _, y in batches).float()
    step_tokens = torch.tensor(float(sum(x.numel() for x, _ in batches)), device=device)
    if ddp:
        dist.all_reduce(n_targets)
        dist.all_reduce(step_tokens)
    n_targets = n_targets.clamp(min=1.0)  # a step with nothing to learn then has zero loss and gradient, not NaN
    loss_sum_local = torch.zeros((), device=device)
    try:
        for micro_step, (x, y) in enumerate(batches):
            sync = micro_step == gradient_accumulation_steps - 1
            with model.no_sync() if (ddp and not sync) else nullcontext():
                with autocast:
                    _, loss_sum = model(x, y, loss_reduction="sum")
                # DDP averages gradients over processes, hence the world_size
                scaler.scale(loss_sum * world_size / n_targets).backward()
            loss_sum_local += loss_sum.detach()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip).item()
        else:
            grad_norm = float("nan")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        fail(f"out of memory at step {iter_num} with batch_size={batch_size}, block_size={block_size}: try a smaller "
             f"--batch_size with a larger --gradient_accumulation_steps (same effective batch); the last checkpoint "
             f"is {ckpt_path}")
    if ddp:
        dist.all_reduce(loss_sum_local)
    step_loss = (loss_sum_local / n_targets).item()  # .item() also waits for the GPU, so the timing is right
    dt = time.time() - t0
    iter_num += 1
    train_time += dt
    step_tokens = int(step_tokens.item())
    tokens_since_start += step_tokens

    if iter_num % log_interval == 0 or iter_num == start_iter + 1:
        ms_per_iter = dt * 1000
        tokens_per_sec = step_tokens / dt
        mfu = flops_per_token_at_block * step_tokens / world_size / dt / peak_flops_per_device
        # the mean step time of this run so far, plus the evaluations still to come
        evals_left = (max_iters - 1) // eval_interval - (iter_num - 1) // eval_interval + 1  # + the final one
        eta_s = (max_iters - iter_num) * train_time / (iter_num - start_iter) + evals_left * eval_seconds
        log(f"step {iter_num}/{max_iters}: loss {step_loss:.4f}, lr {lr:.2e}, {ms_per_iter:.0f} ms, "
            f"{tokens_per_sec:,.0f} tok/s, MFU {mfu:.1%}, ETA {eta_s / 60:.1f} min")
        if master:
            record = {"type": "train", "iter": iter_num, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                      "ms_per_iter": ms_per_iter, "tokens_per_sec": tokens_per_sec, "mfu": mfu,
                      "tokens": tokens_seen + tokens_since_start, "time_s": round(train_time, 3)}
            append_log(record)
            if wandb_log:
                wandb.log(record)

    if not math.isfinite(step_loss):
        fail(f"the loss is {step_loss} at step {iter_num}: lower --learning_rate or use --dtype=float32")
    if ddp:  # every process must stop at the same step
        flag = torch.tensor(float(stop_requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop_requested = flag.item() > 0
    if stop_requested:
        if master:
            save_checkpoint(make_checkpoint(True), ckpt_path)
        log(f"saved {ckpt_path} at step {iter_num}; continue with --init_from=resume")
        break

if master and iter_num > start_iter and not stop_requested and not eval_only:
    log(f"done: {iter_num} steps, {tokens_since_start:,} tokens in {train_time / 60:.1f} min of training; "
        f"best val loss {best_val_loss:.4f} at step {best_iter}")
if ddp:
    dist.destroy_process_group()
