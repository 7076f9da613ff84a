"""kd-serve's library: any oracle (usually a model file) behind the kdtools HTTP protocol, as an
MLaaS-style victim to attack in tests and benchmarks.

The protocol is documented in ``kdtools.oracle`` (GET /v1/info, POST /v1/query with JSON or a kdtools
stream) and in docs/oracles.md. What the server adds on top of answering:

* response modes: the server answers only in the modes it was started with (``modes``);
* API keys and quotas: with a keys table, a request must carry ``Authorization: Bearer KEY`` of a
  known key (else HTTP 401); each key (or, without keys, the one anonymous client) may be given a
  quota of query rows. A request whose rows do not fit in what is left is refused whole with HTTP
  429 and charges nothing; a request that is answered charges all its rows, rejected ones included.
  Quotas live in memory: restarting the server resets them;
* a query-entropy defence (``EntropyDefense``, chapter 4 of the dissertation): each query image's
  entropy is the Shannon entropy, in bits, of its 256-bin grey-level histogram (grey = the image
  itself for 1 channel, ITU-R 601 luma for 3, the channel mean otherwise; values v in [0, 1] binned
  as round(255 v)). Thresholds are learned from the victim's training data as its ``quantile`` and
  ``1 - quantile`` entropies; a query outside [low, high] is *rejected*: it is still charged, the
  answer is HTTP 200 with ``rejected: true`` for that row, and its answer values are placeholders
  (-1 for class indices, 0 for scores) that reveal nothing. Both tails are used because uniform noise
  has a *higher* grey-level entropy (7.7 bits for 28x28) than MNIST digits (1 % / 99 % quantiles of
  the train set: 0.69 / 2.30 bits), while the saturated images of data-free generators often have a
  lower one than natural images; ``sides="low"`` keeps only the lower threshold, the literal reading
  of the chapter's "low quality queries".

Library code: it never prints; ``on_request`` receives one dict per request, whatever its status, for
an access log: method, path, status, account (``key #1``, ``anonymous``, ``no key``, ``unknown key``: the
API key is never in it), and either rows / rejected / mode / quota_left (an answered query) or error
(the one-line message of an error answer). A row the oracle itself answers with a refused query's
placeholders (a served ``replay:`` log recorded with ``--on-rejected flag``) is flagged rejected too.
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

import torch

from . import __version__
from .data import to_float
from .errors import KdError, KdUsageError, UnanswerableQueries
from .fileio import atomic_path
from .oracle import (PROTOCOL_VERSION, STREAM_CONTENT_TYPE, Oracle, decode_array, encode_array, parse_mode,
                     read_stream_bytes, rejected_rows, response_fields, stream_bytes)

MAX_BODY_BYTES = 512 << 20  # a request body larger than this is refused (HTTP 413) without reading it


# ---------------------------------------------------------------------------------------------
# The query-entropy defence
# ---------------------------------------------------------------------------------------------


def grey_levels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images (uint8, or float in [0, 1]) -> (N, H*W) grey levels 0..255 as int64."""
    xf = x.float() if x.dtype == torch.uint8 else x.float().clamp(0, 1) * 255
    if xf.shape[1] == 3:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        g = (xf * w).sum(1)
    else:
        g = xf.mean(1)
    return g.round().clamp(0, 255).long().flatten(1)


def image_entropy(x: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits (0..8) of each image's 256-bin grey-level histogram: (N,) float64."""
    g = grey_levels(x)
    n, pixels = g.shape
    if n == 0:
        return torch.empty(0, dtype=torch.float64)
    # one bincount over all images at once: image i's levels are shifted into bins 256 i .. 256 i + 255
    counts = torch.bincount((g + 256 * torch.arange(n).unsqueeze(1)).flatten(), minlength=256 * n).view(n, 256)
    p = counts.double() / pixels
    return -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(1)


@dataclass
class EntropyDefense:
    """Reject queries whose image entropy lies outside [low, high] (or below low, with sides="low")."""

    low: float
    high: float
    quantile: float = 0.01
    sides: str = "both"  # both | low
    fitted_on: str = ""  # e.g. "mnist (train), 60000 images"
    extra: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, x: torch.Tensor, quantile: float = 0.01, sides: str = "both", fitted_on: str = "") -> "EntropyDefense":
        if not 0 <= quantile < 0.5:
            raise KdUsageError(f"--defense-quantile {quantile}: expected 0 <= q < 0.5")
        if sides not in ("both", "low"):
            raise KdUsageError(f"--defense-sides {sides!r}: expected both or low")
        if x.shape[0] == 0:
            raise KdError("the entropy defence needs training images to learn its thresholds from")
        h = torch.cat([image_entropy(x[i:i + 4096]) for i in range(0, x.shape[0], 4096)])
        low, high = torch.quantile(h, torch.tensor([quantile, 1 - quantile], dtype=torch.float64)).tolist()
        return cls(low, high, quantile, sides, fitted_on, {"mean_entropy": float(h.mean()), "images": int(x.shape[0])})

    def passes(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) bool: True for queries the defence lets through."""
        h = image_entropy(x)
        ok = h >= self.low
        if self.sides == "both":
            ok &= h <= self.high
        return ok

    def describe(self) -> dict:
        return {"kind": "entropy", "low": self.low, "high": self.high if self.sides == "both" else None,
                "quantile": self.quantile, "sides": self.sides, "fitted_on": self.fitted_on}

    def save(self, path, options: Optional[dict] = None) -> None:
        doc = {"kdtools.format": "defense", "kdtools.version": __version__, **self.describe(), "high": self.high,
               "extra": self.extra, "options": options or {}}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, path) -> "EntropyDefense":
        p = Path(path)
        if not p.is_file():
            raise KdError(f"{p}: no such file")
        try:
            doc = json.loads(p.read_text())
            if doc.get("kdtools.format") != "defense" or doc.get("kind") != "entropy":
                raise ValueError("not a kdtools entropy defence file")
            return cls(float(doc["low"]), float(doc["high"]), float(doc.get("quantile", 0.01)), doc.get("sides", "both"),
                       doc.get("fitted_on", ""), doc.get("extra", {}))
        except (ValueError, KeyError, TypeError) as e:
            raise KdError(f"{p}: not a kdtools defence file ({e})") from None


# ---------------------------------------------------------------------------------------------
# Keys and quotas
# ---------------------------------------------------------------------------------------------


class ServeError(Exception):
    """An HTTP error answer: status code and a one-line message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def read_keys_file(path) -> dict:
    """A keys file: one key per line, optionally followed by its own quota (rows); '#' starts a comment.

    Returns {key: quota or None}. The keys themselves never appear in any message."""
    p = Path(path)
    if not p.is_file():
        raise KdError(f"{p}: no such keys file")
    keys: dict = {}
    for number, line in enumerate(p.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise KdError(f"{p}, line {number}: expected 'KEY [QUOTA]'")
        quota = None
        if len(words) == 2:
            try:
                quota = int(words[1])
            except ValueError:
                quota = -1
            if quota < 0:
                raise KdError(f"{p}, line {number}: the quota must be a non-negative integer")
        keys[words[0]] = quota
    if not keys:
        raise KdError(f"{p}: no keys in the keys file")
    return keys


class Quotas:
    """Who may query and how many rows each may still ask. Thread-safe."""

    def __init__(self, keys: Optional[dict] = None, default_quota: Optional[int] = None):
        self.keys = keys  # None: no key needed, one anonymous account
        self.default_quota = default_quota
        self.accounts = ["anonymous"] if keys is None else [f"key #{i + 1}" for i in range(len(keys))]
        self._index = {} if keys is None else {k: i for i, k in enumerate(keys)}
        self.limit = [default_quota] if keys is None else [q if q is not None else default_quota for q in keys.values()]
        self.used = [0] * len(self.accounts)
        self.lock = threading.Lock()

    def account(self, key: Optional[str]) -> int:
        if self.keys is None:
            return 0
        if not key:
            raise ServeError(401, "this server needs an API key (Authorization: Bearer KEY)")
        for known, i in self._index.items():  # constant-time comparison: no timing hints about keys
            if hmac.compare_digest(known.encode(), key.encode()):
                return i
        raise ServeError(401, "unknown API key")

    def name(self, key: Optional[str]) -> str:
        """The account a request's key belongs to, for the access log (never the key itself)."""
        try:
            return self.accounts[self.account(key)]
        except ServeError:
            return "unknown key" if key else "no key"

    def left(self, account: int) -> Optional[int]:
        limit = self.limit[account]
        return None if limit is None else max(0, limit - self.used[account])

    def charge(self, account: int, rows: int) -> Optional[int]:
        """Take ``rows`` from the account's quota, all or nothing; returns what is left afterwards."""
        with self.lock:
            left = self.left(account)
            if left is not None and rows > left:
                raise ServeError(429, f"query quota exhausted: {left} of {self.limit[account]} queries left, the request has {rows}")
            self.used[account] += rows
            return self.left(account)

    def refund(self, account: int, rows: int) -> None:
        with self.lock:
            self.used[account] -= rows


# ---------------------------------------------------------------------------------------------
# The service (protocol logic, independent of the HTTP server) and the server
# ---------------------------------------------------------------------------------------------


class VictimService:
    """Answers protocol requests with ``oracle``; used by the HTTP handler, testable without sockets."""

    def __init__(self, oracle: Oracle, modes: list, quotas: Optional[Quotas] = None, defense: Optional[EntropyDefense] = None,
                 max_batch: int = 4096, on_request: Optional[Callable[[dict], None]] = None):
        if oracle.input_shape is None or oracle.num_classes is None:
            raise KdUsageError("kd-serve needs an oracle that knows its input shape and class count")
        for m in modes:
            parse_mode(m)
            response_fields(m, oracle.num_classes)  # topk:K with K > classes is a usage error now, not per request
        if not modes:
            raise KdUsageError("kd-serve needs at least one response mode")
        self.oracle = oracle
        self.modes = list(modes)
        self.quotas = quotas or Quotas()
        self.defense = defense
        self.max_batch = max_batch
        self.on_request = on_request
        self.lock = threading.Lock()  # one forward pass at a time: the model is shared by all handler threads
        self.answered = 0
        self.rejected = 0

    def info(self) -> dict:
        return {"protocol": PROTOCOL_VERSION, "server": f"kd-serve {__version__}", "input_shape": list(self.oracle.input_shape),
                "num_classes": self.oracle.num_classes, "modes": self.modes, "max_batch": self.max_batch,
                "identity": self.oracle.identity, "keys_required": self.quotas.keys is not None,
                "defense": self.defense.describe() if self.defense else None}

    def _parse(self, body: bytes, content_type: str) -> tuple:
        """(mode, x as uint8/float tensor, reply style) of a query request."""
        if content_type.startswith(STREAM_CONTENT_TYPE):
            try:
                header, batch = read_stream_bytes(body, "request")
            except KdError as e:
                raise ServeError(400, str(e)) from None
            if "x" not in batch:
                raise ServeError(400, "the request stream has no queries (field x)")
            return header.mode or self.modes[0], batch["x"], "stream"
        if not content_type.startswith("application/json"):
            raise ServeError(415, f"unsupported content type {content_type!r}: send application/json or {STREAM_CONTENT_TYPE}")
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise ServeError(400, "the request body is not valid JSON") from None
        if not isinstance(obj, dict) or "inputs" not in obj:
            raise ServeError(400, "expected a JSON object with 'mode' and 'inputs'")
        inputs = obj["inputs"]
        try:
            x = decode_array(inputs, torch.float32, "inputs")
        except KdError as e:
            raise ServeError(400, str(e)) from None
        return str(obj.get("mode") or self.modes[0]), x, ("lists" if isinstance(inputs, list) else "arrays")

    def query(self, body: bytes, content_type: str, key: Optional[str]) -> tuple:
        """(status, content type, body bytes) for a POST /v1/query. Raises ServeError for error answers."""
        account = self.quotas.account(key)
        mode, x, style = self._parse(body, content_type)
        if mode not in self.modes:
            raise ServeError(400, f"this server answers in mode{'s' if len(self.modes) > 1 else ''} {', '.join(self.modes)}, not {mode!r}")
        shape = tuple(self.oracle.input_shape)
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ServeError(400, f"inputs must be N x {' x '.join(map(str, shape))}, got {' x '.join(map(str, x.shape))}")
        n = x.shape[0]
        if n > self.max_batch:
            raise ServeError(413, f"{n} queries in one request; this server takes at most {self.max_batch}")
        if x.dtype == torch.uint8:
            xf = to_float(x)
        else:
            xf = x.float()
            if not bool(torch.isfinite(xf).all()) or (n and (float(xf.min()) < 0 or float(xf.max()) > 1)):
                raise ServeError(400, "inputs must be finite and within [0, 1]")
        left = self.quotas.charge(account, n)  # all or nothing, before any work
        try:
            passed = self.defense.passes(xf) if self.defense is not None else torch.ones(n, dtype=torch.bool)
            with self.lock:
                answers = self.oracle.answer(xf, mode) if n else {k: torch.empty((0, *s["shape"]), dtype=getattr(torch, s["dtype"]))
                                                                  for k, s in response_fields(mode, self.oracle.num_classes).items()}
        except BaseException:
            self.quotas.refund(account, n)
            raise
        rejected = ~passed
        if n:  # an oracle answering with a refused query's placeholders (a served replay: log) refused it too
            rejected |= rejected_rows(answers)
        if bool(rejected.any()):  # placeholders: a rejected query learns nothing about the model
            answers = {k: v.masked_fill(rejected.view(-1, *([1] * (v.ndim - 1))), -1 if not v.dtype.is_floating_point else 0.0)
                       for k, v in answers.items()}
        self.answered += n
        self.rejected += int(rejected.sum())
        if self.on_request:
            self.on_request({"method": "POST", "path": "/v1/query", "status": 200, "account": self.quotas.accounts[account],
                             "rows": n, "rejected": int(rejected.sum()), "mode": mode, "quota_left": left})
        if style == "stream":
            from .stream import StreamHeader, fields_of

            batch = {**answers, "rejected": rejected.to(torch.uint8)}
            header = StreamHeader("samples", fields_of(batch), self.oracle.num_classes, mode=mode,
                                  extra={"server": f"kd-serve {__version__}", "quota_left": left})
            return 200, STREAM_CONTENT_TYPE, stream_bytes(header, batch)
        if style == "lists":
            out = {k: v.tolist() for k, v in answers.items()}
        else:
            out = {k: encode_array(v) for k, v in answers.items()}
        reply = {"mode": mode, "n": n, "answers": out, "rejected": rejected.tolist(), "quota_left": left}
        return 200, "application/json", json.dumps(reply).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client sends many batches over one connection
    server_version = f"kd-serve/{__version__}"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes; without TCP_NODELAY, Nagle's algorithm and the client's
        # delayed ACK hold the body back ~40 ms per request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def service(self) -> VictimService:
        return self.server.service  # type: ignore[attr-defined]

    def _send(self, status: int, content_type: str, data: bytes, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _key(self) -> Optional[str]:
        headers = getattr(self, "headers", None)  # absent when http.server refused the request line itself
        auth = headers.get("Authorization", "") if headers is not None else ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def parse_request(self) -> bool:
        # http.server replaces headers only once a new request's headers parse: a refusal before that (a header
        # line too long, too many headers: 431) would otherwise be logged under the previous request's account
        # on a kept-alive connection
        self.headers = None
        return super().parse_request()

    def _log(self, status: int, **event) -> None:
        """One access-log event for a request that ``VictimService.query`` did not answer (errors, GET)."""
        if self.service.on_request is None:
            return
        # http.server sets command (then path, then headers) only as the request line parses; a request line
        # over 64 KiB (414) leaves command empty. Before they parse, path and headers would be the previous
        # request's on a kept-alive connection, so neither is logged
        line_parsed = bool(getattr(self, "command", None))
        headers_parsed = line_parsed and getattr(self, "headers", None) is not None
        path = (getattr(self, "path", None) or "-").split("?", 1)[0] if line_parsed else "-"  # never a query string: it may hold secrets
        self.service.on_request({"method": self.command if line_parsed else "-", "path": path, "status": status,
                                 "account": self.service.quotas.name(self._key()) if headers_parsed else "-", **event})

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        # http.server's own refusals (a malformed request line, an unsupported method: 400, 501, ...) are requests too
        self._log(code, error=message or self.responses.get(code, ("",))[0] or f"HTTP {code}")
        super().send_error(code, message, explain)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        message = message.splitlines()[0] if message else f"HTTP {status}"
        self._log(status, error=message)  # logged before the answer goes out, like an answered query
        self._send(status, "application/json", json.dumps({"error": message}).encode(), close)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path.endswith("/v1/info"):
            data = json.dumps(self.service.info()).encode()
            self._log(200)
            self._send(200, "application/json", data)
        else:
            self._error(404, f"no such endpoint {path!r}: GET /v1/info, POST /v1/query")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(411, "a Content-Length header is required", close=True)
            return
        if length < 0 or length > MAX_BODY_BYTES:
            self._error(413, f"request body over {MAX_BODY_BYTES} bytes", close=True)
            return
        body = self.rfile.read(length)
        if not path.endswith("/v1/query"):
            self._error(404, f"no such endpoint {path!r}: GET /v1/info, POST /v1/query")
            return
        key = self._key()
        try:
            status, ctype, data = self.service.query(body, self.headers.get("Content-Type", ""), key)
        except ServeError as e:
            self._error(e.status, e.message)
            return
        except KdError as e:
            # the oracle behind the server failed. A remote one (a proxied URL, exec:) may do better next time: 502,
            # which clients retry. A model file or a replayed log fails the same way every time (a query the log
            # does not hold), and so does a proxied server that said 422 itself: 422, which they do not retry
            deterministic = isinstance(e, UnanswerableQueries) or getattr(self.service.oracle, "free_on_failure", False)
            self._error(422 if deterministic else 502, str(e))
            return
        except Exception as e:  # a bug: answer 500, keep serving
            self._error(500, f"internal error ({type(e).__name__})")
            return
        self._send(status, ctype, data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # requests are reported through VictimService.on_request (never with the key)


def make_server(service: VictimService, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A threading HTTP server bound to host:port (port 0: a free one; see ``server.server_address``)."""
    try:
        server = ThreadingHTTPServer((host, port), _Handler)
    except OSError as e:
        raise KdError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    server.daemon_threads = True
    server.service = service  # type: ignore[attr-defined]
    return server


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
