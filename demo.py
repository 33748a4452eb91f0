"""
A live multimodal chatbot in the browser: one page and an OpenAI-compatible API, served by the standard library's
threading HTTP server, answering through generate.py's decoding path (Luo et al., NeurIPS 2023, §4.1; the official
demo is luogen1996/LaVIN demo.py, a gradio page: this one needs no dependency and streams tokens as they come).

    python demo.py                                  # the quick start's out/ckpt.pt on http://127.0.0.1:8000/
    python demo.py --adapter LaVIN-7B/checkpoint-19.pth --llama_dir /data/LLaMA/7B --clip_path /data/clip/ViT-L-14.pt \
        --data_dir /data/ScienceQA --port 8080      # an official adapter file, ScienceQA examples on the page
    curl -s localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Which is red?"}]}'

Endpoints: GET / (demo.html), GET /health (503 while the model loads, 200 when ready), GET /v1/models, GET /info
(what the page needs: the model's kind, examples, sampling defaults), POST /v1/chat/completions (OpenAI's chat format:
`content` a string or a list of text and image_url parts, the image as a data: URL; `stream` for server-sent events;
temperature, top_p, max_tokens, seed). System messages are accepted and left out: LaVIN's templates have no place
for one. Answers carry, beside OpenAI's fields, a `lavin` object: prompt tokens, time to first token, tokens/s and the
router weights w of every LLaMA layer for the prompt's modality (paper §3.2; router.routing_table).

Prompts are laid out exactly as sample.py lays them out (generate.chat_prompt): a model trained on ScienceQA gets the
last question in its training layout, a chatbot the whole conversation in its chat template, cut to the context as
sample.py cuts it, and the answer says when it was cut. One model serves everyone: requests take it one at a time in
arrival order (others wait, and a streaming client is told how many are ahead); a client that leaves, or presses
Stop, frees it at the next token. Safe by default: loopback only unless --host says otherwise, clients send image
bytes (never paths or links), the page renders model text as text, and nothing on this path unpickles.

Tests: `python -m pytest -q test_all.py -k test_demo_`.
"""

import argparse
import base64
import binascii
import io
import json
import math
import re
import select
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image

import clip_vit
import data
from cli import UserError, add_model_flags, check_flags, cli
from evaluate import check_inference_args, inference_setup
from generate import Sampling, answer, chat_prompt, prompt_budget
from router import routing_table

PAGE = Path(__file__).resolve().with_name("demo.html")
MODEL_ID = "lavin"
MAX_BODY = 16 * 2**20  # bytes of one request: room for a large photo as base64 (x 4/3); more is refused with 413
N_EXAMPLES = 6  # one-click examples on the page
ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request the server refuses: answered {"error": {"message": ...}} with this HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ClientGone(Exception):
    """The client left (closed the connection, pressed Stop): raised from generate's per-token hook to end it there."""


# =====================================================================================================================
# One model, many users: a line in arrival order

class Line:
    """
    Requests take the model one at a time, first come first served. threading.Lock wakes its waiters in no set order,
    so the line is explicit: a request holds the model while it is first in `self.queue`. A waiter that gives up (its
    client left) just steps out of the line.
    """

    def __init__(self):
        self.cond = threading.Condition()
        self.queue = []

    @contextmanager
    def turn(self, waiting):
        """Hold the model inside the with-block. waiting(ahead) runs about twice a second while `ahead` requests are
        in front; it may raise (ClientGone) to leave the line."""
        me = object()
        with self.cond:
            self.queue.append(me)
        try:
            while True:
                with self.cond:
                    ahead = self.queue.index(me)
                    if ahead == 0:
                        break
                waiting(ahead)  # outside the lock: it writes to a socket, which may be slow
                with self.cond:
                    self.cond.wait(0.5)  # woken early when someone leaves
            yield
        finally:
            with self.cond:
                self.queue.remove(me)
                self.cond.notify_all()


# =====================================================================================================================
# Reading a request: OpenAI's chat format -> one generation job

@dataclass
class Job:
    prompt: list[int]  # data.py's layout: BOS, prefix, placeholders, text up to "Response:"
    image: torch.Tensor | None  # (3, S, S), on the model's device
    sampling: Sampling
    seed: int
    stream: bool
    note: str | None  # said to the user with the answer (the conversation was cut to fit)


def read_image(url, where: str, size: int, norm: str) -> torch.Tensor:
    """A data: URL of an image -> (3, S, S), preprocessed as in training (data.load_image_tensor's steps)."""
    m = re.fullmatch(r"data:image/[\w.+-]+;base64,(.*)", url, re.S) if isinstance(url, str) else None
    if m is None:
        raise RequestError(400, f"{where}: must be a data:image/...;base64,... URL (the image's bytes: this server "
                                "opens no paths or links)")
    try:
        raw = base64.b64decode(m.group(1), validate=True)
    except binascii.Error as e:
        raise RequestError(400, f"{where}: bad base64 ({e})") from None
    try:  # PIL's plugins raise OSError, SyntaxError, ValueError ... on broken files: decode fully now
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            return clip_vit.preprocess(img, size=size, norm=norm)
    except Exception as e:
        raise RequestError(400, f"{where}: not a readable image, or a truncated one ({e})") from None


def read_content(content, where: str) -> tuple[str, list]:
    """A message's content, a string or a list of {"type": "text"|"image_url"} parts -> (its text, its image URLs).
    image_url may be {"url": ...} (OpenAI) or the URL string itself (Ollama's clients)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(400, f"{where}: must be a string or a list of parts")
    texts, urls = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            urls.append((url.get("url") if isinstance(url, dict) else url, f"{where}[{j}].image_url"))
        else:
            raise RequestError(400, f"{where}[{j}]: a part is {{\"type\": \"text\", \"text\": ...}} or "
                                    f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:...\"}}}}")
    return "\n".join(texts), urls


def read_conversation(messages) -> tuple[list, str, list]:
    """messages -> (earlier (user, assistant) turns, the last user text, image URLs). User and assistant alternate,
    from a user message to a user message; system messages are left out (LaVIN's templates have no place for one)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages: a non-empty list of {\"role\", \"content\"} is required")
    turns, urls, user, expect = [], [], None, "user"
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise RequestError(400, f"messages[{i}].role {role!r}: must be one of {', '.join(ROLES)}")
        text, found = read_content(m.get("content"), f"messages[{i}].content")
        urls += found
        if role == "system":
            continue
        if role != expect:
            raise RequestError(400, f"messages[{i}]: a {expect} message was expected (user and assistant take turns, "
                                    "starting and ending with the user)")
        if role == "user":
            user = text
        else:
            turns.append((user, text))
        expect = "assistant" if role == "user" else "user"
    if expect == "user":
        raise RequestError(400, "messages: the last message must be the user's")
    if not user.strip():
        raise RequestError(400, "empty prompt: the last user message has no text")
    if len(urls) > 1:
        raise RequestError(400, f"{len(urls)} images: the model takes one per conversation (its one image slot "
                                "follows BOS); start a new conversation for another picture")
    return turns, user, urls


def number(req: dict, key: str, default, ok, allowed: str, integer=False):
    """req[key] if given (a JSON number that passes ok), else default."""
    v = req.get(key)
    if v is None:
        return default
    good = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not good or (integer and v != int(v)) or not ok(v):
        raise RequestError(400, f"{key} {json.dumps(v)}: must be {allowed}")
    return int(v) if integer else float(v)


# =====================================================================================================================
# The application: the model and what every request shares

class App:
    def __init__(self, defaults: Sampling, seed: int = 1, merge: bool = True):
        self.defaults, self.seed, self.merge = defaults, seed, merge
        self.ready = threading.Event()  # set once load() is done: /health answers 200 from then on
        self.line = Line()
        self.served = []  # one record per generation that ran (what the log line says), newest last
        self.created = int(time.time())

    def load(self, model, tok, info: dict):
        """Take the loaded model. The router weights are read once, before any answer folds the adapters away
        (merge() removes the MM-Adapters it folds); in eval mode they are a per-modality constant (paper §3.2)."""
        self.model, self.tok, self.info = model, tok, info
        self.device = model.llama.tok_embeddings.weight.device
        self.routing = routing_table(model)
        self.examples = read_examples(info.get("data_dir"))
        self.ready.set()

    def page_info(self) -> dict:
        return dict(model=MODEL_ID, chat=self.info["chat"], method=self.model.adapter_args.method,
                    max_seq_len=self.model.llama.args.max_seq_len, examples=self.examples,
                    defaults=dict(temperature=self.defaults.temperature, top_p=self.defaults.top_p,
                                  max_tokens=self.defaults.max_new_tokens))

    def job(self, body: bytes) -> Job:
        """A request's body -> a Job, every value checked and the image decoded, before it waits for the model."""
        try:
            req = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"malformed JSON: {e}") from None
        if not isinstance(req, dict):
            raise RequestError(400, "the body must be a JSON object")
        turns, line, urls = read_conversation(req.get("messages"))
        limit = self.model.llama.args.max_seq_len  # prompt (< limit) + answer fit the RoPE tables (2 x limit)
        s = Sampling(number(req, "temperature", self.defaults.temperature, lambda v: v >= 0, ">= 0 (0: greedy)"),
                     number(req, "top_p", self.defaults.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
                     number(req, "max_tokens", self.defaults.max_new_tokens, lambda v: 1 <= v <= limit,
                            f"an integer in [1, {limit}] (the model's max_seq_len)", integer=True))
        seed = number(req, "seed", self.seed, lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)", integer=True)
        stream = req.get("stream") or False  # absent or null: one JSON answer
        if not isinstance(stream, bool):
            raise RequestError(400, f"stream {json.dumps(stream)}: must be true or false")
        info = self.info
        image = read_image(*urls[0], info["image_size"], info["norm"]).to(self.device) if urls else None
        # sample.py's prompt for this conversation; the same one uncut says whether the context was outgrown
        budget = prompt_budget(self.model)
        prompt = chat_prompt(self.tok, info, turns, line, image is not None, budget)
        cut = len(chat_prompt(self.tok, info, turns, line, image is not None, 10**9)) - len(prompt)
        note = (f"the conversation no longer fits the model's {budget}-token prompt: its oldest {cut} tokens were "
                "left out" if cut > 0 else None)
        return Job(prompt, image, s, seed, stream, note)

    def run(self, job: Job, on_text, gone) -> dict:
        """Generate job's answer (the caller holds the line): on_text(piece) as it grows, or None; gone() says the
        client left, checked at every token. -> the answer's text and figures."""
        eos, times = self.tok.eos_id, []
        ended = ["length"]

        def on_token(t: int):
            if gone():
                raise ClientGone
            if t == eos or ended[0] == "stop":  # generate() emits EOS for a finished row until it checks (8 steps)
                ended[0] = "stop"
            else:
                times.append(time.perf_counter())

        t0 = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(job.seed)
        try:
            text = answer(self.model, self.tok, job.prompt, job.image, job.sampling, generator, self.merge,
                          on_text=on_text, on_token=on_token)
        except ClientGone:
            text, ended[0] = None, "stopped"
        n = len(times)
        stats = dict(prompt_tokens=len(job.prompt), completion_tokens=n, ended=ended[0],
                     ttft_s=round(times[0] - t0, 4) if n else None,
                     tokens_per_s=round((n - 1) / (times[-1] - times[0]), 2) if n > 1 else None)
        self.served.append(stats)
        print(f"demo: {'image' if job.image is not None else 'text'} prompt, "
              + ", ".join(f"{k} {v}" for k, v in stats.items()), file=sys.stderr)
        return dict(stats, text=text, note=job.note,
                    router_weights=self.routing.get(int(job.image is not None)))


def read_examples(root) -> list[dict]:
    """The page's one-click examples: the first test problems with a picture in the model's data folder (the quick
    start's quiz, or ScienceQA with --data_dir), as {question: "q (A) x (B) y", the line chat_prompt reads back; image:
    a data URL, which the page sends back like any upload}. No folder, or no test split there: no examples."""
    try:
        problems = data.load_scienceqa(root, "test") if root else []
    except (OSError, ValueError):
        return []
    out = []
    for rec in problems:
        path = data.image_path(root, "test", rec["pid"])
        if rec.get("image") and path.is_file() and len(out) < N_EXAMPLES:
            options = "".join(f" ({data.OPTIONS[i]}) {c}" for i, c in enumerate(rec["choices"]))
            out.append(dict(question=rec["question"] + options,
                            image="data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()))
    return out


def envelope(cid: str, obj: str, choice: dict, **fields) -> dict:
    """OpenAI's frame of a chat completion (obj "chat.completion") or of one streamed piece (obj
    "chat.completion.chunk")."""
    return dict(id=cid, object=obj, created=int(time.time()), model=MODEL_ID, choices=[dict(index=0, **choice)],
                **fields)


def figures(r: dict) -> dict:
    """What an answer carries beside OpenAI's fields: usage, and `lavin`, the figures the page shows."""
    p, c = r["prompt_tokens"], r["completion_tokens"]
    return dict(usage=dict(prompt_tokens=p, completion_tokens=c, total_tokens=p + c),
                lavin={k: r[k] for k in ("prompt_tokens", "ttft_s", "tokens_per_s", "router_weights", "note")})


# =====================================================================================================================
# HTTP

# The page loads nothing from elsewhere: its script and style are inline, images are data: or blob: URLs.
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for the JSON answers; a stream closes its connection at the end
    server_version = "lavin-demo"
    timeout = 60  # seconds a client may stall while sending a request

    def do_GET(self):
        app, path = self.server.app, self.path.split("?")[0]
        if path in ("/", "/index.html"):
            self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8", {"Content-Security-Policy": CSP})
        elif path == "/health":
            ready = app.ready.is_set()
            self.json(200 if ready else 503, {"status": "ok" if ready else "loading"})
        elif path == "/v1/models":
            self.json(200, {"object": "list", "data": [{"id": MODEL_ID, "object": "model", "created": app.created,
                                                        "owned_by": "lavin"}]})
        elif path == "/info" and app.ready.is_set():
            self.json(200, app.page_info())
        elif path == "/info":
            self.error(503, "the model is still loading")
        else:
            self.error(404, f"no page {path}: try /, /health, /v1/models or POST /v1/chat/completions")

    def do_POST(self):
        app = self.server.app
        try:
            if self.path.split("?")[0] != "/v1/chat/completions":
                raise RequestError(404, f"no endpoint {self.path}: POST /v1/chat/completions")
            body = self.read_body()
            if not app.ready.is_set():
                raise RequestError(503, "the model is still loading: try again when GET /health answers 200")
            job = app.job(body)
        except RequestError as e:
            return self.error(e.status, e.message)
        cid = f"chatcmpl-{time.time_ns():x}"
        try:
            (self.stream if job.stream else self.complete)(app, job, cid)
        except ClientGone:
            self.close_connection = True  # the client left: nobody to answer
        except Exception as e:  # a bug: report it to this client, and go on serving the others
            traceback.print_exc()
            message = {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error"}}
            self.close_connection = True
            try:
                self.event(message) if job.stream else self.json(500, message)
            except ClientGone:
                pass

    def complete(self, app: App, job: Job, cid: str):
        with app.line.turn(lambda ahead: self.check_gone()):
            r = app.run(job, None, self.gone)
        if r["ended"] != "stopped":
            msg = {"role": "assistant", "content": r["text"]}
            self.json(200, envelope(cid, "chat.completion", dict(message=msg, finish_reason=r["ended"]), **figures(r)))

    def stream(self, app: App, job: Job, cid: str):
        """Server-sent events: `data: {chunk}` per piece of text, `data: [DONE]` at the end. While others hold the
        model, a comment line `: queue N` (ignored by SSE clients, shown by the page) says how many are ahead."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def piece(delta: dict, end=None, **more):
            self.event(envelope(cid, "chat.completion.chunk", dict(delta=delta, finish_reason=end), **more))

        with app.line.turn(lambda ahead: self.write(f": queue {ahead}\n\n")):
            piece({"role": "assistant", "content": ""})
            r = app.run(job, lambda text: piece({"content": text}), self.gone)
        if r["ended"] != "stopped":
            piece({}, r["ended"], **figures(r))
            self.write("data: [DONE]\n\n")

    # ---- plumbing
    def read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "a body with a Content-Length header is required")
        if int(length) > MAX_BODY:
            self.close_connection = True  # the body stays unread: this connection cannot carry another request
            raise RequestError(413, f"the body is {int(length)} bytes, over the limit of {MAX_BODY} "
                                    f"({MAX_BODY // 2**20} MiB); send a smaller image")
        return self.rfile.read(int(length))

    def gone(self) -> bool:
        """Has the client closed its side (Stop, a closed tab)? Its socket then reads as ready with nothing to read."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def check_gone(self):
        if self.gone():
            raise ClientGone

    def write(self, text: str):
        try:
            self.wfile.write(text.encode())
            self.wfile.flush()
        except OSError:  # broken pipe, reset: the client left
            raise ClientGone from None

    def event(self, obj: dict):
        self.write(f"data: {json.dumps(obj)}\n\n")

    def send(self, status: int, body: bytes, ctype: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            self.close_connection = True

    def json(self, status: int, obj: dict):
        self.send(status, json.dumps(obj).encode(), "application/json")

    def error(self, status: int, message: str):
        self.json(status, {"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                     "server_error"}})


def make_server(app: App, host: str, port: int) -> ThreadingHTTPServer:
    """Bind now (a busy port fails before the model loads); port 0 takes a free one (server.server_address)."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True  # a client still waiting does not keep the process alive at exit
    server.app = app
    return server


# =====================================================================================================================

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_model_flags(p)  # sample.py's: --adapter --llama_dir --clip_path --tokenizer --quant, sampling defaults ...
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only; 0.0.0.0 serves "
                                                       "every network the machine is on, with no authentication")
    g.add_argument("--port", type=int, default=8000, help="0: any free port")
    g.add_argument("--data_dir", help="the quiz or ScienceQA root whose test split gives the page's examples "
                                      "(default: what the checkpoint records)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    check_flags(args, [("port", lambda v: 0 <= v <= 65535, "in [0, 65535] (0: any free port)")])
    if not Path(args.adapter).is_file():
        raise UserError(f"--adapter {args.adapter}: no such file; `python train.py` trains the quick start's model "
                        "into out/ckpt.pt (a few minutes on CPU)")
    check_inference_args(args)  # every flag before the port opens (inference_setup checks them again, cheaply)
    app = App(Sampling(args.temperature, args.top_p, args.max_new_tokens), args.seed, not args.no_merge)
    server = make_server(app, args.host, args.port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    print(f"LaVIN demo on http://{host}:{port}/ (loading the model; /health answers 200 once it is ready)",
          flush=True)
    _, _, _, model, tok, info = inference_setup(args, evaluating=False)
    app.load(model, tok, info)
    print(f"ready: http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()


if __name__ == "__main__":
    cli(main)
