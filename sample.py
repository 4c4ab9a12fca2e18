"""
Sample from a trained model.

    python sample.py --out_dir=out                       # out/best.pt if it exists, else out/ckpt.pt
    python sample.py --ckpt=out/ckpt.pt --start="Once upon a time" --temperature=0.8 --top_p=0.9
    python sample.py --start=FILE:prompt.txt --num_samples=3 --max_new_tokens=200
"""

import sys
import time

from configurator import configure
import engine
from checkpoint import checkpoint_in, load_checkpoint

# -----------------------------------------------------------------------------------------------------
out_dir = "out"
ckpt = ""  # a checkpoint: a .pt, a .safetensors export, or hf:DIR (a Hugging Face model folder or Hub id);
#           empty = out_dir/best.pt, or out_dir/ckpt.pt when there is no best.pt
start = ""  # the prompt; "FILE:path" reads it from a file; empty = start from <|bos|> alone
num_samples = 1
max_new_tokens = 200
temperature = 0.8  # 0 = greedy
top_k = 0  # 0 = off
top_p = 0.95  # 1.0 = off
seed = 1337
device = "cpu"
stop_at_bos = True  # end a sample when the model starts a new document
show_tokens = False  # print the token ids too (to compare with ./run or another implementation)
# -----------------------------------------------------------------------------------------------------
configure(globals())

if not ckpt:
    ckpt = checkpoint_in(out_dir)
if start.startswith("FILE:"):
    path = start[len("FILE:"):]
    try:
        with open(path, "rb") as f:
            start = f.read().decode("utf-8")
    except FileNotFoundError:
        sys.exit(f"error: --start=FILE:{path}: there is no file {path}")
    except IsADirectoryError:
        sys.exit(f"error: --start=FILE:{path}: {path} is a folder; give the prompt's text file")
    except UnicodeDecodeError as e:
        sys.exit(f"error: --start=FILE:{path}: {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                 f"{e.start}); save the prompt as UTF-8")
    except OSError as e:
        sys.exit(f"error: --start=FILE:{path}: cannot read {path}: {e.strerror}")
try:
    model, tokenizer, checkpoint = load_checkpoint(ckpt, device)
    engine.check_weights(model, ckpt)
except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
chat_model = checkpoint.get("data_format") == "chat"
if chat_model:
    # a chat model (SFT, LoRA) answers the prompt as a user message; tools on, stop at the end of its turn
    prompt = tokenizer.render_for_completion([{"role": "user", "content": start or "Hello!"}])
    stop_tokens = [tokenizer.assistant_end_id, tokenizer.bos_id]
else:
    prompt = tokenizer.encode(start, bos=True)
    stop_tokens = [tokenizer.bos_id] if stop_at_bos else []
kind = "chat model" if chat_model else "base model"
print(f"{ckpt}: step {checkpoint.get('iter_num', '?')}, {kind}, prompt of {len(prompt)} tokens", file=sys.stderr)

# how a calculator call shows: [calculator: 12*7 = 84]
TOOL_DISPLAY = {"<|python_start|>": "[calculator: ", "<|python_end|>": "", "<|output_start|>": " = ",
                "<|output_end|>": "] "}
n_tokens, t0 = 0, time.time()
for k in range(num_samples):
    sys.stdout.write("" if chat_model else start)
    generated = []
    # generate_text streams whole characters (a character split across tokens waits for its last byte)
    steps = engine.generate_text(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed + k, tools=chat_model, stop_tokens=stop_tokens)
    try:
        for tokens, pieces in steps:
            token = tokens[0]
            generated.append(token)
            n_tokens += 1
            if token in stop_tokens:
                break
            sys.stdout.write(TOOL_DISPLAY.get(pieces[0], pieces[0]))
            sys.stdout.flush()
    except engine.NonFiniteLogitsError as e:
        sys.exit(f"\nerror: {ckpt}: {e}")
    sys.stdout.write("\n")
    if show_tokens:
        print(f"tokens: {' '.join(map(str, generated))}")
    if k < num_samples - 1:
        print("---------------")
elapsed = time.time() - t0
print(f"{n_tokens} tokens in {elapsed:.2f}s: {n_tokens / elapsed:.1f} tokens/s", file=sys.stderr)
