"""
run.c's calculator: the tool calls of a chat are answered as engine.py answers them. The C evaluator gives
engine.calculator's result text on arithmetic (numbers, + - * / // % **, parentheses, its limits and error texts),
and on a tiny arithmetic chat model run.c's chat replies, tool outputs included, are chat.py's token for token.
"""

import json
import random
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_stage
from engine import calculator, generate
from checkpoint import load_checkpoint
from test_export import compile_run, export, run_c


@pytest.fixture(scope="module")
def run_binary(tmp_path_factory):
    return compile_run(tmp_path_factory.mktemp("bin") / "run", "-O2", "-march=native", "-fopenmp-simd")


@pytest.fixture(scope="module")
def arith(tmp_path_factory):
    """A tiny chat model SFT'd from scratch on the synthetic arithmetic task: it answers with calculator calls
    (not always the right ones), exported for run.c."""
    root = tmp_path_factory.mktemp("arith")
    run_stage("prepare/arithmetic.py", "--out", root / "data" / "arith", "--n_train", 1500, "--n_val", 20,
              "--n_test", 40, "--vocab_size", 320)
    run_stage("train.py", "--dim=64", "--n_layers=2", "--n_heads=4", "--n_kv_heads=2", "--block_size=128",
              "--batch_size=16", "--eval_iters=2", "--log_interval=50", "--warmup_iters=10", "--num_threads=1",
              "--data=arith", f"--data_dir={root / 'data'}", f"--out_dir={root / 'sft'}", "--max_iters=200", "--max_seq_len=512",
              "--eval_interval=200", "--learning_rate=3e-3")
    ckpt = root / "sft" / "ckpt.pt"
    export(ckpt, root / "model.bin", f"--tokenizer_out={root / 'tokenizer.bin'}")
    questions = [json.loads(line)["question"] for line in (root / "data" / "arith" / "test.jsonl").open()]
    return {"ckpt": ckpt, "model": root / "model.bin", "tok": root / "tokenizer.bin", "questions": questions,
            "root": root}


# ----------------------------------------------------------------------------------------------------
# the evaluator


EDGE_CASES = [
    "12*7", "2 + 3 * 4", "(2 + 3) * 4", "-5 + 2", "7 // 2", "7 % 4", "2 ** 10", "10 / 4", "1 / 3", "6 / 3",
    "1,200 * 3", "1,234,567 + 1", "  3 +  4 ", "\t4*6\x0c", "1_000 + 1", "007", "00", "007.5", ".5", "5.", "1.e5",
    "1e3 / 7", "2.5e-3 * 4", "-7 // 2", "7 // -2", "-7 % 3", "7 % -3", "-7.5 // 2", "7.5 % -2", "-0.5 % 1",
    "2 ** -2", "-2 ** 2", "(-2) ** 3", "2 ** 3 ** 2", "2 ** -3 ** 2", "--5", "+-+5", "4.0 ** 0.5", "8 ** (1/3)",
    "0 ** 0", "0.1 + 0.2", "1 / 7", "100 / 3", "2 / 3 * 3", "1e15", "1e15 + 0.5", "1e16 / 1", "123456789012345.6",
    "1e-5 * 1", "1.5e-7 * 1", "-0.0000001", "1e-320 * 1", "1e999", "1.5 ** 1000", "123456789 * 987654321",
    "9223372036854775807", "(2**53 + 1) / 1", "9007199254740993 / 3",
    # errors: the text engine.py forces into the sequence
    "1 / 0", "5 // 0", "5 % 0.0", "0 ** -1", "0.0 ** -2", "(-8) ** 0.5", "1e308 * 10", "1e999 - 1e999", "-1e999",
    "2 ** 5000", "9 ** 9 ** 9", "7 ** 999", "2 ** 1000", "0.1 ** -1000", "2 +", "1 2", "(1", "1)", "", "1.5.2", "1e",
    "1__0", "1_", "+".join(["1"] * 60), "()", "(1, 2)", "3,", "1,2,3", "(1, 1/0)", "1/0 + ()", "() + 1/0", "2(3)",
    "4 * 6 = 24", "6 apples * 4", "apples * 4", "x + 1", "len(5)", "True + 1", "None", "4 × 6", "5 − 3", "$5 * 2",
    "1;2", "9" * 201, "1 # a comment",
]


def random_expressions(n, seed=0):
    """Arithmetic the size of a word problem's: integers, decimals, every operator, parentheses, unary signs."""
    rng = random.Random(seed)

    def number():
        k = rng.random()
        if k < 0.6:
            return str(rng.randint(0, 40))
        if k < 0.8:
            return f"{rng.uniform(0, 100):.{rng.randint(1, 3)}f}"
        return rng.choice(["0", "0.0", "1000", "1,000", "12,345", "2.5e-3", "1_000", ".5"])

    def expression(depth=0):
        k = rng.random()
        if depth > 3 or k < 0.3:
            return number()
        if k < 0.4:
            return rng.choice("-+") + expression(depth + 1)
        if k < 0.5:
            return "(" + expression(depth + 1) + ")"
        op = rng.choice(["+", "-", "*", "/", "//", "%", "+", "-", "*", "/"])
        space = rng.choice(["", " "])
        return expression(depth + 1) + space + op + space + expression(depth + 1)

    cases = [expression() for _ in range(n)]
    cases += [f"{rng.randint(-12, 12)} ** {rng.choice([0, 1, 2, 3, -1, -2, 0.5, 1.5])}" for _ in range(n // 10)]
    return cases


def c_calculator(binary, model, tok, expressions, tmp_path):
    path = tmp_path / "expressions.txt"
    path.write_text("".join(e + "\n" for e in expressions), encoding="utf-8")
    return run_c(binary, model, "-z", tok, "-m", "calculator", "-f", path).stdout.split("\n")[:len(expressions)]


def test_calculator_gives_engine_text(arith, run_binary, tmp_path):
    """The same text as engine.calculator for ~2,000 expressions: results, rounding, floor division and modulo with
    negatives, **, limits and every error; the two documented differences hold as documented."""
    expressions = EDGE_CASES + random_expressions(2000)
    got = c_calculator(run_binary, arith["model"], arith["tok"], expressions, tmp_path)
    differ = [(e, c, calculator(e)) for e, c in zip(expressions, got) if c != calculator(e)]
    assert not differ, f"{len(differ)} of {len(expressions)} differ, e.g. {differ[:5]}"
    assert sum(c.startswith("error:") for c in got) >= 50 and sum("." in c for c in got) >= 200
    # the differences run.c's comment documents: integers past 64 bits, and what is not arithmetic
    beyond = c_calculator(run_binary, arith["model"], arith["tok"], ["2 ** 63", "len('abc')", "1 < 2"], tmp_path)
    assert beyond == ["error: result too large"] + ["error: run.c's calculator does arithmetic only"] * 2
    assert calculator("2 ** 63") == "9223372036854775808" and calculator("len('abc')") == "3"


# ----------------------------------------------------------------------------------------------------
# tool calls in a chat


def c_chat(binary, arith, messages, *args):
    """run.c's chat on the messages (the first with -i, the rest on stdin): (replies as text, replies as tokens)."""
    c = subprocess.run([str(binary), str(arith["model"]), "-z", str(arith["tok"]), "-m", "chat", "-t", "0", "-v", "1",
                        *map(str, args), "-i", messages[0]], input="".join(m + "\n" for m in messages[1:]),
                       capture_output=True, text=True, errors="replace", timeout=60)
    assert c.returncode == 0, c.stderr
    replies = re.findall(r"Assistant: (.*)\ntokens:(.*)\n", c.stdout)
    return [text for text, _ in replies], [[int(t) for t in ids.split()] for _, ids in replies]


def engine_replies(model, tokenizer, questions, steps):
    """engine.generate's greedy replies to the questions asked one after another in one conversation, each reply
    closed as run.c closes it (<|assistant_end|>, also after a reply cut at `steps` tokens)."""
    user_start, user_end = tokenizer.special("<|user_start|>"), tokenizer.special("<|user_end|>")
    assistant_start, assistant_end = tokenizer.special("<|assistant_start|>"), tokenizer.assistant_end_id
    history = tokenizer.render_for_completion([{"role": "user", "content": questions[0]}])
    replies = []
    for turn, question in enumerate(questions):
        if turn > 0:
            history += [assistant_end, user_start] + tokenizer.encode(question) + [user_end, assistant_start]
        reply = []
        for tokens, _ in generate(model, tokenizer, history, max_new_tokens=steps + 1, temperature=0):
            if tokens[0] in (assistant_end, tokenizer.bos_id) or len(reply) == steps:
                break
            reply.append(tokens[0])
        replies.append(reply)
        history += reply
    return replies


def test_chat_answers_tool_calls_as_engine_does(arith, run_binary):
    """run.c's replies are engine.generate's on the same token history: the model's calls, the calculator's forced
    outputs and what the model writes after them; for single questions and for three in one conversation (the KV
    cache carries the earlier turns and their tool outputs). Greedy, float32."""
    model, tokenizer, _ = load_checkpoint(str(arith["ckpt"]))
    conversations = [[q] for q in arith["questions"][:8]] + [arith["questions"][8:11]]
    replies = []
    for questions in conversations:
        _, c_replies = c_chat(run_binary, arith, questions, "-n", 60)
        assert c_replies == engine_replies(model, tokenizer, questions, 60), questions
        replies += c_replies
    calls = [r for r in replies if tokenizer.special("<|output_start|>") in r]
    assert len(calls) >= 8, "the model should call the calculator in most replies"


def test_run_c_prints_chat_py_reply(arith, run_binary):
    """./run -m chat and chat.py --prompt print the same reply to an arithmetic question, the tool call shown as
    [calculator: 4*6 = 24] in both."""
    for question in arith["questions"][12:14]:
        texts, _ = c_chat(run_binary, arith, [question], "-n", 80)
        py = subprocess.run([sys.executable, "chat.py", f"--ckpt={arith['ckpt']}", "--prompt", question,
                             "--temperature=0", "--max_new_tokens=80", "--device=cpu"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
        assert py.returncode == 0, py.stderr
        assert texts[0] == py.stdout.rstrip("\n") and "[calculator: " in texts[0] and " = " in texts[0]
