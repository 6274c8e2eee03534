"""engine.py and serve.py: continuous batching equals decoding alone, the OpenAI protocol through the
official client, every error case over raw HTTP, disconnects, and the chat page in headless Chromium."""

import json
import math
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

import inference
import serve
from engine import Engine, QueueFull, Request

from conftest import tiny_model, wander

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "tiny-sft"
CONTEXT = 96
GREEDY = {"temperature": 0, "repetition_penalty": 1.0}
GREEDY_ARGS = {"temperature": 0, "extra_body": {"repetition_penalty": 1.0}}  # the same, as the openai client takes it


def greedy_text(model, tok, ids, max_tokens):
    out = model.generate([ids], max_tokens, eos_id=tok.eos_id, temperature=0)[0]
    return tok.decode(out, skip_special_tokens=True), len(out)


class Running:
    """A uvicorn server for `app` on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "the test server did not start"
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join()


def start_server(model, tok, mode="chat", api_key=KEY, **engine_args):
    engine = Engine(model, tok.eos_id, **engine_args)
    return Running(serve.create_app(serve.Server(engine, tok, mode, NAME, api_key))), engine


@pytest.fixture(scope="module")
def served(tiny_tokenizer):
    model = wander(tiny_model(tiny_tokenizer.vocab_size, max_seq_len=CONTEXT))
    running, engine = start_server(model, tiny_tokenizer, max_batch=4, max_queue=16)
    yield running, model, engine
    running.close()


@pytest.fixture(scope="module")
def slow(tiny_tokenizer):
    """One slot, one place in the queue, a model slowed to 20 ms a forward and no end of text: a request
    runs its max_tokens and stays active meanwhile."""
    model = wander(tiny_model(tiny_tokenizer.vocab_size, max_seq_len=CONTEXT))
    forward = model.hidden_states

    def slowed(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    model.hidden_states = slowed
    engine = Engine(model, eos_id=-1, max_batch=1, max_queue=1)
    running = Running(serve.create_app(serve.Server(engine, tiny_tokenizer, "chat", NAME, KEY)))
    yield running, engine
    running.close()


@pytest.fixture
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0)


# ---- the engine ----
class Collector:
    """Records one request's events (called from the engine's thread)."""

    def __init__(self, engine=None):
        self.tokens, self.end, self.done, self.engine, self.most_active = [], None, threading.Event(), engine, 0

    def __call__(self, kind, value):
        if self.engine is not None:
            self.most_active = max(self.most_active, len(self.engine.rows))
        if kind == "token":
            self.tokens.append(value)
        else:
            self.end = (kind, value)
            self.done.set()

    def wait(self):
        assert self.done.wait(30), "the engine did not finish the request"
        return self


def test_engine_greedy_equals_alone_with_joins_and_leaves(tiny_tokenizer):
    tok = tiny_tokenizer
    model = wander(tiny_model(tok.vocab_size, max_seq_len=CONTEXT))
    questions = (
        "高血压患者饮食上要注意什么？",
        "感冒",
        "糖尿病需要控制饮食、规律运动吗？请详细说明。",
        "头痛怎么办？",
        "发烧",
    )
    prompts = [inference.build_prompt(tok, q)[0] for q in questions]
    lengths = [40, 12, 30, 25, 35]
    alone = [model.generate([p], n, eos_id=tok.eos_id, temperature=0)[0] for p, n in zip(prompts, lengths)]
    assert len({len(p) for p in prompts}) == len(prompts) and len({tuple(a) for a in alone}) == len(prompts)
    engine = Engine(model, tok.eos_id, max_batch=3, max_queue=8).start()
    try:
        first = Collector(engine)
        engine.submit(prompts[0], lengths[0], first, temperature=0)
        while len(first.tokens) < 5 and not first.done.is_set():  # the others join a running sequence
            time.sleep(0.001)
        others = [Collector(engine) for _ in prompts[1:]]
        for prompt, n, collector in zip(prompts[1:], lengths[1:], others):
            engine.submit(prompt, n, collector, temperature=0)
        results = [c.wait() for c in [first] + others]
    finally:
        engine.stop()
    assert [r.tokens for r in results] == alone
    assert max(r.most_active for r in results) == 3  # really batched, and more requests than slots
    for r, expected, n in zip(results, alone, lengths):
        assert r.end == ("done", "length" if len(expected) == n else "stop")


def test_engine_per_row_sampling_settings(tiny_tokenizer):
    """A seeded sampled row gives the same tokens alone and beside rows with other settings."""
    tok = tiny_tokenizer
    model = wander(tiny_model(tok.vocab_size, max_seq_len=CONTEXT))
    prompt = inference.build_prompt(tok, "高血压患者饮食上要注意什么？")[0]
    settings = dict(temperature=0.9, top_k=50, top_p=0.8, repetition_penalty=1.3)
    engine = Engine(model, tok.eos_id, max_batch=4).start()
    try:
        alone = engine.submit(prompt, 30, Collector(), seed=7, **settings).on_event.wait().tokens
        again = engine.submit(prompt, 30, Collector(), seed=7, **settings).on_event.wait().tokens
        other_seed = engine.submit(prompt, 30, Collector(), seed=8, **settings).on_event.wait().tokens
        batch = [
            engine.submit(prompt, 30, Collector(), seed=7, **settings),
            engine.submit(prompt, 30, Collector(), temperature=0),
            engine.submit(prompt[3:], 30, Collector(), seed=3, temperature=1.5, top_k=5),
            engine.submit(prompt, 30, Collector(), seed=7, temperature=0.9),
        ]
        batch = [r.on_event.wait().tokens for r in batch]
    finally:
        engine.stop()
    greedy = model.generate([prompt], 30, eos_id=tok.eos_id, temperature=0)[0]
    assert alone == again != other_seed
    assert batch[0] == alone and batch[1] == greedy
    assert batch[3] != alone  # no penalty, no top-k/top-p: the settings really are per row


def test_engine_refuses_what_does_not_fit(tiny_tokenizer):
    model = wander(tiny_model(tiny_tokenizer.vocab_size, max_seq_len=CONTEXT))
    engine = Engine(model, tiny_tokenizer.eos_id, max_batch=1, max_queue=1)  # not started: requests stay queued
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.submit(list(range(3, 90)), 10, Collector())
    with pytest.raises(ValueError):
        engine.submit([], 10, Collector())
    engine.submit([5, 6], 4, Collector())
    with pytest.raises(QueueFull):
        engine.submit([5, 6], 4, Collector())


def test_stop_text_holds_back_possible_stops():
    cut = serve.StopText(["END", "。\n"])
    assert cut.push("abc") == ("abc", False)
    assert cut.push("xE") == ("x", False)  # "E" may start "END"
    assert cut.push("Ny") == ("ENy", False)
    assert cut.push("1。") == ("1", False)
    assert cut.push("\nmore") == ("", True)
    assert serve.StopText(["ab"]).push("xxabyyab") == ("xx", True)


# ---- the API through the official client ----
def test_chat_completion_is_our_greedy_answer(served, client, tiny_tokenizer):
    _, model, _ = served
    question = "高血压患者饮食上要注意什么？"
    ids = inference.build_prompt(tiny_tokenizer, question)[0]
    expected, n = greedy_text(model, tiny_tokenizer, ids, 20)
    reply = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": question}],
        max_tokens=20,
        temperature=0,
        extra_body={"repetition_penalty": 1.0},
    )
    assert reply.choices[0].message.content == expected and len(expected) > 5
    assert reply.choices[0].finish_reason == ("length" if n == 20 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), n)
    assert reply.usage.total_tokens == len(ids) + n and reply.model == NAME


def test_streaming_chat_and_usage_chunk(served, client, tiny_tokenizer):
    _, model, _ = served
    messages = [
        {"role": "system", "content": "你是医生。"},
        {"role": "user", "content": "头痛怎么办？"},
        {"role": "assistant", "content": "多休息。"},
        {"role": "user", "content": "还要注意什么？"},
    ]
    ids = inference.build_prompt(tiny_tokenizer, "还要注意什么？", [("你是医生。\n头痛怎么办？", "多休息。")])[0]
    expected, n = greedy_text(model, tiny_tokenizer, ids, 16)
    chunks = list(
        client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY_ARGS,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and len(chunks) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ("length" if n == 16 else "stop")
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == n and all(c.usage is None for c in chunks[:-1])


def test_completions_continue_text(served, client, tiny_tokenizer):
    _, model, _ = served
    ids = inference.build_prompt(tiny_tokenizer, "高血压是", mode="continue")[0]
    expected, n = greedy_text(model, tiny_tokenizer, ids, 12)
    reply = client.completions.create(model=NAME, prompt="高血压是", max_tokens=12, **GREEDY_ARGS)
    assert reply.choices[0].text == expected and reply.usage.completion_tokens == n
    streamed = client.completions.create(model=NAME, prompt="高血压是", max_tokens=12, stream=True, **GREEDY_ARGS)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_stop_strings_are_cut_and_not_returned(served, client, tiny_tokenizer):
    _, model, _ = served
    ids = inference.build_prompt(tiny_tokenizer, "感冒")[0]
    full, _ = greedy_text(model, tiny_tokenizer, ids, 30)
    stop = full[8:10]
    before = full[: full.index(stop)]
    ask = dict(model=NAME, messages=[{"role": "user", "content": "感冒"}], max_tokens=30, **GREEDY_ARGS)
    reply = client.chat.completions.create(stop=[stop, "never appears"], **ask)
    assert reply.choices[0].message.content == before and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(stop=stop, stream=True, **ask))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == before


def test_concurrent_requests_each_get_their_own_answer(served, client, tiny_tokenizer):
    _, model, _ = served
    questions = ["感冒", "头痛怎么办？", "高血压患者饮食上要注意什么？", "发烧了要吃药吗？", "失眠"]
    expected = [
        greedy_text(model, tiny_tokenizer, inference.build_prompt(tiny_tokenizer, q)[0], 24)[0] for q in questions
    ]
    answers = [None] * len(questions)

    def ask(i):
        reply = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": questions[i]}], max_tokens=24, **GREEDY_ARGS
        )
        answers[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == expected


def test_models_health_and_page(served, client):
    running, _, _ = served
    assert [m.id for m in client.models.list()] == [NAME]
    health = httpx.get(running.url + "/health").json()
    assert health["status"] == "ok" and health["context"] == CONTEXT and health["slots"] == 4
    page = httpx.get(running.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for outside in ("http://", "https://", "//cdn", "@import", "@font-face"):
        assert outside not in page.text  # self-contained: nothing fetched from elsewhere


# ---- errors over raw HTTP ----
def post(running, path, body, headers=AUTH):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(running.url + path, content=data, headers={**headers, "Content-Type": "application/json"})


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def chat(content="感冒", **fields):
    return {"model": NAME, "messages": [{"role": "user", "content": content}], **fields}


def test_request_errors(served):
    running = served[0]
    url = "/v1/chat/completions"
    assert "not valid JSON" in error_of(post(running, url, '{"messages": [}'), 400)["message"]
    assert error_of(post(running, url, "[1, 2]"), 400)["code"] == "invalid_json"
    assert error_of(post(running, url, chat(model=["x"])), 400)["code"] == "invalid_type"
    assert "nested too deeply" in error_of(post(running, url, "[" * 100_000 + "]" * 100_000), 400)["message"]
    for path, body in [
        (url, '{"messages": [{"role": "user", "content": "\\ud83d"}]}'),
        ("/v1/completions", '{"prompt": "a\\udfff"}'),
    ]:
        assert "lone surrogate" in error_of(post(running, path, body), 400)["message"]
    error = error_of(post(running, url, chat(n=2)), 400)
    assert error["param"] == "n" and "'n' must be 1" in error["message"]
    for field, value in [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("logprobs", True),
        ("frequency_penalty", 0.5),
        ("response_format", {"type": "json_object"}),
    ]:
        error = error_of(post(running, url, chat(**{field: value})), 400)
        assert error["param"] == field and "not supported" in error["message"]
    assert post(running, url, chat(logprobs=False, n=1, frequency_penalty=0, max_tokens=2)).status_code == 200
    error = error_of(post(running, url, chat(colour="blue")), 400)
    assert error["param"] == "colour" and error["code"] == "unknown_parameter"
    for bad in (0, -1, CONTEXT, "10", 2.5):
        assert error_of(post(running, url, chat(max_tokens=bad)), 400)["param"] == "max_tokens"
    assert error_of(post(running, url, chat(temperature=3)), 400)["param"] == "temperature"
    assert error_of(post(running, url, chat(top_p=0)), 400)["param"] == "top_p"
    assert error_of(post(running, url, chat(stop=["a", "b", "c", "d", "e"])), 400)["param"] == "stop"
    assert error_of(post(running, url, chat(stream_options={"include_usage": True})), 400)["param"] == "stream_options"
    assert error_of(post(running, url, {"model": NAME, "messages": []}), 400)["param"] == "messages"
    assert (
        "last message"
        in error_of(
            post(running, url, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            400,
        )["message"]
    )
    tool = {"messages": [{"role": "tool", "content": "x"}]}
    assert error_of(post(running, url, tool), 400)["param"] == "messages[0].role"
    assert error_of(post(running, url, chat(model="gpt-4")), 404)["code"] == "model_not_found"
    assert error_of(post(running, "/v1/completions", {"prompt": ["a", "b"]}), 400)["param"] == "prompt"
    assert error_of(httpx.get(running.url + "/v1/nothing"), 404)["code"] == "not_found"


def test_api_key(served):
    running = served[0]
    assert error_of(post(running, "/v1/chat/completions", chat(), headers={}), 401)["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer nope"}
    assert error_of(post(running, "/v1/chat/completions", chat(), headers=wrong), 401)["message"] == "incorrect API key"
    assert httpx.get(running.url + "/v1/models", headers=wrong).status_code == 401
    assert httpx.get(running.url + "/v1/models", headers=AUTH).status_code == 200


def test_images_need_a_vision_language_checkpoint(served):
    content = [
        {"type": "text", "text": "这是什么？"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    error = error_of(post(served[0], "/v1/chat/completions", chat(content)), 400)
    assert "image inputs are not served" in error["message"] and error["code"] == "unsupported_content"
    text_parts = post(served[0], "/v1/chat/completions", chat([{"type": "text", "text": "感冒"}], max_tokens=2))
    assert text_parts.status_code == 200


def test_context_overflow_is_refused_or_trimmed(served, tiny_tokenizer):
    running, model, _ = served
    tok = tiny_tokenizer
    turns = [(f"问题{i}：高血压患者饮食上要注意什么？", f"回答{i}：少盐，多吃蔬菜。") for i in range(6)]
    messages = [{"role": "system", "content": "你是医生。"}]
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": "还有呢？"})
    error = error_of(post(running, "/v1/chat/completions", {"messages": messages, "max_tokens": 10}), 400)
    assert error["code"] == "context_length_exceeded" and f"context is {CONTEXT} tokens" in error["message"]
    longer = messages[:1] + messages[1:-1] * 4 + messages[-1:]  # no room left at all, max_tokens not sent
    error = error_of(post(running, "/v1/chat/completions", {"messages": longer}), 400)
    assert error["message"].endswith(
        "which leaves no room for an answer: send a shorter conversation, lower max_tokens, or set "
        '"trim_history": true to drop the oldest turns'
    )
    reply = post(
        running, "/v1/chat/completions", {"messages": messages, "max_tokens": 10, "trim_history": True, **GREEDY}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    dropped = body["trimmed_turns"]
    assert 0 < dropped < len(turns)
    kept = [("你是医生。\n" + turns[dropped][0], turns[dropped][1])] + turns[dropped + 1 :]
    ids = inference.build_prompt(tok, "还有呢？", kept)[0]  # the system text moved to the first kept turn
    assert body["usage"]["prompt_tokens"] == len(ids) <= CONTEXT - 10
    one_more = [("你是医生。\n" + turns[dropped - 1][0], turns[dropped - 1][1])] + turns[dropped:]
    assert len(inference.build_prompt(tok, "还有呢？", one_more)[0]) > CONTEXT - 10  # one turn more would not fit
    assert body["choices"][0]["message"]["content"] == greedy_text(model, tok, ids, 10)[0]


def test_trimming_a_long_conversation_encodes_it_a_few_times_not_once_per_turn(served, monkeypatch):
    calls, build_prompt = [], serve.build_prompt
    monkeypatch.setattr(serve, "build_prompt", lambda *args: calls.append(1) or build_prompt(*args))
    messages = []
    for i in range(300):
        messages += [{"role": "user", "content": f"问{i}"}, {"role": "assistant", "content": f"答{i}"}]
    body = {"messages": messages + [{"role": "user", "content": "还有呢？"}], "max_tokens": 2, "trim_history": True}
    reply = post(served[0], "/v1/chat/completions", body)
    assert reply.status_code == 200 and 0 < reply.json()["trimmed_turns"] < 300
    assert len(calls) <= 2 + math.ceil(math.log2(301))  # bisection over the 301 counts, then the chosen one


def test_full_queue_and_disconnect_free_the_slot(slow):
    running, engine = slow
    body = chat("头痛怎么办？", max_tokens=80, stream=True, temperature=0)
    with (
        httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as first,
        httpx.Client(base_url=running.url, headers=AUTH, timeout=30) as second,
    ):
        with first.stream("POST", "/v1/chat/completions", json=body) as active:
            lines = active.iter_lines()  # kept: a dropped iterator closes the connection
            events = (line for line in lines if line.startswith("data: "))
            next(events), next(events)  # the opening chunk, then a token: generating, the only slot taken
            with second.stream("POST", "/v1/chat/completions", json=body) as waiting:
                assert waiting.status_code == 200  # queued: the only place in the queue is taken
                busy = post(running, "/v1/chat/completions", chat(max_tokens=2))
                error = error_of(busy, 503)
                assert busy.headers["retry-after"] == str(serve.RETRY_AFTER_S) and error["type"] == "server_error"
                tokens_before = engine.tokens_out
        # both clients went away mid-stream: their generations stop and the slot is free again
        for _ in range(500):
            if engine.stats()["active"] == 0 and engine.stats()["waiting"] == 0:
                break
            time.sleep(0.01)
        assert engine.stats()["active"] == 0 and engine.stats()["waiting"] == 0
        assert engine.tokens_out < tokens_before + 80  # the second one never ran its 80 tokens
    alone = post(running, "/v1/chat/completions", chat(max_tokens=3))
    assert alone.status_code == 200 and alone.json()["usage"]["completion_tokens"] <= 3


# ---- the page in a real browser ----
class CannedEngine:
    """Stands in for Engine: every request is answered with the tokens of one fixed text."""

    max_seq_len = CONTEXT

    def __init__(self, tok, text):
        self.ids, self.thread = tok.encode_batch([text])[0], threading.Thread(target=lambda: None)

    def start(self):
        self.thread.start()

    def stop(self):
        pass

    def stats(self):
        return {}

    def submit(self, prompt, max_new_tokens, on_event, **sampling):
        def play():
            for token in self.ids:
                on_event("token", token)
            on_event("done", "stop")

        threading.Thread(target=play, daemon=True).start()
        return Request(prompt, max_new_tokens, on_event)


def chromium():
    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(
            "headless browser test needs Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1100,700",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options), options


def test_page_streams_answers_in_a_browser(served, tiny_tokenizer, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    running, model, _ = served
    tok = tiny_tokenizer
    payload = "<img src=x onerror=\"document.title='injected'\">"
    canned = Running(serve.create_app(serve.Server(CannedEngine(tok, payload), tok, "chat", NAME)))
    driver, _ = chromium()
    try:
        driver.get(running.url + "/")
        wait = WebDriverWait(driver, 30)
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", driver.find_element(By.ID, "api-key"))
        wait.until(lambda d: NAME in d.find_element(By.ID, "model").text)
        driver.execute_script(
            "document.getElementById('temperature').value = '0';document.getElementById('max-tokens').value = '24';"
        )
        driver.find_element(By.ID, "system").send_keys("你是医生。")

        def answer_to(question):
            count = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta"))
            box = driver.find_element(By.ID, "question")
            box.send_keys(question)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .meta")) > count)
            bubble = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
            meta = bubble.find_element(By.CSS_SELECTOR, ".meta").text
            return driver.execute_script("return arguments[0].firstChild.textContent", bubble), meta

        def expected(question, history):
            ids = inference.build_prompt(tok, question, history)[0]
            out = model.generate(
                [ids], 24, eos_id=tok.eos_id, temperature=0, repetition_penalty=inference.DEFAULTS["repetition_penalty"]
            )[0]
            return tok.decode(out, skip_special_tokens=True)

        first, meta = answer_to("头痛怎么办？")
        assert first == expected("你是医生。\n头痛怎么办？", []) and first and "tokens" in meta
        second, _ = answer_to("还要注意什么？")  # the page sends the conversation so far
        assert second == expected("还要注意什么？", [("你是医生。\n头痛怎么办？", first)])
        out = Path(__file__).resolve().parents[1] / "out"
        out.mkdir(exist_ok=True)
        driver.save_screenshot(str(out / "serve_page.png"))
        driver.find_element(By.ID, "clear").click()
        assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []

        driver.get(canned.url + "/")  # an answer that is HTML must show as text
        wait.until(lambda d: NAME in d.find_element(By.ID, "model").text)
        shown, _ = answer_to(payload)  # the question too
        assert shown == payload and driver.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text == payload
        assert driver.find_elements(By.CSS_SELECTOR, "#log img") == [] and driver.title != "injected"
    finally:
        driver.quit()
        canned.close()
