"""
The labelling tool in the browser, for many raters at once (a class, a lab): each opens the page,
enters a name, and judges pairs of answers with the keys a (A is better), b, t (tie) or s (skip).

    python -m nanoalign.serve --pairs data/world/prefs_val.jsonl --n 50   # pairs from a file
    python -m nanoalign.serve --ckpt out/tiny/ppo/ckpt.pt --compare out/tiny/sft/ckpt.pt --n 50

then open http://127.0.0.1:8000. Pairs come from a preference file (shown unordered: its chosen
and rejected are what the raters check) or are sampled as label.py samples them (two answers per
prompt, from --ckpt, or one from --ckpt and one from --compare). Each rater sees every pair, A and
B in an order of their own (raters favour the first answer they read), and goes on where they left
off after a restart. Every decision is appended to --log in label.py's format, so evaluate --labels
and label --export read it. --host 0.0.0.0 lets anyone on the network write labels: there is no
authentication (docs/labelling.md). With --ckpt, http://127.0.0.1:8000/chat is sample --chat in
the browser: --ckpt and --compare side by side, each continuing its own conversation.
"""

import json
import os
import random
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoalign import common, config, label, sample
from nanoalign.files import read_jsonl

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# the files served as they are: path -> (file, content type)
FILES = {"/": ("label.html", "text/html"), "/chat": ("chat.html", "text/html"),
         "/style.css": ("style.css", "text/css")}
NO_CHAT = "the chat page needs a model: start serve with --ckpt CHECKPOINT (and --compare)"
MAX_BODY = 64 * 1024  # a decision is ~100 bytes: anything this large is a mistake or an attack
MAX_NAME = 80  # characters of a rater's name
CHOICES = ("A", "B", "tie", "skip")


@dataclass
class ServeConfig:
    pairs: str = ""  # a preference file to label ({prompt, chosen, rejected}); "" = sample them
    ckpt: str = ""  # else: the model whose answers are compared (two per prompt, as label.py)
    compare: str = ""  # a second model: one answer from each (same tokenizer)
    prompts: str = "data/world/prompts_rl.jsonl"  # JSONL prompts to sample answers to
    n: int = 50  # pairs to label: the first n of --pairs, or n prompts
    temperature: float = 1.0  # sampling temperature of the answers
    max_new_tokens: int = 96  # length limit of each answer
    seed: int = 0  # sampling seed: the same command samples the same pairs again
    device: str = "auto"  # auto | cpu | cuda
    log: str = "data/labels.log.jsonl"  # every decision of every rater is appended here
    # 127.0.0.1: this machine only; 0.0.0.0: anyone on the network, with no authentication
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port (printed)

    def validate(self):
        config.check(self.n > 0, "n", "must be > 0")
        config.check(bool(self.pairs) != bool(self.ckpt), "pairs",
                     "give either --pairs FILE or --ckpt CHECKPOINT (to sample pairs), not both")
        config.check(self.temperature > 0, "temperature",
                     "must be > 0 (two greedy answers would be identical)")


# ------------------------------------------------------------ the log
def open_labels(pairs: list[dict], log: str) -> SimpleNamespace:
    """The server's state. What each rater decided is read back from the log: a restart resumes."""
    decided = {}  # {rater: {pair id}}
    if os.path.isfile(log) and os.path.getsize(log):  # log_status creates it, empty
        # skip_bad: a line half-written by a crash is warned about, not a reason to stay down
        for _, d in read_jsonl(log, skip_bad=True):
            decided.setdefault(d.get("rater"), set()).add(d.get("pair"))
        with open(log, "rb+") as f:  # end a half-written line, or the next decision joins it
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    return SimpleNamespace(pairs=pairs, by_id={p["id"]: p for p in pairs}, log=log,
                           decided=decided, lock=threading.Lock())


def order(rater: str, pid: str) -> list[int]:
    """The A/B order this rater sees for this pair: random, but the same after a reload."""
    return [0, 1] if random.Random(f"{rater}\n{pid}").random() < 0.5 else [1, 0]


def log_status(s) -> dict:
    """Can the log be written? The page asks before the first decision, not after it fails."""
    try:
        with open(s.log, "a"):
            pass
        return {"writable": True, "log": s.log, "total": len(s.pairs)}
    except OSError as e:
        return {"writable": False, "log": s.log, "total": len(s.pairs),
                "error": f"cannot write the log {s.log}: {e.strerror}; no label can be saved"}


def check_rater(rater) -> str:
    """The rater's name, stripped; ValueError with the reason if it is not a usable name."""
    if not isinstance(rater, str) or not rater.strip():
        raise ValueError("enter your name first (rater is empty)")
    if len(rater.strip()) > MAX_NAME or not rater.strip().isprintable():
        raise ValueError(f"rater: a name of at most {MAX_NAME} printable characters")
    return rater.strip()


def next_pair(s, rater: str) -> dict:
    """The rater's progress and the first pair they have not decided (None: all done)."""
    with s.lock:
        mine = set(s.decided.get(rater, ()))
    todo = [p for p in s.pairs if p["id"] not in mine]
    out = {"rater": rater, "done": len(s.pairs) - len(todo), "total": len(s.pairs), "pair": None}
    if todo:
        p, o = todo[0], order(rater, todo[0]["id"])
        out["pair"] = {"id": p["id"], "prompt": p["prompt"], "A": p["answers"][o[0]],
                       "B": p["answers"][o[1]]}
    return out


def decide(s, body) -> tuple[int, dict]:
    """(HTTP status, reply) for one decision {rater, pair, choice}: checked first, so a bad one
    leaves the log untouched; one lock around append + flush, so two raters never interleave."""
    if not isinstance(body, dict):
        return 400, {"error": "expected a JSON object {rater, pair, choice}"}
    try:
        rater = check_rater(body.get("rater"))
    except ValueError as e:
        return 400, {"error": str(e)}
    if body.get("pair") not in s.by_id:
        return 400, {"error": f"unknown pair {str(body.get('pair'))[:40]!r}"}
    if body.get("choice") not in CHOICES:
        return 400, {"error": f"choice must be one of {', '.join(CHOICES)}"}
    pair = s.by_id[body["pair"]]
    with s.lock:
        if pair["id"] in s.decided.get(rater, ()):
            return 409, {"error": f"{rater} has already decided pair {pair['id']}"}
        try:
            label.append(s.log, label.decision(pair, order(rater, pair["id"]), body["choice"],
                                               rater))
        except OSError as e:
            return 500, {"error": f"cannot write the log {s.log}: {e.strerror}; not saved"}
        s.decided.setdefault(rater, set()).add(pair["id"])
    return 200, next_pair(s, rater)


# ------------------------------------------------------------ the chat page
def open_chat(cfg: ServeConfig, loaded=None):
    """The chat page's models {"ckpt": (tok, model), "compare": ...}; None without --ckpt.
    loaded: label.load_models' (tok, models, sources), when the label page has them already."""
    if not cfg.ckpt:
        return None
    device = common.init_dist(cfg.device).device
    tok, models, _ = loaded or label.load_models(cfg, device)
    paths = {"ckpt": cfg.ckpt, **({"compare": cfg.compare} if cfg.compare else {})}
    settings = sample.SampleConfig(ckpt=cfg.ckpt, compare=cfg.compare, n=1, seed=cfg.seed,
                                   temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    shown = {"models": paths, "temperature": cfg.temperature, "seed": cfg.seed,
             "max_new_tokens": cfg.max_new_tokens}
    # one generation at a time: each has its own KV cache and generator, so two at once would be
    # correct, but they would share the same cores (or GPU) and the same memory, none faster
    return SimpleNamespace(models={k: (tok, m) for k, m in zip(paths, models)},
                           shown=shown, settings=settings, device=device, lock=threading.Lock())


def chat_reply(chat, body) -> tuple[int, dict]:
    """(HTTP status, reply) for {messages, model}: the answer sample --chat gives to this
    conversation (same function, settings and seed: the same text)."""
    if not isinstance(body, dict):
        return 400, {"error": "expected a JSON object {messages, model}"}
    if body.get("model") not in chat.models:
        return 400, {"error": f"model must be one of {', '.join(chat.models)}"}
    try:
        messages = sample.check_messages(body.get("messages"))
    except ValueError as e:
        return 400, {"error": str(e)}
    tok, model = chat.models[body["model"]]
    with chat.lock:
        answer = sample.reply(model, tok, messages, chat.settings, chat.device)
    return 200, {"model": body["model"], "answer": answer}


# ------------------------------------------------------------ HTTP
def own_host(header: str, server) -> bool:
    """DNS rebinding: another site's name can be made to point at 127.0.0.1, so a page of that
    site would be same-origin. On the loopback address only localhost names are accepted."""
    host = header.rsplit(":", 1)[0].strip("[]").lower()
    return server.server_address[0] != "127.0.0.1" or host in ("127.0.0.1", "localhost")


class Handler(BaseHTTPRequestHandler):
    """GET / (label page), /status, /next?rater=, /chat (chat page), /chat/settings; POST /decide,
    /chat. Replies are JSON but the pages."""

    def reply(self, status: int, obj=None, body: bytes = b"", kind="application/json"):
        body = body or json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url, s = urlsplit(self.path), self.server.labels
        if url.path == "/chat" and self.server.chat is None:
            return self.reply(404, body=NO_CHAT.encode(), kind="text/plain")
        if url.path in FILES:
            name, kind = FILES[url.path]
            with open(os.path.join(STATIC, name), "rb") as f:
                return self.reply(200, body=f.read(), kind=kind)
        if url.path == "/chat/settings":
            chat = self.server.chat
            return self.reply(*(200, chat.shown) if chat else (404, {"error": NO_CHAT}))
        if url.path == "/status":
            return self.reply(200, log_status(s))
        if url.path == "/next":
            try:
                rater = check_rater(parse_qs(url.query).get("rater", [""])[0])
            except ValueError as e:
                return self.reply(400, {"error": str(e)})
            return self.reply(200, next_pair(s, rater))
        self.reply(404, {"error": f"no page {url.path}"})

    def do_POST(self):
        path = urlsplit(self.path).path
        if path not in ("/decide", "/chat") or (path == "/chat" and self.server.chat is None):
            return self.reply(404, {"error": NO_CHAT if path == "/chat" else f"no page {path}"})
        # JSON only: a page of another site must ask the browser first (CORS preflight) and this
        # server never says yes, so no site can post through a rater's browser (CSRF)
        if self.headers.get_content_type() != "application/json":
            return self.reply(415, {"error": "send the body as application/json"})
        if not own_host(self.headers.get("Host", ""), self.server):
            return self.reply(403, {"error": "this server answers to its own address only"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self.reply(400, {"error": "Content-Length is not a number"})
        if length > MAX_BODY:
            # read what was sent (up to 1 MB) so the client gets the reply, not a reset connection
            self.rfile.read(min(length, 1 << 20))
            self.close_connection = True
            return self.reply(413, {"error": f"request body over {MAX_BODY} bytes"})
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
            return self.reply(400, {"error": "the body is not valid JSON"})
        if path == "/chat":
            return self.reply(*chat_reply(self.server.chat, body))
        self.reply(*decide(self.server.labels, body))

    def log_message(self, fmt, *args):
        pass  # one line per request would bury the startup message and the errors


def make_server(labels: SimpleNamespace, host="127.0.0.1", port=0, chat=None):
    """A server over labels and chat (open_chat's, or None); serve_forever starts it."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.labels, server.chat = labels, chat
    return server


def main(argv=None):
    cfg = config.parse_config(ServeConfig, argv, __doc__)
    device = common.init_dist(cfg.device).device
    # one load of the models serves both pages (a GPT-2-sized pair is seconds and gigabytes)
    loaded = label.load_models(cfg, device) if cfg.ckpt else None
    if cfg.pairs:
        pairs = label.pairs_from_file(cfg.pairs, cfg.n)
    else:
        pairs = label.pairs_from_models(cfg, loaded)
    if not pairs:
        raise SystemExit("no pairs to label (every sampled pair had two identical answers)")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.log)), exist_ok=True)
    labels = open_labels(pairs, cfg.log)
    server = make_server(labels, cfg.host, cfg.port, open_chat(cfg, loaded))
    status = log_status(labels)
    print(status.get("error", f"{len(pairs)} pairs; decisions are appended to {cfg.log}"))
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"--host {cfg.host}: anyone who can reach this machine can write labels")
    base = f"http://{cfg.host}:{server.server_address[1]}"
    print(f"label at {base}/" + (f", chat at {base}/chat" if cfg.ckpt else "") + "  (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print()
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
