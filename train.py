"""
Train a model: pretraining, midtraining and SFT share this one loop over memmapped token files.

    python train.py config/pretrain_tinystories.py
    python train.py config/pretrain_tinystories.py --batch_size=32 --compile=True
    torchrun --standalone --nproc_per_node=4 train.py config/pretrain_tinystories.py

Every setting below can be changed by a config file or a --key=value override (configurator.py). The
batches (text windows, whole conversations with a loss mask, or multiple-choice questions whose choices the
loss ranks) come from data.py; the model, LoRA and the optimizer from model.py; checkpoints are read and
written by checkpoint.py.
"""

import copy
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import engine
from checkpoint import (build_model, lora_base_entries, read_checkpoint, remove_stale_temporary_files,
                        save_checkpoint, write_model_safetensors)
from common import (StopSignals, append_jsonl, check_writable_dir, fail, model_matmul_shapes, peak_flops,
                    plot_losses, setup_device)
from configurator import configure
from data import Batches
from model import (QUANTIZE_KINDS, ModelArgs, Transformer, apply_lora, configure_optimizer, count_params,
                   flops_per_token, lora_state_dict, merge_lora)

# -----------------------------------------------------------------------------------------------------
# I/O
out_dir = "out"
eval_interval = 200  # evaluate, save ckpt.pt and maybe best.pt every this many steps
log_interval = 10  # print (and log to out_dir/log.jsonl) every this many steps
eval_iters = 20  # batches per split per evaluation
eval_only = False  # evaluate once and exit
keep_all_checkpoints = False  # also write ckpt_<iter>.pt at every evaluation
save_safetensors = False  # also write best.safetensors (weights, model args, tokenizer) at each new best val
#                          loss; a LoRA run writes the merged weights
sample_prompts = ""  # '|'-separated prompts: print and log (log.jsonl) a greedy sample of each at every
#                     evaluation; a chat model answers each as a user turn
sample_max_new_tokens = 32  # the length of those samples
patience = 0  # stop after this many evaluations without a better val loss; 0 = never
init_from = "scratch"  # 'scratch' | 'resume' (continue out_dir/ckpt.pt: same schedule, same optimizer) |
#                       a .pt or .safetensors to fine-tune from (a fresh optimizer and schedule) |
#                       'hf:DIR' a Hugging Face model folder (or a Hub id such as
#                       HuggingFaceTB/SmolLM2-135M-Instruct)
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
# LoRA: train low-rank adapters on a frozen model from init_from; checkpoints hold only the adapters.
# QLoRA is LoRA with --base_quantize=nf4 (or int8): the frozen base held in 4 (8) bits, ~1/7 (1/4) the memory
lora_rank = 0  # 0 = off (full fine-tuning)
lora_alpha = 16.0  # adapters are scaled by lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = "q,v"  # any of q, k, v, o (attention), gate, up, down (feed-forward)
base_quantize = ""  # QLoRA: 'nf4' (4-bit NormalFloat) | 'int8' stores the frozen block weights quantized
#                    (needs lora_rank > 0; '' = float as loaded); adapters still train in full precision
# model (when resuming or fine-tuning the checkpoint decides the shape: one given that differs is an error)
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
given_settings = set()  # filled by configure: the settings a config file or an override set
config = configure(globals(), given=given_settings)
# -----------------------------------------------------------------------------------------------------
# the model-shape settings the user gave (a config file or an override): when resuming or fine-tuning, the
# checkpoint decides the shape, and a given one that differs is an error (0 = derived: nothing to compare)
MODEL_SHAPE_SETTINGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "multiple_of", "norm_eps",
                        "rope_theta", "max_seq_len", "tie_embeddings")
given_shape = {key: config[key] for key in MODEL_SHAPE_SETTINGS if key in given_settings
               and not (key in ("n_kv_heads", "hidden_dim", "max_seq_len") and config[key] == 0)}
# what a resumed run compares with the run that wrote its checkpoint, to say what changed
RESUME_SETTINGS = ("data", "data_dir", "loss_mask", "batch_size", "block_size", "gradient_accumulation_steps",
                   "seed", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters", "decay_lr",
                   "max_iters", "weight_decay", "beta1", "beta2", "grad_clip")
EXPLODED_RMS_FACTOR = 1000  # weights whose RMS grew this many times during a run blew up (check_weights)
prompts = [prompt.strip() for prompt in sample_prompts.split("|") if prompt.strip()]

if base_quantize not in ("",) + QUANTIZE_KINDS:
    fail(f"base_quantize={base_quantize!r}: expected {' or '.join(QUANTIZE_KINDS)} (or '' for a float base)")
if base_quantize and not lora_rank:
    fail(f"base_quantize={base_quantize} quantizes the frozen base of a LoRA run: set --lora_rank > 0 too")

ddp = "RANK" in os.environ  # run by torchrun, which sets RANK, LOCAL_RANK and WORLD_SIZE
rank, local_rank, world_size = (int(os.environ.get(key, default))
                                for key, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
master = rank == 0  # the one process that prints, logs and saves
# the one device and dtype rule of every stage (common.py); float16 needs the gradient scaler below
device, device_type, dtype, autocast = setup_device(device, dtype, seed + rank, num_threads,
                                                    local_rank if ddp else None)
config.update(device=device, dtype=dtype)  # checkpoints record what ran, not 'auto'
dtype_hint = "" if dtype == "float32" else " or use --dtype=float32"  # for a loss or weights that blew up
if ddp:
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
if deterministic:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def log(*args):
    if master:
        print(*args, flush=True)


# data: prepared sources data_dir/<name>/ (token files, meta.json, tokenizer.json); batches from data.py
try:
    batches = Batches(data_dir, data, batch_size, block_size, seed, rank, world_size,
                      gradient_accumulation_steps, loss_mask, device)
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
tokenizer = batches.tokenizer  # the data's tokenizer, saved in every checkpoint
for line in batches.summary():
    log(line)
if decay_lr and min_lr > learning_rate:  # a low --learning_rate for fine-tuning, min_lr left at its default
    log(f"warning: min_lr={min_lr:g} is above learning_rate={learning_rate:g}: the rate would rise as it "
        "'decays'; set --min_lr as well")
if num_epochs > 0:
    max_iters = batches.steps_for_epochs(num_epochs)
    config["max_iters"] = max_iters
    log(f"num_epochs={num_epochs}: {max_iters} steps")
# the data's token counts: a resumed run notices data prepared again under the same name
data_tokens = {name: {split: meta["splits"][split]["tokens"] for split in ("train", "val")}
               for name, meta in batches.metas.items()}

# -----------------------------------------------------------------------------------------------------
# the model: from scratch, or from a checkpoint (init_from=resume continues out_dir/ckpt.pt exactly)

if master and not eval_only:
    try:
        check_writable_dir(out_dir)  # now, not at the first save after an hour of training
    except OSError as e:
        fail(f"out_dir={out_dir}: {e}; choose another --out_dir")
    for name in remove_stale_temporary_files(out_dir):
        log(f"removed {out_dir}/{name}: the unfinished save of a run that was killed")
ckpt_path, best_ckpt_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "best.pt")
log_path = os.path.join(out_dir, "log.jsonl")
best_safetensors_path = os.path.join(out_dir, "best.safetensors")
checkpoint, lora_entries = None, {}  # lora_entries: what every checkpoint of a LoRA run says about it
if init_from not in ("scratch", "resume") and os.path.exists(init_from) and not eval_only and \
        any(os.path.exists(p) and os.path.samefile(init_from, p) for p in (ckpt_path, best_ckpt_path,
                                                                           best_safetensors_path)):
    fail(f"--init_from={init_from} is one of this out_dir's own checkpoints, which the fine-tune would "
         "overwrite: choose another --out_dir")
if init_from != "resume" and os.path.exists(ckpt_path) and not overwrite and not eval_only:
    fail(f"{ckpt_path} exists: continue it with --init_from=resume, or start over with --overwrite=True "
         "(or another --out_dir)")
if init_from == "scratch":
    if lora_rank:
        fail("LoRA trains adapters on a trained model: set --init_from to its checkpoint")
    try:
        model = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                      vocab_size=tokenizer.vocab_size, hidden_dim=hidden_dim, dropout=dropout,
                                      multiple_of=multiple_of, norm_eps=norm_eps, rope_theta=rope_theta,
                                      max_seq_len=max_seq_len or block_size, tie_embeddings=tie_embeddings))
    except ValueError as e:  # a shape the architecture cannot have, e.g. dim not divisible by n_heads
        fail(str(e))
else:
    load_path = ckpt_path if init_from == "resume" else init_from
    try:
        checkpoint = read_checkpoint(load_path)
        if checkpoint.get("tokenizer_sha256") != tokenizer.sha256:
            fail(f"{load_path} was trained with another tokenizer than the data in "
                 f"{data_dir}/{batches.names[0]} (tokenizer_sha256 differs); prepare the data with the "
                 "checkpoint's tokenizer")
        saved_args = checkpoint["model_args"]
        differing = [f"{key}={value!r} given, {saved_args.get(key)!r} in the checkpoint"
                     for key, value in given_shape.items() if value != saved_args.get(key)]
        if differing:
            fail(f"{load_path} is a model of another shape: {'; '.join(differing)}. Resuming and fine-tuning "
                 "keep the checkpoint's shape: leave these settings out, or train from scratch in another "
                 "--out_dir")
        checkpoint["model_args"]["dropout"] = dropout  # it may change between pretraining and fine-tuning
        model = build_model(checkpoint, load_path)  # a LoRA checkpoint comes back on its verified base model
        # LoRA: adapters on the frozen model; checkpoints hold only them and name their base (checkpoint.py)
        if lora_rank and init_from != "resume":
            if "lora" in checkpoint:
                raise ValueError("it holds LoRA adapters: fine-tune from its base, or merge it first")
            apply_lora(model, lora_rank, lora_alpha, lora_dropout, lora_targets, base_quantize)
            lora_entries = {"lora": {"rank": lora_rank, "alpha": lora_alpha, "dropout": lora_dropout,
                                     "targets": lora_targets, "base_quantize": base_quantize},
                            **lora_base_entries(init_from, out_dir)}
        elif init_from == "resume" and "lora" in checkpoint:
            saved_quantize = checkpoint["lora"].get("base_quantize", "")
            if "base_quantize" in given_settings and base_quantize != saved_quantize:
                raise ValueError(f"its base was quantized with base_quantize={saved_quantize!r}, not "
                                 f"{base_quantize!r}; a resumed run keeps it: leave --base_quantize out")
            lora_entries = {"lora": checkpoint["lora"], **lora_base_entries(
                checkpoint["base_checkpoint"], out_dir, checkpoint["base_sha256"])}
    except (FileNotFoundError, ValueError) as e:
        fail(f"init_from={init_from!r}: {e}")
model_args = model.args
# what the trained model is, for its checkpoint: chat data makes a chat model; choice data (a ranking of
# answers) leaves the model what it was
model_format = batches.format if batches.format != "choice" else (checkpoint or {}).get("data_format", "text")
if block_size > model_args.max_seq_len:
    fail(f"block_size={block_size} is above the model's max_seq_len={model_args.max_seq_len}")
if freeze_embeddings:
    model.tok_embeddings.weight.requires_grad = False
model.to(device)
optimizer = configure_optimizer(model, weight_decay, learning_rate, (beta1, beta2), device_type)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # float16 gradients need scaling
iter_num, best_val_loss, best_iter, evals_without_improvement, tokens_seen = 0, float("inf"), -1, 0, 0
saved_at = {}  # path -> step of each checkpoint this run stands on: what is left if it stops with an error
if init_from == "resume":
    iter_num = checkpoint["iter_num"]
    if iter_num > max_iters and not eval_only:
        fail(f"{ckpt_path} is at step {iter_num}, past max_iters={max_iters}: resuming continues a run's "
             "own schedule and would train nothing. To fine-tune these weights with a fresh optimizer and "
             f"schedule, use --init_from={ckpt_path} (and another --out_dir); to train this run longer, "
             "raise --max_iters")
    optimizer.load_state_dict(checkpoint["optimizer"])
    # the optimizer state carries the betas and weight decay of the run that saved it: this run's settings win
    for group in optimizer.param_groups:
        group["betas"] = (beta1, beta2)
    optimizer.param_groups[0]["weight_decay"] = weight_decay  # group 0 holds the decayed matrices
    scaler.load_state_dict(checkpoint.get("scaler", scaler.state_dict()))
    best_val_loss, best_iter = checkpoint["best_val_loss"], checkpoint["best_iter"]
    evals_without_improvement = checkpoint["evals_without_improvement"]
    tokens_seen = checkpoint["tokens_seen"]
    torch.set_rng_state(checkpoint["rng_state"]["torch"])
    if device_type == "cuda" and checkpoint["rng_state"].get("cuda") is not None:
        torch.cuda.set_rng_state(checkpoint["rng_state"]["cuda"])
    log(f"resuming from {ckpt_path} at step {iter_num}")
    # a resumed run continues exactly when nothing changed; say what did
    saved_config = checkpoint.get("config", {})
    changes = [f"{key} {saved_config[key]!r} -> {config[key]!r}" for key in RESUME_SETTINGS
               if key in saved_config and saved_config[key] != config[key]]
    data_prepared_again = checkpoint.get("data_tokens", data_tokens) != data_tokens
    if data_prepared_again:
        changes.append(f"the token counts of data={data!r} (prepared again?)")
    data_changed = data_prepared_again or saved_config.get("data", data) != data
    if data_changed:  # a val loss on other data is no measure of this data: best.pt starts over
        best_val_loss, best_iter, evals_without_improvement = float("inf"), -1, 0
    if changes:
        best_note = "; the best val loss starts over on the new data" if data_changed else ""
        log(f"warning: settings changed since {ckpt_path} was written: {'; '.join(changes)}. The optimizer "
            f"state and the learning-rate schedule continue from step {iter_num}{best_note}. To fine-tune "
            f"these weights with a fresh schedule instead, use --init_from={ckpt_path} and another --out_dir")
    saved_at[ckpt_path] = iter_num
    if os.path.exists(best_ckpt_path) and best_iter >= 0:
        saved_at[best_ckpt_path] = best_iter
elif checkpoint is not None:
    log(f"initialized from {init_from} (fresh optimizer and schedule)")
checkpoint_loaded, checkpoint = checkpoint is not None, None  # free the memory
if master and init_from != "resume" and not eval_only and os.path.exists(log_path):
    os.remove(log_path)  # a new run starts a new log; a resumed one appends
n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
if lora_entries:
    lora = lora_entries["lora"]
    quantized = lora.get("base_quantize", "")
    log(f"LoRA rank {lora['rank']} on {lora['targets']}: {n_trainable:,} trainable parameters "
        f"({n_trainable / count_params(model):.2%}); base {lora_entries['base_checkpoint']}"
        + (f", its block weights stored {quantized} (QLoRA)" if quantized else ""))
elif freeze_embeddings:
    log(f"embeddings frozen: {n_trainable:,} trainable parameters")
raw_model = model  # checkpoints always hold this module's weights, never compile's or DDP's wrapped names
if compile:
    log("compiling the model...")
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
flops_per_token_at_block = flops_per_token(model_args, block_size)
head_flops_per_token = 6 * model_args.dim * model_args.vocab_size  # skipped where no target counts (model.forward)
# MFU's peak: on a CPU measured for this model's own matmuls (common.peak_flops says why)
peak_flops_per_device = peak_flops(device, dtype, model_matmul_shapes(raw_model, batch_size * block_size)) \
    if master else 1.0
peak_text = f"{peak_flops_per_device / 1e12:.1f} TFLOP/s" if device_type != "cpu" else \
    f"{peak_flops_per_device / 1e9:,.1f} GFLOP/s ({torch.get_num_threads()} x a thread's best {dtype} matmul)"
log(f"model: {count_params(raw_model) / 1e6:.2f}M parameters ({model_args.n_layers} layers, "
    f"dim {model_args.dim}, {model_args.n_heads} heads, {model_args.n_kv_heads} kv heads, "
    f"hidden {model_args.hidden_dim}, vocab {model_args.vocab_size}); device {device}, dtype {dtype}, "
    f"MFU against {peak_text}")


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


def batch_loss(model, batch):
    """
    (summed loss, right answers) of one micro-batch. Text and chat: the cross-entropy summed over the learned
    tokens. Choice data (data.py): for each question, the cross-entropy of a softmax over its choices' scores,
    a score being the summed log-likelihood of the choice's tokens (what eval.py's base-mode acc compares), so
    the right choice is pushed above the others rather than only made likelier; summed over the questions.
    Right answers: the questions whose right choice scores highest (None for text and chat).
    """
    if len(batch) == 2:
        x, y = batch
        _, loss_sum = model(x, y, loss_reduction="sum")
        return loss_sum, None
    x, y, n_choices, answers = batch
    _, token_losses = model(x, y, loss_reduction="none")
    scores = -token_losses.float().sum(1)  # one per row: the log-likelihood of its choice
    # a (questions, most choices) table of the scores, question i's rows following question i - 1's; a
    # question with fewer choices is padded with -inf, which the softmax gives no weight
    column = torch.arange(int(n_choices.max()), device=scores.device)
    first_rows = torch.cumsum(n_choices, 0) - n_choices
    rows = (first_rows[:, None] + column).clamp(max=len(scores) - 1)
    table = scores[rows].masked_fill(column >= n_choices[:, None], float("-inf"))
    return F.cross_entropy(table, answers, reduction="sum"), (table.argmax(1) == answers).sum()


def loss_count(batch):
    """What a micro-batch's loss is summed over: its learned tokens, or (choice data) its questions."""
    return (batch[1] != -1).sum() if len(batch) == 2 else torch.tensor(len(batch[3]), device=batch[3].device)


@torch.no_grad()
def estimate_loss():
    """Loss per learned token (choice data: per question, and the share answered right) of each split on the
    same batches every time; val bits per byte for text."""
    model.eval()
    losses, accuracy = {}, {}  # (split, source) -> mean loss per learned token; split -> share right
    for split in ("train", "val"):
        for source, eval_batches in batches.eval_batches(split, eval_iters):
            loss_sum, count, right = 0.0, 0, 0
            for batch in eval_batches:
                with autocast:
                    loss, n_right = batch_loss(raw_model, batch)
                loss_sum, count = loss_sum + loss.item(), count + int(loss_count(batch))
                right += int(n_right or 0)
            losses[split, source] = loss_sum / max(1, count)
            if batches.format == "choice":
                accuracy[f"{split}_acc"] = right / max(1, count)
    model.train()
    return {**batches.eval_summary(losses), **accuracy}  # train_loss, val_loss; val_bpb for text; choice: acc


def make_checkpoint(with_training_state):
    """This run's checkpoint (docs/formats.md); with the training state, what an exact resume needs too."""
    checkpoint = {"model_args": asdict(model_args), "tokenizer": tokenizer.to_json(),
                  "tokenizer_sha256": tokenizer.sha256, "config": config, "data_format": model_format,
                  "data_tokens": data_tokens, "iter_num": iter_num, "best_val_loss": best_val_loss,
                  "best_iter": best_iter, "tokens_seen": tokens_seen + tokens_since_start, **lora_entries}
    if lora_entries:
        checkpoint["adapters"] = lora_state_dict(raw_model)  # the base's weights stay in the base checkpoint
    else:
        checkpoint["model"] = raw_model.state_dict()
    if with_training_state:
        cuda_rng_state = torch.cuda.get_rng_state() if device_type == "cuda" else None
        checkpoint.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                          evals_without_improvement=evals_without_improvement,
                          rng_state={"torch": torch.get_rng_state(), "cuda": cuda_rng_state})
    return checkpoint


def weight_rms():
    """The root mean square of all the weights (a LoRA run's frozen ones too): one cheap pass over them."""
    params = list(raw_model.parameters())
    squares = torch.stack([p.detach().float().pow(2).sum() for p in params]).sum()
    return math.sqrt(squares.item() / sum(p.numel() for p in params))


def last_good_checkpoints():
    """What is left when the run stops with an error: its checkpoints, all written from sound weights."""
    if saved_at:
        return "the last good checkpoints: " + ", ".join(f"{path} (step {n})" for path, n in saved_at.items())
    untouched = f"; {init_from} is untouched" if checkpoint_loaded else ""
    return f"no checkpoint of this run was written{untouched}"


def check_weights():
    """
    Before every save: refuse weights that blew up, so that a diverging run (a learning rate far too high,
    an overflow) never overwrites ckpt.pt or best.pt. Blown up means non-finite, or an RMS above
    EXPLODED_RMS_FACTOR x the RMS this run started from: healthy training changes it a few times (10x after
    300 steps of a tiny model at a learning rate of 3e-2 without weight decay), while one step at a learning
    rate of 1e6 multiplies it by 1e7 -- and can still "improve" the val loss.
    """
    rms = weight_rms()
    if math.isfinite(rms) and rms <= EXPLODED_RMS_FACTOR * start_weight_rms:
        return
    what = "are not finite" if not math.isfinite(rms) else \
        f"blew up (RMS {rms:.3g}, {rms / start_weight_rms:,.0f}x the {start_weight_rms:.3g} at the start)"
    fail(f"the weights at step {iter_num} {what}; not saved. Lower --learning_rate{dtype_hint}; "
         f"{last_good_checkpoints()}")


def save(path, with_training_state):
    """A checkpoint of the current weights at path, after check_weights; a failed write names its cause."""
    check_weights()
    try:
        save_checkpoint(make_checkpoint(with_training_state), path)
    except OSError as e:  # a full disk: the message names the path and the cause, the old file is intact
        fail(f"{e}; free some space or choose another --out_dir; {last_good_checkpoints()}")
    if path in (ckpt_path, best_ckpt_path):
        saved_at[path] = iter_num


def save_best_safetensors():
    """best.safetensors: the weights alone, for other tools (and read_checkpoint); a LoRA run merged."""
    check_weights()
    weights = merge_lora(copy.deepcopy(raw_model)) if lora_entries else raw_model
    try:
        write_model_safetensors(weights, tokenizer, best_safetensors_path, batches.format, iter_num)
    except OSError as e:
        fail(f"{e}; free some space or choose another --out_dir; {last_good_checkpoints()}")


@torch.no_grad()
def print_samples():
    """A greedy sample for each of sample_prompts, printed and logged: what the model writes, evaluation by
    evaluation. Through the one generation engine; a chat model answers each prompt as a user turn."""
    raw_model.eval()
    chat = model_format == "chat"
    for prompt_text in prompts:
        if chat:
            prompt = tokenizer.render_for_completion([{"role": "user", "content": prompt_text}])
            stop_tokens = [tokenizer.assistant_end_id, tokenizer.bos_id]
        else:
            prompt, stop_tokens = tokenizer.encode(prompt_text, bos=True), [tokenizer.bos_id]
        pieces = engine.generate_text(raw_model, tokenizer, prompt, max_new_tokens=sample_max_new_tokens,
                                      temperature=0.0, tools=chat, stop_tokens=stop_tokens)
        text = "".join(piece[0] for _, piece in pieces)
        log(f"sample: {prompt_text!r} -> {text!r}")
        if not eval_only:
            append_jsonl(log_path, {"type": "sample", "iter": iter_num, "prompt": prompt_text, "text": text})
    raw_model.train()


if wandb_log and master:
    try:
        import wandb  # only here: an optional dependency
    except ImportError:
        fail("wandb_log=True needs wandb: pip install wandb (it runs offline with WANDB_MODE=offline)")
    wandb.init(project=wandb_project, name=wandb_run_name, config=config)
stop = StopSignals(f"finishing this step, then saving {ckpt_path}")  # Ctrl-C and SIGTERM: save, exit 0
start_weight_rms = weight_rms()  # check_weights compares with it
if not math.isfinite(start_weight_rms):
    fail(f"init_from={init_from!r}: the weights are not finite; start from a sound checkpoint")

# -----------------------------------------------------------------------------------------------------
# the training loop

start_iter = iter_num
train_time, tokens_since_start = 0.0, 0
eval_history = []  # (train loss, val loss) per evaluation, for the overfitting warning
overfit_warned = False
eval_seconds = 0.0  # the last evaluation's duration, for the ETA
log(f"training from step {iter_num} to {max_iters}")
while True:
    last_step = iter_num >= max_iters
    if iter_num % eval_interval == 0 or last_step or eval_only:
        # save first: a crash or out-of-memory during evaluation must not lose the steps since the last one
        if master and iter_num > start_iter:
            save(ckpt_path, with_training_state=True)
        t_eval = time.time()
        losses = estimate_loss()
        eval_seconds = time.time() - t_eval
        improved = losses["val_loss"] < best_val_loss
        if improved:
            best_val_loss, best_iter, evals_without_improvement = losses["val_loss"], iter_num, 0
        elif not eval_only:
            evals_without_improvement += 1
        also = f", val bpb {losses['val_bpb']:.4f}" if "val_bpb" in losses else ""  # text
        if "val_acc" in losses:  # choice data
            also = f", train acc {losses['train_acc']:.1%}, val acc {losses['val_acc']:.1%}"
        log(f"step {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
            f"{also}{' (best)' if improved else ''} [{eval_seconds:.1f}s]")
        eval_history.append((losses["train_loss"], losses["val_loss"]))
        recent = eval_history[-(overfit_warning_evals + 1):]
        overfit_warned = overfit_warned and not improved  # once per run of rising val losses
        if overfit_warning_evals and len(recent) == overfit_warning_evals + 1 and not overfit_warned and \
                all(b[1] > a[1] and b[0] < a[0] for a, b in zip(recent, recent[1:])):
            overfit_warned = True
            log(f"warning: overfitting? val loss rose for {overfit_warning_evals} evaluations while train "
                f"loss fell; the best checkpoint is step {best_iter} ({best_ckpt_path}, val loss "
                f"{best_val_loss:.4f})")
        if master and not eval_only:
            append_jsonl(log_path, {"type": "eval", "iter": iter_num, **losses,
                                    "best_val_loss": best_val_loss, "time_s": round(train_time, 3)})
            # at step 0 too: a fine-tune whose val loss never improves keeps its starting weights as best.pt,
            # which every message names
            if improved:
                save(best_ckpt_path, with_training_state=False)
                if save_safetensors:
                    save_best_safetensors()
            if keep_all_checkpoints and iter_num > 0:
                save(os.path.join(out_dir, f"ckpt_{iter_num:06d}.pt"), with_training_state=False)
            plot_losses(log_path, os.path.join(out_dir, "loss.png"), f"{out_dir}: {data}")
            if wandb_log:
                wandb.log({"iter": iter_num, **{k: v for k, v in losses.items() if not isinstance(v, dict)}})
        if master and prompts:
            print_samples()
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
    micro_batches = [batches.get_batch("train", iter_num, m) for m in range(gradient_accumulation_steps)]
    # the loss is normalized by the trainable targets (choice data: the questions) of the whole step (all
    # processes), so that every target weighs the same however the targets are spread over micro-batches
    n_targets = sum(loss_count(batch) for batch in micro_batches).float()
    step_tokens = torch.tensor(float(sum(batch[0].numel() for batch in micro_batches)), device=device)
    learned_tokens = sum((batch[1] != -1).sum() for batch in micro_batches).float()  # where the head runs
    if ddp:
        dist.all_reduce(n_targets)
        dist.all_reduce(step_tokens)
        dist.all_reduce(learned_tokens)
    n_targets = n_targets.clamp(min=1.0)  # a step with nothing to learn: zero loss and gradient, not NaN
    loss_sum_local = torch.zeros((), device=device)
    try:
        for micro_step, batch in enumerate(micro_batches):
            sync = micro_step == gradient_accumulation_steps - 1
            with model.no_sync() if (ddp and not sync) else nullcontext():
                with autocast:
                    loss_sum, _ = batch_loss(model, batch)
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
        fail(f"out of memory at step {iter_num} with batch_size={batch_size}, block_size={block_size}: try "
             "a smaller --batch_size with a larger --gradient_accumulation_steps (same effective batch); the "
             f"last checkpoint is {ckpt_path}")
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
        step_flops = flops_per_token_at_block * step_tokens - head_flops_per_token * (step_tokens - learned_tokens.item())
        mfu = step_flops / world_size / dt / peak_flops_per_device
        # the mean step time of this run so far, plus the evaluations still to come
        evals_left = (max_iters - 1) // eval_interval - (iter_num - 1) // eval_interval + 1  # + the final one
        eta_s = (max_iters - iter_num) * train_time / (iter_num - start_iter) + evals_left * eval_seconds
        log(f"step {iter_num}/{max_iters}: loss {step_loss:.4f}, lr {lr:.2e}, {ms_per_iter:.0f} ms, "
            f"{tokens_per_sec:,.0f} tok/s, MFU {mfu:.1%}, ETA {eta_s / 60:.1f} min")
        if master:
            record = {"type": "train", "iter": iter_num, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                      "ms_per_iter": ms_per_iter, "tokens_per_sec": tokens_per_sec, "mfu": mfu,
                      "tokens": tokens_seen + tokens_since_start, "time_s": round(train_time, 3)}
            append_jsonl(log_path, record)
            if wandb_log:
                wandb.log(record)

    if not math.isfinite(step_loss):
        fail(f"the loss is {step_loss} at step {iter_num}: lower --learning_rate{dtype_hint}; "
             f"{last_good_checkpoints()}")
    if ddp:  # every process must stop at the same step
        flag = torch.tensor(float(stop.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop.requested = flag.item() > 0
    if stop.requested:
        if master:
            save(ckpt_path, with_training_state=True)
        log(f"saved {ckpt_path} at step {iter_num}; continue with --init_from=resume")
        break

if master and iter_num > start_iter and not stop.requested and not eval_only:
    log(f"done: {iter_num} steps, {tokens_since_start:,} tokens in {train_time / 60:.1f} min of training; "
        f"best val loss {best_val_loss:.4f} at step {best_iter}")
if ddp:
    dist.destroy_process_group()
