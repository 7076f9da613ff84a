"""AEDM (chapter 4 of the dissertation): queries steered through a diffusion prior, alone or federated.

Algorithm 4.1, one round:
  1. x_hat ~ N(0, I) in the prior's sample space;
  2. n_d steps of Adam (lr mu_d = 0.01) on x_hat that minimise the *negative* entropy
     sum_j p_j log p_j of the substitute's softmax on D(x_hat), where D is a few-step deterministic
     sampler (DDIM, eta = 0) of the prior and the gradient flows back through every network call;
  3. the steered images D(x*) go to the oracle, one query each, and the substitute takes a step on
     the L1 distance between the oracle's and its own probabilities (eq. 4.2).
The authors' code: 8 sampler steps, 5 steering steps, substitute RMSprop 1e-4 in eval mode while
steering, then 100 epochs on the saved query log with augmentation (``kd-distill q.h5 --augment``).

Algorithm 4.2 (federated): K clients each run the round above against their own copy of the
substitute and their own share of the budget; the server averages the K substitutes (parameters and
batch-norm buffers) after every round and sends the average back. ``FederatedAverage`` does this in
one process (``--clients K``) and ``DistributedAverage`` across ``torchrun`` ranks (one per client).

The prior may differ from the victim's input in size or channels: images are resized (bilinear,
differentiable) and grey <-> RGB converted; other channel counts are refused (``QuerySteerer``).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import KdError, KdUsageError
from .common import Attack, make_optimizer, quantize


@dataclass
class AEDMConfig:
    prior: str = ""  # the diffusion prior's directory (recorded; the loaded prior is passed in)
    sampler_steps: int = 8  # deterministic DDIM steps of D (authors' code: 8)
    steer_steps: int = 5  # n_d
    lr_steer: float = 0.01  # mu_d (Adam on x_hat)
    lr_s: float = 1e-4  # mu_s
    s_optimizer: str = "rmsprop"  # the authors' code; adam/sgd also accepted
    s_loss: str = "l1"  # eq. 4.2; kl also accepted
    replay_steps: int = 0  # kdtools: extra substitute steps on random paid answers per round (no queries)
    clients: int = 1  # Algorithm 4.2: K clients simulated in this process
    rounds: int = 0  # 0: as many as the budget needs; torchrun ranks are all given the same count
    substitute_init: str = ""  # the weights file the substitute started from (recorded), "" for a fresh one
    ranks: int = 1  # torchrun processes, one client each (recorded, so a resume with another count is refused); 1 otherwise


# ----------------------------------------------------------------------------------------------------
# steering


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """sum_j p_j log p_j per row (Algorithm 4.1 line 11): minimising it maximises the entropy."""
    logp = torch.log_softmax(logits, 1)
    return (logp.exp() * logp).sum(1)


def adapt_images(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """[0, 1] images (N, C, H, W) to ``shape`` (C', H', W'), differentiably: bilinear resize, grey -> RGB
    by repetition, RGB -> grey by ITU-R 601 luma. Other channel changes are refused by ``check_adaptable``."""
    c, h, w = (int(v) for v in shape)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif x.shape[1] == 3 and c == 1:
            x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x


def check_adaptable(prior_shape: Sequence[int], target_shape: Sequence[int], where: str = "the prior") -> Optional[str]:
    """None when the shapes agree; a note when images will be resized/converted; KdUsageError when the
    channels cannot be converted."""
    if len(prior_shape) != 3:
        raise KdUsageError(f"{where}: a tabular diffusion model cannot make image queries (samples of shape {tuple(prior_shape)})")
    pc, ph, pw = prior_shape
    c, h, w = target_shape
    if pc != c and not (pc == 1 or (pc == 3 and c == 1)):
        raise KdUsageError(f"{where} makes {pc}-channel images and the victim takes {c} channels: "
                           "kdtools converts only grey <-> RGB; use a prior with matching channels")
    if tuple(prior_shape) == tuple(target_shape):
        return None
    return (f"{where} makes {pc}x{ph}x{pw} images; the victim takes {c}x{h}x{w}: queries are "
            + ("resized (bilinear)" if (ph, pw) != (h, w) else "") + (" and " if (ph, pw) != (h, w) and pc != c else "")
            + ("converted " + ("grey -> RGB" if pc == 1 else "RGB -> grey") if pc != c else ""))


class QuerySteerer:
    """D(x_hat): the prior's few-step DDIM sampler from noise to [0, 1] images of the victim's shape,
    and the steering of x_hat against a substitute (Algorithm 4.1 lines 7-14)."""

    def __init__(self, prior, target_shape: Sequence[int], sampler_steps: int = 8, steer_steps: int = 5,
                 lr: float = 0.01, device: torch.device = torch.device("cpu")):
        from ..diffusion.schedules import make_subsequence

        if sampler_steps < 1 or steer_steps < 0 or lr <= 0:
            raise KdUsageError("--sampler-steps must be >= 1, --steer-steps >= 0 and --lr-steer > 0")
        self.prior = prior
        self.target_shape = tuple(int(v) for v in target_shape)
        self.note = check_adaptable(prior.sample_shape, self.target_shape)
        steps = min(sampler_steps, prior.steps)
        # a uniform sub-chain of the prior's own chain: DDIM step skipping with eta = 0 (deterministic)
        phi = make_subsequence(prior.steps, steps, "uniform")
        self.chain = prior.chain.sub(phi) if steps < prior.steps else prior.chain
        self.steer_steps, self.lr, self.device = steer_steps, lr, device
        self.net = prior.net.to(device).eval()
        for p in self.net.parameters():  # the prior is fixed: only x_hat is optimised
            p.requires_grad_(False)

    @property
    def sampler_steps(self) -> int:
        return len(self.chain)

    def decode(self, x_hat: torch.Tensor, grad: bool = True) -> torch.Tensor:
        """D(x_hat) in [0, 1] at the victim's shape; differentiable with respect to x_hat when ``grad``."""
        from ..diffusion.sampling import sample_chain

        x0 = sample_chain(self.net, self.chain, x_hat, "ddim", 0.0, None, self.prior.clip, self.device, grad=grad).to(self.device)
        return adapt_images((x0.clamp(-1, 1) + 1) / 2, self.target_shape)

    def noise(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.randn((n, *self.prior.sample_shape), generator=generator).to(self.device)

    def steer(self, substitute: nn.Module, n: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict]:
        """n steered queries (detached, [0, 1]) and the substitute's mean entropy before and after."""
        was_training = substitute.training
        substitute.eval()  # the authors' code: batch statistics must not depend on the steered batch
        frozen = [p for p in substitute.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            x_hat = self.noise(n, generator).requires_grad_(True)
            opt = torch.optim.Adam([x_hat], lr=self.lr)
            first = None
            for _ in range(self.steer_steps):
                neg_h = negative_entropy(substitute(self.decode(x_hat)))
                if first is None:
                    first = -neg_h.mean().item()
                opt.zero_grad(set_to_none=True)
                # the sum, not the mean: each x_hat's step does not depend on the batch size
                neg_h.sum().backward()
                opt.step()
            with torch.no_grad():
                x = self.decode(x_hat.detach(), grad=False)
                after = -negative_entropy(substitute(x)).mean().item()
        finally:
            for p in frozen:
                p.requires_grad_(True)
            substitute.train(was_training)
        return x.detach(), {"entropy_before": after if first is None else first, "entropy_after": after}


# ----------------------------------------------------------------------------------------------------
# federated averaging


def average_state(states: Sequence[dict]) -> dict:
    """The mean of K state dicts (eq. 4.4): floating tensors averaged (parameters and batch-norm running
    statistics), integer buffers (num_batches_tracked) taken from the first client."""
    out = {}
    for name, v in states[0].items():
        if v.is_floating_point():
            out[name] = torch.stack([s[name].float() for s in states]).mean(0).to(v.dtype)
        else:
            out[name] = v.clone()
    return out


def client_shares(budget: int, clients: int) -> list[int]:
    """Equal shares of the total budget; the first budget % K clients get one query more."""
    return [budget // clients + (1 if k < budget % clients else 0) for k in range(clients)]


def round_sizes(share: int, rounds: int, batch_size: Optional[int] = None) -> list[int]:
    """A client's share spread over ``rounds`` rounds, so every client runs the same number of rounds (torchrun).
    With ``batch_size``: full batches while they leave at least one query for each later round, the rest in
    the last rounds (round_sizes(80, 3, 32) = [32, 32, 16]); without: as even as possible."""
    if batch_size is None:
        return [share // rounds + (1 if r < share % rounds else 0) for r in range(rounds)]
    sizes, done = [], 0
    for r in range(rounds):
        m = max(0, min(batch_size, share - done - (rounds - r - 1)))
        sizes.append(m)
        done += m
    return sizes


def plan_rounds(budget: int, clients: int, batch_size: int) -> int:
    """Rounds of at most ``batch_size`` queries per client that spend the budget (the last round is smaller)."""
    shares = client_shares(budget, clients)
    rounds = math.ceil(max(shares) / batch_size)
    if min(shares) < rounds:
        need = f"{rounds} {'query' if rounds == 1 else 'queries'}"
        raise KdUsageError(f"--budget {budget} is too small for {clients} clients: every client needs at least {need}"
                           + (f" (one per round; {rounds} rounds of at most --batch-size {batch_size})" if rounds > 1 else ""))
    return rounds


class DistributedAverage:
    """Eq. 4.4 across torch.distributed ranks (one rank = one client): all_reduce of the state."""

    def __init__(self, kept: str = ""):
        import torch.distributed as dist

        self.kept = kept  # where the last average is, for the error message
        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def __call__(self, model: nn.Module) -> None:
        dist = self.dist
        try:
            with torch.no_grad():
                for v in model.state_dict().values():
                    if v.is_floating_point():
                        dist.all_reduce(v, op=dist.ReduceOp.SUM)
                        v.div_(self.world)
                    else:
                        dist.broadcast(v, 0)
        except RuntimeError as e:
            raise KdError(f"federated averaging failed: another client stopped ({str(e).splitlines()[0][:160]}); "
                          "the last averaged substitute is kept" + (f" in {self.kept}" if self.kept else "")) from None


# ----------------------------------------------------------------------------------------------------
# the attack (in-process oracle): single attacker, simulated clients, or one torchrun rank


class AEDM(Attack):
    """Algorithm 4.1 (and 4.2 with ``config.clients > 1`` or a ``sync`` across ranks) under the shared
    attack machinery: hard budget, log, checkpoints, resume. The prior is the method's generator; it is
    fixed and lives in its own directory, so no generator file is written."""

    method = "aedm"
    log_dtype = "uint8"  # no gradient probes: every query is an image on the 8-bit grid

    prior = None  # set before construction (see make_aedm)
    sync: Optional[Callable[[nn.Module], None]] = None  # torchrun: average across ranks after each round
    on_round: Optional[Callable[[int, nn.Module], None]] = None  # after each averaged round (rank 0 saves)

    def setup(self) -> None:
        c, o = self.config, self.options
        if self.prior is None:
            raise KdUsageError("AEDM needs a diffusion prior (--diffusion DIR)")
        if c.clients < 1:
            raise KdUsageError(f"--clients must be at least 1, not {c.clients}")
        if c.s_optimizer not in ("rmsprop", "adam", "sgd"):
            raise KdUsageError(f"--s-optimizer {c.s_optimizer!r}: expected rmsprop, adam or sgd")
        self.steerer = QuerySteerer(self.prior, self.input_shape, c.sampler_steps, c.steer_steps, c.lr_steer, self.device)
        self.shares = client_shares(o.budget, c.clients)
        plan_rounds(o.budget, c.clients, o.batch_size)  # refuses a budget that leaves a client without a query
        # torchrun ranks (``sync``) must run the same number of rounds: a fixed plan, every round >= 1 query.
        # Otherwise every round asks --batch-size queries per client, the last what is left of its share (also
        # after a --resume with a larger budget).
        self.rounds = c.rounds or plan_rounds(o.budget, c.clients, o.batch_size)
        if self.sync is not None:
            if min(self.shares) < self.rounds:
                raise KdUsageError(f"--budget {o.budget} is too small for {self.rounds} rounds")
            self.plans = [round_sizes(s, self.rounds, o.batch_size) for s in self.shares]
        # which client asked each row of the log (rows are appended round by round, client by client)
        self.owner: list[int] = []
        # client k's substitute and optimiser; with one client, client 0 *is* the substitute
        if c.clients == 1:
            self.locals = [self.substitute]
        else:
            self.locals = [copy.deepcopy(self.substitute) for _ in range(c.clients)]
        self.opts = [make_optimizer(c.s_optimizer, m.parameters(), c.lr_s) for m in self.locals]
        self.round = 0
        self.entropy = float("nan")
        self.noise_gen = torch.Generator().manual_seed(self.options.seed + 7919 * self.rank())

    def progress_extra(self) -> dict:
        # the substitute's mean softmax entropy (nats) on the last steered batch: what steering maximises
        return {"entropy": self.entropy}

    def rank(self) -> int:
        # a staticmethod on the class returns the DistributedAverage itself through the instance
        return getattr(self.sync, "rank", 0)

    def state(self) -> dict:
        return {"round": self.round, "opts": [o.state_dict() for o in self.opts],
                "locals": [m.state_dict() for m in self.locals] if len(self.locals) > 1 else [],
                "noise_rng": self.noise_gen.get_state(), "owner": torch.tensor(self.owner, dtype=torch.int64)}

    def load(self, state: dict) -> None:
        self.round = int(state["round"])
        for o, s in zip(self.opts, state["opts"]):
            o.load_state_dict(s)
        if len(self.locals) > 1:  # simulated clients (client 0 of a single attacker is the substitute itself)
            for m, s in zip(self.locals, state["locals"]):
                m.load_state_dict(s)
        self.noise_gen.set_state(state["noise_rng"])
        if "owner" in state:
            self.owner = [int(v) for v in state["owner"].tolist()]

    def _sync_owner(self) -> None:
        """Owners of rows the state does not record (paid after it): as the rounds would have asked them."""
        n = self.pool.n
        del self.owner[n:]
        counts = [self.owner.count(k) for k in range(len(self.locals))]
        while len(self.owner) < n:
            before = len(self.owner)
            for k in range(len(self.locals)):
                m = min(self.options.batch_size, max(0, self.shares[k] - counts[k]), n - len(self.owner))
                self.owner += [k] * m
                counts[k] += m
            if len(self.owner) == before:  # more rows than the shares (a smaller --budget on resume)
                self.owner += [0] * (n - before)

    def _next_sizes(self) -> list[int]:
        if self.sync is not None:
            if self.round >= self.rounds:  # (a resumed run whose log holds more than its last state)
                raise KdError("AEDM: all rounds are done but the budget is not spent; start a new run")
            return [p[self.round] for p in self.plans]
        counts = [self.owner.count(k) for k in range(len(self.locals))]
        return [max(0, min(self.options.batch_size, self.shares[k] - counts[k])) for k in range(len(self.locals))]

    def _client_round(self, k: int, n: int) -> float:
        """One client's round: steer n queries against its substitute, ask, one step on the answers."""
        model, c = self.locals[k], self.config
        x, stats = self.steerer.steer(model, n, self.noise_gen)
        self.entropy = stats["entropy_after"]
        x = quantize(x)
        before = self.pool.n
        try:
            t = self.target_of(self.ask(x))
        finally:  # also the rows of an answer the budget cut short
            self.owner += [k] * (self.pool.n - before)
        loss = self._step(model, self.opts[k], x, t)
        if c.replay_steps:
            # a client replays only the answers it paid for itself: clients do not share queries
            mine = (torch.tensor(self.owner[:self.pool.n]) == k).nonzero().squeeze(1) if len(self.locals) > 1 else None
            for _ in range(c.replay_steps):
                if mine is None:
                    xb, tb = self.pool.sample(self.options.batch_size, self.device)
                else:
                    idx = mine[torch.randint(0, mine.numel(), (self.options.batch_size,))]
                    xb, tb = self.pool._images(idx).to(self.device), self.pool.y[idx].to(self.device)
                self._step(model, self.opts[k], xb, tb)
        return loss

    def _step(self, model: nn.Module, opt, x: torch.Tensor, t: torch.Tensor) -> float:
        return self.train_substitute_on(x, t, opt, self.config.s_loss, model)

    def _average(self) -> None:
        if len(self.locals) > 1:  # eq. 4.4, in this process
            avg = average_state([m.state_dict() for m in self.locals])
            self.substitute.load_state_dict(avg)
            for m in self.locals:
                m.load_state_dict(avg)

    def iteration(self) -> None:
        self._sync_owner()
        losses = []
        sizes = self._next_sizes()
        if not any(sizes):
            raise KdError("AEDM: every client has spent its share but the budget is not spent; start a new run")
        for k, n in enumerate(sizes):
            if n > 0:
                losses.append(self._client_round(k, n))
        self._average()
        if self.sync is not None:  # eq. 4.4 across ranks
            self.sync(self.substitute)
        self.round += 1
        self.last_loss = sum(losses) / max(1, len(losses))
        if self.on_round is not None:
            self.on_round(self.round, self.substitute)

    # answers the substitute has not learned from (a round the budget cut short; log rows after the saved
    # state on --resume): each client steps on its own rows, then the copies are averaged, as in a round
    def catch_up(self) -> int:
        if self.sync is not None:
            # torchrun ranks must stay in lockstep (same rounds, same averages); a rank's plan never
            # overruns its share, so only a resumed rank could have such rows, and they stay in its log
            return 0
        self._sync_owner()
        return super().catch_up()

    def learn_rows(self, idx: torch.Tensor) -> float:
        owner = torch.tensor(self.owner)[idx]
        losses = []
        for k in range(len(self.locals)):
            mine = idx[owner == k]
            if mine.numel():
                x = self.pool.x[mine].float().div(255).to(self.device)
                losses.append(self._step(self.locals[k], self.opts[k], x, self.pool.y[mine].to(self.device)))
        self._average()
        return sum(losses) / max(1, len(losses))

    def catch_up_batch(self) -> int:
        return self.options.batch_size * len(self.locals)  # one round: a batch from every client

    def after_catch_up_batch(self, rows: int) -> None:
        # a batch of answers learned in one step is what a round is: count it as one
        self.round += 1
        self.iterations += 1


def make_aedm(prior, **kwargs) -> AEDM:
    """An AEDM attack with its prior (kept out of the config, which must stay plain data)."""
    sync = kwargs.pop("sync", None)
    on_round = kwargs.pop("on_round", None)
    # staticmethod: a plain function stored on the class must not be bound to the instance
    cls = type("AEDMRun", (AEDM,), {"prior": prior, "sync": staticmethod(sync) if sync else None,
                                    "on_round": staticmethod(on_round) if on_round else None})
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------
# stream mode: steered queries on stdout, the substitute followed through the file system


class SubstituteFollower:
    """The substitute in a weights file that another process rewrites (``kd-distill --save-every``).

    ``current()`` reloads when the file's identity (inode, size, mtime) changes. A file is used only if
    its identity is the same before and after reading it: writers rename complete files into place, so a
    changed identity means a newer file arrived mid-read and the read is retried; a file that does not
    parse (a writer that does not rename) is skipped, the previous substitute kept, and tried again
    later."""

    def __init__(self, path, device: torch.device = torch.device("cpu"), retries: int = 5, wait_s: float = 0.1):
        self.path = Path(path)
        self.device, self.retries, self.wait_s = device, retries, wait_s
        self.model: Optional[nn.Module] = None
        self.meta: dict = {}
        self.stamp = None
        self.reloads = 0
        self.skipped = 0
        self.current()
        if self.model is None:
            raise KdError(f"{self.path}: cannot read the substitute (it changed or was incomplete {retries} times)")

    def _stamp(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def current(self) -> nn.Module:
        stamp = self._stamp()
        if stamp is None and self.model is None:
            raise KdError(f"{self.path}: no such substitute file")
        if stamp is None or stamp == self.stamp:
            return self.model
        from ..weights import load_model

        for _ in range(self.retries):
            before = self._stamp()
            try:
                loaded = load_model(self.path, map_location=self.device)
            except (KdError, OSError, ValueError, RuntimeError):
                loaded = None
            after = self._stamp()
            if loaded is not None and before == after:
                if self.model is not None:
                    self.reloads += 1
                self.model, self.meta, self.stamp = loaded.module, loaded.metadata, after
                return self.model
            if before == after and loaded is None:
                break  # a complete but unreadable file: keep what we have, try again when it changes
            time.sleep(self.wait_s)
        self.skipped += 1
        self.stamp = self._stamp() if self.model is not None else None
        return self.model


def steered_batches(steerer: QuerySteerer, substitute: Callable[[], nn.Module], n: int, batch_size: int,
                    seed: int = 0, on_batch: Optional[Callable[[int, dict], None]] = None):
    """Stream mode: n steered queries in batches of uint8 images; ``substitute()`` is asked for the model
    before every batch (a follower reloads it when its file changes)."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < n:
        m = min(batch_size, n - done)
        x, stats = steerer.steer(substitute(), m, g)
        done += m
        if on_batch is not None:
            on_batch(done, stats)
        yield {"x": (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()}
