"""TandemGAN (dissertation chapter 3): data-free model stealing with a tandem generator G = Ge(Gx(z)).

One round (Algorithm 3.1):
  explore   n_x times: update Gx to *maximise* the distance D(T(x), S(x)) (Eq. 3.2);
  exploit   n_e times: update Ge to maximise the target's confidence, -log T_k(x), k = argmax (Eq. 3.3);
  imitate   n_s times: update S to minimise D(T(x), S(x)) on fresh queries (Eq. 3.1).
Probability mode: D is the L1 norm between probability vectors; the gradients of Gx and Ge through the
black box come from forward differences (M directions, step eps), which costs B x (M + 1) queries each.
Label mode: D is the cross-entropy against the target's label; Gx's gradient flows through S only (the
label is a constant, B queries), and Ge uses S(x) in place of T(x) (no queries).

Queries per round with the defaults (B 256, M 1, n_x = n_e = 1, n_s = 5):
  probs  n_x B (M+1) + n_e B (M+1) + n_s B = 512 + 512 + 1280 = 2304
  label  n_x B + 0 + n_s B                 = 256 + 0 + 1280 = 1536

Paper defaults: RMSprop for all three networks, learning rates 1e-3 (S), 1e-5 (Gx), 1e-6 (Ge), M = 1,
eps = 1e-3, batch 256. kdtools additions (off by default, so the defaults are the paper's):
``replay_steps`` extra S steps per round on batches of every answer paid so far (no queries), and the
shared ``final_epochs`` on that pool once the budget is spent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import Attack, forward_difference, make_optimizer


@dataclass
class TandemConfig:
    n_x: int = 1
    n_e: int = 1
    n_s: int = 5
    lr_s: float = 1e-3
    lr_gx: float = 1e-5
    lr_ge: float = 1e-6
    directions: int = 1  # M
    eps: float = 1e-3
    z_dim: int = 128
    s_loss: str = "l1"  # probability mode: l1 (paper) | l1-logit | kl
    replay_steps: int = 0  # kdtools: extra S steps per round on the pool of paid answers
    s_optimizer: str = "rmsprop"  # paper; adam (lr_s 1e-3) for substitutes without batch norm

    def queries_per_round(self, mode: str, batch_size: int) -> int:
        if mode == "probs":
            return (self.n_x + self.n_e) * batch_size * (self.directions + 1) + self.n_s * batch_size
        return self.n_x * batch_size + self.n_s * batch_size


class TandemGAN(Attack):
    method = "tandemgan"
    generator_arch = "tandem"

    def setup(self) -> None:
        c = self.config
        self.G = self.new_generator(c.z_dim)
        self.opt_s = make_optimizer(c.s_optimizer, self.substitute.parameters(), c.lr_s)
        self.opt_gx = torch.optim.RMSprop(self.G.gx.parameters(), lr=c.lr_gx)
        self.opt_ge = torch.optim.RMSprop(self.G.ge.parameters(), lr=c.lr_ge)

    def generator(self):
        return self.G

    def generator_z(self) -> int:
        return self.config.z_dim

    def state(self) -> dict:
        return {"G": self.G.state_dict(), "opt_s": self.opt_s.state_dict(), "opt_gx": self.opt_gx.state_dict(),
                "opt_ge": self.opt_ge.state_dict()}

    def load(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.opt_s.load_state_dict(state["opt_s"])
        self.opt_gx.load_state_dict(state["opt_gx"])
        self.opt_ge.load_state_dict(state["opt_ge"])

    def _z(self):
        return torch.randn(self.options.batch_size, self.config.z_dim, device=self.device)

    # per-sample losses on the oracle's answers (S evaluated without gradient: inside forward differences
    # the whole loss is a black-box function of x)
    def _distance(self, x, answer):
        s = self.substitute(x)
        t = self.target_of(answer)
        if self.options.mode == "label":
            return F.cross_entropy(s, t, reduction="none")
        return (torch.softmax(s, 1) - t).abs().sum(1)

    def _neg_confidence(self, x, answer):
        t = self.target_of(answer)
        return -torch.log(t.max(1).values.clamp_min(1e-12))

    def _update(self, opt, x, grad_x=None, loss=None):
        self.opt_gx.zero_grad(set_to_none=True)
        self.opt_ge.zero_grad(set_to_none=True)
        if grad_x is not None:
            x.backward(grad_x)
        else:
            loss.backward()
        opt.step()

    def iteration(self) -> None:
        c, mode = self.config, self.options.mode
        S, G = self.substitute, self.G
        G.train()
        # explore: Gx maximises the disagreement of S and T
        for _ in range(c.n_x):
            S.eval()
            x = G(self._z())
            if mode == "probs":
                # x and its probes are all paid for; their answers land in the pool, where replay reuses them
                grad, _ = forward_difference(self, x.detach(), lambda xb, a: -self._distance(xb, a), c.directions, c.eps)
                self._update(self.opt_gx, x, grad_x=grad)
            else:
                t = self.ask(x)["label"]
                for p in S.parameters():
                    p.requires_grad_(False)
                loss = -F.cross_entropy(S(x), t)
                for p in S.parameters():
                    p.requires_grad_(True)
                self._update(self.opt_gx, x, loss=loss)
        # exploit: Ge maximises the target's confidence (label mode: S stands in for T)
        for _ in range(c.n_e):
            S.eval()
            x = G(self._z())
            if mode == "probs":
                grad, _ = forward_difference(self, x.detach(), self._neg_confidence, c.directions, c.eps)
                self._update(self.opt_ge, x, grad_x=grad)
            else:
                for p in S.parameters():
                    p.requires_grad_(False)
                logp = torch.log_softmax(S(x), 1)
                loss = -logp.max(1).values.mean()
                for p in S.parameters():
                    p.requires_grad_(True)
                self._update(self.opt_ge, x, loss=loss)
        # imitate: S learns T on fresh queries (G stays in training mode: batch statistics, as above)
        for _ in range(c.n_s):
            with torch.no_grad():
                x = G(self._z())
            t = self.target_of(self.ask(x))
            self.last_loss = self.train_substitute_on(x, t, self.opt_s, c.s_loss)
        for _ in range(c.replay_steps):
            xb, tb = self.pool.sample(self.options.batch_size, self.device)
            self.train_substitute_on(xb, tb, self.opt_s, c.s_loss)
