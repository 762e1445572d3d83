"""Resource readings: process and system memory and CPU (psutil), GPUs (NVML via nvidia-ml-py,
imported as ``pynvml``) and CUDA memory (torch.cuda). The sampler runs in a background thread;
nothing here is ever called from ``on_step_end`` or the collator."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import psutil

MB = 2**20


@functools.lru_cache(maxsize=4)
def _process(pid: int) -> psutil.Process:
    return psutil.Process(pid)


def rss_mb() -> float:
    """Resident set size of this process in MiB (2**20 bytes), from ``psutil.Process().memory_info()``."""
    return _process(os.getpid()).memory_info().rss / MB


class Stats:
    """min / mean / max of each key over the samples added since the last :meth:`drain`, plus the
    same over all samples since creation (:meth:`totals`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interval: dict[str, list[float]] = {}
        self._run: dict[str, list[float]] = {}

    def add(self, sample: Mapping[str, float]) -> None:
        with self._lock:
            for table in (self._interval, self._run):
                for key, value in sample.items():
                    entry = table.get(key)
                    if entry is None:
                        table[key] = [value, value, value, 1.0]  # min, sum, max, count
                    else:
                        entry[0] = min(entry[0], value)
                        entry[1] += value
                        entry[2] = max(entry[2], value)
                        entry[3] += 1

    @property
    def empty(self) -> bool:
        return not self._interval

    def drain(self) -> dict[str, float]:
        """``key`` (mean), ``key_min``, ``key_max`` per key since the last drain; then reset."""
        with self._lock:
            interval, self._interval = self._interval, {}
        return _summarise(interval)

    def totals(self) -> dict[str, float]:
        with self._lock:
            return _summarise(self._run)


def _summarise(table: Mapping[str, list[float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, (low, total, high, count) in table.items():
        out[key] = total / count
        out[f"{key}_min"] = low
        out[f"{key}_max"] = high
    return out


class CpuReader:
    """``rss_mb``, ``sys_mem_used_mb``, ``sys_mem_available_mb``, ``cpu_pct`` (this process, percent
    of one core, since the previous reading), all from psutil."""

    def __init__(self) -> None:
        self._process = _process(os.getpid())
        self._process.cpu_percent(None)  # the first reading is meaningless: prime it

    def read(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        return {
            "rss_mb": self._process.memory_info().rss / MB,
            "sys_mem_used_mb": memory.used / MB,
            "sys_mem_available_mb": memory.available / MB,
            "cpu_pct": self._process.cpu_percent(None),
        }


def visible_gpu_ids(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of physical indices or UUIDs (``GPU-...``, ``MIG-...``) in
    CUDA's logical order; ``None`` when the variable is unset (every device is visible)."""
    env = os.environ if environ is None else environ
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    ids = []
    for part in raw.split(","):
        part = part.strip()
        if not part or part.startswith("-"):
            break  # CUDA stops at the first invalid entry
        ids.append(part)
    return ids


class NvmlReader:
    """Per GPU: ``gpu{i}_util_pct``, ``gpu{i}_mem_util_pct``, ``gpu{i}_mem_used_mb``,
    ``gpu{i}_mem_total_mb``, ``gpu{i}_power_w``, ``gpu{i}_temp_c``, from NVML, where ``i`` is the
    CUDA (logical) index: ``CUDA_VISIBLE_DEVICES`` is mapped to the physical devices.

    Args:
        local_rank: in a distributed run (``world_size`` > 1), only the device of this local rank
            is read; ``None`` reads every visible device.

    Raises:
        RuntimeError: from the constructor, saying why GPU monitoring is not possible (nvidia-ml-py
            missing, no driver, no device).
    """

    def __init__(self, local_rank: int | None = None, environ: Mapping[str, str] | None = None) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise RuntimeError(f"nvidia-ml-py (pynvml) is not importable: {exc}") from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise RuntimeError(f"NVML could not start (no NVIDIA driver?): {exc}") from None
        try:
            self._devices = self._resolve(visible_gpu_ids(environ), local_rank)
        except Exception:
            self.close()
            raise
        if not self._devices:
            self.close()
            raise RuntimeError("NVML sees no visible GPU")

    def _resolve(self, visible: list[str] | None, local_rank: int | None) -> list[tuple[int, Any]]:
        nvml = self._nvml
        try:
            if visible is None:
                handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            else:
                handles = [nvml.nvmlDeviceGetHandleByIndex(int(ident)) if ident.isdigit()
                           else nvml.nvmlDeviceGetHandleByUUID(ident) for ident in visible]
        except nvml.NVMLError as exc:
            raise RuntimeError(f"NVML could not list the visible GPUs ({visible}): {exc}") from None
        devices = list(enumerate(handles))
        if local_rank is not None:
            devices = [device for device in devices if device[0] == local_rank]
        return devices

    @property
    def logical_indices(self) -> list[int]:
        return [index for index, _ in self._devices]

    def read(self) -> dict[str, float]:
        """Raises ``pynvml.NVMLError`` when the driver stops answering."""
        nvml = self._nvml
        sample: dict[str, float] = {}
        for index, handle in self._devices:
            utilisation = nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            sample[f"gpu{index}_util_pct"] = float(utilisation.gpu)
            sample[f"gpu{index}_mem_util_pct"] = float(utilisation.memory)
            sample[f"gpu{index}_mem_used_mb"] = memory.used / MB
            sample[f"gpu{index}_mem_total_mb"] = memory.total / MB
            sample[f"gpu{index}_power_w"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts
            sample[f"gpu{index}_temp_c"] = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        return sample

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


def cuda_memory() -> dict[str, float]:
    """Per CUDA device this process uses: ``cuda{i}_allocated_mb``, ``cuda{i}_reserved_mb``,
    ``cuda{i}_max_allocated_mb`` (peak since the previous call: the peak counter is reset), from
    ``torch.cuda``. Empty without CUDA or before CUDA is initialised."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return {}
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    out: dict[str, float] = {}
    device = torch.cuda.current_device()
    out[f"cuda{device}_allocated_mb"] = torch.cuda.memory_allocated(device) / MB
    out[f"cuda{device}_reserved_mb"] = torch.cuda.memory_reserved(device) / MB
    out[f"cuda{device}_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
    torch.cuda.reset_peak_memory_stats(device)
    return out


class ResourceSampler:
    """Samples CPU/memory (and GPUs through NVML when possible) every ``interval_s`` seconds in a
    daemon thread, into :class:`Stats`.

    ``notice(message)`` receives, at most once each, the INFO lines that say GPU monitoring is off
    (and why) at start, or stopped mid-run after an NVML error; CPU sampling goes on regardless.
    NVML and psutil are first called in the thread (``nvmlInit`` takes tens of milliseconds on a
    GPU machine), not by the constructor or :meth:`start`: the first :meth:`drain` waits for them.
    ``interval_s`` of 0 (or less) starts no thread: :meth:`drain` then takes one reading itself.
    """

    READY_WAIT_S = 10.0  # the longest a first drain waits for the thread's first reading

    def __init__(self, interval_s: float, notice: Callable[[str], None], local_rank: int | None = None,
                 gpu_reader_factory: Callable[[], NvmlReader] | None = None) -> None:
        self.interval_s = interval_s
        self.stats = Stats()
        self._notice = notice
        self._gpu_factory = gpu_reader_factory or functools.partial(NvmlReader, local_rank)
        self._cpu: CpuReader | None = None
        self._gpu: NvmlReader | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()  # the readers are open and the first reading taken
        self._thread: threading.Thread | None = None
        self._start_scheduled = False  # start() handed to another thread (start_in): drain waits as for a thread
        self._gpu_lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._last: dict[str, float] | None = None
        self._repeat: dict[str, float] | None = None  # the latest reading as an interval summary

    def _open_readers(self) -> None:
        """psutil's process and NVML, once; says whether GPU monitoring is on."""
        with self._open_lock:
            if self._cpu is not None:
                return
            self._cpu = CpuReader()
            try:
                gpu = self._gpu_factory()
            except RuntimeError as exc:
                self._notice(f"GPU monitoring is off: {exc}")
                return
            if self._stop.is_set():  # stopped meanwhile
                gpu.close()
                return
            with self._gpu_lock:
                self._gpu = gpu
            self._notice(f"GPU monitoring is on: NVML, CUDA devices {gpu.logical_indices}")

    @property
    def gpu_on(self) -> bool:
        return self._gpu is not None

    def start(self) -> None:
        """The first reading: in the thread, first thing (the first :meth:`drain` waits for it), or
        here when there is no thread."""
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="seo_trainlog-sampler", daemon=True)
            self._thread.start()
        else:
            self.sample()
            self._ready.set()

    def start_in(self, schedule: Callable[[Callable[[], None]], None]) -> None:
        """Hand :meth:`start` to ``schedule`` (the callback passes its run's recorder thread), so that
        the caller does not start the thread itself; a :meth:`drain` before it ran waits for the
        first reading as it would for the thread's."""
        self._start_scheduled = True
        schedule(self.start)

    def _loop(self) -> None:
        try:
            self.sample()
        finally:
            self._ready.set()
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        if self._cpu is None:
            self._open_readers()
        reading = self._cpu.read()
        with self._gpu_lock:
            gpu = self._gpu
            if gpu is not None:
                try:
                    reading.update(gpu.read())
                except Exception as exc:  # pynvml.NVMLError and friends: stop GPU sampling, say so once
                    self._gpu = None
                    gpu.close()
                    self._notice(f"GPU monitoring stopped after an NVML error: {type(exc).__name__}: {exc}")
        self._last, self._repeat = reading, None
        self.stats.add(reading)

    def drain(self) -> dict[str, float]:
        """The interval's min/mean/max. An interval shorter than ``interval_s`` may hold no reading:
        it then repeats the latest one (a reading is taken here only before the first one, or when
        there is no thread: ``interval_s`` 0)."""
        if (self._thread is not None or self._start_scheduled) and not self._ready.is_set():
            self._ready.wait(self.READY_WAIT_S)
        if self.stats.empty:
            if self._last is None or self.interval_s <= 0:
                self.sample()
            else:
                if self._repeat is None:
                    self._repeat = _summarise({key: [value, value, value, 1.0] for key, value in self._last.items()})
                return self._repeat
        return self.stats.drain()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(1.0, 2 * self.interval_s))
        with self._gpu_lock:
            if self._gpu is not None:
                self._gpu.close()
                self._gpu = None
