"""
The Transformer: Llama architecture, the same math as llama2.c's forward pass.

    token embedding
    n_layers x [ x = x + attention(rmsnorm(x))   (RoPE, grouped-query heads)
                 x = x + feed_forward(rmsnorm(x)) (SwiGLU) ]
    rmsnorm -> output head (tied to the embedding or not)

Weight names follow llama2.c (tok_embeddings, layers.N.attention.wq, feed_forward.w1, ...) and RoPE
rotates interleaved pairs (x[2i], x[2i+1]) like llama2.c's run.c, so an exported model runs there too.
Also here: KV-cache generation with sampling and a tool hook (engine.py adds the tools), LoRA adapters
(and QLoRA's NF4 / int8 frozen weights), the optimizer set-up and the FLOPs per token that MFU is computed
from. Checkpoints: checkpoint.py.
"""

import math
from dataclasses import dataclass

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
        tokens (B, T) -> (logits (B, T, vocab_size), None); with targets, (None, the cross-entropy loss).
        targets == -1 are ignored (masked out). loss_reduction: 'mean' over counted targets, 'sum', or
        'none' for a (B, T) tensor of per-token losses (0 where ignored).
        With targets the output layer runs only at the positions whose target counts: it is a fifth of a
        small model's work per token, and chat data trains only the assistant's tokens (a multiple-choice
        conversation: 2 of ~90), so the logits are not returned then.
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
        if targets is None:
            return self.output(self.norm(h)), None
        counted = targets.reshape(-1) != -1
        logits = self.output(self.norm(h.reshape(B * T, -1)[counted]))
        loss = F.cross_entropy(logits.float(), targets.reshape(-1)[counted],
                               reduction="none" if loss_reduction == "none" else loss_reduction)
        if loss_reduction == "none":
            loss = torch.zeros(B * T, dtype=loss.dtype, device=loss.device).masked_scatter(counted, loss).view(B, T)
        return None, loss

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
    """
    y = x W^T + (alpha / rank) * dropout(x) A^T B^T, with W frozen. B starts at zero: step 0 is the base
    model.
    base is an nn.Linear, whose weight is used as is, or a QuantizedLinear (QLoRA), which stays quantized.
    """

    def __init__(self, base, rank, alpha, dropout):
        # on the meta device: no memory for a weight that is replaced at once
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        device = base.weight_scales.device if isinstance(base, QuantizedLinear) else base.weight.device
        if isinstance(base, QuantizedLinear):
            self.weight, self.bias, self.quantized = None, None, base  # the base's bias lives in the base
        else:
            self.weight = base.weight  # the same tensor: state_dict names stay those of the base model
            self.weight.requires_grad = False
            self.bias = base.bias  # frozen too (apply_lora froze every parameter); None for Llama's
            self.quantized = None
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, device=device)
                                   / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def base_weight_and_bias(self):
        """The frozen weight (dequantized for QLoRA) and bias, as merge_lora folds them."""
        if self.quantized is None:
            return self.weight, self.bias
        return self.quantized.dequantized_weight(), self.quantized.bias

    def forward(self, x):
        base = F.linear(x, self.weight, self.bias) if self.quantized is None else self.quantized(x)
        return base + self.scale * F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b)


def parse_lora_targets(targets):
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names:
        raise ValueError(f"lora_targets={targets!r}: expected a comma-separated list of {', '.join(LORA_TARGETS)}")
    return names


def apply_lora(model, rank, alpha, dropout, targets, quantize=""):
    """
    Freeze every weight and put adapters on the target projections of every layer. Returns the model.
    quantize 'nf4' or 'int8' (QLoRA) first stores every projection of every block quantized (QuantizedLinear).
    """
    if quantize and quantize not in QUANTIZE_KINDS:
        raise ValueError(f"base_quantize={quantize!r}: expected {' or '.join(QUANTIZE_KINDS)} ('' = none)")
    names = parse_lora_targets(targets)
    for p in model.parameters():
        p.requires_grad = False
    for layer in model.layers:
        for path in LORA_TARGETS.values():
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            if quantize:
                setattr(parent, attr, QuantizedLinear(getattr(parent, attr), quantize))
            if path in (LORA_TARGETS[t] for t in names):
                setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
    return model


def lora_state_dict(model):
    return {k: v for k, v in model.state_dict().items() if ".lora_a" in k or ".lora_b" in k}


def plain_linear(weight, bias):
    """An nn.Linear holding these tensors (trainable again, as a loaded model is)."""
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    plain.weight = nn.Parameter(weight.detach().clone(), requires_grad=True)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().clone(), requires_grad=True)
    return plain


@torch.no_grad()
def merge_lora(model):
    """
    Fold every adapter into its weight (W += scale * B A) and put plain nn.Linear modules back. A QLoRA
    model's weights are dequantized first: the merged model carries the quantization error of its base.
    """
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            for attr, module in list(parent.named_children()):
                if isinstance(module, LoRALinear):
                    weight, bias = module.base_weight_and_bias()
                    merged = weight + module.scale * (module.lora_b @ module.lora_a)
                    setattr(parent, attr, plain_linear(merged, bias))
                elif isinstance(module, QuantizedLinear):
                    setattr(parent, attr, plain_linear(module.dequantized_weight(), module.bias))
    return model


# ----------------------------------------------------------------------------------------------------
# QLoRA: the frozen base weights stored in 4 bits (NF4) or 8 bits (int8), dequantized in every forward


QUANTIZE_KINDS = ("nf4", "int8")
NF4_BLOCK = 64  # values per absmax scale


def nf4_levels():
    """
    The 16 NormalFloat4 levels of the QLoRA paper (Dettmers et al. 2023, section 3): quantiles of the standard
    normal distribution, scaled to [-1, 1], so that each level is about equally likely for normal weights. To
    have an exact zero, the positive side takes 8 levels from 9 evenly spaced probabilities between p and
    1/2, the negative side 7 from 8, and the two zeros become one. p = (1 - 1/32 + 1 - 1/30) / 2 keeps the
    outermost quantile finite; it reproduces the table in the paper's appendix (tests/test_qlora.py checks
    4 digits).
    """
    p = 0.5 * ((1 - 1 / 32) + (1 - 1 / 30))
    positive = torch.special.ndtri(torch.linspace(p, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(p, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


NF4_LEVELS = nf4_levels()
# byte -> the levels of its two codes (high 4 bits, low 4 bits): one lookup per byte dequantizes two values
NF4_PAIRS = torch.stack((NF4_LEVELS.repeat_interleave(16), NF4_LEVELS.repeat(16)), dim=-1)


def quantize_nf4(weight):
    """
    weight (any shape) -> (codes, scales): per block of NF4_BLOCK values (row-major, the last block padded
    with zeros), scales is the block's absmax (float32) and each value/absmax is rounded to the nearest NF4
    level; codes are the level indices 0..15, two per uint8 (the first in the high 4 bits).
    """
    flat = weight.detach().float().reshape(-1)
    blocks = F.pad(flat, (0, (-flat.numel()) % NF4_BLOCK)).view(-1, NF4_BLOCK)
    scales = blocks.abs().amax(dim=1)
    normalized = blocks / scales.clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]).to(weight.device) / 2
    codes = torch.bucketize(normalized, midpoints).to(torch.uint8).view(-1)  # the nearest level
    return (codes[0::2] << 4) | codes[1::2], scales


def dequantize_nf4(codes, scales, shape, pairs=NF4_PAIRS):
    """The float32 tensor of that shape that quantize_nf4's codes and scales stand for."""
    values = F.embedding(codes.long(), pairs.to(codes.device)).view(-1, NF4_BLOCK) * scales[:, None]
    return values.view(-1)[:math.prod(shape)].view(shape)


def quantize_int8(weight):
    """weight (out, in) -> (codes int8, scales float32 per row): symmetric, row / (absmax / 127) rounded."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1) / 127
    codes = torch.round(w / scales.clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp(-127, 127)
    return codes.to(torch.int8), scales


def dequantize_int8(codes, scales):
    return codes.float() * scales[:, None]


class DequantizedMatmul(torch.autograd.Function):
    """x W^T, W dequantized in the forward and again in the backward: only the codes stay in memory."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight().to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        # W is frozen: no gradient of its own
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear whose weight is stored quantized (kind 'nf4' or 'int8'), dequantized when used."""

    def __init__(self, base: nn.Linear, kind):
        super().__init__()
        self.in_features, self.out_features, self.kind = base.in_features, base.out_features, kind
        codes, scales = quantize_nf4(base.weight) if kind == "nf4" else quantize_int8(base.weight)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scales", scales)
        if kind == "nf4":  # not persistent: derived, like the RoPE tables, but it follows the model's device
            self.register_buffer("pairs", NF4_PAIRS.to(codes.device), persistent=False)
        self.bias = base.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"

    def dequantized_weight(self):
        if self.kind == "nf4":
            shape = (self.out_features, self.in_features)
            return dequantize_nf4(self.weight_codes, self.weight_scales, shape, self.pairs)
        return dequantize_int8(self.weight_codes, self.weight_scales)

    def forward(self, x):
        y = DequantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


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
    n += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
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
