"""The step rules of the stages: the cosine schedule, Adam and regular-step gradient descent, graph-safe (every
step size given up front, no value read back to the host; see :mod:`maskreg.engine.stepper`)."""

from __future__ import annotations

import math

import torch


def cosine_step(lr: float, it: int, n_it: int) -> float:
    """Step size of iteration ``it`` (1-based) of ``n_it``: cosine decay from ``lr`` to 5 % of it (torch's
    CosineAnnealingLR with eta_min = 0.05 lr), for the linear and the deformable stages alike."""
    return 0.05 * lr + 0.95 * lr * 0.5 * (1 + math.cos(math.pi * (it - 1) / max(n_it, 1)))


class Adam:
    """Adam (Kingma & Ba 2015; torch.optim.Adam's update and defaults) for one parameter tensor, with the
    step sizes of every iteration given up front (``lrs``, one per iteration) and the step count kept on the
    parameter's device, so an iteration never reads a value back to the host (graph-safe, see
    :mod:`maskreg.engine.stepper`). Not ``torch.optim``: creating its first optimizer imports ``torch._dynamo`` and
    sympy, a large part of a short job's start-up."""

    def __init__(
        self, p: torch.Tensor, lrs: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ):
        self.p, self.lrs, self.b1, self.b2, self.eps = p, lrs, betas[0], betas[1], eps
        self.m = torch.zeros_like(p)
        self.v = torch.zeros_like(p)
        self.t = torch.zeros(1, dtype=torch.long, device=p.device)  # steps done

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        lr = self.lrs.index_select(0, self.t)
        self.t += 1
        t = self.t.to(self.m.dtype)
        self.m.mul_(self.b1).add_(grad, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        denom = (self.v / (1 - torch.pow(self.b2, t))).sqrt_().add_(self.eps)
        self.p.sub_(lr / (1 - torch.pow(self.b1, t)) * self.m / denom)

    def converged(self) -> bool:
        """Adam has no convergence test of its own (the plateau test and the schedule end its levels)."""
        return False


class RegularStep:
    """Regular-step gradient descent (ITK's ``RegularStepGradientDescentOptimizer``): each iteration moves the
    parameters by the current step length along the negative gradient direction (Euclidean norm of the
    scaled parameters: mm at the fixed mask's radius, see :mod:`maskreg.engine.linear`); the step length starts at
    ``lrs[0]`` and is halved whenever the gradient turns by more than 90° (the last step overshot the
    optimum), so it converges to the optimum's precision in a few halvings. Adam, by contrast, keeps moving
    every parameter by about its step size until the schedule decays, so it needs many more full-resolution
    iterations for the same accuracy (see ``benchmarks/bench_linear.py``). The schedule ``lrs`` caps the step
    length too. Graph-safe like :class:`Adam`."""

    RELAXATION = 0.5
    # a level has converged once its step is below 2⁻⁵ of the first (five halvings; the cosine cap alone never
    # gets there, it ends at 5 %): the optimum is then known to 1/128 voxel at learning_rate 0.25 voxel. 4 or 6
    # halvings give the same accuracy on the pairs of benchmarks/bench_linear.py, and stopping here ends a level
    # sooner than the plateau test alone
    MIN_STEP_HALVINGS = 5

    def __init__(self, p: torch.Tensor, lrs: torch.Tensor):
        self.p, self.lrs = p, lrs
        self.step_len = lrs[0].clone()
        self.min_step = float(lrs[0]) * self.RELAXATION**self.MIN_STEP_HALVINGS
        self.prev = torch.zeros_like(p)
        self.t = torch.zeros(1, dtype=torch.long, device=p.device)

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        lr = self.lrs.index_select(0, self.t)[0]
        self.t += 1
        turned = (grad * self.prev).sum() < 0
        self.step_len.copy_(torch.minimum(torch.where(turned, self.step_len * self.RELAXATION, self.step_len), lr))
        self.prev.copy_(grad)
        self.p.sub_(self.step_len * grad / grad.norm().clamp_min(1e-20))

    def converged(self) -> bool:
        """Whether the step has shrunk below 2⁻⁵ of the first (reads the step length back: call it rarely)."""
        return float(self.step_len) < self.min_step


def schedule(lr: float, n_it: int, device: torch.device) -> torch.Tensor:
    """:func:`cosine_step` step sizes of iterations 1..n_it as a tensor on ``device`` (one copy per level)."""
    return torch.tensor(
        [cosine_step(lr, it, n_it) for it in range(1, max(n_it, 1) + 1)], dtype=torch.float32, device=device
    )
