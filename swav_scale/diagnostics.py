"""Is SwAV learning? Numbers that tell progress from collapse or a loss stuck at ln K, and the warnings.

The most common SwAV failure is silent: the loss sits at ln K (every prediction uniform) or the network maps
everything to a few prototypes, and nothing says so for days. At log steps the loop computes, over the global
batch (in the log step's one all-reduce, train.log_figures):

* `prototypes_used`: the fraction of the K prototypes that are the code argmax of at least one sample;
* `code_entropy`: entropy of the batch-mean code q, over ln K (1 = the equipartition Sinkhorn aims at);
* `prediction_entropy`: entropy of the batch-mean prediction softmax(C.z/tau), over ln K (low: collapse);
* `code_confidence`: mean of max_k q_k (1/K: uniform codes; 1: one-hot);
* `prediction_confidence`: mean of max_k p_k (1/K: uniform predictions, the loss is then ln K);

and the loop logs `loss_over_ln_k`, the loss against ln K. (The loss is a cross-entropy against soft codes, so
it can exceed ln K while learning: confident predictions of the wrong prototype cost more than uniform ones. A
loss at ln K means stuck only together with uniform predictions.)

`HealthCheck` turns them into warnings with what to change (the advice docs/training.md gives under "Is it learning?").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from swav_scale.distributed import ProcessGroup, all_reduce


def _entropy(p: Tensor) -> Tensor:
    p = p / p.sum()
    return -(p * torch.log(p.clamp_min(1e-12))).sum()


@torch.no_grad()
def code_sums(scores: list[Tensor], codes: dict[int, Tensor], temperature: float) -> Tensor:
    """This rank's sums behind the statistics above, on the device, float32, 3K + 3 values: the argmax count
    per prototype, the sums of the codes and of the predictions, the sums of their maxima and the number of
    rows. Summed over the ranks (an all-reduce of O(K) numbers, whatever the number of ranks), they give the
    global batch's statistics (`code_figures`)."""
    q = torch.cat([codes[i].float() for i in sorted(codes)])
    p = torch.cat([F.softmax(scores[i].float() / temperature, dim=1) for i in sorted(codes)])
    k = q.shape[1]
    used = torch.bincount(q.argmax(dim=1), minlength=k).float()
    # the row count by a fill, not a copy of a host number to the device
    sums = torch.stack([q.max(dim=1).values.sum(), p.max(dim=1).values.sum(), q.new_full((), len(q))])
    return torch.cat([used, q.sum(0), p.sum(0), sums])


def code_figures(sums: Tensor) -> Tensor:
    """From `code_sums` summed over the ranks, on the device and without reading it: the fraction of
    prototypes used, the entropies of the mean code and of the mean prediction (in nats), the sums of the
    codes' and of the predictions' maxima, and the number of rows (`code_statistics_of` takes them, read)."""
    k = (len(sums) - 3) // 3
    used, q_sum, p_sum = sums[:k], sums[k:2 * k], sums[2 * k:3 * k]
    return torch.cat([torch.stack([(used > 0).float().mean(), _entropy(q_sum), _entropy(p_sum)]), sums[3 * k:]])


def code_statistics_of(figures: list[float], num_prototypes: int) -> dict[str, float]:
    """The statistics above from `code_figures`, read."""
    used, q_entropy, p_entropy, q_max_sum, p_max_sum, n = figures
    ln_k = math.log(num_prototypes)
    return {
        "prototypes_used": round(used, 4),
        "code_entropy": round(q_entropy / ln_k, 4),
        "prediction_entropy": round(p_entropy / ln_k, 4),
        "code_confidence": round(q_max_sum / n, 4),
        "prediction_confidence": round(p_max_sum / n, 4),
    }


def code_statistics(scores: list[Tensor], codes: dict[int, Tensor], temperature: float,
                    group: ProcessGroup | None = None) -> dict[str, float]:
    """The statistics above for the assigned crops of this step, over every rank in `group`: one all-reduce and
    one read of their own (the training loop packs the sums into its log step's reduction instead)."""
    sums = all_reduce(code_sums(scores, codes, temperature), group=group)
    return code_statistics_of(code_figures(sums).tolist(), (len(sums) - 3) // 3)


STUCK_ADVICE = ("freeze the prototypes longer (swav.freeze_prototypes_iters), lower swav.epsilon (e.g. 0.03), "
                "start the queue later (swav.queue_start_epoch) or lower optim.base_lr")
COLLAPSE_ADVICE = ("with a small global batch, add a queue (swav.queue_length, a multiple of optim.batch_size) so "
                   "Sinkhorn spreads the codes over more samples; check that the augmentations are on (crops.*), and "
                   "lower optim.base_lr")


class HealthCheck:
    """Warns, once each, when training looks stuck at ln K or collapsed, after `patience` consecutive logged steps
    past `grace_steps` (the prototypes are frozen and the loss is at ln K by design at the start)."""

    def __init__(self, num_prototypes: int, grace_steps: int, patience: int = 5) -> None:
        self.k = num_prototypes
        self.ln_k = math.log(num_prototypes)
        self.grace_steps = grace_steps
        self.patience = patience
        self.streaks = {"stuck": 0, "collapsed": 0}
        self.warned: set[str] = set()

    def check(self, step: int, loss: float, stats: dict[str, float]) -> list[str]:
        """The new warnings at this logged step (empty when all is well or already said)."""
        if step <= self.grace_steps:
            return []
        signs = {
            "stuck": abs(loss - self.ln_k) < 0.01 * self.ln_k and stats["prediction_confidence"] < 2 / self.k,
            # predictions concentrated on a few prototypes (flat codes make the argmax count meaningless, so
            # `prototypes_used` alone is not evidence: uniform predictions give it too)
            "collapsed": stats["prediction_entropy"] < 0.5,
        }
        out = []
        for name, bad in signs.items():
            self.streaks[name] = self.streaks[name] + 1 if bad else 0
            if self.streaks[name] >= self.patience and name not in self.warned:
                self.warned.add(name)
                out.append(self._message(name, step, loss, stats))
        return out

    def _message(self, name: str, step: int, loss: float, stats: dict[str, float]) -> str:
        if name == "stuck":
            return (f"step {step}: the loss ({loss:.4f}) has stayed at ln K = {self.ln_k:.4f} with uniform predictions "
                    f"for {self.patience} logged steps: SwAV is not learning. Try: {STUCK_ADVICE}")
        return (f"step {step}: training looks collapsed: {stats['prototypes_used']:.0%} of the prototypes are used "
                f"and the mean prediction's entropy is {stats['prediction_entropy']:.2f} of ln K, for "
                f"{self.patience} logged steps. Try: {COLLAPSE_ADVICE}")
