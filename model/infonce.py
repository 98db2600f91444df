"""InfoNCE without the N x (1+K) logits matrix, and without keeping the queue for the backward.

The official code concatenates the N positive logits with the N x K negatives, divides by T and calls
cross_entropy: a concatenated copy, a scaled copy and a log-softmax, each N x (1+K), and as many passes over
memory forward and backward; and since the queue is overwritten before the backward runs, autograd needs a copy
of it (32 MB at K = 65536). Here T is folded into q (N x C) before the matmul, the positive joins the
log-sum-exp through logaddexp, and, because the loss is the end of the graph, its gradient with respect to q is
computed in the forward from the negative logits turned into their softmax in place: one N x K buffer, freed
before the encoders' backward begins, and no copy of the queue. The result equals
`cross_entropy(cat([l_pos, l_neg]) / T, zeros)`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, queue, T):
        q_scaled = q / T
        l_pos = (q_scaled * k).sum(dim=1)
        l_neg = q_scaled @ queue
        lse = torch.logaddexp(l_pos, torch.logsumexp(l_neg, dim=1))
        loss = (lse - l_pos).mean()
        if ctx.needs_input_grad[0]:
            # d loss / d logit = softmax - onehot(0), averaged over the batch; d logit / d q = key / T.
            p_neg = l_neg.sub_(lse.unsqueeze(1)).exp_()
            p_pos_minus_one = torch.exp(l_pos - lse) - 1
            grad_q = torch.addmm(p_pos_minus_one.unsqueeze(1) * k, p_neg, queue.T)
            ctx.save_for_backward(grad_q.div_(l_neg.shape[0] * T))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (grad_q,) = ctx.saved_tensors
        return grad_q * grad, None, None, None


def infonce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """Mean InfoNCE of queries q (N x C) against their keys k (N x C) and the queued negatives (C x K), all
    fp32. Gradients flow to q only: keys and queue come from the momentum encoder, and the queue may be updated
    in place as soon as this returns."""
    return _InfoNCE.apply(q, k.detach(), queue.detach(), T)
