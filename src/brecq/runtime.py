"""Where a run computes and keeps its tensors, and the device mechanics of running fast.

Device choice (`resolve_device`), where unit caches live (`CachePlacement`), reduced-precision
arithmetic, and the CUDA specifics of replaying a step (side streams, graph capture) live here,
so that the CLI and the search can pick a device without importing the pipeline, and the
reconstruction loops hold no stream or graph code of their own.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .config import BrecqConfig
from .errors import ConfigError
from .recon.cache import ActivationCache

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a valid torch device: use cpu, cuda or auto") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available: use --device cpu")
    return device


@dataclass(frozen=True)
class CachePlacement:
    """Where unit caches live: `storage` device, with at most `device_budget` bytes on a GPU."""

    storage: torch.device
    device_budget: int | None

    @classmethod
    def resolve(cls, config: BrecqConfig, device: torch.device) -> CachePlacement:
        storage = device if config.cache_device == "auto" else resolve_device(config.cache_device)
        budget = None
        if config.cache_device == "auto" and device.type != "cpu":
            if config.cache_budget_gb is not None:
                budget = int(config.cache_budget_gb * 2**30)
            elif device.type == "cuda":
                # A quarter of what is free leaves room for the unit's own forward and backward.
                budget = torch.cuda.mem_get_info(device)[0] // 4
        return cls(storage, budget)

    def new_cache(self, device: torch.device) -> ActivationCache:
        return ActivationCache(device, self.storage, self.device_budget)


@contextlib.contextmanager
def reduced_precision(kind: str, device: torch.device) -> Iterator[None]:
    """Autocast to bf16/fp16, or allow TF32 matmuls and convolutions on CUDA; `none` does nothing."""
    if kind in ("bf16", "fp16"):
        dtype = torch.bfloat16 if kind == "bf16" else torch.float16
        # No cast cache: each weight is cast once per step anyway, and a CUDA graph capture
        # must not keep cached casts from outside the graph.
        with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
            yield
    elif kind == "tf32":
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    else:
        yield


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_on_side_stream(fn: Callable[[], None], device: torch.device) -> None:
    """Run `fn` on a fresh side stream ordered after and before the current one (CUDA), or just
    run it. Warm-up steps before a graph capture must run off the default stream."""
    if device.type != "cuda":
        fn()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)


def capture_graph(fn: Callable[[], None], device: torch.device, description: str,
                  generators: Sequence[torch.Generator] = ()) -> Callable[[], None] | None:
    """`fn` captured as a CUDA graph (its replay), or None if it cannot be captured.

    Random numbers drawn inside from `generators` (CUDA generators other than the default one)
    advance on every replay: the graph is told about their state.
    """
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        if generator.device.type == "cuda":
            graph.register_generator_state(generator)
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
        logger.warning("%s: CUDA graph capture failed (%s: %s); reconstructing eagerly",
                       description, type(exc).__name__,
                       str(exc).splitlines()[0] if str(exc) else "")
        synchronize(device)
        return None
    return graph.replay
