"""The SwAV objective in the paper's notation (Caron et al. 2020, "Unsupervised Learning of Visual Features
by Contrasting Cluster Assignments").

    z      L2-normalised embedding of one crop, shape (B, D)
    C      prototypes, K vectors of dimension D, L2-normalised before every step
    C.z    scores, shape (B, K)
    Q      codes: an equipartitioned soft assignment of the *global* batch to the K prototypes, found by
           Sinkhorn-Knopp on exp(C.z / epsilon)
    p      predicted assignment softmax(C.z / tau)
    loss   every crop predicts the codes of each other assigned crop: cross-entropy of p against q

Everything here is a plain function of tensors plus an optional process group; nothing reads global state.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

from swav_scale.distributed import ProcessGroup, all_reduce

# Scores are cosines (z and the rows of C are unit vectors), so exp(C.z / epsilon) lies in
# [exp(-1/epsilon), exp(1/epsilon)]: within float32 (normal numbers from exp(-87) to exp(88)) while
# epsilon >= 2/80, even summed over millions of samples. Smaller epsilon runs in float64 (exp(+-708)).
# Bounding from epsilon rather than from the observed maximum costs no pass over the scores, no
# collective and no host synchronisation.
_SMALLEST_FLOAT32_EPSILON = 2.0 / 80.0


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    group: ProcessGroup | None = None,
) -> Tensor:
    """Codes Q for this rank's rows of the global batch.

    `scores` is this rank's (B_local, K) block of C.z, cosines in [-1, 1]. The equipartition constraint (every
    prototype gets B/K of the mass) is imposed on the global batch of all ranks in `group`: only K-vector row
    sums cross the network, never the scores themselves. Ranks may hold different numbers of rows (a global
    batch that does not split evenly, config.rank_batch), so the global B is summed over the ranks, as one
    more element of the first iteration's row sums: no collective and no host copy of its own. Returns
    (B_local, K) codes whose rows sum to 1. Computed in float32 (float64 for epsilon < 0.025) whatever the
    autocast dtype.

    The original's steps, fused where it divides twice: its first division by the total mass is left out,
    since the first row normalisation divides any common factor out again, and so is its final *B, the last
    column normalisation dividing by the column sums alone. 14 passes over Q instead of 23 (3 iterations).
    """
    dtype = torch.float32 if epsilon >= _SMALLEST_FLOAT32_EPSILON else torch.float64
    Q = scores.detach().to(dtype).div(epsilon).exp_().t()  # K x B_local
    K = Q.shape[0]
    B: Tensor | int = Q.shape[1]
    for it in range(iterations):
        # rows: every prototype receives 1/K of the total mass, summed over all ranks
        rows = Q.sum(dim=1, keepdim=True)
        if it == 0:  # the global batch travels with the first row sums (exact in float32 below 2^24 columns)
            summed = all_reduce(torch.cat([rows, rows.new_full((1, 1), Q.shape[1])]), group=group)
            rows, B = summed[:K], summed[K]
        else:
            rows = all_reduce(rows, group=group)
        Q /= rows * K
        # columns: every sample carries 1/B of the mass (columns are local, so no communication); in the
        # last iteration 1 instead, so that each sample's codes are a distribution over the prototypes
        Q /= Q.sum(dim=0, keepdim=True) * (B if it + 1 < iterations else 1)
    return Q.t().float()


def assign_codes(
    scores: list[Tensor],
    crops_for_assign: list[int],
    epsilon: float = 0.05,
    iterations: int = 3,
    queue_scores: list[Tensor] | None = None,
    group: ProcessGroup | None = None,
) -> dict[int, Tensor]:
    """Sinkhorn codes for each assigned (global) crop.

    `queue_scores[j]`, when given, holds C.z for the queued embeddings of crop `crops_for_assign[j]`: they
    join the Sinkhorn problem so that the equipartition is spread over more samples, and their codes are
    dropped afterwards.
    """
    codes = {}
    for j, i in enumerate(crops_for_assign):
        s = scores[i].detach()
        if queue_scores is not None:
            s = torch.cat([queue_scores[j].detach().to(s.dtype), s])
        codes[i] = sinkhorn(s, epsilon, iterations, group)[-scores[i].shape[0] :]
    return codes


def swapped_prediction_loss(
    scores: list[Tensor],
    codes: dict[int, Tensor],
    temperature: float = 0.1,
) -> Tensor:
    """Every crop v predicts the codes q_i of each assigned crop i != v.

    `scores[v]` is C.z for crop v, shape (B, K); `codes[i]` the Sinkhorn codes of assigned crop i.
    Returns the mean over assigned crops of the mean over the other crops of CE(q_i, softmax(C.z_v / tau)).
    """
    total = scores[0].new_zeros((), dtype=torch.float32)
    for i, q in codes.items():
        others = [v for v in range(len(scores)) if v != i]
        for v in others:
            log_p = F.log_softmax(scores[v].float() / temperature, dim=1)
            total = total - (q * log_p).sum(dim=1).mean() / len(others)
    return total / len(codes)


def normalize_prototypes_(weight: Tensor) -> None:
    """Project every prototype (a row of C) back onto the unit sphere, so that C.z is a cosine similarity.

    Rows are independent, so a rank holding whole rows of a sharded C normalises its own rows."""
    with torch.no_grad():
        weight.copy_(F.normalize(weight, dim=1, p=2))
