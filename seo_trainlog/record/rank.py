"""The one place that decides which process writes what, and how the processes of one run agree."""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import psutil


@dataclass(frozen=True)
class ProcessRole:
    """Where this process sits in a (possibly distributed, possibly multi-node) run.

    ``rank`` and ``world_size`` come from ``torch.distributed`` when it is initialised, else from the
    launcher's ``RANK``/``WORLD_SIZE`` (torchrun, accelerate launch, SLURM-style launchers set them on
    every node), else a single process (0 and 1). ``local_rank`` is ``LOCAL_RANK`` (0 by default),
    ``node_rank`` is ``NODE_RANK``/``GROUP_RANK`` (0 by default; torchrun sets ``GROUP_RANK``), ``host``
    the machine's host name.
    """

    rank: int
    local_rank: int
    world_size: int
    node_rank: int
    host: str

    @property
    def is_world_process_zero(self) -> bool:
        return self.rank == 0

    @property
    def is_node_leader(self) -> bool:
        """True on local rank 0 of a node other than node 0: it writes the node's own file set."""
        return self.rank != 0 and self.local_rank == 0 and self.node_rank != 0

    @property
    def file_tag(self) -> str:
        """The part of this process's file names between the prefix and the stamp: ``""`` on global
        rank 0 (the shared files), ``node<N>`` on a node leader, ``rank<N>`` on every other rank."""
        if self.rank == 0:
            return ""
        return f"node{self.node_rank}" if self.is_node_leader else f"rank{self.rank}"

    @property
    def writes_file_set(self) -> bool:
        """True on global rank 0 and on the node leaders: a full file set (progress, resources,
        hyperparameters, summary, manifest); every other rank writes its error files and its
        per-rank metrics only."""
        return self.rank == 0 or self.is_node_leader

    def identity(self) -> dict[str, int | str]:
        """The fields every JSON record carries: ``rank``, ``local_rank``, ``world_size``, ``host``, and
        in a distributed run ``node_rank``."""
        identity: dict[str, int | str] = {"rank": self.rank, "local_rank": self.local_rank,
                                          "world_size": self.world_size, "host": self.host}
        if self.world_size > 1:
            identity["node_rank"] = self.node_rank
        return identity


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
    Every other process writes only its own rank- or node-named files."""
    if state is not None:
        return bool(state.is_world_process_zero)
    return process_role().is_world_process_zero


_SEQUENCE = itertools.count()
POINTER_WAIT_S = 30.0  # how long a rank waits for rank 0's stamp (store or pointer file)
STORE_CONNECT_S = 3.0  # how long a process tries to reach the launcher's store before the file fallback
KEY_PREFIX = "seo_trainlog"


@dataclass(frozen=True)
class RunAgreement:
    """The run stamp and how it was agreed: ``source`` is ``single`` (one process), ``store`` (the
    launcher's rendezvous store), ``file`` (the pointer file in a shared log directory) or ``own``
    (nothing from rank 0 within 30 s: a stamp of this process's own second). ``key`` names the run's
    entries in the store (the per-rank telemetry goes under it); ``None`` without a store. ``reason``:
    with ``own``, why rank 0's stamp was not learnt (which store, which pointer file, how long waited)."""

    stamp: str
    source: str
    key: str | None = None
    reason: str | None = None


def launch_id() -> str:
    """Who this launch is, the same on every node: torchrun's ``TORCHELASTIC_RUN_ID`` and
    ``TORCHELASTIC_RESTART_COUNT`` (a restarted launch agrees anew), ``MASTER_ADDR``, ``MASTER_PORT``
    and ``WORLD_SIZE``, hashed."""
    return hashlib.sha1("|".join(os.environ.get(name, "") for name in (
        "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")
    ).encode()).hexdigest()[:16]


def agree_on_run_id(log_dir: Path, claim: Callable[[], str], role: ProcessRole,
                    given: str | None = None, notice: Callable[[str], None] | None = None) -> RunAgreement:
    """The run stamp, the same on every rank of one launch, without any collective operation (so a
    TrainLogger made on the main process only can never hang the others).

    In a single process: ``claim()``. In a distributed launch, rank 0 claims the stamp and the other
    ranks learn it, first through the launcher's rendezvous store (see :func:`launch_store`; no shared
    disk needed): rank 0 ``set``s it under ``seo_trainlog/<launch>/<n>/run_id``, where ``<launch>``
    is :func:`launch_id` and ``<n>`` counts the TrainLoggers this process opened, and the others
    ``wait`` for that key up to 30 s (then their own stamp). When no store can be reached, through a pointer file
    ``<log_dir>/.seo_trainlog-run-<launch>-<n>`` in a shared log directory (only a pointer written after
    the reader's own start, less 30 s: not one left by an earlier launch), waited for up to 30 s. A rank
    that learns nothing within 30 s uses a stamp of its own second (``source == "own"``).

    ``given``: the run id is known already (a resumed run, every rank reads it from the checkpoint):
    nothing is agreed (``source == "given"``), but the run's store key is still made, in the same
    order on every rank, for the per-rank telemetry.

    ``notice``: told (one line) before a non-zero rank starts waiting for a pointer file, since that
    wait is the one that can take 30 s (e.g. the console's stderr). With ``own``, ``reason`` says why.
    """
    if role.world_size < 2:
        return RunAgreement(given, "given") if given is not None else RunAgreement(claim(), "single")
    launch, number = launch_id(), next(_SEQUENCE)
    key = f"{KEY_PREFIX}/{launch}/{number}"
    store = launch_store()
    if given is not None:
        return RunAgreement(given, "given", key if store is not None else None)
    endpoint = _endpoint()
    if store is not None:
        agreed = _agree_through_store(store, key, claim, role)
        if isinstance(agreed, RunAgreement):
            return agreed
        no_store = f"the launcher's store at {endpoint} failed ({agreed})"
    elif not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
        no_store = "no store to ask (MASTER_ADDR/MASTER_PORT not set)"
    else:
        no_store = f"no store reachable at MASTER_ADDR:MASTER_PORT {endpoint}"
    pointer = log_dir / f".seo_trainlog-run-{launch}-{number}"
    if role.is_world_process_zero:
        stamp = claim()
        temporary = pointer.with_name(f"{pointer.name}.{os.getpid()}.tmp")
        temporary.write_text(stamp, encoding="utf-8")
        os.replace(temporary, pointer)
        return RunAgreement(stamp, "file")
    if notice is not None:
        notice(f"rank {role.rank}: {no_store}; waiting up to {POINTER_WAIT_S:g} s for rank 0's run id in the "
               f"pointer file {pointer} (found only when the log directory is shared with rank 0)")
    not_before = psutil.Process().create_time() - POINTER_WAIT_S
    deadline = time.monotonic() + POINTER_WAIT_S
    while time.monotonic() < deadline:
        try:
            if pointer.stat().st_mtime >= not_before:
                return RunAgreement(pointer.read_text(encoding="utf-8").strip(), "file")
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    return RunAgreement(time.strftime("%Y%m%d_%H%M%S"), "own",
                        reason=f"{no_store}, and rank 0's pointer file {pointer} was not found within "
                               f"{POINTER_WAIT_S:g} s (the log directory is not shared with rank 0, or rank 0 "
                               "opened no TrainLogger)")


def _endpoint() -> str:
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def _agree_through_store(store: Any, key: str, claim: Callable[[], str], role: ProcessRole) -> RunAgreement | str:
    """Rank 0 sets, the others wait (bounded); when the store fails, what it raised (the file fallback then).
    A store that answers but gets no stamp within the wait means rank 0 opened no TrainLogger (or
    has not yet): the rank goes on with its own stamp at once (rank 0 would have used the same store)."""
    started = time.monotonic()
    try:
        if role.is_world_process_zero:
            stamp = claim()
            store.set(f"{key}/run_id", stamp)
            return RunAgreement(stamp, "store", key)
        store.wait([f"{key}/run_id"], timedelta(seconds=POINTER_WAIT_S))
        return RunAgreement(store.get(f"{key}/run_id").decode("utf-8"), "store", key)
    except Exception as exc:
        if time.monotonic() - started >= POINTER_WAIT_S:  # waited in vain, not a failure of the store
            return RunAgreement(time.strftime("%Y%m%d_%H%M%S"), "own", key,
                                reason=f"rank 0's run id never arrived through the launcher's store at "
                                       f"{_endpoint()} within {POINTER_WAIT_S:g} s (rank 0 opened no "
                                       "TrainLogger, or not yet)")
        return f"{type(exc).__name__}: {exc}"  # unreachable now: the shared-file pointer


_STORE_LOCK = threading.Lock()
_STORES: dict[tuple[str, str], Any] = {}  # by (MASTER_ADDR, MASTER_PORT): a client, or None (unreachable)


def launch_store() -> Any | None:
    """A client of the launcher's rendezvous key-value store, or None where there is none.

    Once a process group exists, its default store (``torch.distributed``'s, unwrapped from its
    ``PrefixStore`` layers to the launcher's ``TCPStore`` itself); before that, a
    ``torch.distributed.TCPStore(MASTER_ADDR, MASTER_PORT, is_master=False)`` client, tried for at
    most :data:`STORE_CONNECT_S` seconds: torchrun's agent hosts the store there
    (``TORCHELASTIC_USE_AGENT_STORE=True``, torch >= 2.4). Both reach the same server, so keys agree
    whichever way a rank took. Not a collective: nothing here waits for another rank. The answer is
    kept for the process (a store that cannot be reached is not tried again)."""
    endpoint = (os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
    with _STORE_LOCK:
        known = _STORES.get(endpoint)
        if known is not None:
            return known
        store = _default_store()
        if store is None and endpoint not in _STORES:
            store = _tcp_client()
        _STORES[endpoint] = store
        return store


def _default_store() -> Any | None:
    dist = _initialised_distributed()
    if dist is None:
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        while type(store).__name__ == "PrefixStore":
            store = store.underlying_store
        return store
    except Exception:
        return None


def _tcp_client() -> Any | None:
    address, port = os.environ.get("MASTER_ADDR"), _env_int("MASTER_PORT", 0)
    if not address or not 0 < port < 65536:
        return None
    try:  # nothing listening (refused, unreachable): no store, and none of c10d's retry warnings on stderr
        socket.create_connection((address, port), timeout=STORE_CONNECT_S).close()
    except OSError:
        return None
    try:
        from torch.distributed import TCPStore

        return TCPStore(address, port, is_master=False, timeout=timedelta(seconds=STORE_CONNECT_S),
                        wait_for_workers=False)
    except Exception:
        return None


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


class TelemetryExchange:
    """Each rank's latest logging intervals, shared through the launcher's store (see
    :func:`launch_store`) without a collective operation: nothing here waits for another rank.

    Every rank :meth:`post`\\ s its numbers at each of its logging steps: the last :data:`KEEP` intervals
    ``{"node_rank", "host", "recent": [[global_step, sample], ...]}`` as one JSON value under
    ``<run key>/rank/<rank>``, overwritten (one ``set``); :attr:`identities` holds each rank's
    ``{"node_rank", "host"}`` (its own from the start, the others' once collected). Global rank 0
    :meth:`collect`\\ s the others' at its own logging steps: a non-blocking ``check`` for ranks not
    seen yet, then one ``multi_get`` of those that posted. A store failure is reported once through ``warn`` and switches the exchange off; training goes on.
    """

    KEEP = 16

    def __init__(self, store: Any, key: str, role: ProcessRole, warn: Callable[[str], None]) -> None:
        self._store, self._key, self._role, self._warn = store, key, role, warn
        self.recent: deque[tuple[int, dict[str, float]]] = deque(maxlen=self.KEEP)  # this rank's
        self._seen: list[int] = []
        self.identities: dict[int, dict[str, Any]] = {role.rank: {"node_rank": role.node_rank, "host": role.host}}
        self.enabled = True

    def _rank_key(self, rank: int) -> str:
        return f"{self._key}/rank/{rank}"

    def post(self, global_step: int, sample: dict[str, float]) -> None:
        """Keep this rank's ``sample`` (see :func:`~seo_trainlog.watch.anomaly.rank_sample`) of the interval
        ending at ``global_step``, and publish the recent ones (not on rank 0: it reads its own)."""
        self.recent.append((global_step, sample))
        if not self.enabled or self._role.is_world_process_zero:
            return
        try:
            self._store.set(self._rank_key(self._role.rank), orjson.dumps(
                {**self.identities[self._role.rank], "recent": list(self.recent)}))
        except Exception as exc:
            self._fail(exc)

    def collect(self) -> dict[int, dict[int, dict[str, float]]]:
        """On rank 0: ``{rank: {global_step: sample}}`` of the other ranks that have posted."""
        if not self.enabled:
            return {}
        try:
            seen = set(self._seen)
            for rank in range(1, self._role.world_size):
                if rank not in seen and self._store.check([self._rank_key(rank)]):
                    self._seen.append(rank)
            if not self._seen:
                return {}
            values = self._store.multi_get([self._rank_key(rank) for rank in self._seen])
        except Exception as exc:
            self._fail(exc)
            return {}
        collected = {}
        for rank, value in zip(self._seen, values):
            try:
                posted = orjson.loads(value)
                if isinstance(posted, dict):  # {"node_rank", "host", "recent"}; a bare list before that
                    self.identities[rank] = {"node_rank": posted.get("node_rank"), "host": posted.get("host")}
                    posted = posted["recent"]
                collected[rank] = {int(step): sample for step, sample in posted}
            except (orjson.JSONDecodeError, TypeError, ValueError, KeyError):
                continue
        return collected

    def _fail(self, exc: Exception) -> None:
        self.enabled = False
        self._warn(f"the per-rank telemetry exchange through the launcher's store failed ({type(exc).__name__}: "
                   f"{exc}); straggler detection and the all-rank token counts during training are off, training goes on")
