"""
Chat with a trained model: in the terminal, in a browser, or through an OpenAI-compatible HTTP API.

    python chat.py --ckpt out/sft/best.pt                              # terminal chat with history
    python chat.py --ckpt out/sft/best.pt --prompt "What is 12*7?"     # one answer, then exit
    python chat.py --ckpt out/sft/best.pt --serve                      # web page + API on http://127.0.0.1:8000

Terminal commands: /reset, /system TEXT, /temperature X, /quit (or Ctrl-D). Ctrl-C stops the current reply.
The API: POST /v1/chat/completions (streaming and not) and GET /v1/models, so OpenAI clients work with
base_url="http://127.0.0.1:8000/v1". Every reply comes from engine.generate, calculator tool included.
The server answers only to localhost, IP addresses and the --host name (--allowed_hosts adds more), and to web
pages only its own (--allowed_origins adds more): another site open in the browser cannot drive it.
Settings take nanoGPT's --key=value form; `--key value` and a bare `--serve` work too.
"""

import importlib
import ipaddress
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from configurator import ConfigError, configure
import engine
from checkpoint import checkpoint_in, checkpoint_prefix, load_checkpoint
from common import pick_device

# -----------------------------------------------------------------------------------------------------
out_dir = "out/sft"  # where to look for best.pt (then ckpt.pt) when ckpt is empty
ckpt = ""  # the checkpoint to chat with: a .pt, a .safetensors export, or hf:DIR (a Hugging Face model)
prompt = ""  # answer this one message, print the reply and exit
system = ""  # a system message that opens every conversation
temperature = 0.6  # 0 = greedy
top_k = 50  # 0 = off
top_p = 0.95  # 1.0 = off
max_new_tokens = 512  # per reply (the context window may end it sooner)
seed = -1  # -1 = a different reply every time; otherwise replies are reproducible
tools = True  # the calculator: <|python_start|>expr<|python_end|> gets its result forced in
device = "auto"  # auto = cuda > mps > cpu
serve = False  # serve the web page and the HTTP API instead of chatting in the terminal
host = "127.0.0.1"  # 0.0.0.0 lets other machines in: anyone who can reach the port can use the model
port = 8000
model_name = ""  # the model id the API reports; empty = nanollama-<checkpoint folder>
max_request_bytes = 1_000_000  # larger request bodies get 413
max_tokens_limit = 2048  # the most new tokens one API request may ask for
max_choices = 8  # the most samples (n) one API request may ask for; they run as one batch
max_waiting = 16  # requests queued behind the one generating; more get 503
max_messages = 1000  # the most messages one API request may hold; more get 400
allowed_hosts = ""  # host names the server answers to besides localhost, IP addresses and --host, comma-separated
#                     (e.g. a reverse proxy's); others get 403, which stops DNS rebinding; "*" = any
allowed_origins = ""  # web pages besides the served one that may call the API from a browser, comma-separated
#                       origins (e.g. http://localhost:3000); others get 403; "*" = any
# -----------------------------------------------------------------------------------------------------

HTML_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.html")
# how the terminal shows a tool call: [calculator: 12*7 = 84]
TOOL_DISPLAY = {"<|python_start|>": "[calculator: ", "<|python_end|>": "", "<|output_start|>": " = ",
                "<|output_end|>": "]"}


# -----------------------------------------------------------------------------------------------------
# the terminal


def reply_in_terminal(model, tokenizer, messages, sampling, write):
    """Stream the assistant's reply to write(); Ctrl-C ends it early. Returns the reply text (tool markup kept)."""
    try:
        prompt_ids, dropped = engine.fit_conversation(tokenizer, messages, model.args.max_seq_len - 1)
    except ValueError as e:
        write(f"[{e}]\n")
        return ""
    if dropped:
        write(f"[the conversation is longer than the context: its first {dropped} messages are left out]\n")
    reply = ""
    try:
        for _, pieces in engine.generate_text(model, tokenizer, prompt_ids, **sampling):
            reply += pieces[0]
            for name, shown in TOOL_DISPLAY.items():
                pieces[0] = pieces[0].replace(name, shown)
            write(pieces[0])
    except KeyboardInterrupt:
        write(" [stopped]")
    except engine.NonFiniteLogitsError as e:
        write(f" [{e}]")
    write("\n")
    return reply


def chat_in_terminal(model, tokenizer, sampling, read_line=input, write=None):
    """The read-reply loop with history; /reset, /system TEXT, /temperature X, /quit."""
    if write is None:
        def write(text):
            sys.stdout.write(text)
            sys.stdout.flush()
    system_message = system
    history = []
    write("chat: /reset starts over, /system TEXT sets the system message, /temperature X, /quit; "
          "Ctrl-C stops a reply\n")
    while True:
        try:
            line = read_line("\nyou> ")
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(/quit or Ctrl-D to leave)\n")
            continue
        command, _, argument = line.strip().partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            history = []
            write("[new conversation]\n")
            continue
        if command == "/system":
            system_message, history = argument.strip(), []
            write(f"[system message {'set' if system_message else 'cleared'}; new conversation]\n")
            continue
        if command == "/temperature":
            try:
                value = float(argument)
                if not 0 <= value <= 10:
                    raise ValueError
            except ValueError:
                write(f"[/temperature takes a number from 0 (greedy) up, e.g. /temperature 0.7; got {argument!r}]\n")
                continue
            sampling["temperature"] = value
            write(f"[temperature {value:g}]\n")
            continue
        if command.startswith("/"):
            write(f"[unknown command {command}: /reset, /system TEXT, /temperature X, /quit]\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system_message}] if system_message else []) + history
        write("\nassistant> ")
        reply = reply_in_terminal(model, tokenizer, messages, sampling, write)
        if reply.strip():
            history.append({"role": "assistant", "content": engine.reply_parts(reply)})
        else:
            history.pop()  # no reply: the question goes too, so user and assistant turns keep alternating


# -----------------------------------------------------------------------------------------------------
# the HTTP API (OpenAI's chat completions) and the web page


class RequestError(Exception):
    """A bad request: answered with status and OpenAI's error JSON."""

    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_json(error):
    """A RequestError as OpenAI's error object."""
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


def number_field(body, key, default, low, high, integer=False):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        expected = "an integer" if integer else "a number"
        raise RequestError(400, f"'{key}' must be {expected} from {low} to {high}, got {json.dumps(value)}", key)
    return value


def message_text(content, index):
    """OpenAI content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"messages[{index}].content must be a string or a list of text parts "
                       "(images and other inputs are not supported)", f"messages[{index}].content")


def parse_request(body, defaults):
    """A chat completions request body -> (messages for the tokenizer, generation settings); RequestError if bad."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    if len(raw_messages) > defaults["max_messages"]:
        raise RequestError(400, f"'messages' holds {len(raw_messages)} messages; the limit is "
                           f"{defaults['max_messages']} (leave out the oldest)", "messages")
    messages = []
    for i, message in enumerate(raw_messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RequestError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = "system" if message["role"] == "developer" else message["role"]
        if role not in ("system", "user", "assistant"):
            raise RequestError(400, f"messages[{i}].role {message['role']!r} is not supported: use system, user or "
                               "assistant", f"messages[{i}].role")
        text = message_text(message["content"], i)
        messages.append({"role": role, "content": engine.reply_parts(text) if role == "assistant" else text})
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                             not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise RequestError(400, "'stream_options' must be an object", "stream_options")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    seed_value = number_field(body, "seed", None, -2 ** 63, 2 ** 63 - 1, integer=True)
    settings = {
        "temperature": number_field(body, "temperature", defaults["temperature"], 0, 2),
        "top_p": number_field(body, "top_p", defaults["top_p"], 0.0001, 1),
        "top_k": number_field(body, "top_k", defaults["top_k"], 0, 1_000_000, integer=True),
        "max_tokens": number_field({"max_tokens": max_tokens}, "max_tokens", defaults["max_tokens"], 1,
                                   defaults["max_tokens_limit"], integer=True),
        "n": number_field(body, "n", 1, 1, defaults["max_choices"], integer=True),
        "seed": None if seed_value is None else seed_value % 2 ** 63,
        "stop": stop or [],
        "stream": body.get("stream", False),
        "include_usage": bool(stream_options.get("include_usage", False)),
    }
    return messages, settings


class StopScanner:
    """
    A choice's text as it streams, cut at the first stop string. Text that could still be the start of a
    stop string is held back until the next piece shows whether it is.
    """

    def __init__(self, stop):
        self.stop, self.text, self.sent, self.stopped = stop, "", 0, False
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, piece):
        """Add a piece of text; returns the text that is now safe to send."""
        self.text += piece
        cuts = [self.text.find(s) for s in self.stop if s in self.text]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True
            return self.flush()
        ready = max(self.sent, len(self.text) - self.hold)
        chunk, self.sent = self.text[self.sent:ready], ready
        return chunk

    def flush(self):
        chunk, self.sent = self.text[self.sent:], len(self.text)
        return chunk


def completion_events(model, tokenizer, messages, settings, tools_on):
    """
    Generate the choices of one request; yields ("delta", index, text) as text becomes safe to send, then
    ("done", finish_reasons, usage). finish_reason is "stop" (end of turn or a stop string) or "length".
    """
    max_prompt_tokens = model.args.max_seq_len - 1
    try:
        prompt_ids, _ = engine.fit_conversation(tokenizer, messages, max_prompt_tokens)
    except ValueError as e:
        raise RequestError(400, str(e), "messages", "context_length_exceeded" if "too long" in str(e) else None)
    n = settings["n"]
    scanners = [StopScanner(settings["stop"]) for _ in range(n)]
    finish = ["length"] * n
    completion_tokens = 0
    stop_tokens = {tokenizer.assistant_end_id, tokenizer.bos_id}
    steps = engine.generate_text(model, tokenizer, prompt_ids, num_samples=n, max_new_tokens=settings["max_tokens"],
                                 temperature=settings["temperature"], top_k=settings["top_k"],
                                 top_p=settings["top_p"], seed=settings["seed"], tools=tools_on)
    try:
        for tokens, pieces in steps:
            for i, (token, piece) in enumerate(zip(tokens, pieces)):
                if token is None or scanners[i].stopped:
                    continue
                completion_tokens += 1
                if token in stop_tokens:
                    finish[i] = "stop"
                    chunk = scanners[i].flush()
                else:
                    chunk = scanners[i].add(piece)
                    if scanners[i].stopped:
                        finish[i] = "stop"
                if chunk:
                    yield "delta", i, chunk
            if all(s.stopped or f == "stop" for s, f in zip(scanners, finish)):
                break
    finally:
        steps.close()  # stop the model as soon as the client is gone or every choice has ended
    for i, scanner in enumerate(scanners):
        chunk = scanner.flush()
        if chunk:
            yield "delta", i, chunk
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
             "total_tokens": len(prompt_ids) + completion_tokens}
    yield "done", finish, usage


def host_name(host_header):
    """The name in a Host header, lowercased: 'Example.com:8000' -> 'example.com', '[::1]:8000' -> '::1'."""
    value = host_header.strip().lower()
    if value.startswith("[") and "]" in value:
        return value[1:value.index("]")]
    name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".")  # 'localhost.' is localhost


def is_ip_address(name):
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check_host_and_origin(headers, host_names, origins):
    """
    RequestError (403) for a request that reached the server under a host name it does not answer to, or that a
    web page from another site sent. Returns that site's origin when it is one of origins (the answer then
    carries a CORS header, so that the browser lets the page read it), else None.
    """
    host = headers.get("Host")
    # DNS rebinding: a page on attacker.example points its own name at 127.0.0.1 and calls this server by that
    # name, same-origin as far as the browser knows. Answering only names we know stops it; an IP address is
    # always safe, since no other site's page can come from it.
    if host is not None:
        name = host_name(host)
        if not (is_ip_address(name) or name in host_names or "*" in host_names):
            known = sorted(n for n in host_names if not is_ip_address(n))
            raise RequestError(403, f"this server does not answer to the host name {name!r} (only to "
                               f"{', '.join(known)} and IP addresses); to allow it, start the server with "
                               f"--allowed_hosts={name}")
    origin = headers.get("Origin")
    if origin is None:
        return None  # not sent by a web page: curl, the OpenAI SDKs, scripts
    try:
        if host is not None and urlsplit(origin).netloc.lower() == host.strip().lower():
            return None  # the page this server served
    except ValueError:
        pass  # not a URL at all: refused below unless allowed
    if origin.lower() in origins or "*" in origins:
        return origin
    raise RequestError(403, f"requests from web pages at {origin} are refused; to allow them, start the server "
                       f"with --allowed_origins={origin}")


def content_length(headers):
    """The request body's size in bytes: its Content-Length header, which must be a whole number (else 411, 400)."""
    text = headers.get("Content-Length")
    if text is None:
        raise RequestError(411, "a Content-Length header is required")
    text = text.strip()
    # int() takes '-1', and rfile.read(-1) reads until the client closes: no size limit at all
    if not (text.isascii() and text.isdigit()):
        raise RequestError(400, f"Content-Length must be a number of bytes (0 or more), got {text[:40]!r}")
    if len(text) > 15:  # a petabyte and more is no real body (and int() refuses 4,300 digits and more)
        return 10 ** 15
    return int(text)


class ChatHandler(BaseHTTPRequestHandler):
    server_version = "nanollama"
    protocol_version = "HTTP/1.0"  # one request per connection; a stream ends when the connection closes
    timeout = 60  # seconds a socket read or write may wait: a stalled client cannot hold the model forever
    cors_origin = None  # another site's page that --allowed_origins lets read the answer
    body_read = False
    streaming = False  # the status and headers of an event stream are sent: errors go into the stream

    def log_message(self, format, *args):
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def end_headers(self):
        if self.cors_origin:
            self.send_header("Access-Control-Allow-Origin", self.cors_origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def send_json(self, status, obj):
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, error):
        self.send_json(error.status, error_json(error))

    def refused(self):
        """Answer 403 and return True when the request's Host or Origin is not one this server answers."""
        try:
            self.cors_origin = check_host_and_origin(self.headers, self.server.host_names, self.server.origins)
        except RequestError as e:
            self.send_error_json(e)
            return True
        return False

    def do_GET(self):
        if self.refused():
            return
        path = self.path.split("?")[0]
        if path in ("/", "/index.html"):
            with open(HTML_PATH, "rb") as f:
                page = f.read()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [self.model_entry()]})
        elif path == f"/v1/models/{self.server.model_name}":
            self.send_json(200, self.model_entry())
        else:
            self.send_error_json(RequestError(404, f"no such page: GET {path} (try /, /v1/models)"))

    def model_entry(self):
        return {"id": self.server.model_name, "object": "model", "created": self.server.created,
                "owned_by": "nanollama"}

    def do_POST(self):
        try:
            self.cors_origin = check_host_and_origin(self.headers, self.server.host_names, self.server.origins)
            if self.path.split("?")[0] != "/v1/chat/completions":
                raise RequestError(404, f"no such endpoint: POST {self.path} (try /v1/chat/completions)")
            body = self.read_json_body()
            messages, settings = parse_request(body, self.server.defaults)
            # the queue: one request generates at a time, up to max_waiting wait their turn
            if not self.server.slots.acquire(blocking=False):
                raise RequestError(503, "the server is busy: too many requests are waiting; try again shortly")
        except RequestError as e:
            self.send_error_json(e)
            self.discard_body()
            return
        try:
            with self.server.generation_lock:
                self.answer(messages, settings)
        except OSError:
            pass  # the client went away or stalled; its generation has been stopped
        except Exception as e:  # the model's output (NaN) or a fault here, not the request: say so, never hang up
            self.answer_failure(e)
        finally:
            self.server.slots.release()

    def do_OPTIONS(self):
        """What a browser asks before a page from another site (one --allowed_origins lets in) calls the API."""
        if self.refused():
            return
        self.send_response(204)
        self.send_header("Allow", "GET, POST, OPTIONS")
        if self.cors_origin:
            asked = self.headers.get("Access-Control-Request-Headers", "")
            self.send_header("Access-Control-Allow-Methods", "GET, POST")
            # the headers the page's request carries (an OpenAI SDK sends a dozen), when they are plain names
            self.send_header("Access-Control-Allow-Headers", asked if re.fullmatch(r"[\w\-, ]*", asked) else
                             "Content-Type, Authorization")
            self.send_header("Access-Control-Max-Age", "600")
        self.end_headers()

    def do_PUT(self):
        if not self.refused():
            self.send_error_json(RequestError(405, "method not allowed: use GET or POST"))
            self.discard_body()

    do_DELETE = do_PATCH = do_PUT

    def read_json_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        length = content_length(self.headers)
        if length > self.server.max_request_bytes:
            raise RequestError(413, f"the request body is {length} bytes; the limit is "
                               f"{self.server.max_request_bytes}")
        data, self.body_read = self.rfile.read(length), True
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise RequestError(400, "the request body is nested too deeply (arrays or objects inside one another "
                               f"{sys.getrecursionlimit()} deep or more)") from None
        except ValueError:  # the one other thing json.loads refuses: an integer of too many digits
            raise RequestError(400, "the request body holds a number of too many digits (the limit is "
                               f"{sys.get_int_max_str_digits()})") from None

    def discard_body(self, most_bytes=64 << 20):
        """Read and drop the body of a refused request, so that closing the socket does not reset the connection
        before the client has read the error. Only a valid Content-Length says how much there is to read."""
        try:
            left = 0 if self.body_read else min(content_length(self.headers), most_bytes)
        except RequestError:
            return
        self.connection.settimeout(5)
        try:
            while left > 0:
                data = self.rfile.read(min(left, 1 << 16))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    def answer_failure(self, error):
        """A request that failed after it was accepted: 500 with what went wrong (in the stream, once it runs)."""
        if isinstance(error, engine.NonFiniteLogitsError):
            message = str(error)
        else:
            traceback.print_exc()  # a fault of this server: the log says where
            message = f"the server failed to answer: {type(error).__name__}: {error}"
        failure = error_json(RequestError(500, message))
        try:
            if self.streaming:
                self.send_event(failure)  # the status (200) went out with the first chunk: the stream ends here
            else:
                self.send_json(500, failure)
        except OSError:
            pass

    def answer(self, messages, settings):
        request_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        model, tokenizer = self.server.model, self.server.tokenizer
        events = completion_events(model, tokenizer, messages, settings, self.server.tools)
        t0 = time.time()
        try:
            first = next(events)  # a prompt that does not fit is answered with a 400, before any streaming
        except RequestError as e:
            self.send_error_json(e)
            return
        n = settings["n"]
        if not settings["stream"]:
            texts = [""] * n
            for kind, *data in itertools.chain([first], events):
                if kind == "delta":
                    texts[data[0]] += data[1]
                else:
                    finish, usage = data
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish[i]} for i, text in enumerate(texts)]
            self.send_json(200, {"id": request_id, "object": "chat.completion", "created": created,
                                 "model": self.server.model_name, "choices": choices, "usage": usage})
        else:
            def chunk(index, delta, finish_reason=None):
                return {"id": request_id, "object": "chat.completion.chunk", "created": created,
                        "model": self.server.model_name,
                        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.streaming = True
            for i in range(n):
                self.send_event(chunk(i, {"role": "assistant", "content": ""}))
            for kind, *data in itertools.chain([first], events):
                if kind == "delta":
                    self.send_event(chunk(data[0], {"content": data[1]}))
                else:
                    finish, usage = data
            for i in range(n):
                self.send_event(chunk(i, {}, finish[i]))
            if settings["include_usage"]:
                self.send_event({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                 "model": self.server.model_name, "choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        elapsed = time.time() - t0
        sys.stderr.write(f"  {usage['prompt_tokens']} prompt + {usage['completion_tokens']} new tokens in "
                         f"{elapsed:.2f}s ({usage['completion_tokens'] / max(elapsed, 1e-9):.1f} tokens/s)\n")

    def send_event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")
        self.wfile.flush()


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    # connections the kernel holds until they are accepted: socketserver's 5 turned a burst of clients into TCP
    # resets; now each gets an HTTP answer (503 once max_waiting requests are queued)
    request_queue_size = 128


def make_server(model, tokenizer, host="127.0.0.1", port=8000, name="nanollama", defaults=None, tools_on=True,
                request_bytes_limit=1_000_000, waiting_limit=16, hosts_allowed=(), origins_allowed=()):
    """
    The web page and API server (not yet serving: call serve_forever). port 0 picks a free port.
    It answers to localhost, IP addresses, host and hosts_allowed; web pages other than its own may call it
    when their origins (e.g. "http://localhost:3000") are in origins_allowed. "*" allows any.
    """
    server = ChatServer((host, port), ChatHandler)
    server.model, server.tokenizer, server.model_name, server.tools = model, tokenizer, name, tools_on
    server.created = int(time.time())
    # what a request leaves out comes from the settings at the top of this file (after configure)
    server.defaults = {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                       "max_tokens": min(max_new_tokens, max_tokens_limit), "max_tokens_limit": max_tokens_limit,
                       "max_choices": max_choices, "max_messages": max_messages, **(defaults or {})}
    server.host_names = {"localhost", host_name(host)} | {host_name(h) for h in hosts_allowed}
    server.origins = {origin.strip().rstrip("/").lower() for origin in origins_allowed}
    server.max_request_bytes = request_bytes_limit
    server.generation_lock = threading.Lock()
    server.slots = threading.BoundedSemaphore(waiting_limit + 1)
    return server


# -----------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    try:
        configure(globals())
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if not ckpt:
        ckpt = checkpoint_in(out_dir)
        if not os.path.exists(ckpt):
            sys.exit(f"error: no checkpoint in {out_dir} (looked for best.pt and ckpt.pt); "
                     "give one with --ckpt=PATH or --out_dir=DIR")
    device = pick_device(device)
    try:
        model, tokenizer, checkpoint = load_checkpoint(ckpt, device)
        engine.check_weights(model, ckpt)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if checkpoint.get("data_format") != "chat":
        print(f"note: {ckpt} is a base model (trained on plain text, not conversations): its replies will ramble; "
              "fine-tune it with SFT first", file=sys.stderr)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": max_new_tokens,
                "seed": None if seed < 0 else seed, "tools": tools}

    if serve:
        prefix = checkpoint_prefix(ckpt)  # an imported model is named after its folder or GGUF file
        folder = ckpt[len(prefix):] if prefix else os.path.dirname(os.path.abspath(ckpt))
        name = model_name or f"nanollama-{os.path.basename(os.path.normpath(folder))}"
        try:
            server = make_server(model, tokenizer, host, port, name, tools_on=tools,
                                 request_bytes_limit=max_request_bytes, waiting_limit=max_waiting,
                                 hosts_allowed=[h for h in allowed_hosts.split(",") if h.strip()],
                                 origins_allowed=[o for o in allowed_origins.split(",") if o.strip()])
        except OSError as e:
            sys.exit(f"error: cannot listen on {host}:{port}: {e.strerror} (another server there? try --port=8001)")
        address = f"http://{host}:{server.server_address[1]}"
        print(f"{ckpt} on {device}: serving {address} (web page), {address}/v1/chat/completions and "
              f"{address}/v1/models as model {name!r}; Ctrl-C stops", file=sys.stderr)
        if host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: listening on {host}: anyone who can reach port {port} can use this model", file=sys.stderr)
        # Ctrl-C (SIGINT) stops the server, also when a script started it in the background: a shell without job
        # control starts background commands with SIGINT ignored, and Python then never raises KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("\nstopped", file=sys.stderr)
        server.server_close()
    elif prompt:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        reply_in_terminal(model, tokenizer, messages, sampling, lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    else:
        try:  # imported for its side effect: line editing and history for input(), where available
            importlib.import_module("readline")
        except ImportError:
            pass
        print(f"{ckpt} on {device}, step {checkpoint.get('iter_num', '?')}", file=sys.stderr)
        chat_in_terminal(model, tokenizer, sampling)
