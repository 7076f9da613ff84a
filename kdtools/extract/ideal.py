"""IDEAL (Zhang et al., ICLR 2023): query-efficient data-free learning from hard-label black boxes.

Every epoch:
  1. data generation, no queries: a *freshly initialised* generator is trained for E_G steps through the
     student only: cross-entropy of S(G(z)) to random target classes + lambda x the information-entropy
     balancing loss (1/C) sum_k p_k log p_k of the batch-mean prediction p (Eq. 3-6);
  2. model distillation: B new samples are generated and sent to the oracle once each (B queries per
     epoch, so E = budget / B epochs), then the student learns by cross-entropy on the hard labels.

Defaults from the paper: B = 250, E_G = 5, lambda = 5, generator Adam 1e-3, student SGD 1e-2 with
momentum 0.9. The paper's Algorithm 1 takes one student step per epoch on the new batch; its public
code trains on the whole growing sample set every epoch and re-labels all of it with the oracle, so its
real oracle calls grow quadratically. kdtools trains on every answer paid so far (``pool_epochs``
passes per epoch; 1 by default) and never asks twice: real oracle calls = samples = budget. Full passes
make an epoch's cost grow with the pool (the whole run quadratic in the budget); ``pool_steps`` K caps an
epoch at K random mini-batches of the pool, which keeps large budgets linear.

Queries are rounded to the 8-bit grid before they are asked, so the uint8 log holds exactly what the
oracle saw.

kdtools addition, off by default: ``mix_fraction`` f replaces a fraction f of each epoch's new samples by
*boundary queries*: convex mixes lam x_i + (1 - lam) x_j (lam ~ U(0.25, 0.75)) of two answered samples the
oracle put in different classes, the first drawn against the answers' class counts (rare classes more
often). A generator trained through the student keeps producing what the student already believes; the
victim's boundaries between classes it has answered (shirt / T-shirt / pullover on Fashion-MNIST) are
where the student is wrong, and a mix of two answered images of those classes lands near them. Still one
query per sample; the mixes are paid for and logged like every other query. Measured once (Fashion-MNIST,
hard labels, 100 000, f = 0.5): worse than without (81.31 % against 83.91 % post-trained): the victim
calls most mixes "bag" or "sandal" too. Kept as an experimental option, off by default.

kdtools addition, off by default: ``select_from`` K draws K candidates per query from the epoch's generator
(free: no oracle call) and asks only the 1/K on which the student is least certain (highest entropy of its
softmax): uncertainty sampling, as in ActiveThief (Pal et al., AAAI 2020). The generator makes images the
student is sure of; the victim's answer teaches most where the student is not. Still one query per asked
sample; the candidates not asked are thrown away. Measured once (Fashion-MNIST, hard labels, 100 000, K = 4):
the victim's answers spread over more classes, and a width-2 LeNet-5 post-trained on the log reached 86.08 %
(mean of four seeds) against 85.39 % (two seeds) on the log of the same run without it; 87.19 % with
``g_steps`` 10 as well (docs/extraction-benchmarks.md, session 22).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import Attack, make_optimizer, quantize


@dataclass
class IDEALConfig:
    g_steps: int = 5  # E_G
    lr_g: float = 1e-3
    lr_s: float = 1e-2
    lambda_info: float = 5.0
    z_dim: int = 100
    pool_epochs: int = 1  # passes over every paid answer per epoch (0: the paper's single step on the new batch)
    s_loss: str = "kl"  # probability mode only; hard labels always use cross-entropy
    s_optimizer: str = "sgd"  # sgd (paper: 1e-2, momentum 0.9) | adam (kdtools: lr_s 1e-3 fits the pool far better)
    balance_pool: bool = False  # kdtools: draw the generator's target classes against the pool's label counts
    pool_steps: int = 0  # kdtools: at most this many random pool mini-batches per epoch (0: pool_epochs full passes)
    mix_fraction: float = 0.0  # kdtools: share of each epoch's queries that are mixes of two differently answered samples
    select_from: int = 1  # kdtools: candidates drawn per query; the most uncertain 1/K for the student are asked

    def queries_per_epoch(self, batch_size: int) -> int:
        return batch_size


def info_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """(1/C) sum_k p_k log p_k of the batch-mean softmax: minimal when the classes are balanced."""
    p = torch.softmax(logits, 1).mean(0)
    return (p * torch.log(p.clamp_min(1e-12))).sum() / p.numel()


class IDEAL(Attack):
    method = "ideal"
    generator_arch = "ideal"
    log_dtype = "uint8"

    def setup(self) -> None:
        c = self.config
        self.G = self.new_generator(c.z_dim)
        if c.s_optimizer == "sgd":  # the paper's: momentum 0.9, no weight decay
            self.opt_s = torch.optim.SGD(self.substitute.parameters(), lr=c.lr_s, momentum=0.9)
        else:
            self.opt_s = make_optimizer(c.s_optimizer, self.substitute.parameters(), c.lr_s)

    def generator(self):
        return self.G

    def generator_z(self) -> int:
        return self.config.z_dim

    def state(self) -> dict:
        # the generator is re-initialised every epoch; only the last one is kept (for generator mode)
        return {"G": self.G.state_dict(), "opt_s": self.opt_s.state_dict()}

    def load(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.opt_s.load_state_dict(state["opt_s"])

    def generate(self) -> None:
        """Stage 1: a new generator, trained through the (frozen) student. No oracle calls."""
        c, S, b = self.config, self.substitute, self.options.batch_size
        self.G = self.new_generator(c.z_dim)
        opt_g = torch.optim.Adam(self.G.parameters(), lr=c.lr_g)
        S.eval()
        for p in S.parameters():
            p.requires_grad_(False)
        self.G.train()
        class_weights = torch.ones(self.num_classes)
        if c.balance_pool and self.options.mode == "label" and len(self.pool):
            # classes the oracle has rarely answered so far are asked for more often
            counts = torch.bincount(self.pool.y[:self.pool.n], minlength=self.num_classes).float()
            class_weights = 1.0 / (counts + 1.0)
        for _ in range(c.g_steps):
            z = torch.randn(b, c.z_dim, device=self.device)
            y = torch.multinomial(class_weights, b, replacement=True).to(self.device)
            logits = S(self.G(z))
            loss = F.cross_entropy(logits, y) + c.lambda_info * info_entropy_loss(logits)
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
        for p in S.parameters():
            p.requires_grad_(True)

    def boundary_queries(self, n: int) -> torch.Tensor:
        """n mixes of two answered samples in different classes (see the module docstring); none while the
        pool holds fewer than two classes."""
        if n <= 0 or self.pool.n < 2:
            return torch.empty(0, *self.input_shape, device=self.device)
        y = self.pool.y[:self.pool.n]
        cls = y if y.dim() == 1 else y.argmax(1)
        counts = torch.bincount(cls, minlength=self.num_classes).float()
        if int((counts > 0).sum()) < 2:
            return torch.empty(0, *self.input_shape, device=self.device)
        i = torch.multinomial(1.0 / counts[cls], n, replacement=True)
        # the partner: a uniform row among those of the other classes (its class drawn by row counts with
        # i's own class excluded, then a random row of that class)
        w = counts.repeat(n, 1)
        w[torch.arange(n), cls[i]] = 0
        other = torch.multinomial(w, 1).squeeze(1)
        by_class = torch.argsort(cls, stable=True)
        first_row = torch.cumsum(counts.long(), 0) - counts.long()
        j = by_class[first_row[other] + (torch.rand(n) * counts[other]).long().clamp_max(counts[other].long() - 1)]
        lam = torch.empty(n, 1, 1, 1).uniform_(0.25, 0.75)
        xi, xj = self.pool.x[i].float() / 255, self.pool.x[j].float() / 255
        return quantize(lam * xi + (1 - lam) * xj).to(self.device)

    def generated_queries(self, n: int) -> torch.Tensor:
        """n queries from the epoch's generator, on the 8-bit grid; with ``select_from`` K > 1 the n of
        K x n candidates on which the student's prediction has the highest entropy."""
        k = max(1, self.config.select_from)
        with torch.no_grad():
            x = quantize(self.G(torch.randn(k * n, self.config.z_dim, device=self.device)))
            if k == 1 or n == 0:
                return x
            self.substitute.eval()
            p = torch.softmax(self.substitute(x), 1)
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
            return x[torch.topk(entropy, n).indices]

    def iteration(self) -> None:
        c, b = self.config, self.options.batch_size
        self.generate()
        # stage 2: one query per new sample (a share of them boundary mixes, with --mix-fraction)
        n = min(b, self.oracle.remaining)
        mixes = self.boundary_queries(int(round(c.mix_fraction * n)))
        x = self.generated_queries(n - mixes.shape[0])
        x = torch.cat([x, mixes])
        t = self.target_of(self.ask(x))
        if c.pool_epochs <= 0:
            self.last_loss = self.train_substitute_on(x, t, self.opt_s, c.s_loss)
            return
        total, count = 0.0, 0
        full_steps = c.pool_epochs * math.ceil(self.pool.n / b)
        if c.pool_steps and c.pool_steps < full_steps:
            batches = (self.pool.sample(b, self.device) for _ in range(c.pool_steps))
        else:
            batches = (batch for _ in range(c.pool_epochs) for batch in self.pool.batches(b, self.device))
        for xb, tb in batches:
            total += self.train_substitute_on(xb, tb, self.opt_s, c.s_loss) * xb.shape[0]
            count += xb.shape[0]
        self.last_loss = total / max(1, count)
