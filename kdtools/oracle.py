"""Oracles: whatever answers queries. One interface for kd-query and every method that needs answers.

An oracle takes a float batch of images in [0, 1] (N, C, H, W) and returns its answer in one of the
*response modes*:

  label     hard labels only                        field label (N,) int64
  probs     class probabilities                     field probs (N, K) float32
  logits    raw scores                              field logits (N, K) float32
  topk:K    the K most likely classes and their     fields topk_index (N, K) int64, topk_value (N, K) float32
            probabilities

Oracle specs (``open_oracle``):

  FILE                 a local model file (kdtools weights, TorchScript, torch.export)     ModelOracle
  ensemble:F1,F2,...   local model files answering together: the mean of their softmax     ModelOracle
                       probabilities (``kdtools.weights.load_classifier``)
  http://HOST:PORT     an HTTP API speaking the kdtools protocol (below), e.g. kd-serve    HttpOracle
  https://...          the same over TLS
  exec:CMD             a long-lived subprocess: we write a kdtools *queries* stream on its  ExecOracle
                       stdin, one batch record per call, and read a *samples* stream back
                       (one batch record per call), e.g. ``exec:kd-query victim.pt --mode probs``
  replay:LOG.h5        answers from a recorded query log, by exact match of the query      ReplayOracle
                       values, so an experiment reruns without paying again

HTTP protocol, version 1 (served by ``kdtools.serve``; docs/oracles.md has examples):

  GET  /v1/info   -> JSON {"protocol": 1, "input_shape": [C, H, W], "num_classes": K,
                           "modes": ["label", ...], "max_batch": N, "identity": "...", "defense": ... }
  POST /v1/query  body either
        application/json: {"mode": "label", "inputs": X}, X being nested lists of floats in [0, 1]
                          (N, C, H, W), or an encoded array {"dtype": "uint8"|"float32", "shape":
                          [N, C, H, W], "data": base64 of the little-endian bytes} (uint8 means v/255)
        -> 200 JSON {"mode": ..., "n": N, "answers": {field: values}, "rejected": [bool] * N,
                     "quota_left": int or null}; answers come back in the style of the inputs
                     (lists for lists, encoded arrays for encoded arrays)
     or application/x-kdtools-stream: a kdtools stream (header with mode, one batch with x, end)
        -> 200 the same as a stream: a header, one batch with the answer fields and ``rejected``
           (uint8 0/1), an end record
  Errors: a non-200 status with JSON {"error": "one line"}: 400 bad request, 401 missing or unknown
  API key (sent as ``Authorization: Bearer KEY``), 413 batch too large, 422 the server's model or replayed
  log cannot answer these queries (the same every time), 429 query quota of the key exhausted, 5xx server
  trouble. The client retries 5xx, timeouts and connection errors with
  exponential backoff (and a 429 that carries Retry-After, i.e. a rate limit); every other error,
  a malformed answer or a wrong number of answers is a KdError at once.

Rejected queries: a server with a query defence answers HTTP 200 and flags the refused rows in
``rejected``; their values in ``answers`` mean nothing. The client either raises QueryRejected (the
default, ``on_rejected="error"``; the answers before the first rejected row are kept as its
``partial``) or, with ``on_rejected="flag"``, returns placeholders for those rows: label -1,
topk_index -1 and topk_value 0, probs all 0 (a row that sums to 0 is not a distribution), logits NaN.

Budgets are not the oracle's business: the caller (``BudgetedOracle``, ``kdtools.query.run_queries``)
reserves queries in the log before calling. An oracle that fails after answering the first m rows of
a batch raises a KdError whose ``partial`` attribute holds those m answers, so callers log them too.
Retries re-send the same queries: the budget counts each query once; ``retried_rows`` says how many
rows were re-sent (a server that bills failed requests may have charged them).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import math
import os
import re
import select
import shlex
import subprocess
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import __version__
from .errors import KdError, KdUsageError, UnanswerableQueries, counted
from .weights import LoadedModel, load_classifier, probe_num_classes

STREAM_CONTENT_TYPE = "application/x-kdtools-stream"
PROTOCOL_VERSION = 1


def parse_mode(mode: str) -> tuple[str, int]:
    """'topk:5' -> ('topk', 5); 'probs' -> ('probs', 0)."""
    mode = mode.strip().lower()
    if mode in ("label", "probs", "logits"):
        return mode, 0
    if mode.startswith("topk:"):
        try:
            k = int(mode.split(":", 1)[1])
        except ValueError:
            k = 0
        if k <= 0:
            raise KdUsageError(f"--mode {mode}: K must be a positive integer, e.g. topk:3")
        return "topk", k
    raise KdUsageError(f"--mode {mode!r}: expected label, probs, logits or topk:K")


def response_fields(mode: str, num_classes: int) -> dict:
    """The stream/HDF5 fields an answer in ``mode`` consists of."""
    kind, k = parse_mode(mode)
    if kind == "label":
        return {"label": {"dtype": "int64", "shape": []}}
    if kind == "probs":
        return {"probs": {"dtype": "float32", "shape": [num_classes]}}
    if kind == "logits":
        return {"logits": {"dtype": "float32", "shape": [num_classes]}}
    if k > num_classes:
        raise KdUsageError(f"--mode topk:{k}: the oracle has only {num_classes} classes")
    return {"topk_index": {"dtype": "int64", "shape": [k]}, "topk_value": {"dtype": "float32", "shape": [k]}}


def format_logits(logits: torch.Tensor, mode: str) -> dict:
    """Turn logits into the answer a ``mode`` oracle gives."""
    kind, k = parse_mode(mode)
    logits = logits.detach().float().cpu()
    if kind == "label":
        return {"label": logits.argmax(1).long()}
    if kind == "logits":
        return {"logits": logits.contiguous()}
    probs = torch.softmax(logits, 1)
    if kind == "probs":
        return {"probs": probs.contiguous()}
    v, i = probs.topk(k, dim=1)
    return {"topk_index": i.long().contiguous(), "topk_value": v.contiguous()}


class Oracle:
    """Base class. ``identity`` names the oracle in logs (file hash, URL, command)."""

    identity: str = ""
    kind: str = ""
    input_shape: Optional[tuple] = None
    num_classes: Optional[int] = None
    # whether a call that failed cost nothing: true of the oracles on this machine (a model file, a replayed log),
    # whose failed rows are given back to the budget; a remote server may have counted a request that failed
    free_on_failure: bool = False
    aliases: tuple = ()  # other names a log may have recorded this oracle under (SampleWriter's oracle_aliases)

    def answer(self, x: torch.Tensor, mode: str) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class ModelOracle(Oracle):
    """A local model file (kdtools weights, TorchScript, torch.export) answering on ``device``."""

    kind = "model"
    free_on_failure = True

    def __init__(self, loaded: LoadedModel, device: torch.device = torch.device("cpu"), batch_size: int = 1024):
        self.model = loaded.module.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.identity = loaded.identity
        self.input_shape = loaded.input_shape
        self.num_classes = loaded.num_classes
        if self.num_classes is None and self.input_shape is not None:
            self.num_classes = probe_num_classes(self.model, self.input_shape, device, "the model")

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.model(x[i:i + self.batch_size].to(self.device, non_blocking=True)).float().cpu()
                for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(outs) if outs else torch.empty(0, self.num_classes or 0)

    def answer(self, x: torch.Tensor, mode: str) -> dict:
        return format_logits(self.logits(x), mode)



# ---------------------------------------------------------------------------------------------
# Answers: deriving one mode from another, checking what a remote oracle sent, rejected rows
# ---------------------------------------------------------------------------------------------


class QueryRejected(KdError):
    """The server refused some queries of a batch (a query defence). ``partial`` holds the answers
    to the rows before the first refused one; ``rejected`` is the (N,) bool mask of the batch."""


def answer_rows(answer: dict) -> int:
    return next(iter(answer.values())).shape[0] if answer else 0


def slice_answer(answer: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in answer.items()}


def cat_answers(parts: list) -> dict:
    parts = [p for p in parts if p and answer_rows(p)]
    if not parts:
        return {}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def derive_answer(answer: dict, have: str, want: str) -> dict:
    """An answer in mode ``want`` computed from one in mode ``have`` (logits give every mode, probs
    give label and topk:K). Raises KdError when ``have`` does not carry what ``want`` needs.

    Rows that hold a refused query's placeholders (``rejected_placeholders``: probs all 0, logits NaN)
    stay refused in the derived answer (label -1, topk_index -1 and topk_value 0, probs 0), never the
    argmax of zeros: a derived answer is never made up."""
    hk, _ = parse_mode(have)
    wk, k = parse_mode(want)
    if have == want:
        return answer
    if hk == "logits":
        out = format_logits(answer["logits"], want)
    elif hk == "probs" and wk in ("label", "topk"):
        probs = answer["probs"]
        if wk == "label":
            out = {"label": probs.argmax(1).long()}
        else:
            v, i = probs.topk(k, dim=1)
            out = {"topk_index": i.long().contiguous(), "topk_value": v.contiguous()}
    else:
        raise KdError(f"the oracle answers in mode {have!r}, which does not give {want!r}")
    return rejected_placeholders(out, rejected_rows(answer)) if answer_rows(answer) else out


def rejected_placeholders(answer: dict, rejected: torch.Tensor) -> dict:
    """Overwrite the rows of refused queries with the documented placeholders (see module docstring)."""
    if not bool(rejected.any()):
        return answer
    out = {}
    for name, v in answer.items():
        v = v.clone()
        if name in ("label", "topk_index"):
            v[rejected] = -1
        elif name == "logits":
            v[rejected] = float("nan")
        else:  # probs, topk_value
            v[rejected] = 0.0
        out[name] = v
    return out


def rejected_rows(answer: dict) -> torch.Tensor:
    """(n,) bool: the rows that carry the placeholders of a refused query (the inverse of
    ``rejected_placeholders``), so a student never learns from them."""
    n = next(iter(answer.values())).shape[0]
    out = torch.zeros(n, dtype=torch.bool)
    for name, v in answer.items():
        if name in ("label", "topk_index"):
            out |= (v.reshape(n, -1) < 0).any(1)
        elif name == "logits":
            out |= torch.isnan(v.float()).any(1)
        elif name == "probs":
            out |= v.float().sum(1) <= 0
    return out


def exact_placeholder_rows(answer: dict) -> torch.Tensor:
    """(n,) bool: rows holding exactly what ``rejected_placeholders`` writes in every field (label and
    topk_index -1, logits all NaN, probs and topk_value all 0). Stricter than ``rejected_rows``: for answers
    from a process we do not control, where a label of -5 or one NaN logit is a bug to report, not a refusal."""
    n = next(iter(answer.values())).shape[0]
    out = torch.ones(n, dtype=torch.bool)
    for name, v in answer.items():
        flat = v.reshape(n, -1)
        if name in ("label", "topk_index"):
            out &= (flat == -1).all(1)
        elif name == "logits":
            out &= torch.isnan(flat.float()).all(1)
        else:  # probs, topk_value
            out &= (flat.float() == 0).all(1)
    return out


def without_rejected(batch: dict) -> tuple[dict, int]:
    """Drop the rows a query defence refused (``kd-query --on-rejected flag`` placeholders: label -1,
    probs all 0, logits NaN, topk_index -1): they hold no answer. Returns (batch, rows dropped)."""
    answers = {k: v for k, v in batch.items() if k in ("label", "probs", "logits", "topk_index")}
    if not answers:
        return batch, 0
    bad = rejected_rows(answers)
    n_bad = int(bad.sum())
    if not n_bad:
        return batch, 0
    keep = ~bad
    return {k: (v[keep] if isinstance(v, torch.Tensor) and v.shape[:1] == bad.shape else v) for k, v in batch.items()}, n_bad


def check_answer(answer: dict, mode: str, n: int, num_classes: Optional[int], where: str,
                 rejected: Optional[torch.Tensor] = None) -> dict:
    """Validate a remote answer (fields, row count, shapes, value ranges) and cast it to our dtypes."""
    fields = response_fields(mode, num_classes or 0) if num_classes else response_fields(mode, 10 ** 9)
    ok = torch.ones(n, dtype=torch.bool) if rejected is None else ~rejected
    out = {}
    for name, spec in fields.items():
        if name not in answer:
            raise KdError(f"{where}: the answer lacks field {name!r} (mode {mode})")
        v = answer[name]
        if not isinstance(v, torch.Tensor):
            raise KdError(f"{where}: field {name!r} of the answer is not an array")
        if v.ndim == 0 or v.shape[0] != n:
            got = 1 if v.ndim == 0 else v.shape[0]
            raise KdError(f"{where}: the server answered {counted(got, 'row')} for {counted(n, 'query', 'queries')} (field {name!r})")
        want_shape = list(spec["shape"])
        if num_classes is None and want_shape:  # unknown class count: only the rank can be checked
            want_shape = list(v.shape[1:]) if v.ndim == 2 else want_shape
        if list(v.shape[1:]) != want_shape:
            raise KdError(f"{where}: field {name!r} has per-row shape {list(v.shape[1:])}, expected {want_shape}")
        if spec["dtype"] == "int64":
            if v.dtype.is_floating_point:
                if not bool(torch.isfinite(v).all()) or not bool((v == v.round()).all()):
                    raise KdError(f"{where}: field {name!r} should hold class indices")
            v = v.long()
            hi = num_classes if num_classes else None
            good = v[ok]
            if good.numel() and (int(good.min()) < 0 or (hi is not None and int(good.max()) >= hi)):
                raise KdError(f"{where}: field {name!r} holds a class index outside 0..{(hi or 0) - 1}")
        else:
            v = v.float()
            if not bool(torch.isfinite(v[ok]).all()):
                raise KdError(f"{where}: field {name!r} holds NaN or infinite values")
        out[name] = v.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Wire encoding shared by HttpOracle and kdtools.serve
# ---------------------------------------------------------------------------------------------

WIRE_DTYPES = {"uint8": torch.uint8, "float32": torch.float32, "int64": torch.int64}


def wire_images(x: torch.Tensor) -> torch.Tensor:
    """Images for the wire: uint8 when that is lossless (v/255 values, e.g. dataset images), else float32."""
    x = x.detach().float().cpu()
    q = (x * 255).round()
    if bool(torch.equal(q / 255, x)):
        return q.to(torch.uint8)
    return x.contiguous()


def encode_array(t: torch.Tensor) -> dict:
    """{"dtype", "shape", "data": base64 of the little-endian bytes}."""
    t = t.detach().cpu().contiguous()
    name = next((k for k, d in WIRE_DTYPES.items() if d == t.dtype), None)
    if name is None:
        t, name = t.float(), "float32"
    return {"dtype": name, "shape": list(t.shape), "data": base64.b64encode(t.numpy().tobytes()).decode("ascii")}


def decode_array(value, dtype: torch.dtype, where: str) -> torch.Tensor:
    """An encoded array (dict) or nested lists -> a tensor. KdError on anything malformed."""
    if isinstance(value, dict):
        try:
            name, shape, data = value["dtype"], [int(s) for s in value["shape"]], value["data"]
            raw = base64.b64decode(data, validate=True)
        except (KeyError, TypeError, ValueError) as e:
            raise KdError(f"{where}: malformed encoded array ({type(e).__name__})") from None
        if name not in WIRE_DTYPES or any(s < 0 for s in shape):
            raise KdError(f"{where}: encoded array with unsupported dtype {name!r} or bad shape")
        d = WIRE_DTYPES[name]
        size = math.prod(shape) * torch.tensor([], dtype=d).element_size()
        if len(raw) != size:
            raise KdError(f"{where}: encoded array holds {len(raw)} bytes, its shape {shape} needs {size}")
        t = torch.frombuffer(bytearray(raw), dtype=d) if raw else torch.empty(0, dtype=d)
        return t.reshape(shape)
    if isinstance(value, list):
        try:
            return torch.tensor(value, dtype=dtype)
        except (TypeError, ValueError, RuntimeError) as e:
            raise KdError(f"{where}: malformed array ({str(e).splitlines()[0][:80]})") from None
    raise KdError(f"{where}: expected an array (nested lists or an encoded array)")


def stream_bytes(header, batch: dict) -> bytes:
    """A whole kdtools stream (header, one batch, end record) as bytes."""
    from .stream import StreamWriter

    buf = io.BytesIO()
    w = StreamWriter(buf, header)
    w.write(batch)
    w.close()
    return buf.getvalue()


def read_stream_bytes(data: bytes, where: str) -> tuple:
    """(header, all rows concatenated) of a kdtools stream held in memory."""
    from .stream import StreamReader

    reader = StreamReader(io.BytesIO(data), where)
    parts = list(reader)
    if reader.end is not None and reader.end.get("status") not in (None, "complete"):
        raise KdError(f"{where}: the stream ended with status {reader.end.get('status')}: {reader.end.get('message', '')}")
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return reader.header, batch


# ---------------------------------------------------------------------------------------------
# Remote oracles
# ---------------------------------------------------------------------------------------------


@dataclass
class RemoteOptions:
    """How to talk to an HTTP or exec: oracle. ``api_key`` is the key's *value*: the CLI reads it from
    an environment variable and passes it in; it is sent in a header and never logged or printed."""

    api_key: Optional[str] = None
    timeout: float = 60.0  # seconds per request (HTTP) or per read (exec)
    retries: int = 3  # extra attempts after a 5xx, a timeout or a connection error
    backoff: float = 0.5  # first retry delay in seconds; doubled each time
    backoff_max: float = 30.0
    rate_limit: Optional[float] = None  # queries per second, client side
    wire: str = "json"  # json | stream (the binary application/x-kdtools-stream body)
    on_rejected: str = "error"  # error | flag (see the module docstring)
    max_batch: Optional[int] = None  # rows per request; default the server's max_batch
    api_key_env: Optional[str] = None  # the NAME of the variable the key came from (for error messages only)

    def public(self) -> dict:
        """What may be recorded in a log: everything but the key."""
        return {"timeout": self.timeout, "retries": self.retries, "backoff": self.backoff, "rate_limit": self.rate_limit,
                "wire": self.wire, "on_rejected": self.on_rejected, "max_batch": self.max_batch,
                "api_key": "set" if self.api_key else "none"}


class RateLimiter:
    """Spaces requests so that on average at most ``rate`` queries per second go out."""

    def __init__(self, rate: Optional[float], clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.next_time = None

    def wait(self, rows: int) -> None:
        if not self.rate:
            return
        now = self.clock()
        if self.next_time is not None and self.next_time > now:
            self.sleep(self.next_time - now)
            now = self.next_time
        self.next_time = now + rows / self.rate


class HttpOracle(Oracle):
    """A remote classifier behind the kdtools HTTP protocol (see the module docstring)."""

    kind = "http"

    def __init__(self, url: str, options: Optional[RemoteOptions] = None, sleep: Callable[[float], None] = time.sleep):
        self.options = options or RemoteOptions()
        if self.options.wire not in ("json", "stream"):
            raise KdUsageError(f"--wire {self.options.wire!r}: expected json or stream")
        if self.options.on_rejected not in ("error", "flag"):
            raise KdUsageError(f"--on-rejected {self.options.on_rejected!r}: expected error or flag")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KdUsageError(f"{url!r}: expected an oracle URL like http://127.0.0.1:8080")
        if parts.username or parts.password:
            # a key in the URL would end up in logs and process listings
            raise KdUsageError("do not put credentials in the oracle URL; pass the key through an environment variable (--api-key-env)")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.base_path = parts.path.rstrip("/")
        self.url = f"{parts.scheme}://{parts.netloc}{self.base_path}"  # no query string: it may hold secrets
        self.identity = self.url  # until the server names what answers (below)
        self.sleep = sleep
        self.limiter = RateLimiter(self.options.rate_limit, sleep=sleep)
        self._conn = None
        # what this oracle did, for the caller's report
        self.requests = 0
        self.retried_rows = 0
        self.rejected_total = 0
        info = self._json(self._request("GET", "/v1/info"), "/v1/info")
        try:
            self.input_shape = tuple(int(v) for v in info["input_shape"])
            self.num_classes = int(info["num_classes"])
            self.modes = [str(m) for m in info.get("modes") or []]
            self.max_batch = int(info.get("max_batch") or 1024)
        except (KeyError, TypeError, ValueError):
            raise KdError(f"{self.url}: /v1/info lacks input_shape or num_classes (is this a kdtools oracle server?)") from None
        if self.options.max_batch:
            self.max_batch = min(self.max_batch, self.options.max_batch)
        self.server_info = info
        # a kdtools server names the model that answers (its file's hash): a log records that, not the address, so it
        # resumes on another port and refuses another model served at the same address; other servers keep the URL
        served = info.get("identity")
        if isinstance(served, str) and served:
            self.identity = served
            self.aliases = (self.url,)  # logs made before this recorded the address

    # -- transport ------------------------------------------------------------------------
    def _key_source(self) -> str:
        """Where the API key was looked for, for a 401/403 message: the variable's name, and whether it held one.
        The name is echoed only when it looks like one (upper-case letters, digits, '_'): a key pasted where its
        variable's name belongs must not be printed."""
        env = self.options.api_key_env
        if not env:
            return ""
        named = f"the environment variable {env}" if re.fullmatch(r"[A-Z_][A-Z0-9_]{0,63}", env) else "the environment variable named by"
        if self.options.api_key:
            return f"the key sent came from {named} (--api-key-env)"
        return f"no key was sent: {named} (--api-key-env) is not set or empty"

    def _scrub(self, text: str) -> str:
        key = self.options.api_key
        return text.replace(key, "***") if key else text

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self.host, self.port, timeout=self.options.timeout)
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None

    def _request(self, method: str, path: str, body: Optional[bytes] = None, content_type: str = "", rows: int = 0) -> tuple:
        """(content type, body) of a 200 answer, after retries; KdError otherwise (key never in it)."""
        headers = {"Accept": f"application/json, {STREAM_CONTENT_TYPE}", "User-Agent": f"kdtools/{__version__}"}
        if body is not None:
            headers["Content-Type"] = content_type
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        attempts = max(0, int(self.options.retries)) + 1
        problem = ""
        retry_after = None  # seconds a 429 answer asked us to wait
        for attempt in range(attempts):
            if attempt:
                delay = min(self.options.backoff_max, self.options.backoff * 2 ** (attempt - 1))
                if retry_after is not None:
                    delay = min(self.options.backoff_max, retry_after)
                self.sleep(delay)
                self.retried_rows += rows
                retry_after = None
            self.requests += 1
            try:
                reused = self._conn is not None
                conn = self._connection()
                try:
                    conn.request(method, self.base_path + path, body=body, headers=headers)
                    resp = conn.getresponse()
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    if not reused:
                        raise
                    # the server closed an idle keep-alive connection: not a failure, reconnect at once
                    self._drop_connection()
                    conn = self._connection()
                    conn.request(method, self.base_path + path, body=body, headers=headers)
                    resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                rtype = resp.getheader("Content-Type", "") or ""
                rafter = resp.getheader("Retry-After")
                if resp.will_close:
                    self._drop_connection()
            except TimeoutError:
                problem = f"no answer within {self.options.timeout:g} s"
                self._drop_connection()
                continue
            except (OSError, http.client.HTTPException) as e:
                problem = f"connection failed ({type(e).__name__}{': ' + str(e) if str(e) else ''})"
                self._drop_connection()
                continue
            if status == 200:
                return rtype, data
            message = _server_message(data)
            if status >= 500:
                problem = f"server error (HTTP {status}{': ' + message if message else ''})"
                continue
            if status == 429 and rafter is not None:  # a rate limit says when to come back; a quota does not
                try:
                    retry_after = max(0.0, float(rafter))
                except ValueError:
                    retry_after = None
                problem = f"rate limited (HTTP 429{': ' + message if message else ''})"
                continue
            error = UnanswerableQueries if status == 422 else KdError
            raise error(self._scrub(f"{self.url}: {_describe_status(status, message, self._key_source())}"))
        raise KdError(self._scrub(f"{self.url}: {problem} (gave up after {counted(attempts, 'attempt')})"))

    def _json(self, reply: tuple, what: str) -> dict:
        _, data = reply
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            head = data[:40].decode("utf-8", "replace").replace("\n", " ")
            raise KdError(self._scrub(f"{self.url}{what}: the server's answer is not valid JSON (starts {head!r})")) from None
        if not isinstance(obj, dict):
            raise KdError(f"{self.url}{what}: the server's answer is not a JSON object")
        return obj

    # -- queries --------------------------------------------------------------------------
    def _query_chunk(self, x: torch.Tensor, mode: str) -> tuple:
        n = x.shape[0]
        where = f"{self.url}/v1/query"
        wx = wire_images(x)
        if self.options.wire == "stream":
            from .stream import StreamHeader, fields_of

            body = stream_bytes(StreamHeader("queries", fields_of({"x": wx}), self.num_classes, mode=mode), {"x": wx})
            ctype = STREAM_CONTENT_TYPE
        else:
            body = json.dumps({"mode": mode, "inputs": encode_array(wx)}).encode()
            ctype = "application/json"
        self.limiter.wait(n)
        rtype, data = self._request("POST", "/v1/query", body, ctype, rows=n)
        if rtype.startswith(STREAM_CONTENT_TYPE):
            _, batch = read_stream_bytes(data, where)
            rejected = batch.pop("rejected", None)
            answers = batch
        else:
            obj = self._json((rtype, data), "/v1/query")
            answers_obj = obj.get("answers")
            if not isinstance(answers_obj, dict):
                raise KdError(f"{where}: the answer lacks an 'answers' object")
            fields = response_fields(mode, self.num_classes)
            answers = {k: decode_array(answers_obj[k], WIRE_DTYPES[spec["dtype"]] if spec["dtype"] in WIRE_DTYPES else torch.float32, where)
                       for k, spec in fields.items() if k in answers_obj}
            rejected = obj.get("rejected")
            if rejected is not None:
                if not isinstance(rejected, list) or not all(isinstance(r, bool) for r in rejected):
                    raise KdError(f"{where}: 'rejected' must be a list of booleans")
                rejected = torch.tensor(rejected, dtype=torch.bool)
        if rejected is not None:
            rejected = rejected.bool()
            if rejected.shape != (n,):
                raise KdError(f"{where}: the server flagged {counted(rejected.numel(), 'row')} for {counted(n, 'query', 'queries')}")
        answers = check_answer(answers, mode, n, self.num_classes, where, rejected)
        if rejected is None:
            rejected = torch.zeros(n, dtype=torch.bool)
        return answers, rejected

    def answer(self, x: torch.Tensor, mode: str) -> dict:
        parse_mode(mode)
        if self.modes and mode not in self.modes:
            raise KdError(f"{self.url}: the server answers in mode{'s' if len(self.modes) > 1 else ''} "
                          f"{', '.join(self.modes)}, not {mode!r} (use --mode {self.modes[0]})")
        done: list = []  # answers of the chunks already received: kept if a later chunk fails
        for i in range(0, x.shape[0], self.max_batch):
            chunk = x[i:i + self.max_batch]
            try:
                answers, rejected = self._query_chunk(chunk, mode)
            except BaseException as e:  # a failure, or Ctrl-C / SIGTERM mid-batch: the chunks received are paid for
                e.partial = cat_answers(done)
                raise
            answers = rejected_placeholders(answers, rejected)
            if bool(rejected.any()):
                self.rejected_total += int(rejected.sum())
                if self.options.on_rejected == "error":
                    first = int(rejected.nonzero()[0])
                    kept = i + first
                    before = (f"the {kept} answered before the first rejection are kept" if kept
                              else "no query before the first rejection was answered")
                    err = QueryRejected(f"{self.url}: the server's query defence rejected {int(rejected.sum())} of "
                                        f"{chunk.shape[0]} queries in a batch; {before} "
                                        "(use --on-rejected flag to record rejected rows as label -1 and go on)")
                    err.partial = cat_answers(done + [slice_answer(answers, 0, first)])
                    err.rejected = rejected
                    raise err
            done.append(answers)
        if not done:
            return {k: torch.empty((0, *s["shape"]), dtype=WIRE_DTYPES[s["dtype"]]) for k, s in response_fields(mode, self.num_classes).items()}
        return cat_answers(done)

    def close(self) -> None:
        self._drop_connection()


def _server_message(data: bytes) -> str:
    """The one-line "error" of a JSON error body, else a short excerpt of the body."""
    try:
        obj = json.loads(data)
        if isinstance(obj, dict) and "error" in obj:
            return str(obj["error"]).splitlines()[0][:300] if str(obj["error"]) else ""
    except (UnicodeDecodeError, ValueError):
        pass
    return data[:120].decode("utf-8", "replace").strip().splitlines()[0] if data.strip() else ""


def _describe_status(status: int, message: str, key_source: str = "") -> str:
    """One line for an HTTP error status; ``key_source`` says where the API key came from (never the key)."""
    why = f": {message}" if message else ""
    if status == 401:
        return (f"the server wants a valid API key (HTTP 401{why}); "
                + (key_source or "put it in the environment variable named by --api-key-env"))
    if status == 403:
        return f"the server refused this API key (HTTP 403{why})" + (f"; {key_source}" if key_source else "")
    if status == 429:
        return (f"the server's query quota for this key is exhausted (HTTP 429{why}); if the key still has fewer "
                "queries left than one request holds, smaller requests spend them: --max-batch N")
    if status == 413:
        return f"the batch is too large for the server (HTTP 413{why}); lower --max-batch"
    if status == 400:
        return f"the server rejected the request (HTTP 400{why})"
    if status == 422:
        return f"the server cannot answer these queries (HTTP 422{why}); asking again would give the same"
    return f"unexpected answer HTTP {status}{why}"


class _DeadlineReader:
    """A binary reader over a pipe whose every read gives up after ``timeout`` seconds of silence."""

    def __init__(self, fd: int, timeout: Optional[float], on_timeout: Callable[[], Exception]):
        self.fd = fd
        self.timeout = timeout
        self.on_timeout = on_timeout

    def read(self, n: int) -> bytes:
        if self.timeout is not None:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                raise self.on_timeout()
        return os.read(self.fd, n)


class ExecOracle(Oracle):
    """A subprocess that answers kdtools streams: ``exec:kd-query victim.safetensors --mode probs``.

    The process is started once. We write a *queries* stream header (x float32 of ``input_shape``),
    then one batch record per ``answer`` call; it must write a *samples* stream header (with
    num_classes and its mode), then one batch record with exactly as many rows per batch we sent
    (extra fields such as an echo of x are ignored). ``close`` writes the end record and waits.
    """

    kind = "exec"

    def __init__(self, command: str, input_shape, options: Optional[RemoteOptions] = None, env: Optional[dict] = None):
        from .stream import StreamHeader, StreamReader, StreamWriter

        self.options = options or RemoteOptions()
        try:
            argv = shlex.split(command)
        except ValueError as e:
            raise KdUsageError(f"exec:{command}: {e}") from None
        if not argv:
            raise KdUsageError("exec: needs a command, e.g. exec:'kd-query victim.safetensors --mode probs'")
        if input_shape is None:
            raise KdUsageError("an exec: oracle needs --input-shape CxHxW (what the command takes)")
        self.command = command
        self.identity = "exec:" + command
        self.relayed_rejected = 0  # rows the child answered with a refusal's placeholders
        self.where = f"exec oracle {argv[0]!r}"
        self.input_shape = tuple(int(v) for v in input_shape)
        self.stderr_tail: deque = deque(maxlen=20)
        try:
            # a session of its own: a Ctrl-C at the terminal reaches only our process, which finishes the batch or
            # iteration under way with this oracle still answering, then closes it (its input ends); a child in
            # our process group would die with the Ctrl-C and fail that batch
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                         start_new_session=True)
        except FileNotFoundError:
            raise KdError(f"{self.where}: command not found") from None
        except OSError as e:
            raise KdError(f"{self.where}: cannot start it ({e.strerror or e})") from None
        # drain its stderr so it never blocks on a full pipe; keep the last lines for error messages
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        self.reader = _DeadlineReader(self.proc.stdout.fileno(), self.options.timeout,
                                      lambda: KdError(f"no answer within {self.options.timeout:g} s"))
        try:
            self.writer = StreamWriter(self.proc.stdin, StreamHeader("queries", {"x": {"dtype": "float32", "shape": list(self.input_shape)}},
                                                                     extra={"client": f"kdtools {__version__} exec oracle"}))
            reader = StreamReader(self.reader, self.where)
        except (BrokenPipeError, OSError):
            self._fail("before answering")
        except KdError as e:
            self._fail("before answering", e)
        header = reader.header
        if not header.mode or header.num_classes is None:
            self.close()
            raise KdError(f"{self.where}: its output stream does not say its response mode and class count (kind {header.kind!r})")
        self.mode = header.mode
        self.num_classes = header.num_classes
        self.fields = list(response_fields(self.mode, self.num_classes))
        missing = [f for f in self.fields if f not in header.fields]
        if missing:
            self.close()
            raise KdError(f"{self.where}: its output stream lacks field {missing[0]!r} of mode {self.mode}")

    def _drain_stderr(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.stderr_tail.append(text)

    def _fail(self, when: str, cause: Optional[Exception] = None):
        """Raise the clearest error about a process that stopped answering."""
        try:
            # end of file or a broken pipe: the process is exiting, give it a moment to say how
            code = self.proc.wait(timeout=5 if cause is None else 0.2)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:  # alive but broken (silent past the timeout, or a malformed stream): stop it
            self.proc.kill()
            self.proc.wait()
        self._stderr_thread.join(timeout=2)
        last = f"; its last message: {self.stderr_tail[-1]}" if self.stderr_tail else ""
        if code is None:
            self.close()
            text = str(cause) if cause else "stopped answering"
            text = text if text.startswith(self.where) else f"{self.where}: {text}"
            raise KdError(f"{text} ({when}){last}")
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise KdError(f"{self.where} died {when} (it {how}){last}")

    def answer(self, x: torch.Tensor, mode: str) -> dict:
        from .stream import read_record

        parse_mode(mode)
        if self.proc.poll() is not None:
            self._fail("before this batch")
        x = x.detach().float().cpu().contiguous()
        if tuple(x.shape[1:]) != self.input_shape:
            raise KdError(f"{self.where}: queries are {tuple(x.shape[1:])}, it takes {self.input_shape}")
        n = x.shape[0]
        try:
            self.writer.write({"x": x})
        except (BrokenPipeError, OSError):
            self._fail("while reading queries")
        try:
            record = read_record(self.reader, self.where)
        except KdError as e:
            self._fail("while answering", e)
        if record is None:
            self._fail("while answering")
        meta, tensors = record
        if meta.get("kdtools.record") == "end":
            self.close()
            raise KdError(f"{self.where}: ended its answers early ({meta.get('status')}: {meta.get('message', '')})")
        if any(f not in tensors for f in self.fields):
            raise KdError(f"{self.where}: an answer batch lacks the fields of mode {self.mode}")
        got = {f: tensors[f] for f in self.fields}
        rows = {int(t.shape[0]) for t in got.values() if t.ndim >= 1}
        if len(rows) == 1 and (k := rows.pop()) < n:
            # a child that ran out of its own budget mid-batch (exec:kd-query ... --budget) answers the rows that
            # fit, then ends its stream saying why: that is an early stop with k paid answers, not a count mismatch
            following, patience = None, self.reader.timeout
            try:
                # a child that ends early sends its end record right after the short batch: wait a moment, not the
                # whole --timeout (a child that just answered too few rows is reported below as such)
                self.reader.timeout = min(patience, 2.0) if patience else 2.0
                following = read_record(self.reader, self.where)
            except KdError:
                pass
            finally:
                self.reader.timeout = patience
            if following is not None and following[0].get("kdtools.record") == "end":
                self.close()
                end = following[0]
                err = KdError(f"{self.where}: ended its answers early after {k} of the {n} queries of this batch "
                              f"({end.get('status')}: {end.get('message', '')})")
                refused = exact_placeholder_rows(got)
                self.relayed_rejected += int(refused.sum())
                err.partial = derive_answer(check_answer(got, self.mode, k, self.num_classes, self.where, refused), self.mode, mode)
                raise err
        # a child that relays a defence's refusals (kd-query --on-rejected flag) sends the placeholders: they
        # stay refused (and derive to refused rows), they are not range errors
        whole = all(t.ndim >= 1 and t.shape[0] == n for t in got.values())  # else check_answer says what is wrong
        refused = exact_placeholder_rows(got) if whole else None
        got = check_answer(got, self.mode, n, self.num_classes, self.where, refused)
        if refused is not None:
            self.relayed_rejected += int(refused.sum())
        return derive_answer(got, self.mode, mode)

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is None or proc.returncode is not None and proc.stdin.closed:
            return
        try:
            if proc.poll() is None and getattr(self, "writer", None) is not None:
                self.writer.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


class ReplayOracle(Oracle):
    """Answers from a recorded query log, by exact match of the query values (as float32 in [0, 1]).

    A query the log does not hold is a KdError: a replay never makes up answers. A query the recorded
    server's defence refused (a ``--on-rejected flag`` placeholder) is answered as refused, in every mode
    (``derive_answer``); ``replayed_rejected`` counts those rows. Its identity is the recorded oracle's,
    so a log written from a replay names where the answers really came from.
    """

    kind = "replay"
    free_on_failure = True

    def __init__(self, path: str):
        from .data import to_float
        from .h5store import iter_batches, log_info, read_header

        header = read_header(path)
        facts = log_info(path)
        self.path = path
        self.mode = header.mode
        if not self.mode:
            raise KdError(f"replay:{path}: not a query log (it records no response mode)")
        self.num_classes = header.num_classes
        self.input_shape = header.x_shape
        self.fields = list(response_fields(self.mode, self.num_classes or 0))
        self.identity = facts["oracle"] or f"replay:{path}"
        self.index: dict = {}
        parts: dict = {f: [] for f in self.fields}
        row = 0
        for batch in iter_batches(path):
            for k, key in enumerate(row_keys(to_float(batch["x"]))):
                self.index.setdefault(key, row + k)  # a query asked twice: the first answer stands
            for f in self.fields:
                parts[f].append(batch[f])
            row += batch["x"].shape[0]
        self.rows = row
        self.answers = {f: torch.cat(v) if v else torch.empty(0) for f, v in parts.items()}
        self.replayed_rejected = 0  # rows answered with a recorded refusal, for the caller's report

    def answer(self, x: torch.Tensor, mode: str) -> dict:
        rows = [self.index.get(k) for k in row_keys(x.detach().float().cpu())]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            raise KdError(f"replay:{self.path}: {len(missing)} of {len(rows)} queries are not in the log (first: row {missing[0]} "
                          f"of the batch); a replay answers only queries recorded exactly ({self.rows} recorded)")
        idx = torch.tensor(rows, dtype=torch.long)
        recorded = {f: v[idx] for f, v in self.answers.items()}
        if idx.numel():
            self.replayed_rejected += int(rejected_rows(recorded).sum())
        return derive_answer(recorded, self.mode, mode)


def row_keys(x: torch.Tensor) -> list:
    """One digest per row of float32 images: the exact-match key of ReplayOracle."""
    flat = x.float().contiguous().reshape(x.shape[0], -1).numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in flat]


def safe_spec(spec: str) -> str:
    """An oracle spec fit for logs and messages: URLs lose credentials and query strings."""
    if spec.startswith(("http://", "https://")):
        p = urllib.parse.urlsplit(spec)
        host = p.hostname or ""
        netloc = f"{host}:{p.port}" if p.port else host
        return f"{p.scheme}://{netloc}{p.path}"
    return spec


def open_oracle(spec: str, device: torch.device, trust_pickle: bool = False, input_shape=None, num_classes=None,
                remote: Optional[RemoteOptions] = None) -> Oracle:
    """Open an oracle from its spec: a model file, ensemble:F1,F2,..., http(s)://, exec:CMD or replay:LOG.h5
    (module docstring)."""
    def fmt(shape) -> str:
        return "x".join(map(str, shape))

    def agree(orc, where: str):
        # an --input-shape the oracle does not take is a mistake to name, not a flag to ignore
        if input_shape is not None and tuple(input_shape) != tuple(orc.input_shape):
            close = getattr(orc, "close", None)
            if callable(close):
                close()
            raise KdUsageError(f"--input-shape {fmt(input_shape)}: {where} takes {fmt(orc.input_shape)}")
        return orc

    if spec.startswith(("http://", "https://")):
        return agree(HttpOracle(spec, remote), "the server")
    if spec.startswith("exec:"):
        return ExecOracle(spec[len("exec:"):], input_shape, remote)
    if spec.startswith("replay:"):
        return agree(ReplayOracle(spec[len("replay:"):]), "the replayed log")
    loaded = load_classifier(spec, trust_pickle=trust_pickle, input_shape=input_shape, num_classes=num_classes)
    if loaded.input_shape is None:
        raise KdUsageError(f"{spec}: a {loaded.source} model does not record its input shape; pass --input-shape CxHxW")
    agree(loaded, f"{spec} (the shape its file records)")
    try:
        return ModelOracle(loaded, device)
    except KdError as e:
        raise KdError(f"{spec}: {e}") from None


@dataclass
class QueryStats:
    answered: int = 0  # rows answered in this run (replayed ones included)
    paid: int = 0  # oracle calls made in this run
    replayed: int = 0  # rows answered from the log without a call
    spent_total: int = 0  # the log's spent counter at the end
    budget: Optional[int] = None
    status: str = "complete"
    seconds: float = 0.0


class BudgetedOracle:
    """An oracle behind a hard budget, logging every call: what attacks (TandemGAN, DFME, IDEAL, AEDM) use.

    ``query(x, mode)`` takes float images in [0, 1]. Every row counts against the budget, gradient-
    estimation probes included. The count is reserved in the log (persisted) *before* the oracle is
    called, and the answers are appended to the log before they are returned, so a crash can waste
    queries but never overspend or lose a paid answer (the rows a local model or a replayed log failed to answer
    cost nothing and are given back). When fewer rows remain than asked for, the
    rows that fit are answered and logged, then BudgetExhausted is raised (its ``partial`` attribute
    holds those answers). An oracle error carrying ``partial`` answers (a remote oracle that failed
    part-way, a query defence) has those rows logged before it propagates.
    """

    def __init__(self, oracle: Oracle, mode: str, budget: Optional[int] = None, log=None, store_uint8: bool = False):
        self.oracle = oracle
        self.mode = mode
        self.budget = budget
        self.log = log  # a kdtools.h5store.SampleWriter or None
        if budget is None and log is not None:
            self.budget = budget = log.budget  # the budget recorded in the log holds unless a new one is given
        self.store_uint8 = store_uint8
        self.spent = log.spent if log is not None else 0
        if budget is not None and self.spent > budget:
            raise KdError(f"the log already spent {self.spent} queries, more than the budget of {budget}")

    @property
    def remaining(self) -> Optional[int]:
        return None if self.budget is None else max(0, self.budget - self.spent)

    def query(self, x: torch.Tensor, mode: Optional[str] = None) -> dict:
        from .errors import BudgetExhausted

        mode = mode or self.mode
        n = x.shape[0]
        fit = n if self.remaining is None else min(n, self.remaining)
        answers: dict = {}
        if fit:
            xq = x[:fit].detach().float().cpu().clamp(0, 1)
            if self.log is not None:
                self.log.reserve(fit)
            self.spent += fit
            stored = (xq * 255).round().to(torch.uint8) if self.store_uint8 else xq
            try:
                answers = self.oracle.answer(xq, mode)
            except BaseException as e:
                # a remote oracle that failed (or was stopped) part-way hands back what it did answer: paid for, so logged
                partial = getattr(e, "partial", None)
                got = answer_rows(partial) if partial else 0
                if partial and self.log is not None:
                    self.log.append({"x": stored[:got], **partial})
                if self.oracle.free_on_failure and got < fit:
                    # nothing left this machine (a model file, a replayed log): the rows not answered cost nothing,
                    # so they go back to the budget and a --resume can still ask them (as kd-query does)
                    if self.log is not None:
                        self.log.release(fit - got)
                    self.spent -= fit - got
                raise
            if self.log is not None:
                self.log.append({"x": stored, **answers})
        if fit < n:
            err = BudgetExhausted(f"query budget of {self.budget} reached ({self.spent} spent); "
                                  f"{counted(n - fit, 'query', 'queries')} of the last batch unanswered")
            err.partial = answers
            raise err
        return answers
