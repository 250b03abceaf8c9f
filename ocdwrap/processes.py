"""The process group a collection or fit runs in: an ``accelerate.Accelerator``'s, torch.distributed's,
or a single process.

:class:`Processes` gives the rank, the world size, a barrier and the two reductions ocdwrap needs;
:func:`run_everywhere` runs a step on every process and makes every process raise when any fails,
so that no process waits forever for one that died.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import DistributedError

__all__ = ["Processes", "run_everywhere"]


@dataclass
class Processes:
    """Who this process is: ``rank`` of ``world`` (from an Accelerator or torch.distributed)."""

    rank: int
    world: int
    accelerator: Any = None

    @classmethod
    def current(cls, accelerator: Any = None) -> Processes:
        """The process group of ``accelerator``, else torch.distributed's, else a single process."""
        if accelerator is not None:
            return cls(accelerator.process_index, accelerator.num_processes, accelerator)
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(0, 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world == 1:
            return
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        else:
            dist.barrier()

    def _device(self) -> torch.device:
        if self.accelerator is not None:
            return self.accelerator.device
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over processes (accelerate's reduce where an Accelerator is given)."""
        t = t.to(self._device())
        if self.accelerator is not None:
            return self.accelerator.reduce(t, reduction="sum")
        dist.all_reduce(t)
        return t

    def all_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over processes of a small float tensor."""
        if self.world == 1:
            return values
        total = self._sum(values.detach().to(torch.float64))
        return (total / self.world).to(values.device, values.dtype)

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on at least one."""
        if self.world == 1:
            return flag
        return bool(self._sum(torch.tensor([int(flag)])).item() > 0)


def run_everywhere(procs: Processes, what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every process; if it fails on any, every process raises (none hangs)."""
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # re-raised below, after the others know
        error = e
    if procs.any(error is not None):
        if error is not None:
            raise error
        raise DistributedError(
            f"{what} failed on another process; its log has the error. Nothing was merged; "
            "fix the cause and run again (finished parts are resumed)."
        )
    return result
