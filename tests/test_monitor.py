"""Resource monitoring: psutil for real, NVML through a stand-in at the pynvml boundary, bottlenecks."""

from __future__ import annotations

import threading
import time
import types

import psutil
import pytest
from conftest import RunFiles, quiet
from transformers import DataCollatorWithPadding

from seo_trainlog import TimedDataCollator, TrainLogCallback
from seo_trainlog.watch.monitor import NvmlReader, ResourceSampler, visible_gpu_ids

GIB = 2**30


class FakeNvml(types.ModuleType):
    """Stands in for nvidia-ml-py's ``pynvml`` module: the same function names, argument and return
    types (utilisation in percent as ints, memory in bytes, power in milliwatts, temperature in °C)."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, devices, fail_after_reads=None, init_error=None):
        super().__init__("pynvml")
        self.devices = devices
        self.reads = 0
        self.fail_after_reads = fail_after_reads
        self.init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self):
        if self.init_error:
            raise self.NVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self.devices[index]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return next(device for device in self.devices if device["uuid"] == uuid)

    def nvmlDeviceGetUtilizationRates(self, handle):
        self.reads += 1
        if self.fail_after_reads is not None and self.reads > self.fail_after_reads:
            raise self.NVMLError("GPU is lost")
        return types.SimpleNamespace(gpu=handle["util"], memory=handle["mem_util"])

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(total=handle["total"], used=handle["used"], free=handle["total"] - handle["used"])

    def nvmlDeviceGetPowerUsage(self, handle):
        return handle["power_mw"]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return handle["temp"]


def device(n):
    return {"uuid": f"GPU-{n}", "util": 40 + n, "mem_util": 10 + n, "total": 80 * GIB, "used": (n + 1) * GIB,
            "power_mw": 250_000 + 1000 * n, "temp": 60 + n}


@pytest.fixture
def fake_nvml(monkeypatch):
    def install(**kwargs):
        module = FakeNvml([device(0), device(1), device(2)], **kwargs)
        monkeypatch.setitem(__import__("sys").modules, "pynvml", module)
        return module

    return install


def sampler_threads():
    return [t for t in threading.enumerate() if t.name == "seo_trainlog-sampler"]


def test_cpu_readings_are_real_and_the_thread_stops(make_trainer, log_dir):
    trainer = make_trainer(max_steps=6, logging_steps=2)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, sample_interval_s=0.01)))
    trainer.train()
    assert sampler_threads() == []
    rss_now = psutil.Process().memory_info().rss / 2**20
    run = RunFiles(log_dir)
    rows = run.records("train")
    assert [row["global_step"] for row in rows] == [2, 4, 6]
    for row in rows:
        assert row["rss_mb_min"] <= row["rss_mb"] <= row["rss_mb_max"]
        assert abs(row["rss_mb"] - rss_now) < 30  # MiB: the test process itself, moments apart
        assert 0 < row["sys_mem_used_mb"] and 0 < row["sys_mem_available_mb"] <= psutil.virtual_memory().total / 2**20
        assert row["cpu_pct"] >= 0
        assert not any(key.startswith("gpu") for key in row)
    performance = run.messages("model_performance")
    assert performance[0].startswith("GPU monitoring is off: ")
    intervals = [m for m in performance if m.startswith("steps_")]
    assert [m.split(" completed")[0] for m in intervals] == ["steps_1-2", "steps_3-4", "steps_5-6"]
    memory = performance[performance.index(intervals[0]) + 1]
    assert memory == f"Memory usage: {rows[0]['rss_mb_max']:.2f}MB"
    additional = performance[performance.index(intervals[0]) + 2]
    assert additional.startswith(f"Additional metrics: rss_mb={rows[0]['rss_mb']:.6f}, sys_mem_used_mb=")
    assert "data_wait_pct=" in additional and "GPU utilization" not in "".join(performance)
    summary = run.records("summary")[0]
    assert summary["peak_rss_mb"] >= max(row["rss_mb_max"] for row in rows)
    assert 0 <= summary["data_wait_pct"] < 100 and "mean_gpu_util_pct" not in summary


def test_gpu_readings_come_from_nvml_for_the_visible_device(make_trainer, log_dir, fake_nvml, monkeypatch):
    nvml = fake_nvml()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    trainer = make_trainer(max_steps=4, logging_steps=2)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, sample_interval_s=0.01)))
    trainer.train()
    run = RunFiles(log_dir)
    assert run.messages("model_performance")[0] == "GPU monitoring is on: NVML, CUDA devices [0]"
    row = run.records("train")[0]
    assert (row["gpu0_util_pct"], row["gpu0_mem_util_pct"], row["gpu0_temp_c"]) == (42.0, 12.0, 62.0)
    assert row["gpu0_mem_used_mb"] == 3 * 1024 and row["gpu0_mem_total_mb"] == 80 * 1024
    assert row["gpu0_power_w"] == 252.0 and "gpu1_util_pct" not in row
    assert "GPU utilization: 42.00%" in run.messages("model_performance")
    assert run.records("summary")[0]["mean_gpu_util_pct"] == 42.0
    assert nvml.shutdowns == 1


def test_an_nvml_error_mid_run_stops_gpu_monitoring_once(make_trainer, log_dir, fake_nvml):
    fake_nvml(fail_after_reads=6)  # three devices: two full readings, then the GPU is lost
    trainer = make_trainer(max_steps=6, logging_steps=1)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, sample_interval_s=0)))
    trainer.train()
    run = RunFiles(log_dir)
    stopped = [m for m in run.messages("model_performance") if m.startswith("GPU monitoring stopped")]
    assert stopped == ["GPU monitoring stopped after an NVML error: NVMLError: GPU is lost"]
    assert run.messages("errors") == []
    rows = run.records("train")
    assert len(rows) == 6 and "gpu2_util_pct" in rows[0] and "gpu2_util_pct" not in rows[-1]


def test_no_driver_means_one_info_line(make_trainer, log_dir, fake_nvml):
    fake_nvml(init_error="NVML Shared Library Not Found")
    trainer = make_trainer(max_steps=2)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, sample_interval_s=0.01)))
    trainer.train()
    lines = [m for m in RunFiles(log_dir).messages("model_performance") if "GPU monitoring" in m]
    assert lines == ["GPU monitoring is off: NVML could not start (no NVIDIA driver?): NVML Shared Library Not Found"]


def test_visible_devices_map_to_physical_ones(fake_nvml):
    fake_nvml()
    assert visible_gpu_ids({}) is None
    assert visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "GPU-2,0,-1,1"}) == ["GPU-2", "0"]
    reader = NvmlReader(environ={"CUDA_VISIBLE_DEVICES": "GPU-2,0"})
    sample = reader.read()
    assert sample["gpu0_temp_c"] == 62.0 and sample["gpu1_temp_c"] == 60.0
    ranked = NvmlReader(local_rank=1, environ={"CUDA_VISIBLE_DEVICES": "2,1"}).read()
    assert set(ranked) == {"gpu1_util_pct", "gpu1_mem_util_pct", "gpu1_mem_used_mb", "gpu1_mem_total_mb",
                           "gpu1_power_w", "gpu1_temp_c"} and ranked["gpu1_temp_c"] == 61.0


def test_sampler_aggregates_between_drains():
    sampler = ResourceSampler(0.005, notice=lambda message: None, gpu_reader_factory=_no_gpu)
    sampler.start()
    time.sleep(0.1)
    first = sampler.drain()
    sampler.stop()
    assert first["rss_mb_min"] <= first["rss_mb"] <= first["rss_mb_max"]
    assert sampler.stats.totals()["rss_mb_max"] >= first["rss_mb_max"]
    assert sampler_threads() == []


def _no_gpu():
    raise RuntimeError("not wanted here")


class VirtualClock:
    """Stands in for ``time.perf_counter`` where the callback reads it: time moves only when the
    test's collator or model moves it, so that the measured shares are exact on any machine, busy
    or not. It runs ahead of the real clock, which a run's start times still come from (dataclass
    defaults bound to ``perf_counter`` at import), so that "time since" is never negative."""

    def __init__(self) -> None:
        self.now_s = time.perf_counter() + 100_000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock(monkeypatch) -> VirtualClock:
    from seo_trainlog.record import callback as _callback
    from seo_trainlog.record import run as _run

    virtual = VirtualClock()
    monkeypatch.setattr(_callback, "perf_counter", virtual)  # the step timer's marks
    monkeypatch.setattr(_run, "perf_counter", virtual)  # the interval detail's
    return virtual


def slow_collator(tokenizer, clock, seconds):
    """A collator taking ``seconds`` of the clock per batch."""
    pad = DataCollatorWithPadding(tokenizer)

    def collate(features):
        clock.advance(seconds)
        return pad(features)

    return TimedDataCollator(collate)


def slow_forward(trainer, clock, seconds):
    """A compute-bound step taking ``seconds`` of the clock, as a real model would have."""
    trainer.model.register_forward_pre_hook(lambda module, args: clock.advance(seconds))
    return trainer


def test_a_slow_collator_raises_the_bottleneck_warning(make_trainer, log_dir, tokenizer, clock):
    # 1 s of collating before each step, 0.1 s per step; the first step of an epoch has no wait
    # counted (the loader's start-up): steps 1-3 wait 2 s of 2.3 s, steps 4-6 3 s of 3.3 s
    trainer = slow_forward(make_trainer(max_steps=6, logging_steps=3,
                                        data_collator=slow_collator(tokenizer, clock, 1.0)), clock, 0.1)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, data_wait_warn_pct=20)))
    trainer.train()
    run = RunFiles(log_dir)
    warnings_ = [m for m in run.messages("errors") if m.startswith("Data loading bottleneck")]
    assert len(warnings_) == 2  # one per logging interval, not one per step
    assert warnings_[0].startswith("Data loading bottleneck: 87.0% of the time of steps 1-3 was spent waiting for "
                                   "data (threshold 20%). ")
    assert "dataloader_num_workers > 0 (now 0)" in warnings_[0]
    assert warnings_[1].startswith("Data loading bottleneck: 90.9% of the time of steps 4-6 was spent waiting for "
                                   "data (threshold 20%). ")
    rows = run.records("train")
    assert [row["data_wait_pct"] for row in rows] == [pytest.approx(100 * 2 / 2.3), pytest.approx(100 * 3 / 3.3)]
    assert [row["data_wait_s"] for row in rows] == [pytest.approx(2 / 3), pytest.approx(1.0)]
    assert [row["step_time_s"] for row in rows] == [pytest.approx(0.1), pytest.approx(0.1)]


def test_a_fast_collator_raises_no_warning(make_trainer, log_dir, tokenizer, clock):
    trainer = slow_forward(make_trainer(max_steps=6, logging_steps=3,
                                        data_collator=slow_collator(tokenizer, clock, 0.001)), clock, 0.1)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, data_wait_warn_pct=20)))
    trainer.train()
    run = RunFiles(log_dir)
    assert not [m for m in run.messages("errors") if m.startswith("Data loading bottleneck")]
    assert [row["data_wait_pct"] for row in run.records("train")] == [pytest.approx(100 * 0.002 / 0.302),
                                                                      pytest.approx(100 * 0.003 / 0.303)]


def test_gpu_check_script_runs_its_flow_on_cpu(tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as `python scripts/gpu_check.py` has it
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu-dry-run", "--steps", "40", "--log-dir", str(tmp_path)])
    assert module.main() == 0
    out = capsys.readouterr().out
    assert "PASS  progress records: 2 of 2" in out and "FAIL" not in out


def test_detail_blocks_cover_at_least_detail_interval(make_trainer, log_dir):
    trainer = make_trainer(max_steps=6, logging_steps=1)
    trainer.add_callback(TrainLogCallback(quiet(log_dir, detail_interval_s=3600)))
    trainer.train()
    run = RunFiles(log_dir)
    assert [row["global_step"] for row in run.records("train")] == [1, 2, 3, 4, 5, 6]  # JSON: every step
    # text: the six logging steps are summed into one block, written at the end of the run
    blocks = [m.split(" completed")[0] for m in run.messages("model_performance") if m.startswith("steps_")]
    assert blocks == ["steps_1-6"]
    detail = [m.split(":")[0] for m in run.messages("training_detailed") if m.startswith("Steps ")]
    assert detail == ["Steps 1-6"]
