"""DINO self-distillation pieces: projection head, centred/sharpened loss, EMA teacher.

Caron et al. 2021 ("Emerging Properties in Self-Supervised Vision
Transformers"), Eq. 1-2 and Algorithm 1: the student's softmax over K
prototypes at temperature tau_s is trained to match the teacher's softmax of
centred outputs at a lower temperature tau_t (sharpening), on pairs of
different views; the centre c is an EMA of teacher outputs (centering), and
the teacher is an EMA of the student.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DINOHead", "dino_loss", "update_center", "ema_update", "clip_grad_per_parameter_"]


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck), L2-normalise, weight-normed linear to ``out_dim``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        # DINO fixes the weight-norm gain g = 1 (only the direction is learnt).
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_dim] -> logits [B, out_dim]."""
        return self.last(F.normalize(self.mlp(x), dim=-1))


def dino_loss(
    student_out: list[torch.Tensor],
    teacher_out: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """H(P_t, P_s) averaged over all (teacher view i, student view j != i) pairs (Eq. 1-2).

    P_t = softmax((t - c) / tau_t) (centering then sharpening, no gradient),
    P_s = softmax(s / tau_s). ``teacher_out`` holds the global views [B, K];
    ``student_out`` holds the same global views first, then the local views.
    """
    if len(teacher_out) < 1 or len(student_out) < len(teacher_out):
        raise ValueError("student_out must start with the teacher's global views")
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teacher_out]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]
    total, pairs = 0.0, 0
    for i, p_t in enumerate(targets):
        for j, log_p_s in enumerate(log_probs):
            if i == j:
                continue  # same view: nothing to predict
            total = total + (-(p_t * log_p_s).sum(-1)).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("need at least two views for DINO")
    return total / pairs


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: list[torch.Tensor], momentum: float) -> torch.Tensor:
    """c <- m c + (1 - m) mean of teacher outputs over the batch and global views (in place)."""
    batch_mean = torch.cat(teacher_out).mean(0, keepdim=True)
    center.mul_(momentum).add_(batch_mean, alpha=1 - momentum)
    return center


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """theta_t <- m theta_t + (1 - m) theta_s for matching parameters."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


@torch.no_grad()
def clip_grad_per_parameter_(params, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale each parameter's gradient whose L2 norm exceeds ``max_norm`` down to it, each tensor on
    its own (DINO's clip_grad); gradients within the bound are left exactly as they are.

    Returns the norms before clipping (one per parameter that has a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([g.detach().norm(2.0).float() for g in grads])
    scale = (max_norm / (norms + eps)).clamp(max=1.0)
    for g, s in zip(grads, scale.unbind()):
        g.mul_(s.to(g.dtype))  # x * 1.0 == x: gradients within the bound stay bit for bit
    return norms
