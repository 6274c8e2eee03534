"""An OpenAI-compatible HTTP server for a checkpoint, and a chat page at /.

    python serve.py --ckpt out/sft/ckpt.pt [--tokenizer chatglm_tokenizer] [--host 127.0.0.1] [--port 8000]
                    [--api-key KEY] [--max-batch 16] [--max-queue 64]

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET / (the
page). Generation runs in engine.py (continuous batching); this file is HTTP only: it checks the
request, builds the prompt (inference.build_prompt: the chat template of dataset_sft.render), turns
the engine's tokens into text (inference.TextDecoder), cuts at stop strings and writes the OpenAI
response, whole or as server-sent events.

Chat requests: system messages are joined and put, with a newline, in front of the first user
message that is kept; user/assistant messages then form the template's turns (consecutive messages
of one role are joined with newlines) and the last message must be the user's. A conversation that
does not fit the context with max_tokens is a 400 (code context_length_exceeded), unless the request
sets the extension "trim_history": true, which drops the oldest turns, then the start of the last
prompt (the response then says "trimmed_turns"). Extensions: top_k, repetition_penalty,
trim_history. Unset sampling fields take chat.py's defaults (inference.DEFAULTS).
"""

import argparse
import asyncio
import bisect
import hmac
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from corpora import holds_surrogate, json_loads
from engine import Engine, QueueFull
from inference import DEFAULTS, MODES, TextDecoder, build_prompt, load
from vlm import is_vlm_file

PAGE = Path(__file__).with_name("serve.html")
MAX_STOP_STRINGS = 4  # as OpenAI's API
RETRY_AFTER_S = 1  # what a client told "queue full" waits before trying again
COMMON_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "user",
    "top_k",
    "repetition_penalty",
}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "trim_history"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
# OpenAI fields this server does not implement: refused by name unless their value is the neutral one
UNSUPPORTED = {
    "tools": "tool calls",
    "tool_choice": "tool calls",
    "functions": "function calls",
    "function_call": "function calls",
    "parallel_tool_calls": "tool calls",
    "logprobs": "log-probabilities",
    "top_logprobs": "log-probabilities",
    "logit_bias": "logit_bias",
    "response_format": "response formats",
    "audio": "audio output",
    "modalities": "other modalities",
    "prediction": "predicted outputs",
    "frequency_penalty": "frequency_penalty (use repetition_penalty)",
    "presence_penalty": "presence_penalty (use repetition_penalty)",
    "best_of": "best_of",
    "echo": "echo",
    "suffix": "suffix",
    "reasoning_effort": "reasoning",
    "web_search_options": "web search",
}
NEUTRAL = (None, False, 0, 0.0, [], {"type": "text"}, ["text"])


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def error_response(err):
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ---- request checking ----
def number(body, name, low, high, default, integer=False, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not low <= value <= high
        or (low_open and value == low)
    ):
        what = "an integer" if integer else "a number"
        bounds = f"{'>' if low_open else '>='} {low} and <= {high}"
        raise ApiError(400, f"'{name}' must be {what} {bounds}, not {value!r}", name, "invalid_value")
    return value


def flag(body, name):
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false, not {value!r}", name, "invalid_type")
    return value


def check_fields(body, allowed):
    for name, value in body.items():
        if name in UNSUPPORTED:
            if not any(value == neutral and type(value) is type(neutral) for neutral in NEUTRAL):
                raise ApiError(
                    400,
                    f"'{name}' is not supported: this server does not implement {UNSUPPORTED[name]}",
                    name,
                    "unsupported_parameter",
                )
        elif name not in allowed:
            raise ApiError(400, f"unrecognized request argument: '{name}'", name, "unknown_parameter")
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(
            400,
            f"'n' must be 1, not {n!r}: this server returns one choice per request "
            "(send several requests, they are batched together)",
            "n",
            "unsupported_parameter",
        )


def stop_strings(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or not 1 <= len(stops) <= MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(
            400,
            f"'stop' must be a non-empty string or a list of 1 to {MAX_STOP_STRINGS} of them",
            "stop",
            "invalid_value",
        )
    return stops


def sampling(body):
    """Engine.submit's sampling arguments."""
    return dict(
        temperature=number(body, "temperature", 0, 2, DEFAULTS["temperature"]),
        top_p=number(body, "top_p", 0, 1, DEFAULTS["top_p"], low_open=True),
        top_k=number(body, "top_k", 0, 1 << 30, DEFAULTS["top_k"], integer=True),
        repetition_penalty=number(body, "repetition_penalty", 0, 100, DEFAULTS["repetition_penalty"], low_open=True),
        seed=number(body, "seed", -(1 << 63), (1 << 64) - 1, None, integer=True),
    )


def request_options(body):
    """The request's settings other than the prompt and max_tokens, checked."""
    stream, stream_options = flag(body, "stream"), body.get("stream_options")
    if stream_options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    if stream_options is not None and (not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}):
        raise ApiError(400, "'stream_options' supports only {\"include_usage\": true|false}", "stream_options")
    return {
        "stop": stop_strings(body),
        "sampling": sampling(body),
        "stream": stream,
        "include_usage": stream_options is not None and flag(stream_options, "include_usage"),
    }


def requested_max_tokens(body, context):
    """max_tokens (or max_completion_tokens) as asked, None when not given."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return number(body, name, 1, context - 1, None, integer=True)


def message_text(message, i):
    """A message's text, from a string or a list of content parts (text and image_url parts)."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(
            400, f"messages[{i}].content must be a string or a list of content parts", f"messages[{i}].content"
        )
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        url = part.get("image_url") if kind == "image_url" else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(url, dict) and isinstance(url.get("url"), str):
            images.append(url["url"])
        else:
            raise ApiError(
                400,
                f"messages[{i}].content[{j}]: a content part must be "
                '{"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}}',
                f"messages[{i}].content[{j}]",
            )
    return "\n".join(texts), images


def conversation(body):
    """(system text, [(user, assistant)] earlier turns, last user text, image urls) from `messages`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, '\'messages\' must be a non-empty list of {"role", "content"} objects', "messages")
    system, turns, images = [], [], []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(
                400,
                f"messages[{i}].role must be system, developer, user or assistant, not {role!r}",
                f"messages[{i}].role",
            )
        text, found = message_text(message, i)
        images += found
        if role in ("system", "developer"):
            system.append(text)
        elif turns and turns[-1][0] == role:  # consecutive messages of one role are one turn
            turns[-1][1].append(text)
        else:
            turns.append((role, [text]))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's (the model answers it)", "messages")
    if turns[0][0] != "user":
        turns.insert(0, ("user", [""]))
    texts = ["\n".join(parts) for _, parts in turns]
    pairs = list(zip(texts[0:-1:2], texts[1:-1:2]))
    return "\n".join(system), pairs, texts[-1], images


class Server:
    """What the endpoints share: the engine, the tokenizer, the model's name and mode, the API key."""

    def __init__(self, engine, tokenizer, mode, model_name, api_key=None):
        self.engine, self.tokenizer, self.mode, self.model_name = engine, tokenizer, mode, model_name
        self.api_key, self.context = api_key, engine.max_seq_len

    def authorize(self, request):
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise ApiError(
                401, "missing API key: send the header 'Authorization: Bearer <key>'", None, "invalid_api_key"
            )
        if not hmac.compare_digest(header[len("Bearer ") :].encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key", None, "invalid_api_key")

    async def body(self, request, fields):
        self.authorize(request)
        try:
            body = json_loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        if holds_surrogate(body):  # "\ud83d" without its pair decodes to text no tokenizer can encode
            raise ApiError(
                400,
                "the request body holds a lone surrogate escape (\\ud800-\\udfff without its pair): "
                "send whole characters",
                None,
                "invalid_json",
            )
        check_fields(body, fields)
        if not isinstance(body.get("model") or "", str):
            raise ApiError(400, "'model' must be a string", "model", "invalid_type")
        if body.get("model") not in (None, self.model_name):
            raise ApiError(
                404,
                f"the model '{body['model']}' does not exist: this server serves '{self.model_name}'",
                "model",
                "model_not_found",
            )
        return body

    def fit(self, prompt_length, max_tokens):
        """max_tokens for a prompt of this length; 400 if they do not fit the context."""
        asked = f"and max_tokens {max_tokens}" if max_tokens is not None else "which leaves no room for an answer"
        if max_tokens is None:
            max_tokens = min(DEFAULTS["max_new_tokens"], self.context - prompt_length)
        if max_tokens < 1 or prompt_length + max_tokens > self.context:
            raise ApiError(
                400,
                f"this model's context is {self.context} tokens; the prompt is {prompt_length} tokens "
                f"{asked}: send a shorter conversation, lower max_tokens, or set "
                '"trim_history": true to drop the oldest turns',
                "messages",
                "context_length_exceeded",
            )
        return max_tokens

    def chat_prompt(self, body):
        """(prompt ids, max_tokens, turns trimmed or None) for a chat request."""
        system, pairs, last, images = conversation(body)
        if images:
            raise ApiError(
                400,
                f"image inputs are not served: '{self.model_name}' is a text model (serve.py serves text checkpoints)",
                "messages",
                "unsupported_content",
            )
        max_tokens, trim = requested_max_tokens(body, self.context), flag(body, "trim_history")

        def with_system(text):
            return f"{system}\n{text}" if system else text

        def render(kept):
            history = [(with_system(q) if i == 0 else q, a) for i, (q, a) in enumerate(kept)]
            return build_prompt(self.tokenizer, last if kept else with_system(last), history, self.mode)[0]

        ids = render(pairs)
        if not trim:
            return ids, self.fit(len(ids), max_tokens), None
        wanted = max_tokens or min(DEFAULTS["max_new_tokens"], self.context // 2)
        budget = self.context - wanted
        # the fewest oldest turns to drop (the system text stays in front of the first kept prompt), by
        # bisection: every render encodes the whole conversation, so trying each count in turn would cost the
        # square of the number of turns, and dropping turns only shortens the ids
        dropped = bisect.bisect_left(range(len(pairs) + 1), True, key=lambda d: len(render(pairs[d:])) <= budget)
        if dropped <= len(pairs):
            ids = render(pairs[dropped:])
            return ids, self.fit(len(ids), max_tokens or wanted), dropped
        try:  # the last prompt alone is too long: its start is cut
            ids = build_prompt(self.tokenizer, with_system(last), (), self.mode, budget)[0]
        except ValueError as err:
            raise ApiError(
                400, f"{err}: this model's context is {self.context} tokens", "max_tokens", "context_length_exceeded"
            ) from None
        return ids, wanted, len(pairs)

    def completion_prompt(self, body):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string (one prompt per request)", "prompt")
        ids = build_prompt(self.tokenizer, prompt, (), "continue")[0]
        return ids, self.fit(len(ids), requested_max_tokens(body, self.context))

    def start(self, ids, max_tokens, options):
        try:
            return Generation(self, ids, max_tokens, options["stop"], options["sampling"])
        except QueueFull as err:
            raise ApiError(
                503,
                f"the server is busy ({err}); retry in {RETRY_AFTER_S} s",
                None,
                "server_busy",
                "server_error",
                {"Retry-After": str(RETRY_AFTER_S)},
            ) from None


class StopText:
    """Cuts text at the first stop string; text that could be the start of one is held back."""

    def __init__(self, stops):
        self.stops, self.held = stops, ""

    def push(self, piece):
        """(text that can be given, whether a stop string was reached)."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False


class Generation:
    """One request's tokens, from the engine's thread into the event loop, as text pieces."""

    def __init__(self, server, ids, max_tokens, stops, settings):
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.decoder, self.stop = TextDecoder(server.tokenizer), StopText(stops)
        self.prompt_tokens, self.completion_tokens, self.finish_reason = len(ids), 0, None
        self.request = server.engine.submit(ids, max_tokens, self.on_event, **settings)

    def on_event(self, kind, value):  # the engine's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    async def pieces(self):
        """Text pieces as they come; afterwards finish_reason and the token counts are set. Leaving
        early (a stop string, a client gone, a cancelled task) cancels the engine's request."""
        try:
            while True:
                kind, value = await self.events.get()
                if kind == "error":
                    raise ApiError(500, value, None, "generation_failed", "server_error")
                if kind == "token":
                    self.completion_tokens += 1
                    text, stopped = self.stop.push(self.decoder.push(value))
                else:
                    text, stopped = self.stop.push(self.decoder.finish())
                    text += "" if stopped else self.stop.held
                if text:
                    yield text
                if stopped or kind == "done":
                    self.finish_reason = "stop" if stopped else value
                    return
        finally:
            self.request.cancel()

    def usage(self):
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


async def until_disconnect(request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request, generation):
    """The whole text; a client that disconnects first cancels the generation."""

    async def gather():
        return "".join([piece async for piece in generation.pieces()])

    text_task, gone = asyncio.ensure_future(gather()), asyncio.ensure_future(until_disconnect(request))
    await asyncio.wait([text_task, gone], return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not text_task.done():
        text_task.cancel()
        generation.request.cancel()
        raise ApiError(499, "the client closed the connection", None, "client_closed")
    return text_task.result()


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def event_stream(generation, chunk, include_usage, opening=None):
    """OpenAI's streaming format: the opening chunk if any (sent at once, so that a queued request's
    client sees its response begin), the text chunks, the finishing chunk, the usage chunk if asked,
    then [DONE]. chunk(text, finish_reason) -> the event's object."""
    usage = {"usage": None} if include_usage else {}
    try:
        if opening is not None:
            yield sse({**opening, **usage})
        async for piece in generation.pieces():
            yield sse({**chunk(piece, None), **usage})
        yield sse({**chunk(None, generation.finish_reason), **usage})
        if include_usage:
            yield sse({**chunk(None, None), "choices": [], "usage": generation.usage()})
    except ApiError as err:
        yield sse(err.body())
    yield "data: [DONE]\n\n"


def streaming(generation, events):
    # the background task runs when the response ends or the client disconnects, even before the stream began
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
        background=BackgroundTask(generation.request.cancel),
    )


def create_app(server):
    @asynccontextmanager
    async def lifespan(app):
        if not server.engine.thread.is_alive():
            server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="Mini-Chinese-GPT", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, err):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        return error_response(
            ApiError(
                err.status_code,
                f"{request.method} {request.url.path}: {err.detail}",
                None,
                "not_found" if err.status_code == 404 else None,
            )
        )

    @app.get("/")
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "context": server.context, **server.engine.stats()}

    def model_card():
        return {
            "id": server.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "mini-chinese-gpt",
            "mode": server.mode,
            "context_length": server.context,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        server.authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await server.body(request, CHAT_FIELDS)
        options = request_options(body)
        ids, max_tokens, trimmed = await asyncio.to_thread(server.chat_prompt, body)  # encoding: not in the event loop
        generation = server.start(ids, max_tokens, options)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        extra = {} if trimmed is None else {"trimmed_turns": trimmed}
        if options["stream"]:

            def chunk(piece, finish_reason, delta=None):
                return {
                    **head,
                    "object": "chat.completion.chunk",
                    **extra,
                    "choices": [
                        {
                            "index": 0,
                            "delta": delta or ({} if piece is None else {"content": piece}),
                            "logprobs": None,
                            "finish_reason": finish_reason,
                        }
                    ],
                }

            opening = chunk(None, None, {"role": "assistant", "content": ""})
            return streaming(generation, event_stream(generation, chunk, options["include_usage"], opening))
        text = await collect(request, generation)
        return {
            **head,
            "object": "chat.completion",
            **extra,
            "usage": generation.usage(),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": generation.finish_reason,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await server.body(request, COMPLETION_FIELDS)
        options = request_options(body)
        ids, max_tokens = await asyncio.to_thread(server.completion_prompt, body)
        generation = server.start(ids, max_tokens, options)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": server.model_name,
        }
        if options["stream"]:

            def chunk(piece, finish_reason):
                return {
                    **head,
                    "choices": [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish_reason}],
                }

            return streaming(generation, event_stream(generation, chunk, options["include_usage"]))
        text = await collect(request, generation)
        return {
            **head,
            "usage": generation.usage(),
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": generation.finish_reason}],
        }

    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint file (pretrain or SFT)")
    parser.add_argument("--adapter", help="a LoRA adapter folder (PEFT format) trained on --ckpt, folded into it")
    parser.add_argument("--tokenizer", default="chatglm_tokenizer", help="the tokenizer the model was trained with")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only; 0.0.0.0: every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--model-name", help="the model id in /v1/models (default: mini-chinese-gpt-<phase>)")
    parser.add_argument("--mode", choices=MODES, help="chat requests: default chat for SFT checkpoints, else continue")
    parser.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV cache slots)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503s")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 where it is faster here (a GPU that supports it; a CPU whose measured bf16 decoding "
        "matmul beats fp32), else float32",
    )
    args = parser.parse_args(argv)
    if is_vlm_file(args.ckpt):  # the engine batches text rows; chat.py --image and eval.py vqa take images
        raise SystemExit(
            f"serve.py: {args.ckpt} is a vision-language checkpoint; serve.py serves text checkpoints "
            "(for images: chat.py --image, eval.py vqa)"
        )
    try:
        model, tok, ckpt, mode = load(args.ckpt, args.tokenizer, args.device, args.dtype, adapter=args.adapter)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"serve.py: {err}") from None
    import uvicorn

    name = args.model_name or f"mini-chinese-gpt-{ckpt.get('phase') or 'model'}"
    engine = Engine(model, tok.eos_id, args.max_batch, args.max_queue)
    server = Server(engine, tok, args.mode or mode, name, args.api_key)
    print(
        f"serve.py: {args.ckpt} as '{name}' (mode {server.mode}, context {server.context}, {args.max_batch} slots) "
        f"on http://{args.host}:{args.port}/",
        file=sys.stderr,
    )
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
