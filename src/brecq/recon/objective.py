"""A unit's reconstruction error on its cached mini-batches, in one process or over several."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import DistContext
from ..quant import primitives as P
from .cache import FP_IN, FP_OUT, GRAD, Q_IN, ActivationCache
from .capture import as_tuple

# Mini-batch of the full-cache error evaluations: small enough that a 224x224 ResNet-50 unit's
# forward stays within a few GiB of GPU memory beside its cache.
EVAL_BATCH = 64


class UnitObjective:
    """Output error of a unit on cached mini-batches.

    QDrop's input masks come from `drop_generator` (on the compute device), never from torch's
    global generator.
    """

    def __init__(self, unit: nn.Module, cache: ActivationCache, loss_p: float,
                 channels_last: bool = False, drop_generator: torch.Generator | None = None) -> None:
        self.unit = unit
        self.cache = cache
        self.loss_p = loss_p
        self.drop_generator = drop_generator
        cache.use_channels_last(channels_last)
        self.input_keys = cache.keys_with_prefix(Q_IN)
        self.fp_input_keys = cache.keys_with_prefix(FP_IN)
        self.output_keys = cache.keys_with_prefix(FP_OUT)
        self.grad_keys = cache.keys_with_prefix(GRAD)

    @property
    def num_samples(self) -> int:
        return len(self.cache)

    @property
    def device(self) -> torch.device:
        return self.cache.compute_device

    @property
    def index_device(self) -> torch.device:
        return self.cache.index_device

    def local_batch(self, index: Tensor, drop_prob: float = 0.0) -> tuple[tuple | None, float]:
        """The batch of samples `index` and its share of the mean error (1: all samples here)."""
        return self.batch(index, drop_prob), 1.0

    def batch(self, index: Tensor, drop_prob: float = 0.0) -> tuple[list[Tensor], ...]:
        """Inputs, targets and Fisher weights (empty list without) of samples `index`."""
        inputs = [self.cache.batch(k, index) for k in self.input_keys]
        if drop_prob > 0 and self.fp_input_keys:
            # QDrop on the unit input: each element is the float input with probability p.
            # Integer and boolean inputs (token ids, attention masks) are never quantized.
            mixed = []
            for q_in, key in zip(inputs, self.fp_input_keys):
                if not q_in.is_floating_point():
                    mixed.append(q_in)
                    continue
                fp_in = self.cache.batch(key, index)
                keep = P.keep_mask(q_in, drop_prob, self.drop_generator)
                mixed.append(torch.lerp(q_in, fp_in, keep))
            inputs = mixed
        targets = [self.cache.batch(k, index) for k in self.output_keys]
        weights = [self.cache.batch(k, index) for k in self.grad_keys]
        return inputs, targets, weights

    def loss(self, inputs: list[Tensor], targets: list[Tensor], weights: list[Tensor]) -> Tensor:
        outputs = as_tuple(self.unit(*inputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for k, out in enumerate(outputs):
            if not out.is_floating_point():  # an attention mask the next unit reads as well
                continue
            weight = weights[k] if weights else None
            total = total + P.lp_error(out.float(), targets[k], self.loss_p, weight)
        return total

    def error(self, index: Tensor, drop_prob: float = 0.0) -> Tensor:
        return self.loss(*self.batch(index, drop_prob))

    @torch.no_grad()
    def full_error(self, batch_size: int = EVAL_BATCH) -> float:
        """Mean error over all cached samples (quantization as it is now, no dropping)."""
        count = len(self.cache)
        total = torch.zeros((), device=self.cache.compute_device)
        for start in range(0, count, batch_size):
            index = torch.arange(start, min(count, start + batch_size))
            total += self.error(index) * len(index)
        return float(total) / max(1, count)


class ShardedObjective:
    """A unit's error over the union of every rank's cache; each rank holds its own shard.

    Mini-batch indices are global (ranks' shards in rank order); each rank computes the error of
    the samples it owns, weighted by their share of the batch, so the sum over ranks is the
    single-process mean error and, once gradients are summed across ranks, its gradient.
    """

    def __init__(self, local: UnitObjective, dist: DistContext) -> None:
        self.local = local
        self.dist = dist
        sizes = dist.sizes(local.num_samples)
        self.offset = sum(sizes[: dist.rank])
        self.num_samples = sum(sizes)
        self.device = local.device
        self.index_device = local.index_device
        self.loss = local.loss

    def local_batch(self, index: Tensor, drop_prob: float = 0.0) -> tuple[tuple | None, float]:
        owned = index[(index >= self.offset) & (index < self.offset + self.local.num_samples)]
        if owned.numel() == 0:
            return None, 0.0
        return self.local.batch(owned - self.offset, drop_prob), owned.numel() / index.numel()

    def error(self, index: Tensor, drop_prob: float = 0.0) -> Tensor:
        batch, share = self.local_batch(index, drop_prob)
        if batch is None:
            # Nothing of this batch is here: no gradient (sum_gradients counts it as zero).
            return torch.zeros((), device=self.device, requires_grad=True)
        return self.loss(*batch) * share

    def full_error(self, batch_size: int = EVAL_BATCH) -> float:
        count = self.local.num_samples
        total, seen = self.dist.sum_values([self.local.full_error(batch_size) * count, count])
        return total / seen


Objective = UnitObjective | ShardedObjective
