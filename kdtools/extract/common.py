"""What every data-free attack shares: the output directory, the answer pool, checkpoints and resume.

Output directory of ``kd-gen-queries <method> -o DIR``:

  DIR/substitute.safetensors                   the substitute (a kdtools weights file; final when the run ends)
  DIR/generator.safetensors                    the generator (where the method has one; see genweights.py)
  DIR/queries.h5                               the query log, unless --log names another file
  DIR/checkpoints/substitute-<spent>.safetensors   periodic substitutes; metadata queries_spent + method,
                                               so ``kd-eval curve`` can draw accuracy against queries
  DIR/state.pt                                 resume state (torch.save of tensors/plain values, written
                                               atomically, read back with weights_only=True)

Accounting. Every oracle call goes through ``BudgetedOracle.query``, which reserves the count in the log
before calling and appends the answers after; the log is the source of truth for what was spent. The
attack keeps every paid answer in memory (``AnswerPool``, mirroring the log row for row), so:
  * on ``--resume`` the pool is rebuilt from the log: answers paid after the last saved state are reused
    for training, never asked again;
  * the substitute can be trained again and again on everything paid for (replay) without new queries.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..errors import BudgetExhausted, KdError, KdUsageError
from ..fileio import atomic_path
from ..h5store import SampleWriter
from ..models import ImageClassifier
from ..oracle import BudgetedOracle, Oracle, response_fields
from ..queries import random_affine
from ..progress import ProgressCallback, ProgressEvent, no_progress
from ..stream import StreamHeader
from ..weights import save_model
from .generators import build_generator
from .genweights import save_generator

STATE_SCHEMA = 1


@dataclass
class AttackOptions:
    """Options every attack takes (the method-specific ones live in each method's config)."""

    method: str
    mode: str  # label | probs
    budget: int
    substitute: str = "lenet5"
    batch_size: int = 256
    seed: int = 0
    checkpoint_every: Optional[int] = None  # queries between checkpoints; None: a tenth of the budget
    state_every: float = 60.0  # seconds between resume-state saves (0: after every iteration)
    final_epochs: int = 0  # epochs over every paid answer after the budget is spent (no queries)
    final_lr: float = 0.01
    final_optimizer: str = "sgd"  # sgd (momentum 0.9, cosine) | adam | rmsprop
    augment: bool = False  # kdtools: random shift/rotation/scale of replayed pool images (not of queries)
    pixel_mean: Optional[float] = None  # generator output mapping (see generators.PixelOutput)
    pixel_std: Optional[float] = None
    substitute_args: dict = field(default_factory=dict)  # the substitute architecture's arguments, e.g. {"width": 2}


@dataclass
class AttackResult:
    method: str
    mode: str
    budget: int
    spent: int  # oracle calls recorded in the log, probes included
    rows: int  # answers held in the log
    paid_this_run: int
    reused_rows: int  # answers from the log reused on --resume (paid earlier, not asked again)
    iterations: int
    # "budget_spent" | "already_finished" (a --resume of a finished attack) | "stopped" (stop_requested, between two
    # iterations) | "stopped_in_final_epochs" (stop_requested, between two final epochs; the state is from before them)
    status: str
    seconds: float
    final_loss: float = float("nan")
    accuracy: Optional[float] = None  # on --eval-data, measured in this run (None without --eval-data)
    history: list = field(default_factory=list)  # [{"spent", "loss", "accuracy"?}]
    learned_late: int = 0  # paid answers the substitute learned from only after their iteration (see Attack.catch_up)


class AttackRun:
    """The output directory layout and its files."""

    def __init__(self, out_dir, log_path=None):
        self.dir = Path(out_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise KdUsageError(f"-o {self.dir}: exists and is not a directory (an attack writes a directory)")
        self.substitute_path = self.dir / "substitute.safetensors"
        self.generator_path = self.dir / "generator.safetensors"
        self.checkpoint_dir = self.dir / "checkpoints"
        self.state_path = self.dir / "state.pt"
        self.log_path = Path(log_path) if log_path else self.dir / "queries.h5"

    def checkpoint_path(self, spent: int) -> Path:
        return self.checkpoint_dir / f"substitute-{spent}.safetensors"

    def prepare(self, resume: bool) -> None:
        """Refuse to overwrite an earlier attack unless asked to continue it, and to "continue" one that is not there."""
        if resume and not self.state_path.exists() and not self.log_path.exists():
            # a mistyped -o with --resume would otherwise start a new attack and pay its whole budget again
            raise KdError(f"--resume: no earlier attack in {self.dir} (neither {self.state_path.name} nor {self.log_path} "
                          "exists); check -o/--log, or drop --resume to start a new attack")
        if not resume:
            if self.log_path.exists() and not self.state_path.exists() and _nothing_paid(self.log_path):
                # an attack stopped before its first query (Ctrl-C, SIGTERM during setup) left an empty log:
                # it holds nothing, and keeping it would send the rerun to --resume
                self.log_path.unlink()
            leftovers = [p for p in (self.state_path, self.log_path, self.substitute_path) if p.exists() and p.stat().st_size > 0]
            if leftovers:
                raise KdError(f"{leftovers[0]}: exists from an earlier attack; pass --resume to continue it, or use a new -o/--log")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(exist_ok=True)

    def discard_unstarted(self, dir_existed: bool) -> None:
        """Remove what ``prepare`` and a new, empty log created for an attack that stopped before it began."""
        self.log_path.unlink(missing_ok=True)
        for d in (self.checkpoint_dir, *(() if dir_existed else (self.dir,))):
            try:
                d.rmdir()  # only if empty
            except OSError:
                pass

    def save_state(self, state: dict) -> None:
        with atomic_path(self.state_path) as tmp:
            torch.save(state, tmp)

    def load_state(self) -> Optional[dict]:
        if not self.state_path.is_file():
            return None
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged or foreign file: say so in one line
            raise KdError(f"{self.state_path}: unreadable resume state ({str(e).splitlines()[0][:200]})") from None
        if not isinstance(state, dict) or state.get("schema") != STATE_SCHEMA:
            raise KdError(f"{self.state_path}: not a kdtools attack state (schema {STATE_SCHEMA})")
        return state


def _flag_value(value) -> str:
    """A setting as it is written on the command line, for messages (booleans as on/off: they are switches;
    an unset one, None, as "unset")."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else str(value)


def _substitute_flags(spec: dict) -> str:
    """The command-line flags that make a substitute, for messages: --substitute lenet5 --substitute-args '{...}'."""
    flags = f"--substitute {spec['arch']}"
    if spec.get("arch_args"):
        flags += f" --substitute-args '{json.dumps(spec['arch_args'])}'"
    return flags


def _nothing_paid(log_path: Path) -> bool:
    """True for a kdtools log that spent no query (a damaged or foreign file is not touched: False)."""
    from ..h5store import log_info

    try:
        return log_info(log_path)["spent"] == 0
    except Exception:
        return False


def open_attack_log(path, oracle: Oracle, mode: str, budget: int, x_dtype: str, options: dict) -> SampleWriter:
    """The query log of an attack (created, or continued when it exists)."""
    fields = {"x": {"dtype": x_dtype, "shape": list(oracle.input_shape)}, **response_fields(mode, oracle.num_classes)}
    header = StreamHeader("samples", fields, oracle.num_classes, (0.0, 1.0), mode,
                          {"oracle": oracle.identity, "oracle_kind": oracle.kind, "method": options.get("method"),
                           "options": options, "kdtools": __version__})
    return SampleWriter(path, header, oracle=oracle.identity, budget=budget, oracle_aliases=oracle.aliases)


class AnswerPool:
    """Every answer paid for, in memory, row for row as in the log: x as uint8 (8-bit images are plenty to
    train on), and the label or the probability vector."""

    def __init__(self, mode: str, input_shape, num_classes: int, capacity: int = 1024):
        self.mode = mode
        self.num_classes = num_classes
        self.x = torch.empty(capacity, *input_shape, dtype=torch.uint8)
        self.y = torch.empty(capacity, dtype=torch.int64) if mode == "label" else torch.empty(capacity, num_classes)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def add(self, x: torch.Tensor, answer: dict) -> None:
        m = x.shape[0]
        if m == 0:
            return
        if self.n + m > self.x.shape[0]:  # grow geometrically
            cap = max(self.n + m, 2 * self.x.shape[0])
            self.x = torch.cat([self.x[:self.n], torch.empty(cap - self.n, *self.x.shape[1:], dtype=torch.uint8)])
            self.y = torch.cat([self.y[:self.n], torch.empty(cap - self.n, *self.y.shape[1:], dtype=self.y.dtype)])
        if x.dtype == torch.uint8:  # already quantised (rows read back from a query log on --resume)
            self.x[self.n:self.n + m] = x.cpu()
        else:
            self.x[self.n:self.n + m] = (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        self.y[self.n:self.n + m] = answer["label"] if self.mode == "label" else answer["probs"]
        self.n += m

    def add_from_log(self, log: SampleWriter, chunk: int = 4096) -> int:
        rows = log.rows
        for i in range(0, rows, chunk):
            batch = log.read_rows(i, min(rows, i + chunk))
            x = batch["x"]
            self.add(x if x.dtype == torch.uint8 else x.float(), batch)
        return rows

    augment = False  # set by the attack: replayed images get a random affine transform

    def _images(self, idx):
        x = self.x[idx].float().div_(255)
        if self.augment:
            # small random rotation/scale/shift: the answer of the original stays a good target for it
            x = random_affine(x, torch.default_generator, degrees=10.0, translate=0.08).clamp_(0, 1)
        return x

    def sample(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.n, (n,))
        return self._images(idx).to(device), self.y[idx].to(device)

    def batches(self, batch_size: int, device):
        """One shuffled pass over the pool."""
        order = torch.randperm(self.n)
        for i in range(0, self.n, batch_size):
            idx = order[i:i + batch_size]
            yield self._images(idx).to(device), self.y[idx].to(device)


def substitute_loss(logits: torch.Tensor, target: torch.Tensor, mode: str, kind: str = "l1") -> torch.Tensor:
    """Loss of the substitute against the oracle's answers.

    label: cross-entropy. probs: ``l1`` = ||T(x) - S(x)||_1 on probabilities (TandemGAN, Eq. 3.1);
    ``l1-logit`` = L1 between mean-centred log-probabilities (DFME); ``kl`` = KL(T || S).
    """
    if mode == "label" or target.dtype == torch.int64:
        return F.cross_entropy(logits, target)
    if kind == "l1":
        return (torch.softmax(logits, 1) - target).abs().sum(1).mean()
    if kind == "l1-logit":
        s = torch.log_softmax(logits, 1)
        t = torch.log(target.clamp_min(1e-8))
        return ((s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))).abs().mean()
    if kind == "kl":
        return F.kl_div(torch.log_softmax(logits, 1), target.clamp_min(1e-8).log(), log_target=True, reduction="batchmean")
    raise KdUsageError(f"--s-loss {kind!r}: expected l1, l1-logit or kl")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 1024) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        xb = xb.float().div(255) if xb.dtype == torch.uint8 else xb.float()
        correct += (model(xb.to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    model.train(was)
    return correct / max(1, x.shape[0])


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The substitute's optimiser by name. RMSprop's first steps are ~10x lr per weight (its running
    average starts at zero): fine for VGG with batch norm (the papers), fatal to a small net without it."""
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise KdUsageError(f"--s-optimizer {name!r}: expected rmsprop, sgd or adam")


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round images to the 8-bit grid, so that the uint8 log holds exactly what was asked."""
    return (x.detach().clamp(0, 1) * 255).round() / 255


class Attack:
    """Base of TandemGAN, DFME and IDEAL: the loop, the budget, the pool, checkpoints and resume.

    A method implements ``setup()`` (build generator(s) and optimisers), ``iteration()`` (one round/epoch;
    it asks the oracle only through ``self.ask``), ``state()``/``load(state)`` for its own modules and
    ``generator()`` (the module to save, or None).
    """

    method = "attack"
    generator_arch: Optional[str] = None
    log_dtype = "float32"  # probes of gradient estimation need full precision in the record

    def __init__(self, oracle: Oracle, options: AttackOptions, config, run: AttackRun, device: torch.device,
                 eval_set: Optional[tuple] = None, progress: ProgressCallback = no_progress, resume: bool = False,
                 substitute: Optional[ImageClassifier] = None):
        if options.mode not in ("label", "probs"):
            raise KdUsageError(f"--mode {options.mode}: data-free attacks take label or probs")
        if options.budget <= 0:
            raise KdUsageError("--budget must be a positive number of queries")
        if oracle.input_shape is None or oracle.num_classes is None:
            raise KdUsageError("the oracle does not say its input shape and class count")
        self.options, self.config, self.run, self.device = options, config, run, device
        self.eval_set, self.progress, self.resume = eval_set, progress, resume
        self.input_shape = tuple(oracle.input_shape)
        self.num_classes = int(oracle.num_classes)
        self.resolved = {"kdtools": __version__, **asdict(options), **asdict(config)}
        dir_existed, log_existed = run.dir.exists(), run.log_path.exists()
        run.prepare(resume)
        torch.manual_seed(options.seed)
        self.log = open_attack_log(run.log_path, oracle, options.mode, options.budget, self.log_dtype, self.resolved)
        try:
            if self.log.header.extra.get("method") not in (None, self.method):
                raise KdError(f"{run.log_path}: the log was written by {self.log.header.extra.get('method')}, not {self.method}; use a new log")
            if log_existed:
                self._refuse_other_settings(self.log.header.extra.get("options"))
            self.oracle = BudgetedOracle(oracle, options.mode, options.budget, self.log, store_uint8=self.log_dtype == "uint8")
            self.substitute = (substitute or ImageClassifier(options.substitute, self.input_shape, self.num_classes, options.substitute_args)).to(device)
            self.pool = AnswerPool(options.mode, self.input_shape, self.num_classes)
            self.pool.augment = options.augment
            self.iterations = 0
            self.history: list[dict] = []
            self.last_loss = float("nan")
            self.paid_this_run = 0
            self.reused_rows = 0
            self.learned_rows = 0  # the substitute has learned from pool rows [0, learned_rows)
            self.learned_late = 0
            self.measured_accuracy: Optional[float] = None  # the latest accuracy on eval_set, in this run
            self.pending_at_resume = 0
            self.finished_before = False
            self.setup()
            self._restore()
        except BaseException:
            # refused while being set up (nothing is asked before __init__ returns): the log keeps its budget too
            self.log.restore_budget()
            self.log.close()
            if not log_existed and self.log.spent == 0:
                # refused before a query was paid (e.g. a prior that does not fit the victim): leave no empty
                # log behind, or the corrected command would be told to --resume an attack that never ran
                run.discard_unstarted(dir_existed)
            raise
        every = options.checkpoint_every or max(1, options.budget // 10)
        self.checkpoint_every = every
        self.next_checkpoint = (self.oracle.spent // every + 1) * every
        self.last_state_save = time.monotonic()

    # settings that shape the queries an attack asks and the substitute it trains: a resume with other values
    # would make one log of two attacks (the budget, checkpoints, evaluation, final epochs, device and oracle
    # connection may change between resumes)
    SHAPING_OPTIONS = ("batch_size", "augment", "pixel_mean", "pixel_std")
    # config fields not compared: recorded paths (the same prior or start weights may be given by another
    # path) and counts derived from the budget (AEDM's torchrun rounds), which a resume may extend
    UNCOMPARED_SETTINGS = ("prior", "substitute_init", "rounds")
    # compared only when the log records them (logs from before kdtools recorded them ran with other values)
    COMPARED_WHEN_RECORDED = ("ranks",)
    FLAG_NAMES = {"ranks": "torchrun --nproc_per_node"}  # settings that are not a flag of the command

    def _refuse_other_settings(self, recorded) -> None:
        """On a continued log: refuse settings that differ from those the log was started with, before anything
        is asked. A setting the recording lacks (added to kdtools later) counts as its default, which is what ran.
        The substitute is compared here too, not only against the resume state: a run killed before its first
        state save has only the log."""
        if not isinstance(recorded, dict):
            return  # a log from before options were recorded: nothing to compare

        def defaults_of(obj) -> dict:
            out = {}
            for f in fields(obj):
                if f.default is not MISSING:
                    out[f.name] = f.default
                elif f.default_factory is not MISSING:
                    out[f.name] = f.default_factory()
            return out

        def plain(value):  # as the log's header stores it (JSON, anything else as text)
            return json.loads(json.dumps(value, default=str))

        defaults = {**defaults_of(self.options), **defaults_of(self.config)}
        differ = []
        was = {k: recorded.get(k, defaults.get(k)) for k in ("substitute", "substitute_args", "substitute_init")}
        now_init = getattr(self.config, "substitute_init", "")
        if (plain(was["substitute"]) != plain(self.options.substitute)
                or plain(was["substitute_args"] or {}) != plain(self.options.substitute_args or {})
                or bool(was["substitute_init"]) != bool(now_init)):  # AEDM: started from a weights file, or fresh
            saved_spec = {"arch": was["substitute_init"] or was["substitute"],
                          "arch_args": {} if was["substitute_init"] else was["substitute_args"] or {}}
            now_spec = {"arch": now_init or self.options.substitute, "arch_args": {} if now_init else self.options.substitute_args or {}}
            differ.append(f"{_substitute_flags(saved_spec)} (now {_substitute_flags(now_spec)})")
        now = {**{k: getattr(self.options, k) for k in self.SHAPING_OPTIONS}, **asdict(self.config)}
        for key, value in now.items():
            if key in self.UNCOMPARED_SETTINGS or (key in self.COMPARED_WHEN_RECORDED and key not in recorded):
                continue
            before = recorded.get(key, defaults.get(key, value))
            if plain(before) != plain(value):
                flag = self.FLAG_NAMES.get(key, f"--{key.replace('_', '-')}")
                differ.append(f"{flag} {_flag_value(before)} (now {_flag_value(value)})")
        if differ:
            raise KdError(f"{self.run.log_path}: this attack was started with {', '.join(differ)}; resume it with the "
                          "settings it was started with, or use a new -o/--log for the new settings")

    # --- to be provided by each method -------------------------------------------------------------
    def setup(self) -> None:
        raise NotImplementedError

    def iteration(self) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass

    def generator(self) -> Optional[nn.Module]:
        return None

    def progress_extra(self) -> dict:
        """What a method adds to each progress report (e.g. AEDM: the steered queries' entropy)."""
        return {}

    def generator_z(self) -> int:
        return 0

    def new_generator(self, z_dim: int) -> nn.Module:
        return build_generator(self.generator_arch, self.input_shape, z_dim, self.options.pixel_mean,
                               self.options.pixel_std).to(self.device)

    # --- the oracle ---------------------------------------------------------------------------------
    def ask(self, x: torch.Tensor) -> dict:
        """Query the oracle (budgeted, logged) and keep the answers in the pool; the pool mirrors the log."""
        x = x.detach()
        try:
            answer = self.oracle.query(x)
        except BudgetExhausted as e:
            partial = getattr(e, "partial", {}) or {}
            if partial:
                m = next(iter(partial.values())).shape[0]
                self.pool.add(x[:m].cpu(), partial)
                self.paid_this_run += m
            raise
        self.pool.add(x.cpu(), answer)
        self.paid_this_run += x.shape[0]
        return {k: v.to(self.device) for k, v in answer.items()}

    @staticmethod
    def target_of(answer: dict) -> torch.Tensor:
        return answer["label"] if "label" in answer else answer["probs"]

    # --- the loop -----------------------------------------------------------------------------------
    def run_attack(self, stop_requested: Optional[Callable[[], bool]] = None) -> AttackResult:
        """Run until the budget is spent. ``stop_requested`` (a caller that defers Ctrl-C and SIGTERM, e.g. the CLI's
        StopsAtBoundaries) is polled between two iterations: when it says stop, the state is saved right there and
        the result's status is "stopped". A state saved between iterations holds everything the next one needs
        (learned_rows == rows), so a --resume from it continues query for query as the uninterrupted run. It is
        polled between the final epochs too (--final-epochs): a stop there keeps the state saved before them, and
        the resume trains them all again."""
        t0 = time.perf_counter()
        status = "budget_spent"
        ran = False
        # answers of the log that the saved substitute never learned from (paid after its last state): first
        caught_up = self.catch_up()
        stop = stop_requested or (lambda: False)
        while self.oracle.remaining > 0:
            if stop():
                try:
                    self._save_state()
                finally:
                    self.log.close()
                return self._stopped(t0)
            ran = True
            try:
                self.iteration()
            except BudgetExhausted:
                break  # the budget ran out inside the iteration; what was answered is in the pool
            self.iterations += 1
            self.learned_rows = self.pool.n
            self._after_iteration()
        # answers paid by an iteration the budget cut short: every paid answer reaches the substitute
        caught_up += self.catch_up()
        if not ran and self.finished_before and not caught_up:
            status = "already_finished"  # a rerun of a finished attack changes nothing
        try:
            if status != "already_finished":
                if self.options.final_epochs > 0 and len(self.pool):
                    # the state before the final epochs: a stop inside them resumes from here and trains them again
                    # (the substitute they leave half-trained is not saved)
                    self._save_state()
                    if stop():
                        return self._stopped(t0)
                    if not self.final_training(stop):
                        return self._stopped(t0, "stopped_in_final_epochs")
                self._checkpoint(final=True, changed=bool(caught_up))
                self.save_outputs()
                self._save_state(finished=True)
        finally:
            self.log.close()
        acc = self.measured_accuracy  # never a figure from an earlier run (or on another --eval-data)
        return AttackResult(self.method, self.options.mode, self.options.budget, self.log_spent, self.pool.n,
                            self.paid_this_run, self.reused_rows, self.iterations, status, time.perf_counter() - t0,
                            self.last_loss, acc, self.history, learned_late=self.learned_late)

    def _stopped(self, t0: float, status: str = "stopped") -> AttackResult:
        """The result of a run that stop_requested ended (its state already saved; the log is closed by the caller)."""
        return AttackResult(self.method, self.options.mode, self.options.budget, self.log_spent, self.pool.n,
                            self.paid_this_run, self.reused_rows, self.iterations, status, time.perf_counter() - t0,
                            self.last_loss, self.measured_accuracy, self.history, learned_late=self.learned_late)

    # --- answers not yet learned from -----------------------------------------------------------------
    def substitute_optimizer(self):
        """The optimiser of the substitute's online steps (each method keeps it as ``opt_s``)."""
        return getattr(self, "opt_s", None)

    def learn_rows(self, idx: torch.Tensor) -> float:
        """One substitute step on pool rows ``idx`` (answers it has not learned from yet); AEDM overrides it."""
        opt = self.substitute_optimizer()
        if opt is None:  # pragma: no cover - every method has one
            opt = make_optimizer("adam", self.substitute.parameters(), 1e-3)
            self.opt_s = opt
        x = self.pool.x[idx].float().div(255).to(self.device)
        return self.train_substitute_on(x, self.pool.y[idx].to(self.device), opt, getattr(self.config, "s_loss", "l1"))

    def catch_up(self) -> int:
        """Substitute steps, in batches of --batch-size, on the paid answers it has not learned from: rows paid
        by an iteration that the budget cut short, and on --resume rows of the log paid after the saved state.
        Returns how many rows it learned from (no query is made)."""
        start, end = self.learned_rows, self.pool.n
        if end <= start:
            return 0
        bs = self.catch_up_batch()
        for i in range(start, end, bs):
            self.last_loss = self.learn_rows(torch.arange(i, min(end, i + bs)))
            self.after_catch_up_batch(min(end, i + bs) - i)
            self.progress(ProgressEvent("learning unlearned answers", min(end, i + bs) - start, end - start,
                                        {"loss": self.last_loss}))
        self.learned_rows = end
        self.learned_late += end - start
        return end - start

    def catch_up_batch(self) -> int:
        return self.options.batch_size

    def after_catch_up_batch(self, rows: int) -> None:
        """Called after each catch-up batch (AEDM counts it as a round)."""

    @property
    def log_spent(self) -> int:
        return self.oracle.spent

    def _after_iteration(self) -> None:
        spent = self.oracle.spent
        info = {"spent": spent, "loss": self.last_loss, **self.progress_extra()}
        if self.measured_accuracy is not None:
            info["acc"] = self.measured_accuracy
        self.progress(ProgressEvent(self.method, spent, self.options.budget, info))
        if spent >= self.next_checkpoint:
            self._checkpoint()
            self.next_checkpoint = (spent // self.checkpoint_every + 1) * self.checkpoint_every
            self._save_state()
        elif time.monotonic() - self.last_state_save >= self.options.state_every:
            self._save_state()

    def train_substitute_on(self, x: torch.Tensor, target: torch.Tensor, optimizer, kind: str,
                            model: Optional[nn.Module] = None) -> float:
        """One optimiser step of the substitute (or of ``model``, e.g. a federated client's copy)."""
        if model is None:
            # a step of the substitute itself covers every row paid so far: the rows of its own batch, and the
            # probes asked before it, which the method chose not to learn from. An iteration the budget cuts short
            # then leaves only the rows paid after its last step for catch_up (none learned twice)
            self.learned_rows = max(self.learned_rows, self.pool.n)
        model = self.substitute if model is None else model
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = substitute_loss(model(x), target, self.options.mode, kind)
        loss.backward()
        optimizer.step()
        return loss.item()

    def final_training(self, stop_requested: Callable[[], bool] = lambda: False) -> bool:
        """Epochs over every paid answer after the budget is spent (no queries), cosine-decayed learning rate.
        Returns False when ``stop_requested`` ended it between two epochs (True when all were trained)."""
        opts = self.options
        opt = make_optimizer(opts.final_optimizer, self.substitute.parameters(), opts.final_lr)
        steps = opts.final_epochs * math.ceil(self.pool.n / opts.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        kind = getattr(self.config, "s_loss", "kl")
        for epoch in range(opts.final_epochs):
            total, count = 0.0, 0
            for x, y in self.pool.batches(opts.batch_size, self.device):
                total += self.train_substitute_on(x, y, opt, "kl" if kind == "l1" else kind) * x.shape[0]
                count += x.shape[0]
                sched.step()
            self.last_loss = total / max(1, count)
            self.progress(ProgressEvent("final training", epoch + 1, opts.final_epochs, {"loss": self.last_loss}))
            if epoch + 1 < opts.final_epochs and stop_requested():
                return False
        return True

    def evaluate(self) -> Optional[float]:
        if self.eval_set is None:
            return None
        return accuracy(self.substitute, self.eval_set[0], self.eval_set[1], self.device)

    def _checkpoint(self, final: bool = False, changed: bool = False) -> None:
        spent = self.oracle.spent
        if (final and not changed and self.options.final_epochs == 0 and self.history and self.history[-1]["spent"] == spent
                and self.run.checkpoint_path(spent).is_file()):
            return  # the last iteration's checkpoint is this very substitute: neither save nor report it twice
        record = {"spent": spent, "loss": self.last_loss, "iterations": self.iterations}
        acc = self.evaluate()
        if acc is not None:
            record["accuracy"] = acc
            self.measured_accuracy = acc
        if not self.history or self.history[-1]["spent"] != spent:
            self.history.append(record)
        elif final:
            self.history[-1] = record
        extra = {"queries_spent": spent, "method": self.method, "mode": self.options.mode, "iterations": self.iterations}
        if acc is not None:
            extra["eval_accuracy"] = acc
        if final:
            extra["final_epochs"] = self.options.final_epochs
        save_model(self.substitute, self.run.checkpoint_path(spent), self.resolved, extra)
        self.progress(ProgressEvent("checkpoint", spent, self.options.budget, {"spent": spent, "loss": self.last_loss,
                                                                               **({"acc": acc} if acc is not None else {})}))

    def save_outputs(self) -> None:
        spent = self.oracle.spent
        extra = {"queries_spent": spent, "method": self.method, "mode": self.options.mode, "iterations": self.iterations,
                 "answers_learned": self.learned_rows}
        if self.measured_accuracy is not None:
            extra["eval_accuracy"] = self.measured_accuracy
        save_model(self.substitute, self.run.substitute_path, self.resolved, extra)
        gen = self.generator()
        if gen is not None:
            save_generator(gen, self.run.generator_path, self.generator_arch, self.input_shape, self.generator_z(),
                           self.resolved, extra, self.options.pixel_mean, self.options.pixel_std)

    # --- resume -------------------------------------------------------------------------------------
    def _save_state(self, finished: bool = False) -> None:
        state = {
            "schema": STATE_SCHEMA, "method": self.method, "kdtools": __version__, "finished": finished,
            "iterations": self.iterations, "spent": self.oracle.spent, "rows": self.pool.n,
            "learned_rows": self.learned_rows,
            "substitute": self.substitute.state_dict(), "substitute_spec": self._substitute_spec(), "rng": torch.get_rng_state(),
            # the methods draw their noise on the device: on a GPU that is the CUDA generator, which torch.manual_seed
            # resets on resume (without it a resumed run would draw the noise of its first iterations again)
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "history": self.history, "last_loss": float(self.last_loss), "method_state": self.state(),
        }
        self.run.save_state(state)
        self.last_state_save = time.monotonic()

    def _substitute_spec(self) -> dict:
        arch = getattr(self.substitute, "arch", type(self.substitute).__name__)
        return {"arch": arch, "arch_args": dict(getattr(self.substitute, "arch_args", {}) or {})}

    def _restore(self) -> None:
        """On --resume: the latest saved state, and every answer of the log back in the pool."""
        if not self.resume:
            return
        state = self.run.load_state()
        if state is not None:
            if state.get("method") != self.method:
                raise KdError(f"{self.run.state_path}: state of a {state.get('method')} attack, not {self.method}")
            saved, now = state.get("substitute_spec"), self._substitute_spec()
            if saved is not None and saved != now:
                raise KdError(f"{self.run.state_path}: this attack was started with {_substitute_flags(saved)}, not "
                              f"{_substitute_flags(now)}; resume it with the substitute it was started with")
            try:
                self.substitute.load_state_dict(state["substitute"])
                self.load(state["method_state"])
            except RuntimeError as e:  # a state from before substitute_spec was recorded, or other settings
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise KdError(f"{self.run.state_path}: the saved attack does not fit this command's --substitute or "
                              f"generator settings ({first}); resume with the settings it was started with") from None
            self.iterations = int(state["iterations"])
            self.history = list(state["history"])
            self.last_loss = float(state["last_loss"])
            torch.set_rng_state(state["rng"])
            if state.get("cuda_rng") is not None and self.device.type == "cuda":  # (a state saved on the CPU has none)
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            self.finished_before = bool(state.get("finished"))
        # the log, not the state, says what was paid: rows logged after the last state are reused too, and
        # since the saved substitute never learned from them, run_attack trains on them first (catch_up)
        self.reused_rows = self.pool.add_from_log(self.log)
        self.learned_rows = min(self.reused_rows, int(state.get("learned_rows", state.get("rows", 0)))) if state else 0
        self.pending_at_resume = self.reused_rows - self.learned_rows


@torch.no_grad()
def forward_difference(attack: Attack, x: torch.Tensor, loss_of, directions: int = 1, eps: float = 1e-3):
    """Estimate dL/dx of a black-box per-sample loss by forward differences (TandemGAN Sec. 3.3.2, DFME).

    grad ~ 1/M sum_j (L(x + eps u_j) - L(x)) / eps * u_j, u_j random unit directions. Costs B x (M + 1)
    oracle calls: the batch and its M probes go to the oracle together (all are logged, all are paid).
    ``loss_of(x, answer) -> (B,)`` evaluates the loss given the oracle's answers on x.
    Returns (gradient of the batch-mean loss with respect to x, mean loss at x).
    """
    b = x.shape[0]
    d = x[0].numel()
    u = torch.randn(b, directions, d, device=x.device)
    u = u / u.norm(dim=2, keepdim=True)
    probes = (x.reshape(b, 1, d) + eps * u).clamp(0, 1)
    # where clamping moved a probe, the direction actually taken is (probe - x) / eps
    u = (probes - x.reshape(b, 1, d)) / eps
    probes = probes.reshape(b * directions, *x.shape[1:])
    answer = attack.ask(torch.cat([x, probes]))
    loss_x = loss_of(x, {k: v[:b] for k, v in answer.items()})
    loss_p = loss_of(probes, {k: v[b:] for k, v in answer.items()}).view(b, directions)
    grad = ((loss_p - loss_x[:, None]) / eps).unsqueeze(2) * u  # (B, M, d)
    grad = grad.mean(1) / b  # the objective is the batch mean
    return grad.view_as(x), loss_x.mean().item()
