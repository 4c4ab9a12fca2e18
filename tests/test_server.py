"""chat.py's server under hostile or unlucky input: odd lengths, deep JSON, other sites, bursts, broken models."""

import json
import socket
import threading
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from test_chat import HELLO, TOKENIZER, one_thread, request, serving  # noqa: F401  (one_thread: a fixture)
from test_engine import ScriptedModel, text_script

COMPLETIONS = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server():
    model = ScriptedModel(text_script(TOKENIZER, "ok"))
    with serving(model, defaults={"max_messages": 20}, hosts_allowed=["chat.example"],
                 origins_allowed=["http://localhost:3000"]) as url:
        yield url


def raw_request(url, head, body=b"", timeout_s=30):
    """Send a request as raw bytes (head: request line and headers), keep the socket open for writing, and
    return (status, parsed JSON body) of the answer."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=timeout_s) as connection:
        connection.sendall(head.replace("\n", "\r\n").encode("ascii") + b"\r\n" + body)
        answer = b""
        while chunk := connection.recv(1 << 16):
            answer += chunk
    status_and_headers, _, payload = answer.partition(b"\r\n\r\n")
    return int(status_and_headers.split()[1]), json.loads(payload)


def answer_of(url, body=None, method=None, headers=None):
    """(status, headers, body text) of a request."""
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.headers, response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode("utf-8")


# -----------------------------------------------------------------------------------------------------
# request bodies


@pytest.mark.parametrize("length, status, message", [
    ("-1", 400, "Content-Length must be a number of bytes"),  # read(-1) read until the client hung up
    ("abc", 400, "Content-Length must be a number of bytes"),
    ("1e3", 400, "Content-Length must be a number of bytes"),
    ("9" * 5000, 413, "the limit is"),
    (None, 411, "Content-Length header is required"),
], ids=["negative", "letters", "exponent", "5000 digits", "missing"])
def test_a_bad_content_length_is_refused_at_once(server, length, status, message):
    # the client sends the headers and then waits, its socket open: the answer must not wait for more
    head = f"POST {COMPLETIONS} HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
    head += "" if length is None else f"Content-Length: {length}\n"
    code, answer = raw_request(server, head, timeout_s=10)
    assert code == status and message in answer["error"]["message"]


@pytest.mark.parametrize("body, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"7" * 5001 + b"}", "too many digits"),
], ids=["100,000 deep", "5,001 digits"])
def test_deep_nesting_and_huge_numbers_get_400_not_a_closed_connection(server, body, message):
    status, answer = request(server + COMPLETIONS, data=body)
    assert status == 400 and message in answer["error"]["message"]


def test_too_many_messages_get_400(server):
    # 8,001 short messages held the model for minutes; past max_messages a request is refused before any work
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(21)]
    status, answer = request(server + COMPLETIONS, {"messages": messages})
    assert status == 400 and "21 messages; the limit is 20" in answer["error"]["message"]
    assert answer["error"]["param"] == "messages"
    assert request(server + COMPLETIONS, {"messages": messages[2:]})[0] == 200


# -----------------------------------------------------------------------------------------------------
# other sites: DNS rebinding and cross-origin pages


def test_other_host_names_and_other_sites_pages_are_refused(server):
    port = urlsplit(server).port
    for host in ("evil.example", f"evil.example:{port}", f"EVIL.example.:{port}"):
        status, answer = request(server + "/v1/models", headers={"Host": host})
        assert status == 403 and "--allowed_hosts=evil.example" in answer["error"]["message"]
    status, answer = request(server + COMPLETIONS, HELLO, headers={"Host": f"evil.example:{port}"})
    assert status == 403
    for origin in ("http://evil.example", "http://localhost:8080", "null"):
        status, answer = request(server + COMPLETIONS, HELLO, headers={"Origin": origin})
        assert status == 403 and f"--allowed_origins={origin}" in answer["error"]["message"]


def test_local_names_the_served_page_and_allowed_sites_get_answers(server):
    port = urlsplit(server).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "chat.example", f"192.168.1.5:{port}"):
        assert request(server + "/v1/models", headers={"Host": host})[0] == 200, host
    # the served page calls with its own origin; curl and the SDKs send none
    assert request(server + COMPLETIONS, HELLO, headers={"Origin": server})[0] == 200
    assert request(server + COMPLETIONS, HELLO, headers={"Origin": f"http://localhost:{port}",
                                                         "Host": f"localhost:{port}"})[0] == 200
    # an allowed site: the browser's preflight, then the call, both with the CORS header that lets the page read
    site = {"Origin": "http://localhost:3000"}
    status, headers, _ = answer_of(server + COMPLETIONS, method="OPTIONS", headers={
        **site, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type, authorization"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "content-type, authorization"
    status, headers, text = answer_of(server + COMPLETIONS, HELLO, headers=site)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert json.loads(text)["choices"][0]["message"]["content"] == "ok"
    # no CORS header for a request without an origin: nothing to allow
    assert answer_of(server + "/v1/models")[1]["Access-Control-Allow-Origin"] is None


# -----------------------------------------------------------------------------------------------------
# bursts and broken models


def test_a_burst_of_50_clients_all_get_http_answers():
    # with socketserver's listen backlog of 5, about half of them got a TCP reset instead of a 503
    model = ScriptedModel(text_script(TOKENIZER, "ok"), delay_s=0.05)
    statuses = []
    with serving(model, waiting_limit=4) as url:
        start = threading.Barrier(50)

        def ask():
            start.wait()
            try:
                statuses.append(request(url + COMPLETIONS, HELLO)[0])
            except OSError as e:
                statuses.append(repr(e))

        clients = [threading.Thread(target=ask) for _ in range(50)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=120)
    assert len(statuses) == 50 and set(statuses) <= {200, 503}, statuses
    assert 200 in statuses and 503 in statuses


def test_non_finite_logits_answer_500_not_a_dropped_connection():
    model = ScriptedModel(text_script(TOKENIZER, "hello there"), nan_after=0)  # NaN from the first step
    with serving(model) as url:
        for body in (HELLO, {**HELLO, "stream": True}):  # a stream fails before its first chunk: 500 too
            status, answer = request(url + COMPLETIONS, body)
            assert status == 500 and "not finite" in answer["error"]["message"]
            assert answer["error"]["type"] == "server_error"
    # NaN in the middle of a streamed reply: the stream so far, then an error event in place of [DONE]
    model = ScriptedModel(text_script(TOKENIZER, "hello there"), nan_after=4)
    with serving(model) as url:
        status, _, text = answer_of(url + COMPLETIONS, {**HELLO, "stream": True})
    events = [json.loads(e[len("data: "):]) for e in text.split("\n\n") if e]
    assert status == 200 and "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "hell"
    assert "not finite" in events[-1]["error"]["message"]
