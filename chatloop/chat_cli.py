"""``chatloop chat [URL]``: talk to a ChatLoop (or any OpenAI-compatible) server from a terminal.

Replies stream as they are generated (``/v1/chat/completions`` with SSE). Ctrl-C during a reply closes the
connection, which makes the server cancel the request and free its KV cache in every stage, and returns to the
prompt; Ctrl-D or ``/quit`` leaves. Only the standard library is used, so the command works in any environment
the package installs into.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

DEFAULT_URL = "http://127.0.0.1:8000"
HELP = """\
commands:
  /reset          start a new conversation (keeps the system prompt)
  /system TEXT    set the system prompt (and start a new conversation); /system alone clears it
  /help           this text
  /quit           leave (Ctrl-D too)
Ctrl-C stops a reply that is streaming."""


class ChatError(Exception):
    """A request that failed, with the server's own error text."""


def add_parser(sub):
    p = sub.add_parser("chat", help="interactive chat with a running server, in this terminal")
    p.add_argument("url", nargs="?", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    p.add_argument(
        "--api-key", default=os.environ.get("CHATLOOP_API_KEY"), help="bearer key (default: $CHATLOOP_API_KEY)"
    )
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold (default: the server's)")
    p.add_argument("--max-tokens", type=int, help="longest reply in tokens (default: the server's)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server (default 300)")
    return "chat", run


@dataclass
class Reply:
    text: str = ""
    tokens: int = 0
    ttft: float | None = None  # seconds from sending to the first text
    seconds: float = 0.0  # from the first text to the end
    finish: str | None = None
    stopped: bool = False

    def summary(self) -> str:
        parts = [f"{self.tokens} tokens"]
        if self.tokens > 1 and self.seconds > 0:
            parts.append(f"{(self.tokens - 1) / self.seconds:.1f} tokens/s")
        if self.ttft is not None:
            parts.append(f"first token {self.ttft * 1000:.0f} ms")
        if self.stopped:
            parts.append("stopped")
        elif self.finish == "length":
            parts.append("cut at max tokens")
        return ", ".join(parts)


class Client:
    """The two calls the chat needs, over urllib; errors become ``ChatError`` with readable text."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout

    def _open(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise ChatError(f"{exc.code}: {_error_text(exc.read()) or exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ChatError(f"cannot reach {self.url}: {reason}") from None

    def model(self) -> str | None:
        with self._open("/v1/models") as resp:
            try:
                data = json.loads(resp.read())["data"]
                return data[0]["id"] if data else None
            except (ValueError, KeyError, IndexError, TypeError):
                return None

    def stream(self, body: dict) -> Iterator[dict]:
        """The parsed ``data:`` events of a streamed completion; closing the generator closes the connection."""
        resp = self._open("/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
        try:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                try:
                    event = json.loads(payload)
                except ValueError:
                    raise ChatError(f"the server sent an event that is not JSON: {payload[:200]}") from None
                if isinstance(event, dict) and event.get("error"):
                    raise ChatError(_error_text(json.dumps(event)) or "the server ended the reply with an error")
                yield event
        except OSError as exc:
            raise ChatError(f"the connection broke: {exc}") from None
        finally:
            resp.close()  # NOTE: on Ctrl-C this is what tells the server to cancel the request


def _error_text(raw: bytes | str) -> str:
    try:
        err = json.loads(raw)["error"]
        return str(err.get("message") or err)
    except (ValueError, KeyError, TypeError, AttributeError):
        return (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw).strip()[:300]


_CONTROL = {c: None for c in range(32) if c not in (9, 10)} | {127: None}


def printable(text: str) -> str:
    """Model text without terminal control characters (an escape sequence in a reply must not drive the terminal)."""
    return text.translate(_CONTROL)


@dataclass
class Session:
    client: Client
    system: str = ""
    sampling: dict = field(default_factory=dict)
    messages: list[dict] = field(default_factory=list)

    def request(self) -> dict:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return {"messages": head + self.messages, **{k: v for k, v in self.sampling.items() if v is not None}}

    def ask(self, text: str, out) -> Reply:
        """Send ``text``, stream the reply to ``out``; Ctrl-C stops it. Raises ``ChatError`` on failure."""
        self.messages.append({"role": "user", "content": text})
        reply = Reply()
        start = time.monotonic()
        first = None
        events = self.client.stream(self.request())
        try:
            for event in events:
                if event.get("usage"):
                    reply.tokens = int(event["usage"].get("completion_tokens") or reply.tokens)
                for choice in event.get("choices") or []:
                    reply.finish = choice.get("finish_reason") or reply.finish
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if first is None:
                            first = time.monotonic()
                            reply.ttft = first - start
                        reply.text += piece
                        if not event.get("usage"):
                            reply.tokens += 1  # a chunk per token; the usage event corrects it at the end
                        out.write(printable(piece))
                        out.flush()
        except KeyboardInterrupt:
            reply.stopped = True
            events.close()
        except ChatError:
            if not reply.text:
                self.messages.pop()  # nothing came back: the question can be asked again
            raise
        if first is not None:
            reply.seconds = time.monotonic() - first
        if reply.stopped and not reply.text:
            self.messages.pop()  # stopped before any text: as if never asked
        else:
            self.messages.append({"role": "assistant", "content": reply.text})
        return reply

    def reset(self) -> None:
        self.messages.clear()


def run(args) -> int:
    out = sys.stdout
    # Ctrl-C is how a reply is stopped: make it raise KeyboardInterrupt even when this process inherited SIGINT
    # ignored (Python keeps an inherited SIG_IGN; a shell script's background jobs start that way).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import readline  # noqa: F401, PLC0415 - line editing and history for input()
    except ImportError:
        pass
    client = Client(args.url, args.api_key, args.timeout)
    try:
        model = client.model()
    except ChatError as exc:
        print(f"chatloop chat: error: {exc}", file=sys.stderr)
        if exc.args and str(exc).startswith("401"):
            print("chatloop chat: pass --api-key or set CHATLOOP_API_KEY", file=sys.stderr)
        return 2
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
    session = Session(client, system=args.system, sampling=sampling)
    dim = (lambda s: f"\033[2m{s}\033[0m") if out.isatty() and not os.environ.get("NO_COLOR") else (lambda s: s)
    print(f"Chatting with {model or 'the model'} at {client.url}. /help for commands, Ctrl-D to leave.", file=out)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            print("^C  (Ctrl-D or /quit leaves)", file=out)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                session.reset()
                print(dim("(new conversation)"), file=out)
            elif command == "/system":
                session.system = rest.strip()
                session.reset()
                print(dim(f"(system prompt {'set' if session.system else 'cleared'}; new conversation)"), file=out)
            elif command == "/help":
                print(HELP, file=out)
            else:
                print(f"unknown command {command}; /help lists them", file=out)
            continue
        out.write("bot> ")
        out.flush()
        try:
            reply = session.ask(text, out)
        except ChatError as exc:
            print(f"\nerror: {exc}", file=out)
            continue
        except KeyboardInterrupt:  # between two steps of ask(): nothing is streaming
            print("\n" + dim("[stopped]"), file=out)
            continue
        print(file=out)
        print(dim(f"[{reply.summary()}]"), file=out)
