"""engine.py: the calculator (a whitelisted evaluator, never eval), the tool state machine, streaming text."""

import random
import time

import pytest
import torch

import engine
from conftest import random_model
from model import ModelArgs, Transformer
from tokenizer import Tokenizer, count_chunks, train_bpe


class ScriptedModel(Transformer):
    """
    Transformer.generate's real loop (KV cache, sampling, stop tokens, tool hook) over a network that plays a
    script: reply(seen) -> the next token, where seen is every token fed in so far (prompt, sampled and forced).
    All the probability goes to that token, so the script plays out at any temperature. After nan_after forward
    passes its logits are NaN, as a diverged model's are.
    """

    def __init__(self, reply, vocab_size=267, max_seq_len=256, delay_s=0.0, interrupt_after=None, nan_after=None):
        super().__init__(ModelArgs(dim=8, n_layers=1, n_heads=1, vocab_size=vocab_size, max_seq_len=max_seq_len))
        self.reply, self.delay_s, self.interrupt_after = reply, delay_s, interrupt_after
        self.nan_after = nan_after
        self.cache, self.seen, self.prompts = None, [], []

    def forward(self, tokens, targets=None, kv_cache=None, loss_reduction="mean"):
        if kv_cache is not self.cache:  # a new generate() call
            self.cache, self.seen, self.steps = kv_cache, [], 0
            self.prompts.append(tokens[0].tolist())
        self.seen += tokens[0].tolist()
        self.steps += 1
        if self.interrupt_after is not None and self.steps > self.interrupt_after:
            raise KeyboardInterrupt  # what Ctrl-C does in the middle of a reply
        time.sleep(self.delay_s)
        logits = torch.full((tokens.shape[0], tokens.shape[1], self.args.vocab_size), -1e4)
        logits[:, -1, self.reply(self.seen)] = 0.0
        if self.nan_after is not None and self.steps > self.nan_after:
            logits[:] = float("nan")
        return logits, None


def calculator_script(tokenizer, expression, answer_prefix="The answer is "):
    """
    A model that, after <|assistant_start|>, writes <|python_start|>expression<|python_end|>, waits for the
    tool's output, then writes answer_prefix + the output it was given + <|assistant_end|>.
    """
    special = tokenizer.special
    call = [special("<|python_start|>")] + tokenizer.encode(expression) + [special("<|python_end|>")]
    output_start, output_end = special("<|output_start|>"), special("<|output_end|>")

    def reply(seen):
        start = len(seen) - seen[::-1].index(special("<|assistant_start|>"))
        generated = seen[start:]
        if len(generated) < len(call):
            return call[len(generated)]
        if output_end not in generated:
            return 0  # the tool's output is being forced in; what the model says here is ignored
        given = generated[generated.index(output_start) + 1:generated.index(output_end)]
        answer = tokenizer.encode(answer_prefix) + given + [special("<|assistant_end|>")]
        written = generated[generated.index(output_end) + 1:]
        return answer[len(written)] if len(written) < len(answer) else special("<|assistant_end|>")

    return reply


def text_script(tokenizer, text):
    """A model that answers every conversation with text, then <|assistant_end|>."""
    answer = tokenizer.encode(text) + [tokenizer.special("<|assistant_end|>")]

    def reply(seen):
        start = len(seen) - seen[::-1].index(tokenizer.special("<|assistant_start|>"))
        written = seen[start:]
        return answer[len(written)] if len(written) < len(answer) else answer[-1]

    return reply


@pytest.fixture
def tokenizer():
    return Tokenizer.byte_level()


# -----------------------------------------------------------------------------------------------------
# the calculator


@pytest.mark.parametrize("expression, expected", [
    ("12*7", "84"), ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("-5 + 2", "-3"), ("7 // 2", "3"), ("7 % 4", "3"),
    ("2 ** 10", "1024"), ("10 / 4", "2.5"), ("1 / 3", "0.333333"), ("6 / 3", "2"), ("1,200 * 3", "3600"),
    ("1,234,567 + 1", "1234568"), ("len('strawberry')", "10"), ("'strawberry'.count('r')", "3"),
    ("'Hello'.lower()", "hello"), ("  3 +  4 ", "7"),
])
def test_calculator_answers_arithmetic_and_letter_counting(expression, expected):
    assert engine.calculator(expression) == expected


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('ls')", "only len() and string methods"),
    ("open('/etc/passwd')", "only len() and string methods"),
    ("x + 1", "Name not allowed"),
    ("(1).__class__", "Attribute not allowed"),
    ("'a'.__len__()", "only len() and string methods"),
    ("(lambda: 1)()", "only len() and string methods"),
    ("lambda: 1", "Lambda not allowed"),
    ("[x for x in 'abc']", "not allowed"),
    ("9 ** 9 ** 9", "exponent too large"),
    ("2 ** 5000", "exponent too large"),
    ("7 ** 999", "result too large"),
    ("10 ** 150 * 10 ** 150", "result too large"),
    ("'a' * 10", "arithmetic needs numbers"),
    ("'" + "a" * 300 + "'", "expression too long"),
    ("'aaaa'.replace('a', 'aaaaaaaaaa').replace('a', 'aaaaaaaaaa').replace('a', 'aaaaaaaaaa')", "string too long"),
    ("1 / 0", "division by zero"),
    ("(-8) ** 0.5", "not a real number"),
    ("1e308 * 10", "not a finite number"),
    ("(1, 2)", "Tuple not allowed"),
    ("True + 1", "not allowed"),
    ("2 +", "not a valid expression"),
    ("+".join(["1"] * 60), "too complex"),
])
def test_calculator_refuses_with_an_error_text(expression, reason):
    result = engine.calculator(expression)
    assert result.startswith("error:") and reason in result, result


def test_calculator_time_limit_stops_slow_work():
    def spin():
        while True:
            pass
    t0 = time.time()
    with pytest.raises(TimeoutError):
        engine._with_time_limit(spin, 0.05)
    assert time.time() - t0 < 1.0


# -----------------------------------------------------------------------------------------------------
# the tool state machine


def test_tool_call_is_evaluated_and_forced_into_the_sequence(tokenizer):
    model = ScriptedModel(calculator_script(tokenizer, "12*7"))
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "What is 12 times 7?"}])
    steps = list(engine.generate(model, tokenizer, prompt, max_new_tokens=100, temperature=0.8, seed=0))
    tokens, forced = [s[0][0] for s in steps], [s[1][0] for s in steps]
    special = tokenizer.special
    call = [special("<|python_start|>")] + tokenizer.encode("12*7") + [special("<|python_end|>")]
    output = [special("<|output_start|>")] + tokenizer.encode("84") + [special("<|output_end|>")]
    answer = tokenizer.encode("The answer is 84") + [special("<|assistant_end|>")]
    assert tokens == call + output + answer
    assert forced == [False] * len(call) + [True] * len(output) + [False] * len(answer)
    # the model was fed the forced tokens: its answer repeats the result it was given
    assert model.seen[-(len(output) + len(answer) - 1):] == output + answer[:-1]  # (the stop token is not fed)
    text, ids = engine.generate_reply(model, tokenizer, [{"role": "user", "content": "What is 12 times 7?"}])
    assert ids == tokens and text == "12*784The answer is 84"  # special tokens are left out of the text


def test_failing_tool_call_gives_an_error_output_not_an_exception(tokenizer):
    model = ScriptedModel(calculator_script(tokenizer, "__import__('os').getcwd()", answer_prefix="Sorry: "))
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "hack"}])
    pieces = [p[0] for _, p in engine.generate_text(model, tokenizer, prompt, max_new_tokens=200)]
    text = "".join(pieces)
    assert "<|output_start|>error: only len() and string methods may be called<|output_end|>" in text
    assert text.endswith("Sorry: error: only len() and string methods may be called")


def test_python_end_without_start_and_tools_off(tokenizer):
    hook = engine.make_tool_hook(tokenizer)
    orphan = [tokenizer.special("<|assistant_start|>")] + tokenizer.encode("1+1") + [tokenizer.special("<|python_end|>")]
    assert tokenizer.decode(hook(0, orphan)[1:-1]).startswith("error: <|python_end|> without")
    # an earlier turn's tool call is not mistaken for this one's
    earlier = [tokenizer.special("<|python_start|>")] + tokenizer.encode("2+2") + [tokenizer.special("<|python_end|>")]
    assert tokenizer.decode(hook(0, earlier + orphan)[1:-1]).startswith("error:")
    assert hook(0, tokenizer.encode("2+2")) is None  # only <|python_end|> calls the tool
    # tools=False: nothing is forced; the model's own tokens continue
    model = ScriptedModel(calculator_script(tokenizer, "1+1"))
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "hi"}])
    steps = list(engine.generate(model, tokenizer, prompt, max_new_tokens=8, tools=False))
    assert not any(s[1][0] for s in steps)


# -----------------------------------------------------------------------------------------------------
# generation: batches, seeds, stop tokens, limits


def test_samples_in_one_batch_are_seeded_and_stop_at_max_tokens(tokenizer):
    model = random_model(vocab_size=267, max_seq_len=128)
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "Tell me a story."}])

    def run(seed):
        steps = list(engine.generate(model, tokenizer, prompt, max_new_tokens=12, temperature=1.0, top_k=50,
                                     top_p=0.9, seed=seed, num_samples=3, tools=False, stop_tokens=[]))
        return [[s[0][i] for s in steps] for i in range(3)]

    first = run(seed=5)
    assert first == run(seed=5)  # a seed reproduces the batch
    assert first != run(seed=6)
    assert len({tuple(s) for s in first}) == 3  # three different samples of one prompt
    assert all(len(s) == 12 for s in first)  # max_new_tokens


def test_generation_stops_at_end_of_turn_or_bos(tokenizer):
    for stop in ("<|assistant_end|>", "<|bos|>"):
        answer = tokenizer.encode("Hi") + [tokenizer.special(stop)] + tokenizer.encode(" never seen")

        def reply(seen, answer=answer):
            written = seen[len(model.prompts[-1]):]
            return answer[len(written)]

        model = ScriptedModel(reply)
        prompt = tokenizer.render_for_completion([{"role": "user", "content": "hello"}])
        tokens = [s[0][0] for s in engine.generate(model, tokenizer, prompt, max_new_tokens=50)]
        assert tokens == answer[:3]


# -----------------------------------------------------------------------------------------------------
# streaming text, tool calls in text, context


def test_text_decoder_keeps_split_characters_whole(tokenizer):
    decoder = engine.TextDecoder(tokenizer)
    pieces = [decoder.piece(t) for t in tokenizer.encode("naïve 😀!")]  # byte-level: one token per byte
    assert "".join(pieces) == "naïve 😀!"
    assert "😀" in pieces and "\ufffd" not in "".join(pieces)
    assert decoder.piece(tokenizer.special("<|python_start|>")) == "<|python_start|>"
    assert decoder.piece(tokenizer.special("<|assistant_end|>")) == ""
    assert decoder.piece(400) == ""  # an id past the tokenizer (padded vocabulary)


def test_reply_text_round_trips_to_the_same_tokens(tokenizer):
    # a generated reply, streamed as text and sent back as a message, renders to exactly the tokens generated
    model = ScriptedModel(calculator_script(tokenizer, "3 + 4"))
    messages = [{"role": "user", "content": "3 + 4?"}]
    prompt = tokenizer.render_for_completion(messages)
    steps = list(engine.generate_text(model, tokenizer, prompt, max_new_tokens=100))
    tokens, text = [s[0][0] for s in steps], "".join(s[1][0] for s in steps)
    assert text == "<|python_start|>3 + 4<|python_end|><|output_start|>7<|output_end|>The answer is 7"
    parts = engine.reply_parts(text)
    assert [p["type"] for p in parts] == ["python", "python_output", "text"]
    ids, mask = tokenizer.render_conversation(messages + [{"role": "assistant", "content": parts}])
    assert ids == prompt + tokens
    assert engine.reply_parts("no tools here") == "no tools here"


def test_fit_conversation_leaves_out_the_oldest_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "a" * 40}, {"role": "assistant", "content": "b" * 40},
                {"role": "user", "content": "c" * 10}]
    prompt, dropped = engine.fit_conversation(tokenizer, messages, 200)
    assert dropped == 0 and prompt == tokenizer.render_for_completion(messages)
    prompt, dropped = engine.fit_conversation(tokenizer, messages, 40)
    assert dropped == 2 and prompt == tokenizer.render_for_completion([messages[0], messages[3]])
    with pytest.raises(ValueError, match="too long"):
        engine.fit_conversation(tokenizer, messages, 10)


def fit_by_rendering_again(tokenizer, messages, max_prompt_tokens):
    """fit_conversation as it was until issue 20: the whole conversation rendered again per exchange left out."""
    system = messages[:1] if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else []
    turns = list(messages[len(system):])
    dropped = 0
    while True:
        prompt = tokenizer.render_for_completion(system + turns)
        if len(prompt) <= max_prompt_tokens:
            return prompt, dropped
        if len(turns) <= 1:
            raise ValueError(f"the last message is too long: the prompt is {len(prompt)} tokens and the model's "
                             f"context leaves room for {max_prompt_tokens}")
        turns, dropped = turns[2:], dropped + 2


def imported_tokenizer(chat_format):
    """A small BPE in an imported model's chat format: ChatML with a default system message, or Llama 3."""
    text = "the cat sat on the mat. What is 12 times 7? The answer is 84. naïve café, 日本語 text\n" * 20
    trained = train_bpe(count_chunks([text]), 256 + 11 + 40)
    names = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
             "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}[chat_format]
    specials = {name: len(trained.mergeable_ranks) + i for i, name in enumerate(names)}
    return Tokenizer(trained.mergeable_ranks, trained.pattern, specials, chat_format=chat_format, bos_token=names[0],
                     default_system="You are a helpful assistant." if chat_format == "chatml" else "")


def random_conversation(rng, tool_parts):
    """[system?] user, assistant, ..., user of random text; now and then malformed, as a client may send it."""
    words = ["the", "cat", " sat", "12*7", "naïve", "日本", "  ", "\n", "What is 3 + 4?", "ok.", "The answer is 84"]

    def text():
        return "".join(rng.choice(words) for _ in range(rng.randint(1, 8)))

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(0, 10)):
        reply = text()
        if tool_parts and rng.random() < 0.3:
            reply = [{"type": "python", "text": "12*7"}, {"type": "python_output", "text": "84"},
                     {"type": "text", "text": text()}]
        messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": text()})
    if rng.random() < 0.1:
        messages.pop()  # ends with the assistant's turn
    if rng.random() < 0.05:
        messages[-1] = {"role": "user", "content": " "}  # empty content
    return messages


@pytest.mark.parametrize("chat_format", ["nanollama", "chatml", "llama3"])
def test_fit_conversation_keeps_the_turns_that_rendering_again_kept(chat_format):
    # counting each exchange once must leave out exactly the turns that rendering again and again did
    tokenizer = Tokenizer.byte_level() if chat_format == "nanollama" else imported_tokenizer(chat_format)
    rng = random.Random(20)
    outcomes = set()
    for _ in range(300):
        messages = random_conversation(rng, tool_parts=chat_format == "nanollama")
        max_prompt_tokens = rng.randint(1, 4 + sum(len(str(m["content"])) for m in messages) * 2)
        results = []
        for fit in (fit_by_rendering_again, engine.fit_conversation):
            try:
                results.append(fit(tokenizer, messages, max_prompt_tokens))
            except ValueError as e:
                results.append(str(e))
        assert results[0] == results[1], (messages, max_prompt_tokens)
        outcomes.add("error" if isinstance(results[0], str) else "whole" if results[0][1] == 0 else "cut")
    assert outcomes == {"error", "whole", "cut"}  # every path was taken


def test_fit_conversation_work_grows_linearly_with_the_conversation(tokenizer):
    # 8,001 short messages held the server 107 s: every exchange left out meant rendering all the rest again
    encoded_tokens = 0
    encode = tokenizer.encode

    def counting_encode(text, bos=False):
        nonlocal encoded_tokens
        ids = encode(text, bos)
        encoded_tokens += len(ids)
        return ids

    tokenizer.encode = counting_encode
    for n_exchanges in (100, 1000):
        messages = [{"role": "system", "content": "Be brief."}]
        for i in range(n_exchanges):
            messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
        messages.append({"role": "user", "content": "and the last one?"})
        conversation_tokens = len(tokenizer.render_for_completion(messages))
        encoded_tokens = 0
        prompt, dropped = engine.fit_conversation(tokenizer, messages, 100)
        assert len(prompt) <= 100 and dropped >= 2 * n_exchanges - 6
        assert prompt == tokenizer.render_for_completion(messages[:1] + messages[1 + dropped:])
        assert encoded_tokens <= 3 * conversation_tokens, (n_exchanges, encoded_tokens, conversation_tokens)


# -----------------------------------------------------------------------------------------------------
# broken models: NaN weights, NaN logits


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_raise_instead_of_sampling_garbage(tokenizer, temperature):
    # greedy decoding of NaN logits gave token 0 forever; sampling gave torch's own error from multinomial
    model = ScriptedModel(text_script(tokenizer, "hello"), nan_after=3)
    prompt = tokenizer.render_for_completion([{"role": "user", "content": "hi"}])
    tokens = []
    with pytest.raises(engine.NonFiniteLogitsError, match="not finite"):
        for step, _ in engine.generate(model, tokenizer, prompt, max_new_tokens=20, temperature=temperature):
            tokens.append(step[0])
    assert tokens == tokenizer.encode("hel")  # the steps before came through
    assert not model._forward_hooks  # the check leaves with its generation


def test_check_weights_names_the_checkpoint_and_the_first_broken_tensor():
    model = random_model()
    engine.check_weights(model, "out/best.pt")  # a healthy model passes
    with torch.no_grad():
        model.layers[1].feed_forward.w2.weight[3, 5] = float("nan")
        model.norm.weight[0] = float("inf")
    with pytest.raises(ValueError, match=r"^out/best.pt: weight layers\.1\.feed_forward\.w2\.weight holds NaN"):
        engine.check_weights(model, "out/best.pt")
