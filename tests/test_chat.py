"""chat.py: the terminal chat, the OpenAI-compatible API (schema, streaming, errors, concurrency), the web page."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict

import pytest
import torch

import chat
import engine
from conftest import REPO, random_model, run_stage
from checkpoint import load_checkpoint, save_checkpoint
from test_engine import ScriptedModel, calculator_script, text_script
from tokenizer import Tokenizer

TOKENIZER = Tokenizer.byte_level()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def serving(model, **kw):
    """A chat.py server on a free port of 127.0.0.1, shut down afterwards; yields its base URL."""
    server = chat.make_server(model, TOKENIZER, "127.0.0.1", 0, name="tiny", **kw)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def api():
    model = random_model(vocab_size=267, max_seq_len=128)
    with serving(model, defaults={"max_tokens": 16, "max_tokens_limit": 64, "max_choices": 4},
                 request_bytes_limit=20_000) as url:
        yield url


def request(url, body=None, method=None, data=None, headers=None):
    """(status, parsed JSON body) of a request; body is sent as JSON, data as raw bytes."""
    if body is not None:
        data = json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def stream(url, body):
    """The parsed chunks of a streamed completion; asserts the stream is well-formed SSE ending in [DONE]."""
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode("utf-8"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
        events = response.read().decode("utf-8").split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-2])
    return [json.loads(e[len("data: "):]) for e in events[:-2]]


HELLO = {"messages": [{"role": "user", "content": "Hello there!"}]}


# -----------------------------------------------------------------------------------------------------
# the API


def test_models_endpoint(api):
    status, body = request(api + "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert body["data"][0]["id"] == "tiny" and body["data"][0]["object"] == "model"


def test_completion_follows_the_openai_schema(api):
    status, body = request(api + "/v1/chat/completions", {**HELLO, "model": "anything", "seed": 7, "max_tokens": 10})
    assert status == 200
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(TOKENIZER.render_for_completion(HELLO["messages"]))
    assert 1 <= usage["completion_tokens"] <= 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # the same seed gives the same reply
    assert request(api + "/v1/chat/completions", {**HELLO, "seed": 7, "max_tokens": 10})[1]["choices"] == body["choices"]


def test_streamed_completion_sends_the_same_reply_in_chunks(api):
    body = {**HELLO, "seed": 3, "max_tokens": 12, "temperature": 1.0}
    whole = request(api + "/v1/chat/completions", body)[1]
    chunks = stream(api + "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chunks) > 3  # streamed piece by piece, not in one go
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_several_choices_come_from_one_batch(api):
    body = {**HELLO, "n": 3, "seed": 1, "temperature": 1.0, "max_tokens": 8}
    status, whole = request(api + "/v1/chat/completions", body)
    assert status == 200 and [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in whole["choices"]}) > 1
    chunks = stream(api + "/v1/chat/completions", body)
    for i in range(3):
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"][0]["index"] == i)
        assert text == whole["choices"][i]["message"]["content"]


def test_stop_strings_cut_the_reply(api):
    body = {**HELLO, "temperature": 0.0, "max_tokens": 20}
    full = request(api + "/v1/chat/completions", body)[1]["choices"][0]["message"]["content"]
    assert len(full) >= 8
    stop = full[5:7]
    expected = full[:full.index(stop)]
    cut = request(api + "/v1/chat/completions", {**body, "stop": [stop, "never there"]})[1]["choices"][0]
    assert cut["message"]["content"] == expected and cut["finish_reason"] == "stop"
    chunks = stream(api + "/v1/chat/completions", {**body, "stop": stop})
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 400, "JSON object"),
    ({}, 400, "'messages'"),
    ({"messages": []}, 400, "'messages'"),
    ({"messages": ["hi"]}, 400, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "robot"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": "  "}]}, 400, "empty content"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "last message"),
    ({**HELLO, "temperature": "hot"}, 400, "'temperature'"),
    ({**HELLO, "max_tokens": 0}, 400, "'max_tokens'"),
    ({**HELLO, "max_tokens": 65}, 400, "'max_tokens'"),
    ({**HELLO, "n": 5}, 400, "'n'"),
    ({**HELLO, "stream": "yes"}, 400, "'stream'"),
    ({**HELLO, "stop": [""]}, 400, "'stop'"),
    ({"messages": [{"role": "user", "content": "x" * 500}]}, 400, "too long"),
    ({"messages": [{"role": "user", "content": "x" * 30_000}]}, 413, "limit"),
])
def test_bad_requests_get_a_4xx_json_error(api, body, status, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    code, answer = request(api + "/v1/chat/completions", data=raw)
    assert code == status
    assert message in answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error"


def test_unknown_paths_and_methods(api):
    assert request(api + "/v1/completions", HELLO)[0] == 404
    assert request(api + "/v1/nothing")[0] == 404
    code, answer = request(api + "/v1/chat/completions", HELLO, method="PUT")
    assert code == 405 and "method" in answer["error"]["message"]


def test_long_conversations_keep_their_latest_turns(api):
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": "answer " * 4}]
    messages = history + [{"role": "user", "content": "last?"}]
    assert len(TOKENIZER.render_for_completion(messages)) > 128  # more than the model's context
    status, body = request(api + "/v1/chat/completions", {"messages": messages, "max_tokens": 4})
    assert status == 200 and body["usage"]["prompt_tokens"] <= 127


def test_concurrent_requests_do_not_mix(api):
    bodies = [{**HELLO, "seed": seed, "temperature": 1.0, "max_tokens": 12} for seed in range(6)]
    expected = [request(api + "/v1/chat/completions", b)[1]["choices"] for b in bodies]
    results = [None] * len(bodies)

    def ask(i):
        if i % 2:
            chunks = stream(api + "/v1/chat/completions", bodies[i])
            results[i] = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        else:
            results[i] = request(api + "/v1/chat/completions", bodies[i])[1]["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [e[0]["message"]["content"] for e in expected]


def test_a_full_queue_answers_503():
    model = ScriptedModel(text_script(TOKENIZER, "ok"), delay_s=0.2)
    with serving(model, waiting_limit=0) as url:  # one request generates, none may wait
        slow = threading.Thread(target=stream, args=(url + "/v1/chat/completions", HELLO))
        slow.start()
        while not model.prompts:  # the first request is generating
            time.sleep(0.01)
        status, body = request(url + "/v1/chat/completions", HELLO)
        slow.join(timeout=30)
        assert status == 503 and "busy" in body["error"]["message"] and body["error"]["type"] == "server_error"
        assert request(url + "/v1/chat/completions", HELLO)[0] == 200  # its turn came


def test_tool_calls_round_trip_through_the_api():
    model = ScriptedModel(calculator_script(TOKENIZER, "12*7"))
    with serving(model) as url:
        question = {"role": "user", "content": "What is 12 times 7?"}
        reply = request(url + "/v1/chat/completions", {"messages": [question]})[1]["choices"][0]["message"]
        assert reply["content"] == "<|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>The answer is 84"
        # sent back as history, the reply renders as the tool call it was, not as text
        follow_up = [question, reply, {"role": "user", "content": "Thanks"}]
        assert request(url + "/v1/chat/completions", {"messages": follow_up})[0] == 200
        expected = TOKENIZER.render_for_completion([question, {"role": "assistant",
                                                               "content": engine.reply_parts(reply["content"])},
                                                    follow_up[2]])
        assert model.prompts[-1] == expected
        assert TOKENIZER.special("<|python_start|>") in model.prompts[-1]


# -----------------------------------------------------------------------------------------------------
# the terminal


def test_terminal_chat_keeps_history_and_obeys_commands():
    model = ScriptedModel(calculator_script(TOKENIZER, "2+3"))
    lines = iter(["/system Be brief.", "hi", "and again", "/temperature 0.3", "/temperature hot", "/reset", "bye",
                  "/unknown", "/quit", "never read"])
    output = []
    sampling = {"temperature": 0.6, "max_new_tokens": 100}
    chat.chat_in_terminal(model, TOKENIZER, sampling, read_line=lambda _: next(lines), write=output.append)
    text = "".join(output)
    assert text.count("[calculator: 2+3 = 5]The answer is 5") == 3
    assert "[temperature 0.3]" in text and "/temperature takes a number" in text and "unknown command /unknown" in text
    assert sampling["temperature"] == 0.3
    system = {"role": "system", "content": "Be brief."}
    first_reply = {"role": "assistant", "content": engine.reply_parts(
        "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|>The answer is 5")}
    assert model.prompts == [
        TOKENIZER.render_for_completion([system, {"role": "user", "content": "hi"}]),
        TOKENIZER.render_for_completion([system, {"role": "user", "content": "hi"}, first_reply,
                                         {"role": "user", "content": "and again"}]),
        TOKENIZER.render_for_completion([system, {"role": "user", "content": "bye"}]),  # after /reset
    ]


def test_ctrl_c_stops_the_reply_not_the_chat():
    model = ScriptedModel(calculator_script(TOKENIZER, "123456789 * 987654321"), interrupt_after=6)
    lines = iter(["first", "second", "/quit"])
    output = []
    chat.chat_in_terminal(model, TOKENIZER, {"max_new_tokens": 100}, read_line=lambda _: next(lines),
                          write=output.append)
    text = "".join(output)
    assert text.count(" [stopped]") == 2  # both replies were cut, and the chat went on to /quit
    assert "[calculator: 12345 [stopped]" in text
    # the partial reply stays in the history, as the unfinished tool call it was
    assert model.prompts[1] == TOKENIZER.render_for_completion([
        {"role": "user", "content": "first"}, {"role": "assistant", "content": [{"type": "python", "text": "12345"}]},
        {"role": "user", "content": "second"}])


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "best.pt"
    model = random_model(vocab_size=267, max_seq_len=128)
    save_checkpoint({"model_args": asdict(model.args), "model": model.state_dict(), "tokenizer": TOKENIZER.to_json(),
                     "data_format": "chat", "iter_num": 0}, str(path))
    return path


def test_prompt_answers_once_and_exits(checkpoint_path):
    result = run_stage("chat.py", "--ckpt", checkpoint_path, "--prompt", "Hi there", "--temperature=0",
                       "--max_new_tokens=20", "--system", "Be kind.")
    model, tokenizer, _ = load_checkpoint(str(checkpoint_path))
    expected = []
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
    chat.reply_in_terminal(model, tokenizer, messages, {"temperature": 0.0, "max_new_tokens": 20}, expected.append)
    expected = "".join(expected).replace("\r\n", "\n").replace("\r", "\n")  # as text=True reads it
    assert result.stdout == expected and len(result.stdout.strip()) > 0


def test_piped_terminal_session_and_user_errors(checkpoint_path):
    session = "hello\n/temperature 0.2\n/reset\n/quit\n"
    result = subprocess.run([sys.executable, "chat.py", f"--ckpt={checkpoint_path}", "--max_new_tokens=5"],
                            cwd=REPO, input=session, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "assistant> " in result.stdout and "[temperature 0.2]" in result.stdout
    assert "[new conversation]" in result.stdout
    missing = run_stage("chat.py", "--ckpt=nowhere/best.pt", check=False)
    assert missing.returncode == 1 and "nowhere/best.pt not found" in missing.stderr
    assert "Traceback" not in missing.stderr
    typo = run_stage("chat.py", "--temprature=1", check=False)
    assert typo.returncode == 1 and "did you mean 'temperature'" in typo.stderr


def test_serve_from_the_command_line(checkpoint_path):
    process = subprocess.Popen([sys.executable, "chat.py", "--ckpt", checkpoint_path, "--serve", "--port=0",
                                "--allowed_hosts=chat.example", "--allowed_origins=http://localhost:3000"],
                               cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving http://" not in line:
            line = process.stderr.readline()
            assert line, "chat.py --serve exited before serving"
        url = line.split("serving ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        status, body = request(url + "/v1/chat/completions", {**HELLO, "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] <= 3
        # the allow settings reach the server; other names and sites stay out
        assert request(url + "/v1/models", headers={"Host": "chat.example"})[0] == 200
        assert request(url + "/v1/models", headers={"Host": "evil.example"})[0] == 403
        assert request(url + "/v1/models", headers={"Origin": "http://localhost:3000"})[0] == 200
        assert request(url + "/v1/models", headers={"Origin": "http://evil.example"})[0] == 403
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_a_checkpoint_with_nan_weights_is_refused_by_name(tmp_path):
    # such a model replied with nothing (chat.py) or a crash in sampling; now both scripts refuse it at load
    path = tmp_path / "diverged.pt"
    model = random_model(vocab_size=267, max_seq_len=128)
    with torch.no_grad():
        model.layers[0].attention.wq.weight[0, 0] = float("nan")
    save_checkpoint({"model_args": asdict(model.args), "model": model.state_dict(), "tokenizer": TOKENIZER.to_json(),
                     "data_format": "chat", "iter_num": 0}, str(path))
    for script, *args in (("chat.py", "--prompt=Hi"), ("sample.py", "--max_new_tokens=5")):
        result = run_stage(script, f"--ckpt={path}", *args, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"{path}: weight layers.0.attention.wq.weight holds NaN" in result.stderr
        assert result.stdout == ""


def test_a_model_whose_output_overflows_stops_with_a_message(tmp_path):
    # finite weights (so loading accepts them) whose logits overflow float32: generation stops with a message
    path = tmp_path / "overflowing.pt"
    model = random_model(vocab_size=267, max_seq_len=128, tie_embeddings=False)
    with torch.no_grad():
        model.output.weight.fill_(3e38)
    save_checkpoint({"model_args": asdict(model.args), "model": model.state_dict(), "tokenizer": TOKENIZER.to_json(),
                     "data_format": "chat", "iter_num": 0}, str(path))
    chat_result = run_stage("chat.py", f"--ckpt={path}", "--prompt=Hi")
    assert "[the model's output is not finite" in chat_result.stdout
    sample = run_stage("sample.py", f"--ckpt={path}", "--max_new_tokens=5", check=False)
    assert sample.returncode == 1 and "Traceback" not in sample.stderr, sample.stderr
    assert f"error: {path}: the model's output is not finite" in sample.stderr


def test_sample_start_file_errors_name_the_file(checkpoint_path, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    for path, reason in ((tmp_path / "missing.txt", "there is no file"), (tmp_path, "is a folder"),
                         (latin1, "is not UTF-8 text (byte 0xe9 at offset 3)")):
        result = run_stage("sample.py", f"--ckpt={checkpoint_path}", f"--start=FILE:{path}", check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and f"--start=FILE:{path}: " in error_lines[0] and reason in error_lines[0]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time", encoding="utf-8")
    assert run_stage("sample.py", f"--ckpt={checkpoint_path}", f"--start=FILE:{prompt}",
                     "--max_new_tokens=3").returncode == 0


# -----------------------------------------------------------------------------------------------------
# the web page, in a real headless browser


def browser_paths():
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    return browser, shutil.which("chromedriver")


@pytest.mark.skipif(None in browser_paths(), reason="no headless browser: needs chromium and chromedriver "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
def test_web_page_streams_a_reply_in_a_real_browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium; "
                                    ".ci/run installs it)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    model = ScriptedModel(calculator_script(TOKENIZER, "12*7"), delay_s=0.03)  # slow enough to watch it stream
    with serving(model) as url:
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            driver.get(url + "/")
            box = driver.find_element(By.ID, "input")
            box.send_keys("What is 12 times 7?", Keys.ENTER)
            seen, deadline = [], time.time() + 30
            last_reply = "const r = document.querySelectorAll('.message.assistant'); return r.length ? " \
                         "[r[r.length - 1].textContent, r[r.length - 1].classList.contains('streaming')] : ['', true];"
            while time.time() < deadline:
                text, streaming = driver.execute_script(last_reply)
                seen.append(text)
                if not streaming:
                    break
                time.sleep(0.01)
            final = "calculator: 12*7 = 84The answer is 84"
            assert seen[-1] == final, seen[-5:]
            assert any(0 < len(t) < len(final) and final.startswith(t) for t in seen)  # it grew on screen
            assert driver.find_element(By.CSS_SELECTOR, ".message.user").text == "What is 12 times 7?"
            assert driver.find_element(By.CSS_SELECTOR, ".message.assistant .tool").text == "calculator: 12*7 = 84"
            # a second message sends the history back, the tool call included
            box.send_keys("Thanks!", Keys.ENTER)
            deadline = time.time() + 30
            while len(model.prompts) < 2 or driver.execute_script(last_reply)[1]:
                assert time.time() < deadline, "no second reply"
                time.sleep(0.02)
            assert TOKENIZER.special("<|python_start|>") in model.prompts[1]
            assert TOKENIZER.decode(model.prompts[1]).endswith("<|user_start|>Thanks!<|user_end|><|assistant_start|>")
            # the new-chat button clears the conversation
            driver.find_element(By.ID, "new-chat").click()
            assert driver.find_elements(By.CSS_SELECTOR, ".message") == []
        finally:
            driver.quit()
