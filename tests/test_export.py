"""
export.py and run.c: the C program reproduces the PyTorch model (greedy tokens, logits, prompt encoding, chat
format), also with Llama 3.1's RoPE scaling, Qwen2's attention biases and real vocabularies' pre-splits and missing
byte tokens; int8 stays close to fp32; broken files, directories and NaN weights are refused cleanly (checked under
AddressSanitizer).
"""

import inspect
import json
import os
import re
import shutil
import struct
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_TRAIN, random_model, run_stage, sample_file
from checkpoint import load_checkpoint, save_checkpoint
from export import LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN
from model import ModelArgs, Transformer
from tokenizer import GPT2_DIGITS_SPLIT_PATTERN, GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, Tokenizer

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
HEADER_BYTES = 256


def compile_run(out, *flags):
    if CC is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH: the C inference tests need one")
    result = subprocess.run([CC, *flags, "-o", str(out), str(REPO / "run.c"), "-lm"], capture_output=True, text=True)
    assert result.returncode == 0, f"compiling run.c failed:\n{result.stderr}"
    return out


@pytest.fixture(scope="module")
def run_binary(tmp_path_factory):
    """run.c built like `make runfast` (the SIMD kernels of this CPU), single-threaded."""
    return compile_run(tmp_path_factory.mktemp("bin") / "run", "-O2", "-march=native", "-fopenmp-simd")


@pytest.fixture(scope="module")
def debug_binary(tmp_path_factory):
    """run.c built like `make debug`: AddressSanitizer and UBSan, any report aborts."""
    return compile_run(tmp_path_factory.mktemp("bin") / "rundebug", "-g", "-O1", "-fsanitize=address,undefined",
                       "-fno-omit-frame-pointer", "-fno-sanitize-recover=all")


def run_c(binary, *args, check=True, stdin=subprocess.DEVNULL):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ASAN_OPTIONS": "detect_leaks=0"}
    result = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, errors="replace",
                            stdin=stdin, env=env, timeout=60)
    if check:
        assert result.returncode == 0, f"{binary} {args} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def tokens_line(stdout):
    return [int(t) for t in re.findall(r"^tokens:(.*)$", stdout, re.M)[-1].split()]


def export(ckpt, out, *args):
    run_stage("export.py", f"--ckpt={ckpt}", f"--out={out}", *args)
    return out


def save_model(model, tokenizer, path, data_format="text"):
    save_checkpoint({"model_args": asdict(model.args), "model": model.state_dict(), "tokenizer": tokenizer.to_json(),
                     "data_format": data_format}, path)
    return path


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A tiny model trained on tiny shakespeare (separate output head), exported as fp32 and int8."""
    root = tmp_path_factory.mktemp("export")
    run_stage("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={root}", "--max_iters=60",
              "--eval_interval=60", "--learning_rate=3e-3", "--tie_embeddings=False", "--block_size=128",
              "--max_seq_len=256")
    ckpt = root / "ckpt.pt"
    export(ckpt, root / "model.bin", f"--tokenizer_out={root / 'tokenizer.bin'}")
    export(ckpt, root / "model_q8.bin", "--tokenizer_out=", "--quantize=int8")  # group 64: the 512-bit kernel
    return {"ckpt": ckpt, "fp32": root / "model.bin", "int8": root / "model_q8.bin", "tok": root / "tokenizer.bin",
            "root": root}


def test_greedy_tokens_match_sample_py(trained, run_binary):
    result = run_stage("sample.py", f"--ckpt={trained['ckpt']}", "--start=ROMEO:", "--temperature=0",
                       "--max_new_tokens=80", "--show_tokens=True")
    python_tokens = tokens_line(result.stdout)
    c = run_c(run_binary, trained["fp32"], "-z", trained["tok"], "-t", 0, "-n", 80, "-v", 1, "-i", "ROMEO:")
    c_tokens = tokens_line(c.stdout)
    assert len(python_tokens) >= 64
    assert c_tokens == python_tokens
    assert "achieved tok/s" in c.stderr


def first_step_logits(binary, model_file, tokenizer_file, prompt):
    c = run_c(binary, model_file, "-z", tokenizer_file, "-t", 0, "-n", 1, "-l", 1, "-i", prompt)
    return torch.tensor([float(v) for v in re.search(r"^logits:(.*)$", c.stdout, re.M).group(1).split()])


def test_first_step_logits_match_pytorch(trained, run_binary, shakespeare_tokenizer, tmp_path):
    model, tokenizer, _ = load_checkpoint(str(trained["ckpt"]))
    prompt = "First Citizen:\nBefore we proceed any further, hear me speak."
    with torch.no_grad():
        expected = model(torch.tensor([tokenizer.encode(prompt, bos=True)]))[0][0, -1]
    assert (first_step_logits(run_binary, trained["fp32"], trained["tok"], prompt) - expected).abs().max() < 1e-4

    # a random model with a tied head, grouped-query attention and non-default rope_theta / norm_eps
    random = random_model(vocab_size=shakespeare_tokenizer.vocab_size, rope_theta=500000.0, norm_eps=1e-6,
                          tie_embeddings=True, n_heads=4, n_kv_heads=1)
    ckpt = tmp_path / "random.pt"
    save_checkpoint({"model_args": vars(random.args), "model": random.state_dict(),
                     "tokenizer": shakespeare_tokenizer.to_json(), "data_format": "text"}, ckpt)
    export(ckpt, tmp_path / "random.bin", f"--tokenizer_out={tmp_path / 'random_tok.bin'}")
    with torch.no_grad():
        expected = random(torch.tensor([shakespeare_tokenizer.encode(prompt, bos=True)]))[0][0, -1]
    got = first_step_logits(run_binary, tmp_path / "random.bin", tmp_path / "random_tok.bin", prompt)
    assert (got - expected).abs().max() < 1e-4


# tiny random models of the settings run.c runs beyond llama2.c's
REAL_MODEL_SETTINGS = {
    # Llama 3.2's RoPE scaling, with an original context of 64 so that at head_dim 16 one frequency is kept, one
    # blended and six slowed down, and the ~100 positions below see the difference
    "llama3_rope_scaling": dict(rope_theta=500000.0, rope_scaling=8.0, rope_low_freq_factor=1.0,
                                rope_high_freq_factor=4.0, rope_original_max_seq_len=64),
    "qwen2_attention_biases": dict(rope_theta=1000000.0, attention_bias=True),  # random biases on q, k and v
}


@pytest.mark.parametrize("setting", list(REAL_MODEL_SETTINGS))
def test_rope_scaling_and_attention_biases_match_pytorch(setting, run_binary, tmp_path):
    """Llama 3.1+'s RoPE scaling and Qwen2's q/k/v biases: ./run's greedy tokens are PyTorch's (fp32) for 90 steps,
    the prompt in blocks and one token at a time; int8 runs, its logits much closer to PyTorch's than those of the
    same weights without the setting."""
    tokenizer = Tokenizer.byte_level()
    model = random_model(vocab_size=300, max_seq_len=128, **REAL_MODEL_SETTINGS[setting])
    without = Transformer(ModelArgs(**{**asdict(model.args), "rope_scaling": 0.0, "attention_bias": False}))
    without.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".bias")})
    ckpt = save_model(model, tokenizer, tmp_path / "model.pt")
    fp32 = export(ckpt, tmp_path / "model.bin", f"--tokenizer_out={tmp_path / 'tokenizer.bin'}")
    int8 = export(ckpt, tmp_path / "model_q8.bin", "--tokenizer_out=", "--quantize=int8")
    prompt = "Once upon a time, in a land far away"
    ids = tokenizer.encode(prompt, bos=True)
    with torch.no_grad():
        expected_logits = model(torch.tensor([ids]))[0][0, -1]
        effect = (expected_logits - without(torch.tensor([ids]))[0][0, -1]).abs().max().item()
    assert effect > 0.5  # the setting changes the model at these positions
    expected = [tokens[0] for tokens, _ in model.generate(ids, 90, temperature=0)]
    for block in (1, 64):
        c = run_c(run_binary, fp32, "-z", tmp_path / "tokenizer.bin", "-t", 0, "-n", 90, "-v", 1, "-l", 1,
                  "-b", block, "-i", prompt)
        assert tokens_line(c.stdout) == expected and len(expected) == 90, block
        logits = torch.tensor([float(v) for v in re.search(r"^logits:(.*)$", c.stdout, re.M).group(1).split()])
        assert (logits - expected_logits).abs().max() < 1e-4, block
    c = run_c(run_binary, int8, "-z", tmp_path / "tokenizer.bin", "-t", 0, "-n", 90, "-v", 1, "-l", 1, "-i", prompt)
    logits = torch.tensor([float(v) for v in re.search(r"^logits:(.*)$", c.stdout, re.M).group(1).split()])
    assert (logits - expected_logits).abs().max() < min(0.2, effect / 4) and len(tokens_line(c.stdout)) == 90


def test_non_finite_weights_are_refused(run_binary, tmp_path):
    """A NaN weight: export.py refuses it naming the tensor; a model file holding one anyway (written by other
    means) makes ./run stop with a message instead of printing garbage, in the prompt's blocks and token by token."""
    tokenizer = Tokenizer.byte_level()
    model = random_model(vocab_size=300)
    with torch.no_grad():
        model.layers[1].attention.wk.weight[3, 5] = float("nan")
    ckpt = save_model(model, tokenizer, tmp_path / "nan.pt")
    for fmt in ("run", "safetensors"):
        result = run_stage("export.py", f"--ckpt={ckpt}", f"--format={fmt}", f"--out={tmp_path / 'nan.out'}",
                           "--tokenizer_out=", check=False)
        assert result.returncode == 1 and "layers.1.attention.wk.weight has 1 of its" in result.stderr, result.stderr
        assert not (tmp_path / "nan.out").exists()
    from export import write_model, write_tokenizer
    write_tokenizer(tokenizer, tmp_path / "tokenizer.bin")
    for weight_type, group in ((0, 0), (1, 64)):
        write_model(model, tokenizer, tmp_path / "nan.bin", weight_type, group)
        for block in (1, 64):
            result = run_c(run_binary, tmp_path / "nan.bin", "-z", tmp_path / "tokenizer.bin", "-t", 0, "-n", 8,
                           "-b", block, "-i", "Hello", check=False)
            assert result.returncode == 1 and "not finite" in result.stderr, (weight_type, block, result.stderr)


def c_perplexity(binary, model_file, tokenizer_file, text_file):
    c = run_c(binary, model_file, "-z", tokenizer_file, "-m", "perplexity", "-f", text_file)
    return float(re.search(r"mean nll: ([0-9.]+)", c.stdout).group(1)), float(re.search(r"perplexity: ([0-9.]+)", c.stdout).group(1))


def test_int8_close_to_fp32(trained, run_binary):
    model, tokenizer, _ = load_checkpoint(str(trained["ckpt"]))
    text = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    val_text = text[-8000:]  # from the validation split (the last 10%)
    text_file = trained["root"] / "val.txt"
    text_file.write_text(val_text, encoding="utf-8")
    nll_fp32, ppl_fp32 = c_perplexity(run_binary, trained["fp32"], trained["tok"], text_file)
    nll_int8, ppl_int8 = c_perplexity(run_binary, trained["int8"], trained["tok"], text_file)
    # the C perplexity is PyTorch's loss on the same windows (seq_len - 1 tokens, each after <|bos|>)
    ids, seq_len = tokenizer.encode(val_text), model.args.max_seq_len
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids), seq_len - 1):
            window = ids[start:start + seq_len - 1]
            _, loss = model(torch.tensor([[tokenizer.bos_id] + window[:-1]]), torch.tensor([window]),
                            loss_reduction="sum")
            losses.append(loss.item())
    assert abs(nll_fp32 - sum(losses) / len(ids)) < 1e-4
    assert abs(ppl_int8 - ppl_fp32) / ppl_fp32 < 0.02, (ppl_fp32, ppl_int8)

    fp32 = tokens_line(run_c(run_binary, trained["fp32"], "-z", trained["tok"], "-t", 0, "-n", 64, "-v", 1,
                             "-i", "KING RICHARD:").stdout)
    int8 = tokens_line(run_c(run_binary, trained["int8"], "-z", trained["tok"], "-t", 0, "-n", 64, "-v", 1,
                             "-i", "KING RICHARD:").stdout)
    agree = sum(a == b for a, b in zip(fp32, int8)) / len(fp32)
    assert agree > 0.5, (fp32, int8)
    assert trained["int8"].stat().st_size < 0.4 * trained["fp32"].stat().st_size


def real_lines(n_per_source=250):
    """Non-empty lines of real text: stories, Wikipedia, instructions, and LIMA's answers (code, non-ASCII)."""
    lines = []
    for relative in ("tinystories/tinystories_val.txt", "wikitext-2/valid.txt"):
        text = sample_file(relative).read_text(encoding="utf-8")
        lines += [line for line in text.splitlines() if line.strip()][:n_per_source]
    alpaca = json.loads(sample_file("alpaca/alpaca_data_1k.json").read_text(encoding="utf-8"))
    lines += [line for r in alpaca for line in r["output"].splitlines() if line.strip()][:n_per_source]
    lima = json.loads(sample_file("lima/lima.json").read_text(encoding="utf-8"))
    lima_lines = [line for r in lima for line in (r["instruction"] + "\n" + r["output"]).splitlines() if line.strip()]
    non_ascii = [line for line in lima_lines if not line.isascii()][:n_per_source // 2]
    lines += non_ascii + [line for line in lima_lines if line.isascii()][:n_per_source - len(non_ascii)]
    return lines


def test_prompt_encoding_matches_tiktoken(trained, run_binary, tmp_path):
    _, tokenizer, _ = load_checkpoint(str(trained["ckpt"]))
    lines = [line + "\n" for line in real_lines()]
    lines += ["  two  spaces\tand\ttabs  \n", "numbers 1234567 and 3.14159, it's THEY'LL we've\n",
              "émigré naïve Москва 東京 🙂 x²\n", "\r\n", "end of text   "]
    assert len(lines) >= 1000
    text_file = tmp_path / "lines.txt"
    text_file.write_text("".join(lines), encoding="utf-8")
    c = run_c(run_binary, trained["fp32"], "-z", trained["tok"], "-m", "encode", "-f", text_file)
    c_ids = [[int(t) for t in row.split()] for row in c.stdout.split("\n")[:len(lines)]]
    mismatches = [line for line, ids in zip(lines, c_ids) if ids != tokenizer.encode(line)]
    assert not mismatches, f"{len(mismatches)} lines encode differently, e.g. {mismatches[:3]}"


# the pre-split patterns run.c writes out by hand
SPLIT_PATTERNS = {"gpt4": GPT4_SPLIT_PATTERN, "llama3": LLAMA3_SPLIT_PATTERN, "qwen2": QWEN2_SPLIT_PATTERN,
                  "gpt2": GPT2_SPLIT_PATTERN, "smollm2": GPT2_DIGITS_SPLIT_PATTERN}
SPLIT_CASES = ["year 1999 had  123 people,   and 4,567 items!!\n", "  spaces   \r\r  x 12 \t\t9 \n", " 5 apples\n",
               "a  5\n", "tab\t\t1 2  3\n", "I'M HE'S you'RE 'tis we'Ve\n", "end.\r\r  \r\n", "x²³ ½ ٣٤ Ⅻ\n"]  # (a line each)


def c_encode(binary, model_file, tokenizer_file, lines, folder):
    """run.c's ids of each line (each ends with a newline)."""
    text_file = folder / "lines.txt"
    text_file.write_text("".join(lines), encoding="utf-8", newline="")
    c = run_c(binary, model_file, "-z", tokenizer_file, "-m", "encode", "-f", text_file)
    return [[int(t) for t in row.split()] for row in c.stdout.split("\n")[:len(lines)]]


def exported_for(tokenizer, folder, **settings):
    """A tiny random model with this tokenizer, through export.py: (model, model file, tokenizer file)."""
    model = random_model(vocab_size=tokenizer.vocab_size, max_seq_len=128, **settings)
    ckpt = save_model(model, tokenizer, folder / "model.pt", data_format="chat")
    export(ckpt, folder / "model.bin", f"--tokenizer_out={folder / 'tokenizer.bin'}")
    return model, folder / "model.bin", folder / "tokenizer.bin"


@pytest.mark.parametrize("split", list(SPLIT_PATTERNS))
def test_pre_splits_encode_as_tokenizer_py(split, run_binary, tmp_path):
    """GPT-4's, Llama 3's, Qwen2's, GPT-2's and SmolLM2's pre-splits in run.c cut ~1,000 real lines (code,
    non-ASCII) and the cases where the patterns differ (digits, spaces before them, line breaks, contractions) where
    tokenizer.py's regex does: the same ids. The vocabulary is the lines' most frequent byte pairs and triples,
    whose tokens cross every boundary a pattern could draw, so that a chunk cut elsewhere encodes differently (with
    another pattern's split, 200-750 of the lines would)."""
    lines = [line + "\n" for line in real_lines()] + SPLIT_CASES
    data = "".join(lines).encode("utf-8")
    grams = (Counter(data[i:i + 2] for i in range(len(data) - 1)).most_common(1500) +
             Counter(data[i:i + 3] for i in range(len(data) - 2)).most_common(1000))
    ranks = {token: rank for rank, token in enumerate([bytes([b]) for b in range(256)] + [g for g, _ in grams])}
    specials = {name: len(ranks) + i for i, name in enumerate(Tokenizer.byte_level().special_tokens)}
    tokenizer = Tokenizer(ranks, SPLIT_PATTERNS[split], specials)
    _, model_file, tokenizer_file = exported_for(tokenizer, tmp_path)
    got = c_encode(run_binary, model_file, tokenizer_file, lines, tmp_path)
    mismatches = [line for line, ids in zip(lines, got) if ids != tokenizer.encode(line)]
    assert not mismatches, f"{len(mismatches)} lines encode differently, e.g. {mismatches[:3]}"


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# bytes SmolLM2's vocabulary has no token for, as control characters and as the lead byte of U+40000.. U+7FFFF
MISSING_BYTES = [4, 6, 19, 20, 22, 29, 0xC0, 0xC1, 0xF1, 0xFF]
UNENCODABLE = ["\x04", "\x06", "\x13", "\x14", "\x16", "\x1d", "\U00040000", "\U0005ABCD"]


def smollm2_like(ours, missing_bytes=(), **settings):
    """A ChatML tokenizer shaped like SmolLM2's: our merges re-numbered without the single bytes in missing_bytes
    (ids close up, as in a real vocabulary), SmolLM2's pre-split, <|endoftext|> first, its default system message."""
    ranks = [token for token, _ in sorted(ours.mergeable_ranks.items(), key=lambda kv: kv[1])]
    assert not any(b in token for token in ranks if len(token) > 1 for b in missing_bytes)  # nothing merges them
    kept = [token for token in ranks if not (len(token) == 1 and token[0] in missing_bytes)]
    specials = {name: i for i, name in enumerate(CHATML_SPECIALS)}  # ids 0.., as SmolLM2 has them
    return Tokenizer({token: len(specials) + i for i, token in enumerate(kept)}, GPT2_DIGITS_SPLIT_PATTERN, specials,
                     name="smollm2-like", chat_format="chatml", bos_token="<|endoftext|>",
                     default_system=SMOLLM2_SYSTEM, **settings)


@pytest.mark.parametrize("unk_token", ["", "<|endoftext|>"])
def test_bytes_without_a_token_encode_as_tokenizer_py(unk_token, trained, run_binary, tmp_path):
    """A vocabulary without some single-byte tokens (SmolLM2's lacks 21): run.c encodes real lines with such bytes
    put in as tokenizer.py does, leaving a byte out of its piece and merging the rest, or putting the unk token in
    place of each run of them."""
    if "unk_token" not in inspect.signature(Tokenizer).parameters:
        pytest.skip("tokenizer.py here cannot encode bytes that have no token (Tokenizer's unk_token, missing_bytes)")
    tokenizer = smollm2_like(load_checkpoint(str(trained["ckpt"]))[1], MISSING_BYTES, unk_token=unk_token)
    assert sorted(tokenizer.missing_bytes) == MISSING_BYTES
    _, model_file, tokenizer_file = exported_for(tokenizer, tmp_path)
    lines = real_lines()
    plain = [line for line in lines if line.isascii()][:400] + [line for line in lines if not line.isascii()][:100]
    spoiled = [line[:i % 9] + UNENCODABLE[i % 8] * (1 + i % 3) + line[i % 9:] for i, line in enumerate(plain[::2])]
    lines = [line + "\n" for line in plain + spoiled + [".\x04.", "\x06abc", "12\x1434", "\x04", "a \x13\x16 b"]]
    got = c_encode(run_binary, model_file, tokenizer_file, lines, tmp_path)
    mismatches = [line for line, ids in zip(lines, got) if ids != tokenizer.encode(line)]
    assert not mismatches, f"{len(mismatches)} of {len(lines)} lines encode differently, e.g. {mismatches[:3]}"
    left_out, dots, dot = c_encode(run_binary, model_file, tokenizer_file, [".\x04\x06.\n", "..\n", ".\n"], tmp_path)
    unk = [tokenizer.special(unk_token)] if unk_token else []
    assert left_out == (dot[:-1] + unk + dot if unk_token else dots)


def test_chat_opens_with_the_templates_default_system_message(trained, run_binary, tmp_path):
    """SmolLM2's chat template opens a conversation that has no system message with its own; the tokenizer file
    carries it, and ./run -m chat without -y replies as PyTorch does to tokenizer.py's rendering (-y replaces it)."""
    tokenizer = smollm2_like(load_checkpoint(str(trained["ckpt"]))[1])
    model, model_file, tokenizer_file = exported_for(tokenizer, tmp_path)
    end = tokenizer.special("<|im_end|>")
    for system in ([], [{"role": "system", "content": "Speak in verse."}]):
        prompt = tokenizer.render_for_completion(system + [{"role": "user", "content": "Who is there?"}])
        assert (SMOLLM2_SYSTEM in tokenizer.decode(prompt)) == (not system)
        expected = [t[0] for t, _ in model.generate(prompt, 20, temperature=0, stop_tokens=[end])]
        system_flag = ["-y", system[0]["content"]] if system else []
        c = run_c(run_binary, model_file, "-z", tokenizer_file, "-m", "chat", "-t", 0, "-n", 20, "-v", 1, *system_flag,
                  "-i", "Who is there?")
        assert tokens_line(c.stdout) == [t for t in expected if t != end] and len(expected) >= 5


def test_chat_mode_uses_the_chat_format(trained, run_binary):
    model, tokenizer, _ = load_checkpoint(str(trained["ckpt"]))
    messages = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who is there?"}]
    prompt = tokenizer.render_for_completion(messages)
    stops = {tokenizer.special("<|assistant_end|>"), tokenizer.bos_id}
    expected = []
    for tokens, _ in model.generate(prompt, 20, temperature=0):
        if tokens[0] in stops:
            break
        expected.append(tokens[0])
    c = run_c(run_binary, trained["fp32"], "-z", trained["tok"], "-m", "chat", "-t", 0, "-n", 20, "-v", 1,
              "-y", "Speak in verse.", "-i", "Who is there?")
    assert tokens_line(c.stdout) == expected


def test_threaded_build_matches_single_thread(trained, run_binary, tmp_path):
    """`make runomp` on 2 threads gives the same tokens as one thread: float32, int8 with the 512-bit kernel
    (group 64) and with the 256-bit one (group 32), greedy and top-p (rows are split, not their sums)."""
    omp_binary = compile_run(tmp_path / "runomp", "-O3", "-march=native", "-fopenmp")
    group32 = export(trained["ckpt"], tmp_path / "model_q8_g32.bin", "--tokenizer_out=", "--quantize=int8",
                     "--group_size=32")
    for model_file in (trained["fp32"], trained["int8"], group32):
        for sampling in (["-t", 0], ["-t", 1.0, "-p", 0.9, "-s", 7]):
            args = [model_file, "-z", trained["tok"], *sampling, "-n", 48, "-v", 1, "-i", "ROMEO:"]
            single = tokens_line(run_c(run_binary, *args).stdout)
            env = {**os.environ, "OMP_NUM_THREADS": "2"}
            threaded = subprocess.run([str(omp_binary), *map(str, args)], capture_output=True, text=True,
                                      errors="replace", env=env, timeout=60)
            assert threaded.returncode == 0, threaded.stderr
            assert tokens_line(threaded.stdout) == single and len(single) >= 16, (model_file, sampling)


def test_prompt_in_blocks_matches_token_by_token_and_pytorch(trained, run_binary, tmp_path):
    """The prompt goes through the model in blocks (-b, default 64): the same logits as feeding it one token at a
    time (-b 1, the generation path) and as PyTorch, for blocks that fill the prompt exactly and ragged ones, fp32
    and int8, one thread and two; the greedy tokens after it are the same."""
    model, tokenizer, _ = load_checkpoint(str(trained["ckpt"]))
    text = sample_file("tinyshakespeare/input.txt").read_text(encoding="utf-8")[-3000:]
    prompt = text[:text.index("\n", 280)]  # ~150 tokens: several blocks of 7 and 64, a ragged last one
    prompt_ids = tokenizer.encode(prompt, bos=True)
    assert 130 <= len(prompt_ids) <= 200 and len(prompt_ids) % 7 and len(prompt_ids) % 64
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(prompt, encoding="utf-8")
    with torch.no_grad():
        expected = model(torch.tensor([prompt_ids]))[0][0, -1]
    omp_binary = compile_run(tmp_path / "runomp", "-O3", "-march=native", "-fopenmp")
    for model_file in (trained["fp32"], trained["int8"]):
        outputs = {}
        for binary, threads in ((run_binary, 1), (omp_binary, 2)):
            for block in (1, 7, 64):
                args = [model_file, "-z", trained["tok"], "-t", 0, "-n", 40, "-v", 1, "-l", 1, "-b", block, "-f",
                        prompt_file]
                result = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                                        errors="replace", env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                        timeout=60)
                assert result.returncode == 0, result.stderr
                assert f"prompt of {len(prompt_ids)} tokens" in result.stderr
                logits = torch.tensor([float(v) for v in re.search(r"^logits:(.*)$", result.stdout, re.M).group(1).split()])
                outputs[threads, block] = (logits, tokens_line(result.stdout))
        one_by_one, one_by_one_tokens = outputs[1, 1]
        assert len(one_by_one_tokens) == 40
        for (threads, block), (logits, tokens) in outputs.items():
            assert (logits - one_by_one).abs().max() < 1e-4, (model_file.name, threads, block)
            assert tokens == one_by_one_tokens, (model_file.name, threads, block)
            if model_file == trained["fp32"]:
                assert (logits - expected).abs().max() < 1e-4, (threads, block)


def test_chat_turns_go_through_in_blocks_like_pytorch(trained, run_binary):
    """Chat mode feeds each turn's tokens (the last reply's end, the user's turn, the assistant's header) as a
    block: three turns give PyTorch's greedy replies on the same token history, fp32 (and int8 as one token at a
    time does), with blocks of 5 and the default."""
    model, tokenizer, _ = load_checkpoint(str(trained["ckpt"]))
    user_start, user_end = tokenizer.special("<|user_start|>"), tokenizer.special("<|user_end|>")
    assistant_start, assistant_end = tokenizer.special("<|assistant_start|>"), tokenizer.assistant_end_id
    messages = ["Who is there?", "Nay, answer me: stand, and unfold yourself.", "Long live the king!"]
    steps = 24
    history = tokenizer.render_for_completion([{"role": "system", "content": "Speak in verse."},
                                               {"role": "user", "content": messages[0]}])
    expected = []
    for turn, message in enumerate(messages):
        if turn > 0:
            history += [assistant_end, user_start] + tokenizer.encode(message) + [user_end, assistant_start]
        reply = []
        for tokens, _ in model.generate(history, steps + 1, temperature=0):
            if tokens[0] in (assistant_end, tokenizer.bos_id) or len(reply) == steps:
                break
            reply.append(tokens[0])
        expected.append(reply)
        history += reply
    stdin = "\n".join(messages[1:]) + "\n"
    for model_file in (trained["fp32"], trained["int8"]):
        replies = {}
        for block in (1, 5, 64):
            c = subprocess.run([str(run_binary), str(model_file), "-z", str(trained["tok"]), "-m", "chat", "-t", "0",
                                "-n", str(steps), "-v", "1", "-b", str(block), "-y", "Speak in verse.", "-i", messages[0]],
                               input=stdin, capture_output=True, text=True, errors="replace", timeout=60,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert c.returncode == 0, c.stderr
            replies[block] = [[int(t) for t in line.split()] for line in re.findall(r"^tokens:(.*)$", c.stdout, re.M)]
            assert len(replies[block]) == 3 and "prompt tok/s" in c.stderr
        assert replies[5] == replies[64] == replies[1], model_file.name
        if model_file == trained["fp32"]:
            assert replies[64] == expected and sum(map(len, expected)) >= 30


def ranked_by_probability(probs):
    """Token ids from the most probable down (a stable sort: ties by id, as run.c takes them) and the mass of the
    tokens before each: the nucleus of top-p p is the first (mass_before < p).sum() of them."""
    order = torch.sort(probs, descending=True, stable=True)
    return order.indices, torch.cumsum(order.values, 0) - order.values


def test_top_p_samples_only_from_the_nucleus(trained, run_binary, shakespeare_tokenizer, tmp_path):
    """Every token run.c samples at top-p lies in the nucleus PyTorch finds by a full sort of the same logits, a
    tiny p is greedy, and the draws follow the probabilities within the nucleus. Nuclei of 1 to hundreds of tokens
    (the barely trained model and a random one): run.c's bisection runs down to its last few candidates."""
    random = random_model(vocab_size=shakespeare_tokenizer.vocab_size, max_seq_len=128, tie_embeddings=True, seed=3)
    ckpt = tmp_path / "flat.pt"
    save_checkpoint({"model_args": vars(random.args), "model": random.state_dict(),
                     "tokenizer": shakespeare_tokenizer.to_json(), "data_format": "text"}, ckpt)
    export(ckpt, tmp_path / "flat.bin", "--tokenizer_out=")
    trained_model, tokenizer, _ = load_checkpoint(str(trained["ckpt"]))
    prompt = "ROMEO:"
    prompt_ids = tokenizer.encode(prompt, bos=True)
    sizes, positions = [], []
    for model, model_file in ((trained_model, trained["fp32"]), (random, tmp_path / "flat.bin")):
        # more draws at p 0.5: a nucleus a little too large shows only when draws land in its excess
        cases = [(1.0, 0.9, 1), (1.3, 0.95, 3), (1.0, 1e-6, 4)] + [(0.7, 0.5, seed) for seed in range(8)]
        for temperature, top_p, seed in cases:
            c = run_c(run_binary, model_file, "-z", trained["tok"], "-t", temperature, "-p", top_p, "-s", seed,
                      "-n", 40, "-v", 1, "-i", prompt)
            sampled = tokens_line(c.stdout)
            assert len(sampled) >= 8
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + sampled]))[0][0].double()
            for k, token in enumerate(sampled):
                probs = torch.softmax(logits[len(prompt_ids) - 1 + k] / temperature, dim=-1)
                ranked, mass_before = ranked_by_probability(probs)
                size, rank = int((mass_before < top_p).sum()), int((ranked == token).nonzero())
                # a token right at the boundary may fall either way by float rounding (run.c sums in float32)
                limit = int((mass_before < top_p + 1e-5).sum())
                assert rank < limit, (model_file.name, temperature, top_p, k, rank, size)
                sizes.append(size)
                # where the draw lies in the nucleus's own distribution (its mid-point CDF): uniform on [0, 1]
                # when tokens are drawn in proportion to their probability, lower when the nucleus is cut short
                if size < 20:
                    continue  # (a draw from a nucleus of a few tokens says little)
                ranked_probs = probs[ranked[:max(size, rank + 1)]]
                nucleus_mass = ranked_probs.sum()
                positions.append(float((ranked_probs[:rank].sum() + ranked_probs[rank] / 2) / nucleus_mass))
    assert max(sizes) >= 100 and min(sizes) == 1  # flat and peaked both seen
    assert len(positions) >= 400 and abs(np.mean(positions) - 0.5) < 0.04, (len(positions), np.mean(positions))


def test_sampling_is_seeded(trained, run_binary):
    args = [trained["fp32"], "-z", trained["tok"], "-t", 1.0, "-p", 0.9, "-n", 40, "-v", 1, "-i", "ROMEO:"]
    a = tokens_line(run_c(run_binary, *args, "-s", 42).stdout)
    b = tokens_line(run_c(run_binary, *args, "-s", 42).stdout)
    c = tokens_line(run_c(run_binary, *args, "-s", 43).stdout)
    assert a == b and a != c


# ----------------------------------------------------------------------------------------------------
# broken files, under AddressSanitizer


def refused(result):
    return result.returncode == 1 and result.stderr.startswith("error: ") and "Sanitizer" not in result.stderr


def clean(result):
    """Refused cleanly, or accepted and run without a sanitizer report."""
    return refused(result) or (result.returncode == 0 and "Sanitizer" not in result.stderr
                               and "runtime error" not in result.stderr)


def test_bad_files_are_refused_cleanly(trained, debug_binary, tmp_path):
    model_bytes, tok_bytes = trained["fp32"].read_bytes(), trained["tok"].read_bytes()
    cases = []  # (path of the model file, path of the tokenizer file, must it be refused?)

    def case(name, model_data, tok_data, must_refuse):
        model_path, tok_path = tmp_path / f"{name}.bin", tmp_path / f"{name}.tok"
        model_path.write_bytes(model_data)
        tok_path.write_bytes(tok_data)
        cases.append((name, model_path, tok_path, must_refuse))

    for cut in sorted({0, 3, 4, 8, 100, 255, 256, 257, 1000, len(model_bytes) // 2, len(model_bytes) - 64,
                       len(model_bytes) - 1}):
        case(f"model_cut{cut}", model_bytes[:cut], tok_bytes, True)
    case("model_longer", model_bytes + b"\0" * 64, tok_bytes, True)
    for cut in sorted({0, 4, 40, 63, 64, 100, len(tok_bytes) // 3, len(tok_bytes) // 2, len(tok_bytes) - 1}):
        case(f"tok_cut{cut}", model_bytes, tok_bytes[:cut], True)
    # flipped header bytes: seq_len, rope_theta and norm_eps (32..43) may take other valid values, the RoPE scaling
    # factors (80..91) are unused without scaling, the padding (92..255) is unused; every other field must be refused
    for offset in range(0, 96):
        flipped = bytearray(model_bytes)
        flipped[offset] ^= 0xFF
        case(f"model_flip{offset}", bytes(flipped), tok_bytes, not 32 <= offset < 44 and offset < 80)
    # the tokenizer header: n_special (16..19) is not used, max_token_bytes and the class table sizes (20..23,
    # 32..43) may take other values that still fit, the padding (56..63) is unused
    for offset in range(0, 64):
        flipped = bytearray(tok_bytes)
        flipped[offset] ^= 0xFF
        case(f"tok_flip{offset}", model_bytes, bytes(flipped), offset < 16 or 24 <= offset < 32 or 44 <= offset < 56)
    version_3 = bytearray(model_bytes)
    version_3[4:8] = struct.pack("<i", 3)
    case("model_version3", bytes(version_3), tok_bytes, True)
    tok_version_3 = bytearray(tok_bytes)
    tok_version_3[4:8] = struct.pack("<i", 3)
    case("tok_version3", model_bytes, bytes(tok_version_3), True)
    case("model_is_tokenizer", tok_bytes, tok_bytes, True)
    case("tok_is_model", model_bytes, model_bytes[:5000], True)

    def run_case(c):
        name, model_path, tok_path, must_refuse = c
        return c, run_c(debug_binary, model_path, "-z", tok_path, "-t", 0, "-n", 4, "-i", "Hi", check=False)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run_case, cases))
    for (name, _, _, must_refuse), result in results:
        assert clean(result), f"{name}: rc {result.returncode}\n{result.stderr[-1500:]}"
        if must_refuse:
            assert refused(result), f"{name} was not refused: rc {result.returncode}\n{result.stderr[-500:]}"

    missing = run_c(debug_binary, tmp_path / "nothing.bin", "-z", trained["tok"], check=False)
    assert refused(missing) and "nothing.bin" in missing.stderr
    truncated = dict((r[0][0], r[1]) for r in results)["model_cut1000"]
    assert "truncated" in truncated.stderr


def test_version_1_files_still_run(trained, run_binary, tmp_path):
    """Files written before version 2 (no attention biases or RoPE scaling; GPT-4's pre-split, every byte a token,
    no default system message) run as the same files in version 2 do."""
    model_v1, tok_v1 = bytearray(trained["fp32"].read_bytes()), bytearray(trained["tok"].read_bytes())
    assert model_v1[72:92] == bytes(20) and tok_v1[44:56] == struct.pack("<3i", 0, -1, 0)
    model_v1[4:8] = tok_v1[4:8] = struct.pack("<i", 1)
    tok_v1[44:56] = bytes(12)  # (zero padding in version 1)
    (tmp_path / "v1.bin").write_bytes(model_v1)
    (tmp_path / "v1.tok").write_bytes(tok_v1)
    args = ["-t", 0, "-n", 40, "-v", 1, "-i", "ROMEO:"]
    v1 = tokens_line(run_c(run_binary, tmp_path / "v1.bin", "-z", tmp_path / "v1.tok", *args).stdout)
    assert v1 == tokens_line(run_c(run_binary, trained["fp32"], "-z", trained["tok"], *args).stdout)


def test_prompt_from_a_pipe_and_directories_refused(trained, debug_binary, tmp_path):
    """-f reads a pipe or /dev/stdin (the same tokens as -i), -z too; a directory as the prompt, tokenizer or model
    file is refused with a message (it was a signed overflow under UBSan and an attempt to allocate 2^63 bytes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ASAN_OPTIONS": "detect_leaks=0"}
    args = [str(debug_binary), str(trained["fp32"]), "-z", str(trained["tok"]), "-t", "0", "-n", "24", "-v", "1"]
    expected = tokens_line(run_c(debug_binary, *args[1:], "-i", "ROMEO:").stdout)
    piped = subprocess.run(args + ["-f", "/dev/stdin"], input=b"ROMEO:", capture_output=True, env=env, timeout=60)
    assert piped.returncode == 0 and tokens_line(piped.stdout.decode()) == expected, piped.stderr.decode()[-1000:]
    args[3] = "/dev/stdin"  # the tokenizer from a pipe
    piped = subprocess.run(args + ["-i", "ROMEO:"], input=trained["tok"].read_bytes(), capture_output=True, env=env,
                           timeout=60)
    assert piped.returncode == 0 and tokens_line(piped.stdout.decode()) == expected, piped.stderr.decode()[-1000:]
    for flag_args in (["-f", tmp_path], ["-z", tmp_path]):
        result = run_c(debug_binary, trained["fp32"], "-z", trained["tok"], *flag_args, check=False)
        assert refused(result) and f"{tmp_path} is a directory" in result.stderr, (flag_args, result.stderr)
    result = run_c(debug_binary, tmp_path, "-z", trained["tok"], "-i", "Hi", check=False)
    assert refused(result) and f"{tmp_path} is a directory" in result.stderr, result.stderr


def test_tokenizer_of_another_model_is_refused(trained, debug_binary, tmp_path):
    tokenizer = load_checkpoint(str(trained["ckpt"]))[1]
    other = random_model(vocab_size=tokenizer.vocab_size + 50)
    from tokenizer import Tokenizer
    byte_tokenizer = Tokenizer.byte_level()
    ckpt = tmp_path / "other.pt"
    save_checkpoint({"model_args": vars(other.args), "model": other.state_dict(),
                     "tokenizer": byte_tokenizer.to_json()}, ckpt)
    export(ckpt, tmp_path / "other.bin", f"--tokenizer_out={tmp_path / 'other_tok.bin'}")
    result = run_c(debug_binary, trained["fp32"], "-z", tmp_path / "other_tok.bin", check=False)
    assert refused(result) and "does not belong" in result.stderr


# ----------------------------------------------------------------------------------------------------
# llama2.c's version-0 layout


def test_legacy_export_matches_llama2c_layout(trained, tmp_path):
    model, tokenizer, _ = load_checkpoint(str(trained["ckpt"]))
    legacy, legacy_tok = tmp_path / "legacy.bin", tmp_path / "legacy_tok.bin"
    run_stage("export.py", f"--ckpt={trained['ckpt']}", f"--out={tmp_path / 'm.bin'}", "--tokenizer_out=",
              "--legacy=True", f"--legacy_out={legacy}", f"--legacy_tokenizer_out={legacy_tok}")
    a = model.args
    data = legacy.read_bytes()
    header = struct.unpack("<7i", data[:28])
    assert header == (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, -a.vocab_size, a.max_seq_len)
    floats = np.frombuffer(data[28:], dtype="<f4")
    head_dim, kv_dim = a.dim // a.n_heads, a.dim // a.n_heads * a.n_kv_heads
    sizes = [a.vocab_size * a.dim, a.n_layers * a.dim, a.n_layers * a.dim * a.dim, a.n_layers * kv_dim * a.dim,
             a.n_layers * kv_dim * a.dim, a.n_layers * a.dim * a.dim, a.n_layers * a.dim,
             3 * a.n_layers * a.dim * a.hidden_dim, a.dim, a.max_seq_len * head_dim, a.vocab_size * a.dim]
    assert floats.size == sum(sizes)
    embedding = torch.from_numpy(floats[:sizes[0]].copy()).view(a.vocab_size, a.dim)
    classifier = torch.from_numpy(floats[-sizes[-1]:].copy()).view(a.vocab_size, a.dim)
    # llama2.c's conventions: BOS is 1 and byte b is 3 + b; the rows moved with the ids
    assert torch.equal(embedding[1], model.tok_embeddings.weight[tokenizer.bos_id])
    assert torch.equal(classifier[1], model.output.weight[tokenizer.bos_id])
    for b in (10, 32, 65, 200):
        assert torch.equal(embedding[3 + b], model.tok_embeddings.weight[tokenizer.mergeable_ranks[bytes([b])]])
    # the tokenizer: max length, then (score, length, bytes) per id; higher score = earlier merge
    tok = legacy_tok.read_bytes()
    offset, pieces, scores = 4, [], []
    while offset < len(tok):
        score, length = struct.unpack("<fi", tok[offset:offset + 8])
        pieces.append(tok[offset + 8:offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    assert len(pieces) == a.vocab_size and pieces[1] == b"<|bos|>" and pieces[3 + 10] == b"<0x0A>"
    assert pieces[3 + ord("a")] == b"a"
    merged = [i for i, p in enumerate(pieces) if i > 258 and not p.startswith(b"<|")]
    assert all(scores[i] > scores[j] for i, j in zip(merged, merged[1:]))

    # settings llama2.c hard-codes are refused with a message
    other = random_model(vocab_size=tokenizer.vocab_size, rope_theta=500000.0)
    ckpt = tmp_path / "theta.pt"
    save_checkpoint({"model_args": vars(other.args), "model": other.state_dict(),
                     "tokenizer": tokenizer.to_json()}, ckpt)
    result = run_stage("export.py", f"--ckpt={ckpt}", f"--out={tmp_path / 't.bin'}", "--tokenizer_out=",
                       "--legacy=True", f"--legacy_out={tmp_path / 'tl.bin'}",
                       f"--legacy_tokenizer_out={tmp_path / 'tlt.bin'}", check=False)
    assert result.returncode == 1 and "rope_theta=500000" in result.stderr
