"""
The Transformer: Llama architecture, the same math as llama2.c's forward pass.

    token embedding
    n_layers x [ x = x + attention(rmsnorm(x))   (RoPE, grouped-query heads)
                 x = x + feed_forward(rmsnorm(x)) (SwiGLU) ]
    rmsnorm -> output head (tied to the embedding or not)

Weight names follow llama2.c (tok_embeddings, layers.N.attention.wq, feed_forward.w1, ...) and RoPE
rotates interleaved pairs (x[2i], x[2i+1]) like llama2.c's run.c, so an exported model runs there too.
Also here, because every stage needs them: KV-cache generation with sampling and a tool hook, the
optimizer set-up, the FLOPs/MFU estimate, and checkpoint saving/loading.
"""

import hashlib
import json
import math
import os
import struct
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 0  # 0 means n_heads (plain multi-head attention); fewer shares each K/V head between heads
    vocab_size: int = 4096
    hidden_dim: int = 0  # 0 means llama's rule: 2/3 of 4*dim, rounded up to a multiple of multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    attention_bias: bool = False  # biases on wq, wk, wv (Qwen2 has them; Llama does not)
    # Llama 3.1+'s long-context RoPE: low frequencies divided by rope_scaling, high ones kept, a smooth blend
    # between (wavelengths measured against rope_original_max_seq_len); 0 = plain RoPE
    rope_scaling: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192

    def __post_init__(self):
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim == 0:
            hidden = int(2 * (4 * self.dim) / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"head size dim/n_heads={self.dim // self.n_heads} must be even for RoPE")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32 even under autocast, as llama does
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_rope(head_dim, max_seq_len, theta, args=None):
    """cos and sin of the rotation angle pos * theta^(-2i/head_dim), each (max_seq_len, head_dim/2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if args is not None and args.rope_scaling:
        freqs = llama3_scaled_frequencies(freqs, args)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def llama3_scaled_frequencies(freqs, args):
    """
    Llama 3.1's RoPE scaling: rotations slower than the original context (wavelength above
    original / low_freq_factor) are slowed by the factor, those faster than original / high_freq_factor are
    kept, and the ones between move smoothly from one to the other.
    """
    wavelength = 2 * math.pi / freqs
    slow = freqs / args.rope_scaling
    # 0 at the low-frequency end of the blend, 1 at the high-frequency end
    blend = ((args.rope_original_max_seq_len / wavelength - args.rope_low_freq_factor)
             / (args.rope_high_freq_factor - args.rope_low_freq_factor)).clamp(0.0, 1.0)
    return (1 - blend) * slow + blend * freqs


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[..., 2i], x[..., 2i+1]); x is (B, T, n_heads, head_dim), cos/sin (T, head_dim/2)."""
    x_pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x_pairs.unbind(-1)  # (B, T, nh, hd/2) each
    cos = cos.view(1, cos.shape[0], 1, cos.shape[1])
    sin = sin.view(1, sin.shape[0], 1, sin.shape[1])
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class KVCache:
    """Keys and values of every layer for the positions generated so far; one position for the whole batch."""

    def __init__(self, args, batch_size, max_len, device, dtype):
        head_dim = args.dim // args.n_heads
        shape = (args.n_layers, batch_size, args.n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions filled
        self.max_len = max_len

    def update(self, layer, k, v):
        """Store k, v (B, n_kv_heads, T, hd) at the current position; return all keys and values so far."""
        T = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.attention_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hd)

        start = 0
        if kv_cache is not None:
            start = kv_cache.pos
            k, v = kv_cache.update(self.layer_id, k, v)  # (B, n_kv, start+T, hd)
        if self.n_kv_heads != self.n_heads:
            # grouped-query attention: each K/V head serves n_heads/n_kv_heads query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)

        dropout_p = self.dropout if self.training else 0.0
        if start == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:
            # new queries at positions start..start+T-1 see every cached key up to their own position
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, kv_cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, kv_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        rope_cos, rope_sin = precompute_rope(args.dim // args.n_heads, args.max_seq_len, args.rope_theta, args)
        # not persistent: they are derived from the args, so checkpoints and exports never carry them
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        # Small-scale initialization (chosen by bench/loss_per_second.py, figures in the README): every matrix
        # ~ N(0, 0.02), the GPT-2/llama2.c default that keeps activations O(1) at these widths, and the two
        # projections that write into the residual stream (wo, w2) at 0.02/sqrt(2 n_layers), so the stream's
        # variance does not grow with depth. Starting those two at zero instead (every block the identity at
        # step 0) reached a worse val loss in the same 90 s on TinyStories (3.68 vs 3.55 nats at 2.4M params).
        residual_std = 0.02 / math.sqrt(2 * self.args.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                is_residual = name.endswith("attention.wo.weight") or name.endswith("feed_forward.w2.weight")
                nn.init.normal_(p, mean=0.0, std=residual_std if is_residual else 0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, tokens, targets=None, kv_cache=None, loss_reduction="mean"):
        """
        tokens (B, T) -> logits (B, T, vocab_size), and the cross-entropy loss when targets are given.
        targets == -1 are ignored (masked out). loss_reduction: 'mean' over counted targets, 'sum', or
        'none' for a (B, T) tensor of per-token losses (0 where ignored).
        With a kv_cache, tokens continue at position kv_cache.pos, and the cache advances by T.
        """
        B, T = tokens.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than max_seq_len={self.args.max_seq_len}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        h = self.dropout(self.tok_embeddings(tokens))
        for layer in self.layers:
            h = layer(h, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        logits = self.output(self.norm(h))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction="none" if loss_reduction == "none" else loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(B, T)
        return logits, loss

    # ------------------------------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                 stop_tokens=(), num_samples=1, tool_hook=None):
        """
        Sample continuations of one prompt (a list of token ids), num_samples of them in one batch.
        A generator: each step yields (tokens, forced), two lists of length num_samples; tokens[i] is the
        next token of sample i, or None once sample i has stopped (it produced a stop token or reached
        max_new_tokens); forced[i] is True when tokens[i] was inserted by tool_hook rather than sampled.
        Cost: one forward pass over the prompt, then one single-token step per new token (KV cache).
        temperature 0 is greedy. top_k 0 and top_p 1.0 disable those filters.
        tool_hook(sample_index, tokens_so_far) -> list of ids to force next (or None): lets a caller such
        as the calculator tool write text into the sequence; forced tokens go through the model like
        sampled ones, and a forced stop token does not end the sample.
        The context window bounds everything: generation stops at max_seq_len.
        """
        if len(prompt) == 0:
            raise ValueError("generate() needs a prompt of at least one token (usually <|bos|>)")
        device = self.tok_embeddings.weight.device
        max_len = min(self.args.max_seq_len, len(prompt) + max_new_tokens)
        if len(prompt) >= max_len:
            return
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        cache = KVCache(self.args, num_samples, max_len, device, self.tok_embeddings.weight.dtype)
        stop_tokens = set(stop_tokens)
        sequences = [list(prompt) for _ in range(num_samples)]
        forced_queue = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        inputs = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
        for step in range(max_len - len(prompt)):
            logits, _ = self(inputs, kv_cache=cache)
            sampled = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, generator).tolist()
            tokens, forced = [], []
            for i in range(num_samples):
                if done[i]:
                    tokens.append(None)
                    forced.append(False)
                    continue
                was_forced = len(forced_queue[i]) > 0
                token = forced_queue[i].pop(0) if was_forced else sampled[i]
                sequences[i].append(token)
                tokens.append(token)
                forced.append(was_forced)
                if not was_forced and token in stop_tokens:
                    done[i] = True
                elif tool_hook is not None and not forced_queue[i]:
                    forced_queue[i] = list(tool_hook(i, sequences[i]) or [])
            yield tokens, forced
            if all(done):
                return
            # finished samples keep feeding a dummy token; their outputs are ignored
            next_inputs = [t if t is not None else prompt[0] for t in tokens]
            inputs = torch.tensor(next_inputs, dtype=torch.long, device=device).view(num_samples, 1)


def sample_next_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> token ids (B,). temperature 0 is greedy; top_k / top_p keep the most likely tokens."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        kth_value = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_value, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest set of most likely tokens whose total reaches top_p (always at least one)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return sorted_ids.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# LoRA: low-rank adapters on chosen projections; only the adapters train


LORA_TARGETS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo",
                "gate": "feed_forward.w1", "up": "feed_forward.w3", "down": "feed_forward.w2"}


class LoRALinear(nn.Linear):
    """y = x W^T + (alpha / rank) * dropout(x) A^T B^T, with W frozen. B starts at zero: step 0 is the base model."""

    def __init__(self, base: nn.Linear, rank, alpha, dropout):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device,
                         dtype=base.weight.dtype)
        self.weight = base.weight  # the same tensor: state_dict names stay those of the base model
        self.weight.requires_grad = False
        self.bias = base.bias  # frozen too (apply_lora froze every parameter); None for Llama's projections
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)


def parse_lora_targets(targets):
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"lora_targets={targets!r}: expected a comma-separated list of {', '.join(LORA_TARGETS)}")
    return names


def apply_lora(model, rank, alpha, dropout, targets):
    """Freeze every weight and put adapters on the target projections of every layer. Returns the model."""
    for p in model.parameters():
        p.requires_grad = False
    for layer in model.layers:
        for target in parse_lora_targets(targets):
            parent_name, attr = LORA_TARGETS[target].split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
    return model


def lora_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_a" in k or ".lora_b" in k}


@torch.no_grad()
def merge_lora(model):
    """Fold every adapter into its weight (W += scale * B A) and put plain nn.Linear modules back."""
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            for attr, module in list(parent.named_children()):
                if isinstance(module, LoRALinear):
                    plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
                    plain.weight = nn.Parameter(module.weight + module.scale * (module.lora_b @ module.lora_a),
                                                requires_grad=True)
                    if module.bias is not None:
                        plain.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=True)
                    setattr(parent, attr, plain)
    return model


# ----------------------------------------------------------------------------------------------------
# optimizer and FLOPs


def configure_optimizer(model, weight_decay, learning_rate, betas, device_type):
    """AdamW; weight decay on matrices (linear weights and the embedding), none on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel is one launch per step instead of one per tensor; it exists on CUDA and CPU
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def count_params(model, non_embedding=False):
    """Unique parameters (a tied head counts once). non_embedding drops the input embedding table."""
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if non_embedding:
        n -= model.tok_embeddings.weight.numel()
    return n


def flops_per_token(args: ModelArgs, seq_len):
    """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention scores and mixing."""
    head_dim = args.dim // args.n_heads
    per_layer = (args.dim * args.n_heads * head_dim            # wq
                 + 2 * args.dim * args.n_kv_heads * head_dim   # wk, wv
                 + args.n_heads * head_dim * args.dim          # wo
                 + 3 * args.dim * args.hidden_dim)             # w1, w2, w3
    matmul_weights = args.n_layers * per_layer + args.dim * args.vocab_size  # + output head
    attention = 12 * args.n_layers * args.dim * seq_len  # q@k and att@v, forward and backward
    return 6 * matmul_weights + attention


def pick_device(requested="auto"):
    """'auto' -> cuda if present, else mps if it really runs (not just exists), else cpu; anything else as given."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        try:
            (torch.ones(2, device="mps") * 2).cpu()
            return "mps"
        except Exception:
            pass
    return "cpu"


# peak dense bf16 tensor FLOP/s of common GPUs, for MFU
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12,
                  "3090": 71e12, "V100": 125e12, "T4": 65e12}


def measure_matmul_flops(device="cpu", dtype=torch.float32, size=1024, seconds=0.5, trials=5):
    """
    Measured FLOP/s of a square matmul on this device: the practical peak that MFU is taken against on CPU.
    The best of several short trials, because a peak is a maximum: one trial that shares the CPU with another
    process for a moment would understate it (and overstate MFU).
    """
    generator = torch.Generator(device=device).manual_seed(0)  # leave the global RNG (dropout, resume) alone
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    a @ b  # warm up
    best = 0.0
    for _ in range(trials):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / trials:
            a @ b
            n += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = max(best, 2 * size ** 3 * n / (time.perf_counter() - t0))
    return best


def peak_flops(device):
    """The FLOP/s that MFU is measured against: the GPU's bf16 peak, or this CPU's measured fp32 matmul peak."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return measure_matmul_flops(device, torch.bfloat16, size=4096)
    return measure_matmul_flops(device)


# ----------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(checkpoint, path):
    """torch.save, atomically: a crash or kill mid-save leaves the old file."""
    write_atomically(path, lambda f: torch.save(checkpoint, f))


def write_atomically(path, write):
    """write(f) into a temporary file, fsync, then rename it to path: readers see the old file or the new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def file_sha256(path):
    """sha256 of a file; of an 'hf:DIR' folder, the sha256 of its config's and weight files' sha256s."""
    if path.startswith("hf:"):
        from tokenizer import hf_folder
        folder = hf_folder(path[len("hf:"):])
        names = ["config.json"] + sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        return hashlib.sha256("".join(file_sha256(os.path.join(folder, n)) for n in names).encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



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
    from tokenizer import Tokenizer, hf_folder, read_json_file
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
    sha = file_sha256(base_path)
    if sha != checkpoint["base_sha256"]:
        raise ValueError(f"{path}: adapters were trained on a base checkpoint with sha256 "
                         f"{checkpoint['base_sha256'][:16]}..., but {base_path} has sha256 {sha[:16]}... "
                         "(it was overwritten or retrained); use the original base checkpoint")
    return base_path


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
    from tokenizer import Tokenizer
    checkpoint = read_checkpoint(path, device)
    model = merge_lora(build_model(checkpoint, path, device)).eval()
    tokenizer = Tokenizer.from_json(checkpoint["tokenizer"])
    if tokenizer.vocab_size > model.args.vocab_size:
        raise ValueError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size}")
    return model, tokenizer, checkpoint

