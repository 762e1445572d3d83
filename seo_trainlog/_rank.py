"""The one place that decides which process writes what, and how the processes of one run agree."""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class ProcessRole:
    """Where this process sits in a (possibly distributed, possibly multi-node) run.

    ``rank`` and ``world_size`` come from ``torch.distributed`` when it is initialised, else from the
    launcher's ``RANK``/``WORLD_SIZE`` (torchrun, accelerate launch, SLURM-style launchers set them on
    every node), else a single process (0 and 1). ``local_rank`` is ``LOCAL_RANK`` (0 by default),
    ``node_rank`` is ``NODE_RANK``/``GROUP_RANK`` (0 by default), ``host`` the machine's host name.
    """

    rank: int
    local_rank: int
    world_size: int
    node_rank: int
    host: str

    @property
    def is_world_process_zero(self) -> bool:
        return self.rank == 0

    def identity(self) -> dict[str, int | str]:
        """The fields every JSON record carries: ``rank``, ``local_rank``, ``world_size``, ``host``."""
        return {"rank": self.rank, "local_rank": self.local_rank, "world_size": self.world_size, "host": self.host}


def process_role() -> ProcessRole:
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    dist = _initialised_distributed()
    if dist is not None:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return ProcessRole(rank=rank, local_rank=_env_int("LOCAL_RANK", 0), world_size=world_size,
                       node_rank=_env_int("NODE_RANK", _env_int("GROUP_RANK", 0)), host=socket.gethostname())


def writes_shared_files(state=None) -> bool:
    """True on the world-process-zero, the only process that writes the shared files: the Trainer's
    ``state.is_world_process_zero`` when a ``TrainerState`` is given, else :func:`process_role`.
    Every other process writes only its own rank-named error files."""
    if state is not None:
        return bool(state.is_world_process_zero)
    return process_role().is_world_process_zero


_SEQUENCE = itertools.count()
POINTER_WAIT_S = 30.0


def agree_on_run_id(log_dir: Path, claim: Callable[[], str], role: ProcessRole) -> str:
    """The run stamp, the same on every rank of one launch, without any collective operation (so a
    TrainLogger made on the main process only can never hang the others).

    In a single process: ``claim()``. In a distributed launch, rank 0 claims the stamp and writes it
    to ``<log_dir>/.seo_trainlog-run-<launch>-<n>``, where ``<launch>`` hashes the launcher's
    ``TORCHELASTIC_RUN_ID``, ``MASTER_ADDR``, ``MASTER_PORT`` and ``WORLD_SIZE`` (the same on every node)
    and ``<n>`` counts the TrainLoggers this process opened; the other ranks read it (only a pointer
    written after their own start, less 30 s: not one left by an earlier launch), waiting up to 30 s
    for rank 0, then fall back to a stamp of their own second.
    """
    if role.world_size < 2:
        return claim()
    launch = hashlib.sha1("|".join(os.environ.get(name, "") for name in
                                   ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")).encode())
    pointer = log_dir / f".seo_trainlog-run-{launch.hexdigest()[:16]}-{next(_SEQUENCE)}"
    if role.is_world_process_zero:
        stamp = claim()
        temporary = pointer.with_name(f"{pointer.name}.{os.getpid()}.tmp")
        temporary.write_text(stamp, encoding="utf-8")
        os.replace(temporary, pointer)
        return stamp
    not_before = psutil.Process().create_time() - POINTER_WAIT_S
    deadline = time.monotonic() + POINTER_WAIT_S
    while time.monotonic() < deadline:
        try:
            if pointer.stat().st_mtime >= not_before:
                return pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    return time.strftime("%Y%m%d_%H%M%S")


def _initialised_distributed():
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
