"""Reconstruction over several processes (torchrun): each rank holds a shard of the calibration set.

Every rank draws the same global mini-batch indices, computes the error of the samples it owns
scaled by their share of the batch (so the sum over ranks is the single-process mean error), and
the gradients are summed across ranks after every backward pass: Adam then takes the same step
on every rank, and the result equals a single-process run on the union of the shards up to the
order of floating-point sums. Activation scales are searched on observations gathered from all
ranks. The run ends by checking that every rank holds bit-identical parameters.

Collectives go through `DistContext`, which turns a failed or timed-out collective (a peer that
died or hangs) into a `ReconstructionError`. The single-process context does nothing.
Backends: NCCL when the compute device is a CUDA GPU (rank on `cuda:LOCAL_RANK`), gloo otherwise.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor

from .errors import ConfigError, ReconstructionError
from .hashing import hash_tensor
from .quant.quantizers import search_sample

logger = logging.getLogger(__name__)

# Variables torchrun sets for every worker; the process group is initialized from them.
_REQUIRED_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun set it for this process (1 when not launched by torchrun)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={text!r} is not an integer: launch with torchrun") from None


class DistContext:
    """This process's place among the ranks of a run, and the collectives the run needs.

    `DistContext()` is the single-process context: every method returns its input unchanged.
    """

    def __init__(self, rank: int = 0, world_size: int = 1,
                 comm_device: torch.device | str = "cpu", timeout_s: float | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        # Where tensors must be for a collective: NCCL only moves CUDA tensors.
        self.comm_device = torch.device(comm_device)
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world_size={self.world_size})"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows progress and writes files."""
        return self.rank == 0

    # ---------------------------------------------------------------------- sharding

    def shard_range(self, total: int) -> tuple[int, int]:
        """This rank's contiguous part [start, stop) of `total` items split as evenly as possible."""
        base, extra = divmod(total, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, samples: Tensor) -> Tensor:
        """This rank's contiguous slice of `samples` (first dimension)."""
        start, stop = self.shard_range(samples.shape[0])
        return samples[start:stop]

    # ---------------------------------------------------------------------- collectives

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as exc:  # gloo/NCCL errors (torch.distributed.DistError included)
            detail = " ".join(str(exc).split())[:300]
            raise ReconstructionError(
                f"rank {self.rank} of {self.world_size}: {what} across ranks failed ({detail}). "
                f"Another rank has probably died or hangs (a rank waits at most --dist-timeout "
                f"{self.timeout_s:g}s for the others): see the other ranks' errors"
            ) from exc

    def sizes(self, count: int) -> list[int]:
        """`count` of every rank, in rank order."""
        if not self.distributed:
            return [count]
        local = torch.tensor([count], dtype=torch.int64, device=self.comm_device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        with self._collective("exchanging sizes"):
            torch_dist.all_gather(parts, local)
            return [int(p) for p in parts]

    def sum_values(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of `values` over all ranks (float64)."""
        if not self.distributed:
            return [float(v) for v in values]
        summed = torch.tensor([float(v) for v in values], dtype=torch.float64,
                              device=self.comm_device)
        with self._collective("summing values"):
            torch_dist.all_reduce(summed)
            return summed.tolist()

    def global_mean(self, tensor: Tensor) -> Tensor:
        """Mean of `tensor`'s elements over all ranks (as a 0-d tensor on `tensor`'s device)."""
        if not self.distributed:
            return tensor.mean()
        total, count = self.sum_values([float(tensor.double().sum()), tensor.numel()])
        return torch.tensor(total / count, dtype=tensor.dtype, device=tensor.device)

    def sum_gradients(self, params: Sequence[Tensor]) -> None:
        """Replace each parameter's gradient by its sum over ranks (a missing one counts as 0).

        Every rank must call this with the same parameters in the same order.
        """
        if not self.distributed or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.comm_device)
        with self._collective("summing gradients"):
            torch_dist.all_reduce(flat)
        flat = flat.to(params[0].device)
        for p, summed in zip(params, flat.split([p.numel() for p in params])):
            p.grad = summed.view_as(p)

    def gather(self, flat: Tensor) -> Tensor:
        """The 1-D tensors of all ranks (sizes may differ), concatenated in rank order."""
        if not self.distributed:
            return flat
        sizes = self.sizes(flat.numel())
        padded = flat.new_zeros(max(sizes), device=self.comm_device)
        padded[: flat.numel()] = flat.to(self.comm_device)
        parts = [torch.empty_like(padded) for _ in sizes]
        with self._collective("gathering observations"):
            torch_dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(flat.device)

    def gather_search_sample(self, flat: Tensor) -> Tensor:
        """What `search_sample` returns for the concatenation of every rank's `flat`.

        Only the strided subsample and the extremes travel, not the whole activation.
        """
        if not self.distributed:
            return flat
        sizes = self.sizes(flat.numel())
        return search_sample(flat, self.gather, offset=sum(sizes[: self.rank]), total=sum(sizes))

    def gather_objects(self, obj: Any) -> list[Any]:
        """`obj` of every rank (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._collective("gathering states"):
            torch_dist.all_gather_object(out, obj)
        return out

    def check_identical(self, tensors: Mapping[str, Tensor], what: str, fix: str) -> None:
        """Raise ReconstructionError naming the tensors whose bits differ between ranks."""
        if not self.distributed:
            return
        names = sorted(tensors)
        if len(set(self.sizes(len(names)))) > 1:
            raise ReconstructionError(
                f"rank {self.rank}: the ranks hold different numbers of {what}; {fix}"
            )
        local = torch.tensor([_digest(tensors[n]) for n in names], dtype=torch.int64,
                             device=self.comm_device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        with self._collective(f"comparing {what}"):
            torch_dist.all_gather(parts, local)
        digests = torch.stack(parts).cpu()
        differing = [n for i, n in enumerate(names) if bool((digests[:, i] != digests[0, i]).any())]
        if differing:
            shown = ", ".join(differing[:8]) + (f" and {len(differing) - 8} more"
                                               if len(differing) > 8 else "")
            raise ReconstructionError(
                f"{what} differ between ranks ({len(differing)} of {len(names)} tensors: "
                f"{shown}); {fix}"
            )


def _digest(tensor: Tensor) -> int:
    """64-bit hash of a tensor's dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=8)
    hash_tensor(h, tensor)
    return int.from_bytes(h.digest(), "little", signed=True)


SINGLE_PROCESS = DistContext()


def current(timeout_s: float | None = None) -> DistContext:
    """The context of an initialized default process group, else the single-process one.

    `timeout_s` is the group's collective timeout, for error messages.
    """
    if not torch_dist.is_available() or not torch_dist.is_initialized():
        return SINGLE_PROCESS
    world = torch_dist.get_world_size()
    if world == 1:
        return SINGLE_PROCESS
    nccl = torch_dist.get_backend() == "nccl"
    comm = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return DistContext(torch_dist.get_rank(), world, comm, timeout_s)


@contextmanager
def _blocking_nccl_waits(backend: str) -> Iterator[None]:
    """Blocking waits for the NCCL process group created inside the block, and for nothing else.

    Without them a collective that runs past the group's timeout aborts the whole process from
    NCCL's watchdog thread; with them it raises in the waiting call, and the rank stops with a
    ReconstructionError. torch has no process-group option for this: the NCCL group reads
    TORCH_NCCL_BLOCKING_WAIT once, when it is constructed, so the variable is set only for that
    call and then restored, leaving the caller's environment (and its other process groups and
    child processes) as it was. A value the caller set is respected.
    """
    name = "TORCH_NCCL_BLOCKING_WAIT"
    if backend != "nccl" or name in os.environ:
        yield
        return
    os.environ[name] = "1"
    try:
        yield
    finally:
        os.environ.pop(name, None)


@contextmanager
def session(device: torch.device, timeout_s: float) -> Iterator[DistContext]:
    """This process's context; under torchrun (WORLD_SIZE > 1) the process group is
    initialized from the environment for the duration of the block.

    NCCL on CUDA devices (each rank on `cuda:LOCAL_RANK`), gloo otherwise; collectives give up
    after `timeout_s` seconds.
    """
    world = launched_world_size()
    if world <= 1 or (torch_dist.is_available() and torch_dist.is_initialized()):
        yield current(timeout_s)
        return
    if not torch_dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: run in one process")
    missing = [name for name in _REQUIRED_ENV if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with "
                          "torchrun (it sets them), or unset WORLD_SIZE")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise ConfigError(
                f"--device {device} under torchrun: each rank uses cuda:LOCAL_RANK, so pass "
                "--device cuda (or auto)"
            )
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s): "
                "start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        backend, comm = "nccl", torch.device("cuda", local_rank)
    else:
        backend, comm = "gloo", torch.device("cpu")
    context = DistContext(rank, world, comm, timeout_s)
    with context._collective("joining the process group"), _blocking_nccl_waits(backend):
        torch_dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                      rank=rank, world_size=world)
    logger.info("rank %d of %d joined (%s backend, device %s)", rank, world, backend, device)
    try:
        yield context
    finally:
        torch_dist.destroy_process_group()
