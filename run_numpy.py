"""
Run an exported model with NumPy alone, no torch: the Python twin of run.c, for a machine without torch or to
read the forward pass as a few dozen lines of array code.

    python export.py --ckpt=out/ckpt.pt --format=npz --out=model.npz
    python run_numpy.py model.npz --prompt="Once upon a time" --steps=100
    python run_numpy.py model.npz --mode=chat --prompt="What is 12 * 7?" --temperature=0   # calculator on
    python run_numpy.py model.npz --prompt="Once upon a time" --temperature=0.8 --top_p=0.9 --seed=42

The model file is export.py's --format=npz: every weight a float32 array under model.py's names
(layers.0.attention.wq.weight, ...; no output.weight when the head is tied to the embedding), and string
entries model_args (model.py's ModelArgs as JSON) and tokenizer (the tokenizer file). The forward pass is
model.py's: RMSNorm, RoPE on interleaved pairs (with Llama 3's frequency scaling when model_args has
rope_scaling), grouped-query attention, SwiGLU, attention biases (Qwen2), a tied or separate output head; in
float32, its logits equal PyTorch's within 1e-4 (tests/test_numpy_export.py). Generation keeps a KV cache,
reads the prompt in one pass, then one token per step; greedy (--temperature=0) gives engine.py's tokens. It imports
tokenizer.py (tiktoken and regex) and engine.py (the calculator), neither of which imports torch.
"""

import json
import math
import sys
import time

import numpy as np

import engine
from configurator import configure
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------------------
# settings (--key=value or --key value, as every script takes them; --help lists them)
model_file = ""  # the .npz file (python export.py --format=npz); the first positional argument
prompt = ""  # the prompt (chat: the user's message)
mode = "generate"  # 'generate': continue the prompt | 'chat': answer it as a user message, calculator on
system = ""  # chat: a system message
steps = 256  # most tokens to generate
temperature = 1.0  # 0 = greedy
top_p = 0.9  # nucleus sampling: keep the most likely tokens up to this probability mass
seed = -1  # random seed; -1 = from the time
show_tokens = False  # also print the new token ids
# -----------------------------------------------------------------------------------------------------

FORMAT = "nanollama"


# ----------------------------------------------------------------------------------------------------
# the model file


def expected_shapes(args):
    """{weight name: shape} of a model with these arguments, as model.py's state_dict has them."""
    dim, head_dim = args["dim"], args["dim"] // args["n_heads"]
    q_dim, kv_dim, hidden = args["n_heads"] * head_dim, args["n_kv_heads"] * head_dim, args["hidden_dim"]
    per_layer = {"attention.wq.weight": (q_dim, dim), "attention.wk.weight": (kv_dim, dim),
                 "attention.wv.weight": (kv_dim, dim), "attention.wo.weight": (dim, q_dim),
                 "feed_forward.w1.weight": (hidden, dim), "feed_forward.w2.weight": (dim, hidden),
                 "feed_forward.w3.weight": (hidden, dim), "attention_norm.weight": (dim,),
                 "ffn_norm.weight": (dim,)}
    if args.get("attention_bias"):
        per_layer.update({"attention.wq.bias": (q_dim,), "attention.wk.bias": (kv_dim,),
                          "attention.wv.bias": (kv_dim,)})
    shapes = {"tok_embeddings.weight": (args["vocab_size"], dim), "norm.weight": (dim,)}
    for i in range(args["n_layers"]):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in per_layer.items()})
    if not args["tie_embeddings"]:
        shapes["output.weight"] = (args["vocab_size"], dim)
    return shapes


def load_model(path):
    """
    (model, tokenizer) of an .npz file written by export.py --format=npz. model is a dict: args (model_args),
    weights {name: float32 array}, rope_cos and rope_sin (max_seq_len, head_dim / 2). Errors name the file and
    what is wrong with it.
    """
    try:
        npz = np.load(path)  # allow_pickle stays False: nothing in the file can run code
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found (python export.py --format=npz writes one)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    with npz:
        if "format" not in npz.files or str(npz["format"]) != FORMAT:
            raise ValueError(f"{path}: not written by export.py --format=npz (no 'format': '{FORMAT}' entry)")
        args = json.loads(str(npz["model_args"]))
        tokenizer = Tokenizer.from_json(str(npz["tokenizer"]), source=path)
        weights = {name: npz[name].astype(np.float32) for name in npz.files if "." in name}
    shapes = expected_shapes(args)
    missing = [name for name in shapes if name not in weights]
    unexpected = [name for name in weights if name not in shapes]
    wrong = [f"{name} {weights[name].shape} (expected {shape})" for name, shape in shapes.items()
             if name in weights and weights[name].shape != shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: weights do not match model_args: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    if args["tie_embeddings"]:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    rope_cos, rope_sin = rope_tables(args)
    return {"args": args, "weights": weights, "rope_cos": rope_cos, "rope_sin": rope_sin}, tokenizer


# ----------------------------------------------------------------------------------------------------
# the Transformer


def rope_tables(args):
    """cos and sin of the rotation angle pos * theta^(-2i/head_dim), each (max_seq_len, head_dim / 2)."""
    head_dim = args["dim"] // args["n_heads"]
    freqs = 1.0 / (args["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if args.get("rope_scaling"):
        # Llama 3.1: rotations slower than the original context slowed by the factor, fast ones kept, a blend
        wavelength = 2 * math.pi / freqs
        blend = np.clip((args["rope_original_max_seq_len"] / wavelength - args["rope_low_freq_factor"])
                        / (args["rope_high_freq_factor"] - args["rope_low_freq_factor"]), 0.0, 1.0)
        freqs = (1 - blend) * freqs / args["rope_scaling"] + blend * freqs
    angles = np.outer(np.arange(args["max_seq_len"], dtype=np.float64), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rmsnorm(x, weight, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[..., 2i], x[..., 2i+1]); x (T, heads, head_dim); cos, sin (T, hd / 2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = np.empty_like(x)
    rotated[..., 0::2] = x0 * cos - x1 * sin
    rotated[..., 1::2] = x0 * sin + x1 * cos
    return rotated


def linear(x, weights, name):
    """x @ W^T (+ b): W is (out_features, in_features), as nn.Linear stores it."""
    y = x @ weights[name + ".weight"].T
    return y + weights[name + ".bias"] if name + ".bias" in weights else y


def new_cache(args, max_len):
    """Keys and values of every layer, (n_layers, n_kv_heads, max_len, head_dim) each."""
    shape = (args["n_layers"], args["n_kv_heads"], max_len, args["dim"] // args["n_heads"])
    return {"k": np.zeros(shape, dtype=np.float32), "v": np.zeros(shape, dtype=np.float32)}


def forward(model, tokens, pos, cache):
    """
    Logits (T, vocab_size) of T tokens at positions pos .. pos + T - 1; they attend to the keys and values the
    cache holds before pos, and the cache takes theirs. One sequence, as in run.c.
    """
    args, w = model["args"], model["weights"]
    n_heads, n_kv_heads, eps = args["n_heads"], args["n_kv_heads"], args["norm_eps"]
    head_dim = args["dim"] // n_heads
    T = len(tokens)
    if pos + T > cache["k"].shape[2]:
        raise ValueError(f"{pos + T} tokens do not fit the cache of {cache['k'].shape[2]} (max_seq_len "
                         f"{args['max_seq_len']})")
    cos, sin = model["rope_cos"][pos:pos + T], model["rope_sin"][pos:pos + T]
    # query t (at position pos + t) sees the keys up to its own position
    causal = np.triu(np.full((T, pos + T), -np.inf, dtype=np.float32), k=pos + 1)
    x = w["tok_embeddings.weight"][np.asarray(tokens)]  # (T, dim)
    for i in range(args["n_layers"]):
        layer = f"layers.{i}."
        h = rmsnorm(x, w[layer + "attention_norm.weight"], eps)
        q = linear(h, w, layer + "attention.wq").reshape(T, n_heads, head_dim)
        k = linear(h, w, layer + "attention.wk").reshape(T, n_kv_heads, head_dim)
        v = linear(h, w, layer + "attention.wv").reshape(T, n_kv_heads, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache["k"][i, :, pos:pos + T] = k.transpose(1, 0, 2)
        cache["v"][i, :, pos:pos + T] = v.transpose(1, 0, 2)
        # grouped-query attention: each K/V head serves n_heads / n_kv_heads query heads in a row
        keys = np.repeat(cache["k"][i, :, :pos + T], n_heads // n_kv_heads, axis=0)  # (n_heads, pos + T, hd)
        values = np.repeat(cache["v"][i, :, :pos + T], n_heads // n_kv_heads, axis=0)
        scores = q.transpose(1, 0, 2) @ keys.transpose(0, 2, 1) / np.float32(math.sqrt(head_dim)) + causal
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))  # (n_heads, T, pos + T)
        attention = scores / scores.sum(axis=-1, keepdims=True)
        y = (attention @ values).transpose(1, 0, 2).reshape(T, n_heads * head_dim)
        x = x + linear(y, w, layer + "attention.wo")
        h = rmsnorm(x, w[layer + "ffn_norm.weight"], eps)
        gate = linear(h, w, layer + "feed_forward.w1")
        silu = gate * 0.5 * (1 + np.tanh(0.5 * gate))  # gate * sigmoid(gate), no overflow for large -gate
        x = x + linear(silu * linear(h, w, layer + "feed_forward.w3"), w, layer + "feed_forward.w2")
    return rmsnorm(x, w["norm.weight"], eps) @ w["output.weight"].T


# ----------------------------------------------------------------------------------------------------
# sampling and generation


def sample(logits, temperature, top_p, rng):
    """The next token: the most likely one at temperature 0, else drawn from softmax(logits / temperature),
    restricted to the smallest set of most likely tokens whose probability reaches top_p."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        kept = order[mass_before < top_p]  # always at least the most likely token
        return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))
    return int(rng.choice(len(probs), p=probs))


def generate(model, tokenizer, prompt, max_new_tokens, temperature=0.0, top_p=1.0, seed=None, tools=True,
             stop_tokens=None):
    """
    Yield (token, forced) for each new token after prompt (a list of ids), as engine.generate does for one
    sample: stop after a sampled stop token (default: the end of the assistant's turn and <|bos|>) or at
    max_seq_len; with tools, the calculator's answer is forced in after <|python_end|> (engine.py's hook).
    """
    if stop_tokens is None:
        stop_tokens = [tokenizer.assistant_end_id, tokenizer.bos_id]
    hook = engine.make_tool_hook(tokenizer) if tools and tokenizer.has_tools else None
    rng = np.random.default_rng(seed)
    max_len = min(model["args"]["max_seq_len"], len(prompt) + max_new_tokens)
    cache = new_cache(model["args"], max_len)
    sequence, forced_queue = list(prompt), []
    inputs, pos = list(prompt), 0
    for _ in range(max_len - len(prompt)):
        logits = forward(model, inputs, pos, cache)[-1]
        pos += len(inputs)
        forced = len(forced_queue) > 0
        token = forced_queue.pop(0) if forced else sample(logits, temperature, top_p, rng)
        sequence.append(token)
        yield token, forced
        if not forced and token in stop_tokens:
            return
        if hook is not None and not forced_queue:
            forced_queue = list(hook(0, sequence) or [])
        inputs = [token]


# ----------------------------------------------------------------------------------------------------
# the CLI

SHOWN = {"<|python_start|>": "[calculator: ", "<|python_end|>": "]", "<|output_start|>": " = ",
         "<|output_end|>": " "}  # tool tokens as run.c prints them


def main(options):
    if options["steps"] < 1 or options["temperature"] < 0 or not 0 < options["top_p"] <= 1:
        sys.exit("error: steps must be at least 1, temperature at least 0, top_p in (0, 1]")
    if options["mode"] not in ("generate", "chat"):
        sys.exit(f"error: mode={options['mode']!r}: expected 'generate' or 'chat'")
    try:
        model, tokenizer = load_model(options['model_file'])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if options['mode'] == "chat":
        messages = [{"role": "system", "content": options['system']}] if options['system'] else []
        try:
            prompt = tokenizer.render_for_completion(messages + [{"role": "user", "content": options['prompt']}])
        except ValueError as e:
            sys.exit(f"error: chat mode: {e}")
        stop_tokens, tools = [tokenizer.assistant_end_id, tokenizer.bos_id], True
    else:
        prompt = tokenizer.encode(options['prompt'], bos=True)
        print(options['prompt'], end="", flush=True)
        stop_tokens, tools = [tokenizer.bos_id], False  # a new document ends the text, as in run.c
    if len(prompt) >= model["args"]["max_seq_len"]:
        sys.exit(f"error: the prompt is {len(prompt)} tokens; the model's context is "
                 f"{model['args']['max_seq_len']}")
    decoder = engine.TextDecoder(tokenizer)
    generated, t_first = [], None
    for token, _ in generate(model, tokenizer, prompt, options['steps'], options['temperature'], options['top_p'],
                             options['seed'] if options['seed'] >= 0 else None, tools, stop_tokens):
        generated.append(token)
        if t_first is None:
            t_first = time.time()  # as run.c: timed from the first token on, the prompt's pass left out
        if token in stop_tokens:
            break
        piece = decoder.piece(token)
        print(SHOWN.get(piece, piece), end="", flush=True)
    print(flush=True)
    if options['show_tokens']:
        print("tokens: " + " ".join(map(str, generated)))
    if len(generated) > 1:
        print(f"achieved tok/s: {(len(generated) - 1) / (time.time() - t_first):.2f}", file=sys.stderr)


if __name__ == "__main__":
    main(configure(globals(), positional="model_file", verbose=False))
