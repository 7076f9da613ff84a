"""DFME (Truong et al. 2021), the standard data-free baseline for probability-mode oracles.

One iteration: g_iter generator steps, each maximising the L1 distance between the mean-centred
log-probabilities of T and S, with dL/dx estimated by forward differences (m directions, step eps:
B x (m + 1) queries); then d_iter substitute steps minimising that distance on fresh queries (B each).
Queries per iteration: B x (g_iter x (m + 1) + d_iter); with the defaults 256 x (1 x 2 + 5) = 1792.

Defaults as in the paper: generator Adam 1e-4, substitute SGD 0.1 (momentum 0.9, weight decay 5e-4), both
learning rates x0.3 at 10 %, 30 % and 50 % of the budget; z of 256 dimensions; m = 1, eps = 1e-3.
In label mode (as IDEAL's paper ran it, for comparison) T's answer is a one-hot vector: the substitute
learns by cross-entropy and the generator's distance uses log(one-hot clamped to 1e-8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import Attack, forward_difference, make_optimizer


@dataclass
class DFMEConfig:
    g_iter: int = 1
    d_iter: int = 5
    lr_s: float = 0.1
    lr_g: float = 1e-4
    directions: int = 1  # m
    eps: float = 1e-3
    z_dim: int = 256
    s_loss: str = "l1-logit"
    lr_steps: tuple = (0.1, 0.3, 0.5)  # fractions of the budget where both learning rates drop
    lr_gamma: float = 0.3
    replay_steps: int = 0  # kdtools: extra S steps per iteration on the pool of paid answers
    s_optimizer: str = "sgd"  # paper; adam (lr_s 1e-3) for substitutes without batch norm

    def queries_per_iteration(self, batch_size: int) -> int:
        return batch_size * (self.g_iter * (self.directions + 1) + self.d_iter)


class DFME(Attack):
    method = "dfme"
    generator_arch = "dfme"

    def setup(self) -> None:
        c = self.config
        self.G = self.new_generator(c.z_dim)
        self.opt_s = make_optimizer(c.s_optimizer, self.substitute.parameters(), c.lr_s)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=c.lr_g)

    def generator(self):
        return self.G

    def generator_z(self) -> int:
        return self.config.z_dim

    def state(self) -> dict:
        return {"G": self.G.state_dict(), "opt_s": self.opt_s.state_dict(), "opt_g": self.opt_g.state_dict()}

    def load(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.opt_s.load_state_dict(state["opt_s"])
        self.opt_g.load_state_dict(state["opt_g"])

    def _target_log(self, answer):
        t = self.target_of(answer)
        if t.dtype == torch.int64:
            t = F.one_hot(t, self.num_classes).float()
        logt = torch.log(t.clamp_min(1e-8))
        return logt - logt.mean(1, keepdim=True)

    def _distance(self, x, answer):
        s = torch.log_softmax(self.substitute(x), 1)
        s = s - s.mean(1, keepdim=True)
        return (s - self._target_log(answer)).abs().mean(1)

    def _set_lr(self) -> None:
        c = self.config
        frac = self.oracle.spent / self.options.budget
        factor = c.lr_gamma ** sum(frac >= f for f in c.lr_steps)
        for g in self.opt_s.param_groups:
            g["lr"] = c.lr_s * factor
        for g in self.opt_g.param_groups:
            g["lr"] = c.lr_g * factor

    def iteration(self) -> None:
        c, S, G = self.config, self.substitute, self.G
        self._set_lr()
        G.train()
        for _ in range(c.g_iter):
            S.eval()
            x = G(torch.randn(self.options.batch_size, c.z_dim, device=self.device))
            grad, _ = forward_difference(self, x.detach(), lambda xb, a: -self._distance(xb, a), c.directions, c.eps)
            self.opt_g.zero_grad(set_to_none=True)
            x.backward(grad)
            self.opt_g.step()
        for _ in range(c.d_iter):
            with torch.no_grad():
                x = G(torch.randn(self.options.batch_size, c.z_dim, device=self.device))
            t = self.target_of(self.ask(x))
            self.last_loss = self.train_substitute_on(x, t, self.opt_s, c.s_loss)
        for _ in range(c.replay_steps):
            xb, tb = self.pool.sample(self.options.batch_size, self.device)
            self.train_substitute_on(xb, tb, self.opt_s, c.s_loss)
