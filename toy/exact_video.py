r"""The exact teacher of the video world: the flow of its empirical distribution over a bank of clips.

A bank holds ``K`` world clips ``x_k`` (flattened to ``[K, D]``, ``D = C F S S``) with labels ``c_k``. Noised by
``x = (1 - sigma) x0 + sigma eps``, the bank's distribution of class ``c`` becomes a mixture of ``K_c`` Gaussians
of width ``sigma`` around ``a x_k`` (``a = 1 - sigma``), whose posterior and flow are exact::

    r_k(x)       = softmax_{k: c_k = c}( -|x - a x_k|^2 / (2 sigma^2) )
                 = softmax_{k: c_k = c}( (a <x, x_k> - a^2 |x_k|^2 / 2) / sigma^2 )       (|x|^2 cancels)
    E[x0 | x, c] = sum_k r_k x_k,          v*(x, sigma, c) = (x - E[x0 | x, c]) / sigma

the flow the teacher is trained to regress (``v = eps - x0``). The null prompt (CFG's unconditional branch) takes
the softmax over the whole bank. This is ``toy.gmm``'s exact flow with zero-width components, written with one
matrix product per class because here ``K D`` is ~10^8 (``gmm`` broadcasts ``[B, K, D]`` for its 2D targets).

What it is and is not: at the noise levels where a clip is mostly noise (sigma >= 0.9 on this world) the bank's
posterior is already the world's (``scripts/teacher_level_loss.py teacher=exact teacher=exact,exact_bank=80000``
prints the same loss for both banks there); at low sigma it is a nearest-neighbour rule, and DDIM from noise ends
on bank clips. So its samples *are* world clips (speed, radius and bounces are the world's by construction), as
a perfectly trained teacher of a finite training set would make. It has no hidden states of its own: Salt's
feature alignment, which reads a frozen network's block features, reads them from the trained network teacher
passed in (``features``), as the critic starts from that network's weights.

Shapes: ``x [B, C, F, S, S]``, ``t [B]`` (network timesteps, ``t = 1000 sigma``), ``context [B, L, D_text]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from salt_ref.schedule import flow_from_x0, t_to_sigma
from toy import video_world as vw

if TYPE_CHECKING:  # setup_video imports this module
    from toy.setup_video import ClassPrompts

__all__ = ["BANK_CLIPS", "BANK_SEED", "ExactWorldTeacher"]

BANK_CLIPS = 20000  # 5000 clips per class of the small world
BANK_SEED = 2027  # a seed of its own: the evaluations draw their clips from seeds 5, 6, 11, 12, 99


class ExactWorldTeacher(nn.Module):
    """The exact flow of ``bank_clips`` world clips (real score, ODE init), a network's features (alignment).

    Args:
        world: the world the bank is drawn from.
        network: the trained (bidirectional) network teacher: its ``config`` is this teacher's, and a call with
            ``features=`` is answered by it.
        prompts: the class prompts (``embed(labels)``, ``null(batch)``) whose embeddings are read back to labels.
        bank_clips: ``K``; ``seed``: the generator seed of the bank.
    """

    def __init__(
        self,
        world: vw.VideoWorldConfig,
        network: nn.Module,
        prompts: ClassPrompts,
        *,
        bank_clips: int = BANK_CLIPS,
        seed: int = BANK_SEED,
    ):
        super().__init__()
        if bank_clips < world.n_classes:
            raise ValueError(f"bank_clips must be at least the {world.n_classes} classes, got {bank_clips}")
        self.network, self.config = network.requires_grad_(False), network.config
        clips, labels, _ = vw.sample(bank_clips, torch.Generator().manual_seed(seed), config=world)
        self.shape = tuple(clips.shape[1:])
        self.register_buffer("bank", clips.flatten(1), persistent=False)  # [K, D]
        self.register_buffer("bank_sq", self.bank.pow(2).sum(1), persistent=False)  # [K]
        self.register_buffer("labels", labels, persistent=False)  # [K]
        # the prompt embeddings, flattened: class c in row c, the null prompt in the last row
        keys = torch.cat([prompts.embed(torch.arange(world.n_classes)), prompts.null(1)]).flatten(1)
        self.register_buffer("keys", keys, persistent=False)  # [n_classes + 1, L * D_text]

    def read_labels(self, context: Tensor) -> Tensor:
        """Labels ``[B]`` of ``context [B, L, D_text]`` (``-1`` for the null prompt); anything else is refused."""
        d = torch.cdist(context.flatten(1).float(), self.keys.float(), compute_mode="donot_use_mm_for_euclid_dist")
        best, idx = d.min(dim=1)
        if bool((best > 1e-4 * self.keys.shape[1] ** 0.5).any()):
            raise ValueError("context is neither a class embedding of the world nor its null prompt")
        return torch.where(idx == self.keys.shape[0] - 1, -1, idx)

    def denoise(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        """The posterior mean ``E[x0 | x, c]`` ``[B, C, F, S, S]`` over the bank clips of each label (-1: all)."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must be [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        xf = x.flatten(1).float()
        out = torch.empty_like(xf)
        a, s2 = (1 - sigma).float(), sigma.float().pow(2)
        for c in labels.unique().tolist():
            rows = (labels == c).nonzero().squeeze(1)
            keep = slice(None) if c < 0 else self.labels == c
            bank, sq = self.bank[keep], self.bank_sq[keep]
            ar, s2r = a[rows, None], s2[rows, None]
            logits = (ar * (xf[rows] @ bank.T) - 0.5 * ar**2 * sq[None]) / s2r  # [B_c, K_c]
            out[rows] = logits.softmax(dim=1) @ bank
        return out.view_as(x).to(x.dtype)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        *,
        features: tuple[int, ...] = (),
        features_only: bool = False,
    ) -> Tensor | tuple[Tensor, dict[int, Tensor]] | dict[int, Tensor]:
        """The exact flow ``v* [B, C, F, S, S]`` at timesteps ``t [B]``; block ``features`` come from the network."""
        if features_only:
            return self.network(x, t, context, features=features, features_only=True)
        if t.ndim > 1:  # [B, F]: one level per clip only (a clip's frames share it under the exact flow)
            if bool((t != t[:, :1]).any()):
                raise ValueError("the exact teacher takes one noise level per clip, got per-frame levels that differ")
            t = t[:, 0]
        sigma = t_to_sigma(t).reshape(-1).expand(x.shape[0])
        v = flow_from_x0(x, sigma, self.denoise(x, sigma, self.read_labels(context)))  # raises at sigma = 0
        if features:
            return v, self.network(x, t, context, features=features, features_only=True)
        return v
