"""
The generation engine shared by sample.py, chat.py, eval.py and rl.py: model.generate (KV cache, batched
samples, sampling, streaming) plus the calculator tool.

Tool use: when the model writes <|python_start|>expression<|python_end|>, the engine evaluates the
expression with a whitelisted AST evaluator (never Python's eval) and forces
<|output_start|>result<|output_end|> into the sequence; the model continues from there. A refused or
failing expression produces an error text as the output, never an exception.

    generate(model, tokenizer, prompt, ...)       -> yields (tokens, forced) per step, as model.generate
    generate_text(model, tokenizer, prompt, ...)  -> yields (tokens, text pieces) per step, for streaming
    generate_reply(model, tokenizer, messages)    -> (reply text, token ids), not streamed
    reply_parts(text)                             -> reply text with tool markup back to tool-call parts
    fit_conversation(tokenizer, messages, n)      -> a prompt of at most n tokens, oldest turns left out
    check_weights(model, source)                  -> ValueError when a weight holds NaN or infinity

A model whose output is not finite (NaN weights, an overflow) raises NonFiniteLogitsError, never replies with
whatever argmax or multinomial make of NaN.
"""

import ast
import codecs
import math
import operator
import re
import signal
import threading
import warnings

# no torch import here: run_numpy.py uses the calculator and TextDecoder on machines without torch

# -----------------------------------------------------------------------------------------------------
# the calculator

MAX_EXPRESSION_CHARS = 200
MAX_STRING_CHARS = 1000
MAX_EXPONENT = 1000
MAX_RESULT_DIGITS = 200  # integers beyond this many digits are refused
MAX_NODES = 100
TIME_LIMIT_S = 0.1

BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos}
STRING_METHODS = {"count", "lower", "upper", "strip", "replace", "find", "startswith", "endswith"}


# thousands separators ("1,200 * 3") are common in GSM8K; other commas ("(1,2)", strings) stay
THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class CalculatorError(Exception):
    pass


def check_number(x):
    if isinstance(x, complex):
        raise CalculatorError("result is not a real number")
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return x
    if isinstance(x, int) and abs(x) >= 10 ** MAX_RESULT_DIGITS:
        raise CalculatorError("result too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalculatorError("result is not a finite number")
    return x


def evaluate_node(node):
    if isinstance(node, ast.Expression):
        return evaluate_node(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float, str)):
            raise CalculatorError(f"constant {node.value!r} not allowed")
        if isinstance(node.value, str) and len(node.value) > MAX_STRING_CHARS:
            raise CalculatorError("string too long")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
        operand = evaluate_node(node.operand)
        if not isinstance(operand, (int, float)):
            raise CalculatorError("unary operators need a number")
        return check_number(UNARY_OPS[type(node.op)](operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
        left, right = evaluate_node(node.left), evaluate_node(node.right)
        if not all(isinstance(v, (int, float)) for v in (left, right)):
            raise CalculatorError("arithmetic needs numbers")
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise CalculatorError("exponent too large")
            # bound the size of the result before computing it: digits ~ exponent * log10(|base|)
            if abs(left) > 1 and right > 0 and right * math.log10(abs(left)) > MAX_RESULT_DIGITS:
                raise CalculatorError("result too large")
        try:
            return check_number(BINARY_OPS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except (OverflowError, ValueError) as e:
            raise CalculatorError(str(e)) from None
    if isinstance(node, ast.Call):
        # len("text") and "text".count("t") and a few other string helpers; no other calls
        if isinstance(node.func, ast.Name) and node.func.id == "len" and len(node.args) == 1 and not node.keywords:
            value = evaluate_node(node.args[0])
            if not isinstance(value, str):
                raise CalculatorError("len() takes a string")
            return len(value)
        if isinstance(node.func, ast.Attribute) and node.func.attr in STRING_METHODS and not node.keywords:
            target = evaluate_node(node.func.value)
            args = [evaluate_node(a) for a in node.args]
            if not isinstance(target, str) or not all(isinstance(a, str) for a in args) or len(args) > 2:
                raise CalculatorError(f".{node.func.attr}() is allowed on strings with string arguments only")
            result = getattr(target, node.func.attr)(*args)
            if isinstance(result, str) and len(result) > MAX_STRING_CHARS:
                raise CalculatorError("string too long")
            return result
        raise CalculatorError("only len() and string methods may be called")
    raise CalculatorError(f"{type(node).__name__} not allowed")


def format_result(value):
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(round(value, 6))
    return str(value)


def calculator(expression):
    """
    The value of an arithmetic expression as text, or 'error: ...'. Allowed: numbers, + - * / // % **,
    parentheses, unary minus, string literals with len() and a few string methods (count, lower, ...).
    Limits: expression length, AST size, exponent, result size and a time limit.
    """
    expression = expression.strip()
    if '"' not in expression and "'" not in expression:  # inside a string a comma is text
        expression = THOUSANDS_SEPARATOR.sub("", expression)
    if len(expression) > MAX_EXPRESSION_CHARS:
        return "error: expression too long"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # '1if'-like model output gets an error reply, not a warning
            tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError):
        return "error: not a valid expression"
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        return "error: expression too complex"
    try:
        return format_result(_with_time_limit(lambda: evaluate_node(tree), TIME_LIMIT_S))
    except CalculatorError as e:
        return f"error: {e}"
    except TimeoutError:
        return "error: took too long"
    except Exception as e:  # nothing the model writes may crash the engine
        return f"error: {type(e).__name__}"


def _with_time_limit(fn, seconds):
    """Run fn with a wall-clock limit (SIGALRM where available: main thread on Unix)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return fn()  # the size limits above still bound the work

    def on_alarm(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -----------------------------------------------------------------------------------------------------
# generation


def make_tool_hook(tokenizer):
    """A model.generate tool_hook: after <|python_end|>, the calculator's answer as tokens to force."""
    python_start, python_end = tokenizer.special("<|python_start|>"), tokenizer.special("<|python_end|>")
    output_start, output_end = tokenizer.special("<|output_start|>"), tokenizer.special("<|output_end|>")

    def hook(sample_index, tokens):
        if tokens[-1] != python_end:
            return None
        # the expression: the plain tokens back to this call's <|python_start|> (never into earlier turns)
        start = len(tokens) - 2
        while start >= 0 and not tokenizer.is_special(tokens[start]):
            start -= 1
        if start < 0 or tokens[start] != python_start:
            result = "error: <|python_end|> without <|python_start|>"
        else:
            expression_ids = [t for t in tokens[start + 1:-1] if t < tokenizer.vocab_size]  # padded-vocab ids dropped
            result = calculator(tokenizer.decode(expression_ids))
        return [output_start] + tokenizer.encode(result) + [output_end]

    return hook


class NonFiniteLogitsError(RuntimeError):
    pass


def check_logits(module, inputs, output):
    """A forward hook: NonFiniteLogitsError when the next-token logits hold NaN or infinity."""
    logits = output[0][:, -1]  # (B, vocab_size)
    # the largest logit of a row is NaN when any logit is, and infinite when one is +inf or all are -inf
    if not logits.max(dim=-1).values.isfinite().all():
        raise NonFiniteLogitsError("the model's output is not finite (NaN or infinity): its weights are broken or "
                                   "this input overflows its number format; nothing sensible can be sampled")


def generate(model, tokenizer, prompt, max_new_tokens=256, temperature=0.8, top_k=0, top_p=1.0, seed=None,
             num_samples=1, tools=True, stop_tokens=None):
    """
    Stream continuations of prompt (token ids): yields (tokens, forced) per step as model.generate does.
    Stops at the end of the assistant's turn (<|assistant_end|> in our chat format) or <|bos|> by default.
    tools=True turns the calculator on (tokenizers of imported models have no calculator tokens: then it is off).
    Raises NonFiniteLogitsError at the first step whose logits are not finite.
    """
    if stop_tokens is None:
        stop_tokens = [tokenizer.assistant_end_id, tokenizer.bos_id]
    hook = make_tool_hook(tokenizer) if tools and tokenizer.has_tools else None
    # every forward pass of this generation has its logits checked before model.generate samples from them
    logits_check = model.register_forward_hook(check_logits)
    try:
        yield from model.generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, stop_tokens=stop_tokens, num_samples=num_samples, tool_hook=hook)
    finally:
        logits_check.remove()


def check_weights(model, source):
    """
    ValueError naming source and the model's first tensor that holds NaN or infinity. A checkpoint from a
    training run that diverged looks like any other, but its model can only produce NaN: refuse it at load.
    """
    for name, tensor in model.state_dict().items():
        # a quick test first: a sum is NaN or infinite when a term is (20 times faster on a CPU than
        # isfinite(tensor).all(), which confirms it: finite weights of 10**28 and more could overflow the sum)
        if tensor.is_floating_point() and not tensor.float().sum().isfinite() and not tensor.isfinite().all():
            raise ValueError(f"{source}: weight {name} holds NaN or infinite values, so the model cannot generate "
                             "(did its training diverge?); use an earlier checkpoint")


def generate_reply(model, tokenizer, messages, max_new_tokens=256, temperature=0.0, seed=None, tools=True, **kw):
    """The assistant's next reply to a conversation as (text, token ids): the non-streaming convenience."""
    prompt = tokenizer.render_for_completion(messages)
    ids = []
    for tokens, _ in generate(model, tokenizer, prompt, max_new_tokens, temperature=temperature, seed=seed,
                              tools=tools, **kw):
        ids.append(tokens[0])
    text_ids = [t for t in ids if not tokenizer.is_special(t)]
    return tokenizer.decode(text_ids), ids


# -----------------------------------------------------------------------------------------------------
# text: streaming decoding, tool calls in reply text, conversations that fit the context

TOOL_MARKUP = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
# a tool call in reply text; one cut short (a reply stopped mid-call) runs to the end of the text
TOOL_CALL = re.compile(r"<\|python_start\|>(.*?)(?:<\|python_end\|>(?:<\|output_start\|>(.*?)<\|output_end\|>)?|$)",
                       re.S)
STRAY_MARKUP = re.compile("|".join(re.escape(name) for name in TOOL_MARKUP))


class TextDecoder:
    """
    Token ids -> text, one token at a time, for streaming: a character whose bytes are split across tokens
    comes out whole with the token that completes it. Tool tokens come out as their names ('<|python_start|>'
    ...) so that reply_parts() can rebuild the tool calls from the text; other special tokens as ''.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tool_names = {tokenizer.special(name): name for name in TOOL_MARKUP if name in tokenizer.special_tokens}
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token):
        if self.tokenizer.is_special(token) or token >= self.tokenizer.vocab_size:
            # ids past the tokenizer (a vocabulary padded for speed; an untrained model may sample them) are ''
            return self.utf8.decode(b"", final=True) + self.tool_names.get(token, "")
        return self.utf8.decode(self.tokenizer.decode_bytes([token]))


def generate_text(model, tokenizer, prompt, num_samples=1, **kw):
    """
    engine.generate with text: yields (tokens, pieces) per step, pieces[i] the text that tokens[i] adds to
    sample i (see TextDecoder; None once sample i has stopped). The stop token itself adds ''.
    """
    decoders = [TextDecoder(tokenizer) for _ in range(num_samples)]
    for tokens, _ in generate(model, tokenizer, prompt, num_samples=num_samples, **kw):
        yield tokens, [None if t is None else d.piece(t) for t, d in zip(tokens, decoders)]


def reply_parts(text):
    """
    A reply's text with tool markup (as TextDecoder writes it) -> the assistant content render_conversation
    takes: the text itself when it holds no tool call, else a list of {"type": "text" | "python" |
    "python_output", "text"} parts, so a conversation sent back as text renders exactly as it was generated.
    """
    parts, position = [], 0
    for match in TOOL_CALL.finditer(text):
        if match.start() > position:
            parts.append({"type": "text", "text": STRAY_MARKUP.sub("", text[position:match.start()])})
        parts.append({"type": "python", "text": match.group(1)})
        if match.group(2) is not None:
            parts.append({"type": "python_output", "text": match.group(2)})
        position = match.end()
    if not parts:
        return STRAY_MARKUP.sub("", text)  # markup outside a tool call (an untrained model's) is not kept
    if position < len(text):
        parts.append({"type": "text", "text": STRAY_MARKUP.sub("", text[position:])})
    return [p for p in parts if p["text"] or p["type"] != "text"]


def fit_conversation(tokenizer, messages, max_prompt_tokens):
    """
    The prompt (token ids) for the assistant's next reply, leaving out the oldest user/assistant exchanges
    (the system message stays) until it is at most max_prompt_tokens long. Returns (prompt, messages left
    out). ValueError when the conversation is malformed or even its last user message alone is too long.
    """
    system = messages[:1] if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" else []
    turns = list(messages[len(system):])
    prompt = tokenizer.render_for_completion(system + turns)  # checks the conversation, too
    if len(prompt) <= max_prompt_tokens:
        return prompt, 0
    # Too long. A rendering is its messages' renderings one after another, after the tokens every rendering
    # starts with (<|bos|>, an imported format's default system message). So each exchange is rendered once on
    # its own, less those start tokens, and exchanges are left out oldest first until the prompt fits: linear in
    # the conversation's length. (Rendering the whole conversation again for every exchange left out took
    # minutes for 8,000 short messages.) The start tokens: an exchange rendered once, doubled, less the same
    # exchange rendered twice over.
    exchanges = [turns[i:i + 2] for i in range(0, len(turns) - 1, 2)]
    start_tokens = 0
    if exchanges:
        once = len(tokenizer.render_conversation(exchanges[0])[0])
        start_tokens = 2 * once - len(tokenizer.render_conversation(exchanges[0] * 2)[0])
    excess_tokens, dropped = len(prompt) - max_prompt_tokens, 0
    for exchange in exchanges:
        if excess_tokens <= 0:
            break
        excess_tokens -= len(tokenizer.render_conversation(exchange)[0]) - start_tokens
        dropped += 2
    prompt = tokenizer.render_for_completion(system + turns[dropped:])
    if len(prompt) > max_prompt_tokens:
        raise ValueError(f"the last message is too long: the prompt is {len(prompt)} tokens and the model's "
                         f"context leaves room for {max_prompt_tokens}")
    return prompt, dropped
