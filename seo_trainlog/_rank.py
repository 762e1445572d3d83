"""The one place that decides which process writes the run's shared files."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessRole:
    """Where this process sits in a (possibly distributed) run.

    ``rank``/``local_rank``/``world_size`` come from ``torch.distributed`` when it is initialised,
    else from the launcher's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` variables (torchrun, accelerate),
    else a single process: 0, 0, 1.
    """

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_world_process_zero(self) -> bool:
        return self.rank == 0


def process_role() -> ProcessRole:
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return ProcessRole(rank=rank, local_rank=_env_int("LOCAL_RANK", 0), world_size=world_size)


def writes_shared_files(state=None) -> bool:
    """True on the world-process-zero: the Trainer's ``state.is_world_process_zero`` when a
    ``TrainerState`` is given, else :func:`process_role`."""
    if state is not None:
        return bool(state.is_world_process_zero)
    return process_role().is_world_process_zero


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
