"""
A real open model, SmolLM2-135M-Instruct, from its GGUF and from a Hugging Face folder: import time, the largest
logit difference against transformers, generation speed of sample.py and of run.c, and how often chat replies
equal transformers' own.

    python bench/real_model.py                      # after the real-model tests have filled their cache once
    python bench/real_model.py --gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf --hf_dir=smollm2 --compare_chat=False

hf_dir must be transformers' conversion of gguf_file (the real-model tests save it beside the GGUF): it is the
reference for the logits. Prints figures and the machine; asserts nothing.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configurator import configure  # noqa: E402

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "nanollama", "realmodel")
# -----------------------------------------------------------------------------------------------------
gguf_file = os.path.join(CACHE, "SmolLM2-135M-Instruct.Q4_1.gguf")  # the GGUF (the real-model tests fetch it)
hf_dir = ""  # transformers' conversion of gguf_file; empty = the one the real-model tests saved in their cache
repeats = 3  # imports and generations timed this many times; the best is reported
logit_tokens = 256  # real tokens (WikiText-2) for the logit comparison
new_tokens = 128  # tokens generated per timing, greedy
threads = 0  # torch threads and OMP threads for run.c; 0 = torch's default
compare_chat = True  # also count the 20 test prompts whose greedy replies equal transformers' (slow: ~40 replies)
# -----------------------------------------------------------------------------------------------------
configure(globals())

import transformers  # noqa: E402  (the reference; test-only, installed by .ci/run)

from checkpoint import load_checkpoint  # noqa: E402
from export import write_model, write_tokenizer  # noqa: E402

if threads:
    torch.set_num_threads(threads)
if not hf_dir:
    hf_dir = os.path.join(CACHE, f"transformers-{transformers.__version__}")
for path in (gguf_file, hf_dir):
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found: run python -m pytest tests/test_real_model.py once (it fetches the GGUF "
                 "and saves transformers' conversion), or pass --gguf_file and --hf_dir")
print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
      f"with {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")


def best_time(fn):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


# import: the file to a model.py model and a tokenizer, as every stage does it
imports = {}
for name in (f"gguf:{gguf_file}", f"hf:{hf_dir}"):
    seconds, (model, tokenizer, _) = best_time(lambda: load_checkpoint(name))
    imports[name.split(":")[0]] = (seconds, model, tokenizer)
    print(f"import {name.split(':')[0]}: {seconds:.2f} s (load_checkpoint, best of {repeats})")
model, tokenizer = imports["gguf"][1], imports["gguf"][2]

# logits against transformers' own loading of the same GGUF
reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
text = open(os.path.join(REPO, "prepare", "sample", "wikitext-2", "valid.txt"), encoding="utf-8").read(20000)
ids = torch.tensor([tokenizer.encode(text)[:logit_tokens]])
with torch.no_grad():
    expected = reference(ids).logits[0]
    for kind in ("gguf", "hf"):
        difference = (imports[kind][1](ids)[0][0] - expected).abs().max().item()
        print(f"max |logit difference| vs transformers ({kind}:, {ids.shape[1]} tokens, logits up to "
              f"{expected.abs().max().item():.0f}): {difference:.1e}")

# sample.py: greedy generation, as a user runs it (its own tokens/s line)
for name in (f"gguf:{gguf_file}", f"hf:{hf_dir}"):
    speeds = []
    for _ in range(repeats):
        result = subprocess.run([sys.executable, "sample.py", f"--ckpt={name}", "--start=Tell me about the sea.",
                                 "--temperature=0", f"--max_new_tokens={new_tokens}", "--stop_at_bos=False"],
                                cwd=REPO, capture_output=True, text=True)
        found = re.search(r"(\d+) tokens in [\d.]+s: ([\d.]+) tokens/s", result.stderr)
        if found is None:
            sys.exit(f"error: sample.py failed:\n{result.stderr[-2000:]}")
        speeds.append(float(found.group(2)))
    print(f"sample.py {name.split(':')[0]}: {max(speeds):.1f} tok/s ({found.group(1)} tokens, best of {repeats})")

# run.c: fp32 and int8 files from the GGUF, greedy generation
cc = shutil.which("cc") or shutil.which("gcc")
folder = tempfile.mkdtemp(prefix="realmodel-")
try:
    binary = os.path.join(folder, "run")
    subprocess.run([cc, "-O3", "-march=native", "-o", binary, os.path.join(REPO, "run.c"), "-lm"], check=True)
    write_tokenizer(tokenizer, os.path.join(folder, "tokenizer.bin"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or torch.get_num_threads())}
    for weight_type, label in ((0, "fp32"), (1, "int8")):
        path = os.path.join(folder, f"model_{label}.bin")
        size, _ = write_model(model, tokenizer, path, weight_type, 64 if weight_type else 0)
        speeds = []
        for _ in range(repeats):
            result = subprocess.run([binary, path, "-z", os.path.join(folder, "tokenizer.bin"), "-t", "0",
                                     "-n", str(new_tokens), "-i", "Tell me about the sea."],
                                    capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
            found = re.search(r"achieved tok/s: ([\d.]+)", result.stderr + result.stdout)
            if found is None:
                sys.exit(f"error: run.c failed:\n{(result.stderr + result.stdout)[-2000:]}")
            speeds.append(float(found.group(1)))
        print(f"run.c {label} ({size / 1e6:.0f} MB): {max(speeds):.1f} tok/s (best of {repeats})")
        os.remove(path)
finally:
    shutil.rmtree(folder)

# chat fidelity: greedy replies to the real-model tests' 20 prompts, ours (chat.py's prompt, which starts with
# <|endoftext|>) and ours from the template's prompt alone, against transformers from its template's prompt
if compare_chat:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_real_model import CHAT_PROMPTS
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    end = tokenizer.assistant_end_id
    same_chat_prompt = same_template_prompt = 0
    for question in CHAT_PROMPTS:
        messages = [{"role": "user", "content": question}]
        template = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        with torch.no_grad():
            out = reference.generate(torch.tensor([template]), attention_mask=torch.ones(1, len(template), dtype=torch.long),
                                     max_new_tokens=32, do_sample=False, eos_token_id=end, pad_token_id=end)
        theirs = out[0, len(template):].tolist()
        for prompt, counter in ((tokenizer.render_for_completion(messages), "chat"), (template, "template")):
            ours = [t[0] for t, _ in model.generate(prompt, 32, temperature=0, stop_tokens=[end])]
            if ours == theirs:
                same_chat_prompt += counter == "chat"
                same_template_prompt += counter == "template"
    print(f"greedy replies equal to transformers' (its template's prompt), of {len(CHAT_PROMPTS)}: "
          f"{same_template_prompt} from the same prompt, {same_chat_prompt} from chat.py's prompt "
          "(<|endoftext|> first)")
