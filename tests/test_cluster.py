"""Several nodes without a shared disk, per-rank telemetry and stragglers: two real torchrun launches
(gloo, CPU) and the straggler detector on synthetic per-rank series."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import LINE, RunFiles, quiet
from test_scale import HERE, failure_text, free_port, launch

from seo_trainlog import TrainLogger
from seo_trainlog.record import rank as _rank
from seo_trainlog.watch.anomaly import StragglerDetector, pace_times, rank_sample
from seo_trainlog.read.reader import LogReadError, find_process_files, find_runs
from seo_trainlog.cli import main as cli_main

CATEGORY_PREFIXES = ("seo_engine", "training_progress", "training_detailed", "model_performance", "data_loading",
                     "errors", "error_tracking", "performance_metrics")


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def rank_messages(log_dir: Path, run_id: str, rank: int) -> list[str]:
    """The message of every record in a rank's ``errors_rank<N>_<stamp>.log``."""
    lines = (log_dir / f"errors_rank{rank}_{run_id}.log").read_text(encoding="utf-8").splitlines()
    return [m.group(4) for m in map(LINE.match, lines) if m]


def summarize_json(capsys, *argv: str) -> dict:
    assert cli_main(["summarize", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------------------------------- two nodes, two disks


def test_two_nodes_without_a_shared_disk_agree_through_the_store(tmp_path, capsys, monkeypatch):
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    port = str(free_port())
    results: dict[int, object] = {}

    def node(rank: int) -> None:
        results[rank] = launch(sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                               str(HERE / "distributed_child.py"), str(dirs[rank]), "ok", timeout=150)

    second = threading.Thread(target=node, args=(1,))
    second.start()
    node(0)
    second.join()
    for rank in (0, 1):
        assert results[rank].returncode == 0, failure_text(results[rank])
    run = RunFiles(dirs[0])
    stamp = run.run_id
    # node 1's own file set, under rank 0's stamp, in its own directory
    assert sorted(p.name for p in dirs[1].iterdir() if p.is_file()) == sorted(
        [f"{prefix}_node1_{stamp}.log" for prefix in CATEGORY_PREFIXES] + [f"run_manifest_node1_{stamp}.json"])
    assert all(stamp in p.name for p in dirs[0].iterdir() if p.is_file())
    node_rows = metrics(dirs[1] / f"performance_metrics_node1_{stamp}.log")
    train = [row for row in node_rows if row["event"] == "train"]
    assert [row["global_step"] for row in train] == list(range(1, 11))
    assert {(row["rank"], row["local_rank"], row["node_rank"], row["world_size"]) for row in train} == {(1, 0, 1, 2)}
    assert all(row["step_time_s"] > 0 and row["rss_mb"] > 0 and "data_wait_pct" in row for row in train)
    assert [row["event"] for row in node_rows[:2]] == ["run_start", "hyperparameters"]
    assert "Epoch 1.25, Step 10: Loss=" in (dirs[1] / f"training_progress_node1_{stamp}.log").read_text()
    assert [row["status"] for row in node_rows if row["event"] == "summary"] == ["completed"]
    manifest = json.loads((dirs[1] / f"run_manifest_node1_{stamp}.json").read_text())
    assert manifest["run_id"] == stamp and manifest["status"] == "completed"
    # one id, agreed through torchrun's rendezvous store: no pointer file anywhere
    starts = [run.records("run_start")[0], node_rows[0]]
    assert [(row["run_id"], row["run_id_source"], row["rank"]) for row in starts] == [(stamp, "store", 0),
                                                                                      (stamp, "store", 1)]
    assert not [p for d in dirs for p in d.glob(".seo_trainlog-run-*")]
    assert [row["rank"] for row in run.records("train")] == [0] * 10
    # node 1's leader writes no anomaly and no alert; rank 0 finds no straggler in a balanced run
    assert [row for row in node_rows if row["event"] == "anomaly"] == []
    assert [row for row in run.records("anomaly") if row["kind"] == "straggler"] == []
    # the readers: both directories give one run with both ranks; the node directory alone is that run
    summary = summarize_json(capsys, str(dirs[0]), str(dirs[1]))
    assert summary["run_id"] == stamp and summary["stragglers"] == []
    assert [(row["rank"], row["node_rank"], row["records"], row["compared_steps"], row["straggler"])
            for row in summary["ranks"]] == [(0, 0, 10, 10, False), (1, 1, 10, 10, False)]
    alone = summarize_json(capsys, str(dirs[1]))
    assert (alone["run_id"], alone["status"], alone["global_step"]) == (stamp, "completed", 10)
    assert cli_main(["plot", str(dirs[1]), "-o", str(tmp_path / "node1.png")]) == 0
    assert (tmp_path / "node1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------- a straggler


def test_a_rank_slowed_in_its_collator_is_the_straggler(log_dir, capsys, monkeypatch):
    result = launch(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(HERE / "distributed_child.py"), str(log_dir), "slow_rank1", timeout=150)
    assert result.returncode == 0, failure_text(result)
    run = RunFiles(log_dir)
    rank_rows = metrics(log_dir / f"performance_metrics_rank1_{run.run_id}.log")
    rank_steps = [row for row in rank_rows if row["event"] == "rank_step"]
    assert [row["global_step"] for row in rank_steps] == list(range(1, 16))
    assert {row["rank"] for row in rank_steps} == {1}
    for row in rank_steps:
        assert {"step_time_s", "data_wait_s", "data_wait_pct", "samples_per_second", "rss_mb"} <= row.keys()
    # rank 1 collated every batch it trained on, each after a 0.15 s sleep (the child's SLOW_COLLATE_S)
    assert sum(row.get("collate_calls", 0) for row in rank_steps) >= 15
    assert all(row["collate_time_s"] >= 0.15 * row["collate_calls"] for row in rank_steps if "collate_calls" in row)
    stragglers = [row for row in run.records("anomaly") if row["kind"] == "straggler"]
    host = socket.gethostname()
    # the record is rank 0's (its writer's identity); the slow rank is named in straggler_* fields
    assert stragglers and {(row["rank"], row["local_rank"], row["node_rank"], row["host"]) for row in stragglers} == {
        (0, 0, 0, host)}
    assert {(row["straggler_rank"], row["straggler_node_rank"], row["straggler_host"]) for row in stragglers} == {
        (1, 0, host)}
    first = stragglers[0]
    # its global_step is the step the ranks were compared at (the one its message names), not a later one
    assert "user_global_step" not in first
    assert first["message"].startswith(f"Straggler at global_step {first['global_step']}: rank 1's pace ")
    assert first["global_step"] in [row["global_step"] for row in rank_steps]
    assert first["global_step"] >= 3 and first["straggler_window"] == 3 and first["straggler_pct"] == 20.0
    assert first["pace_s"] == first["value"] > first["threshold"] >= 1.2 * first["median_pace_s"]
    assert first["share_pct"] == pytest.approx(100 * (first["pace_s"] / first["median_pace_s"] - 1))
    assert first["pace_s"] >= 0.15
    warnings = [m for m in run.messages("errors") if m.startswith("Anomaly: Straggler at global_step")]
    assert warnings and "rank 1's pace" in warnings[0]
    # tokens: each rank counts its own batches (4 queries of 5 tokens a step, no padding: 20 a step);
    # rank 0's all-rank count is the sum of both ranks' at the same step, from the telemetry exchange
    assert [row["rank_num_input_tokens_seen"] for row in rank_steps] == [20 * step for step in range(1, 16)]
    rank1 = {row["global_step"]: row for row in rank_steps}
    train = run.records("train")
    assert [row["rank_num_input_tokens_seen"] for row in train] == [20 * step for step in range(1, 16)]
    summed = [row for row in train if "num_input_tokens_seen" in row]
    assert summed and summed[-1]["global_step"] == 15 and summed[-1]["num_input_tokens_seen"] == 600
    for row in summed:
        other = rank1[row["global_step"]]
        assert row["num_input_tokens_seen"] == row["rank_num_input_tokens_seen"] + other["rank_num_input_tokens_seen"]
        assert row["tokens_per_second"] == pytest.approx(
            (row["rank_input_tokens"] + other["rank_input_tokens"]) / row["interval_s"], rel=1e-12)
    assert all("tokens_per_second" not in row for row in train if "num_input_tokens_seen" not in row)
    monkeypatch.setenv("SEO_TRAINLOG_STRAGGLER_WINDOW", "3")
    summary = summarize_json(capsys, str(log_dir))
    ranks = {row["rank"]: row for row in summary["ranks"]}
    assert [ranks[0]["straggler"], ranks[1]["straggler"]] == [False, True]
    assert {(row["straggler_rank"], row["straggler_node_rank"], row["straggler_host"])
            for row in summary["stragglers"]} == {(1, 0, host)}
    assert (summary["world_size"], summary["ranks_without_records"]) == (2, [])
    assert ranks[1]["own_data_s"] >= 0.15 > 0.075 > ranks[0]["own_data_s"]
    assert ranks[1]["pace_s"] > ranks[0]["pace_s"]
    print(json.dumps(summary["ranks"]), file=sys.__stderr__)  # the measured numbers, for the record


# ---------------------------------------------------------------------------------------- the detector


def sample(step_time_s: float, data_wait_s: float, collate_time_s: float | None = None, steps: int = 1) -> dict:
    values = {"steps": steps, "step_time_s": step_time_s, "data_wait_s": data_wait_s, "data_wait_pct": 50.0}
    if collate_time_s is not None:
        values["collate_time_s"] = collate_time_s
    return rank_sample(values)


def test_rank_sample_takes_collate_time_per_step_else_data_wait():
    assert rank_sample({"steps": 4, "step_time_s": 0.2, "data_wait_s": 0.1, "data_wait_pct": 33.3,
                        "collate_time_s": 0.08}) == {"step_time_s": 0.2, "data_wait_s": 0.1, "own_data_s": 0.02,
                                                     "data_wait_pct": 33.3}
    assert rank_sample({"steps": 4, "step_time_s": 0.2, "data_wait_s": 0.1})["own_data_s"] == 0.1
    assert rank_sample({"loss": 1.0}) is None


def test_the_ddp_pattern_names_the_rank_slow_in_its_data_not_the_one_with_long_steps():
    # rank 1 collates 0.16 s a step; rank 0 then waits for it inside backward's all-reduce: rank 0
    # shows the LONG step time, rank 1 the long data wait. The pace names rank 1.
    detector = StragglerDetector(straggler_pct=20.0, window=3)
    samples = {0: sample(0.17, 0.01), 1: sample(0.02, 0.16)}
    assert pace_times(samples) == {0: pytest.approx(0.03), 1: pytest.approx(0.18)}
    assert detector.update(1, samples) == []
    assert detector.update(2, samples) == []
    [anomaly] = detector.update(3, samples, {0: {"node_rank": 0, "host": "a"}, 1: {"node_rank": 1, "host": "b"}})
    record = anomaly.to_dict()
    assert (record["kind"], record["global_step"], record["straggler_rank"], record["straggler_node_rank"],
            record["straggler_host"], record["straggler_window"]) == ("straggler", 3, 1, 1, "b", 3)
    # rank, node_rank, host are the identity of the process that writes the record, never the slow rank's
    assert not {"rank", "node_rank", "host"} & record.keys()
    assert record["pace_s"] == record["value"] == pytest.approx(0.18)
    assert record["median_pace_s"] == pytest.approx(0.105)
    assert record["threshold"] == pytest.approx(0.126)  # median x 1.2
    assert record["share_pct"] == pytest.approx(100 * (0.18 / 0.105 - 1))
    assert record["message"] == ("Straggler at global_step 3: rank 1's pace 0.1800s per step is 71% above the "
                                 "median 0.1050s of 2 ranks for 3 logging steps (threshold 20% over 3); every "
                                 "rank waits for it")
    # latched: the episode goes on without a second anomaly; a single normal step does not end it
    balanced = {0: sample(0.03, 0.01), 1: sample(0.03, 0.01)}
    assert detector.update(4, samples) == []
    assert detector.update(5, balanced) == []
    assert [detector.update(step, samples) for step in (6, 7, 8)] == [[], [], []]
    # three normal steps in a row end it: the next slow episode is reported again
    assert [detector.update(step, balanced) for step in (9, 10, 11)] == [[], [], []]
    assert detector.update(12, samples) == detector.update(13, samples) == []
    assert [a.global_step for a in detector.update(14, samples)] == [14]


def test_collate_time_tells_the_straggler_when_everyone_waits_for_data():
    # a causal LM's loss takes num_items_in_batch: transformers gathers it before the step, so the fast
    # ranks wait for the slow one in their data wait too (as measured: 0.152 s on both ranks)
    samples = {0: sample(0.016, 0.152, collate_time_s=0.0004), 1: sample(0.016, 0.152, collate_time_s=0.1506),
               2: sample(0.015, 0.152, collate_time_s=0.0005), 3: sample(0.017, 0.152, collate_time_s=0.0003)}
    assert pace_times(samples)[1] == pytest.approx(0.1656)
    detector = StragglerDetector(straggler_pct=20.0, window=2)
    assert detector.update(10, samples) == []
    [anomaly] = detector.update(11, samples)
    assert anomaly.details["straggler_rank"] == 1 and "straggler_host" not in anomaly.details  # not known
    assert anomaly.details["median_pace_s"] == pytest.approx((0.0154 + 0.0155) / 2)


def test_no_straggler_in_a_balanced_run_nor_below_5_ms():
    detector = StragglerDetector(straggler_pct=20.0, window=2)
    balanced = {0: sample(0.100, 0.010), 1: sample(0.105, 0.011), 2: sample(0.098, 0.0115)}
    assert [detector.update(step, balanced) for step in range(1, 20)] == [[]] * 19
    # twice the median's pace, but only 3 ms more: scheduling noise of a tiny model
    tiny = {0: sample(0.002, 0.001), 1: sample(0.002, 0.004)}
    assert [detector.update(step, tiny) for step in range(20, 30)] == [[]] * 10
    assert detector.update(30, {0: sample(0.01, 0.5)}) == []  # one rank compares with nobody


# ---------------------------------------------------------------------------------------- readers


def test_rank_and_node_files_are_not_runs_of_their_own(tmp_path, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    only_rank = tmp_path / "rank_only"
    only_rank.mkdir()
    (only_rank / "performance_metrics_rank3_20260101_120000.log").write_text("")
    with pytest.raises(LogReadError, match="holds no performance_metrics_\\*.log file of a run"):
        find_runs(only_rank)
    node_dir = tmp_path / "node1"
    for name, value in {"RANK": "2", "LOCAL_RANK": "0", "GROUP_RANK": "1", "WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(name, value)
    with TrainLogger(quiet(node_dir), run_id="20260101_120000") as leader:
        assert (leader.role.file_tag, leader.writes) == ("node1", True)
        leader.log_training_progress(0.5, 7, 0.25, 1e-3, metrics={"step_time_s": 0.1, "data_wait_s": 0.01})
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with TrainLogger(quiet(node_dir), run_id="20260101_120000") as other:
        assert (other.role.file_tag, other.writes) == ("rank3", False)
        other.log_metrics("rank_step", {"step_time_s": 0.1, "data_wait_s": 0.02})
        other.log_metrics("train", {"loss": 1.0})  # not a per-rank event: nothing written
    [run] = find_runs(node_dir)
    assert (run.run_id, run.tag, [p.name for p in run.paths]) == (
        "20260101_120000", "node1", ["performance_metrics_node1_20260101_120000.log"])
    processes = find_process_files([node_dir, tmp_path / "missing"], "20260101_120000")
    assert [(p.tag, p.active_path.name) for p in processes] == [
        ("node1", "performance_metrics_node1_20260101_120000.log"),
        ("rank3", "performance_metrics_rank3_20260101_120000.log")]
    rank_rows = metrics(node_dir / "performance_metrics_rank3_20260101_120000.log")
    assert [(row["event"], row["rank"], row["node_rank"]) for row in rank_rows] == [("rank_step", 3, 1)]
    assert not (node_dir / "training_progress_rank3_20260101_120000.log").exists()
    assert os.path.exists(node_dir / "run_manifest_node1_20260101_120000.json")


def test_the_launch_key_changes_with_a_restart(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = _rank.launch_id()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert _rank.launch_id() != first


# ---------------------------------------------------------------------------------------- the store


@pytest.fixture
def tcp_store(monkeypatch):
    """A real c10d TCPStore server on a free loopback port, named by MASTER_ADDR/MASTER_PORT as torchrun's
    agent names its own; a fresh launch for seo_trainlog (no store client or TrainLogger count kept)."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                        "TORCHELASTIC_RUN_ID": "cluster-test", "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(_rank, "_STORES", {})
    yield server


def test_ranks_agree_through_the_store_and_exchange_their_intervals(tcp_store, tmp_path, monkeypatch):
    monkeypatch.setattr(_rank, "_SEQUENCE", __import__("itertools").count())
    with TrainLogger(quiet(tmp_path / "a")) as first:  # RANK unset: rank 0 of 2
        pass
    for name, value in {"RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(_rank, "_SEQUENCE", __import__("itertools").count())  # as in another process
    with TrainLogger(quiet(tmp_path / "b")) as second:  # another disk
        pass
    assert (first.agreement.source, second.agreement.source) == ("store", "store")
    assert second.run_id == first.run_id and second.agreement.key == first.agreement.key
    assert tcp_store.get(f"{first.agreement.key}/run_id").decode() == first.run_id
    assert not list((tmp_path / "a").glob(".seo_trainlog-run-*"))
    monkeypatch.setattr(_rank, "_SEQUENCE", __import__("itertools").count())  # the launch resumed from a checkpoint
    with TrainLogger(quiet(tmp_path / "b"), run_id=first.run_id, resume=True) as resumed:
        pass
    assert (resumed.run_id, resumed.agreement.source, resumed.agreement.key) == (first.run_id, "given",
                                                                                 first.agreement.key)
    # the per-rank numbers: rank 1 posts, rank 0 reads them without waiting for anybody
    role1 = _rank.ProcessRole(rank=1, local_rank=1, world_size=2, node_rank=0, host="h")
    role0 = _rank.ProcessRole(rank=0, local_rank=0, world_size=2, node_rank=0, host="h")
    warnings: list[str] = []
    reader = _rank.TelemetryExchange(_rank.launch_store(), first.agreement.key, role0, warnings.append)
    assert reader.collect() == {}  # nobody posted yet: a check, no wait
    writer = _rank.TelemetryExchange(_rank.launch_store(), first.agreement.key, role1, warnings.append)
    for step in range(1, 20):
        writer.post(step, {"step_time_s": 0.01 * step, "own_data_s": 0.5})
    collected = reader.collect()
    assert sorted(collected) == [1]
    assert sorted(collected[1]) == list(range(19 - _rank.TelemetryExchange.KEEP + 1, 20))  # the last KEEP
    assert collected[1][19] == {"step_time_s": 0.19, "own_data_s": 0.5}
    # each rank's node and host come with its numbers (a straggler is named with them)
    assert reader.identities == {0: {"node_rank": 0, "host": "h"}, 1: {"node_rank": 0, "host": "h"}}
    assert warnings == []


def test_a_rank_that_hears_nothing_goes_on_with_its_own_stamp(tcp_store, tmp_path, monkeypatch):
    monkeypatch.setattr(_rank, "POINTER_WAIT_S", 0.5)
    monkeypatch.setenv("RANK", "1")
    started = time.monotonic()
    with TrainLogger(quiet(tmp_path)) as lonely:  # rank 0 never opens a TrainLogger: no hang
        pass
    assert lonely.agreement.source == "own" and len(lonely.run_id) == 15
    assert time.monotonic() - started < 10  # one bounded wait in the store, no second one for a pointer file
    assert not list(tmp_path.glob(".seo_trainlog-run-*"))
    port = os.environ["MASTER_PORT"]
    expected = (f"Run id: rank 1 of 2 uses a stamp of its own, {lonely.run_id}: rank 0's run id never arrived "
                f"through the launcher's store at 127.0.0.1:{port} within 0.5 s (rank 0 opened no TrainLogger, or "
                "not yet). Its files will not share rank 0's run id: gather them by directory and time, not by run id")
    assert rank_messages(tmp_path, lonely.run_id, 1) == [expected]
    rows = metrics(tmp_path / f"performance_metrics_rank1_{lonely.run_id}.log")
    assert [(row["event"], row.get("run_id_source"), row.get("message")) for row in rows] == [
        ("run_start", "own", None), ("warning", "own", expected)]


def test_a_rank_without_a_store_says_why_it_waits_and_why_its_stamp_is_its_own(tmp_path, monkeypatch, capfd):
    # RANK/WORLD_SIZE set by hand, MASTER_PORT where nothing listens, a log directory rank 0 does not share
    monkeypatch.setattr(_rank, "POINTER_WAIT_S", 0.5)
    monkeypatch.setattr(_rank, "_STORES", {})
    monkeypatch.setattr(_rank, "_SEQUENCE", __import__("itertools").count())
    for name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    capfd.readouterr()
    with TrainLogger(quiet(tmp_path, console=True)) as lonely:
        pass
    assert lonely.agreement.source == "own"
    pointer = tmp_path / f".seo_trainlog-run-{_rank.launch_id()}-0"
    expected = (f"Run id: rank 1 of 2 uses a stamp of its own, {lonely.run_id}: no store reachable at "
                f"MASTER_ADDR:MASTER_PORT 127.0.0.1:{port}, and rank 0's pointer file {pointer} was not found within "
                "0.5 s (the log directory is not shared with rank 0, or rank 0 opened no TrainLogger). Its files "
                "will not share rank 0's run id: gather them by directory and time, not by run id")
    assert rank_messages(tmp_path, lonely.run_id, 1) == [expected]
    # on the console: why it waits, before the wait, then the warning
    assert capfd.readouterr().err.splitlines() == [
        f"seo_trainlog: rank 1: no store reachable at MASTER_ADDR:MASTER_PORT 127.0.0.1:{port}; waiting up to 0.5 s "
        f"for rank 0's run id in the pointer file {pointer} (found only when the log directory is shared with "
        "rank 0)", f"seo_trainlog: {expected}"]


def test_log_metrics_takes_the_step_an_event_belongs_to(tmp_path):
    with TrainLogger(quiet(tmp_path)) as tlog:
        tlog.mark(12, 1.5)
        tlog.log_metrics("anomaly", {"kind": "straggler"}, global_step=10)
        tlog.log_metrics("warning", {"message": "later"})
    rows = RunFiles(tmp_path).records()
    assert [(row["event"], row["global_step"], row["epoch"], "user_global_step" in row) for row in rows[-2:]] == [
        ("anomaly", 10, 1.5, False), ("warning", 12, 1.5, False)]


DIE_EARLY = """
import os, sys
from seo_trainlog import LogConfig, TrainLogger
tlog = TrainLogger(LogConfig(log_dir=sys.argv[1], console=False))
print(tlog.run_id, tlog.agreement.source, flush=True)
os._exit(3)  # dies before any flush interval: its buffered records would be lost
"""


def test_a_rank_that_dies_early_leaves_its_run_start_and_summarize_names_the_missing_ranks(tmp_path, capsys,
                                                                                           monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_rank, "_SEQUENCE", __import__("itertools").count())  # the first TrainLogger, as in rank 1
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(name, value)
    # rank 0 of 3 (no store: the stamp through the pointer file of the shared directory), two logging steps
    with TrainLogger(quiet(tmp_path)) as leader:
        for step in (1, 2):
            leader.log_training_progress(0.5, step, 0.25, 1e-3, metrics={"step_time_s": 0.1, "data_wait_s": 0.01})
    env = {**os.environ, "RANK": "1", "LOCAL_RANK": "1", "PYTHONPATH": str(HERE.parent)}
    died = subprocess.run([sys.executable, "-c", DIE_EARLY, str(tmp_path)], env=env, capture_output=True, timeout=120)
    assert died.returncode == 3, died.stderr.decode()
    assert died.stdout.decode().split() == [leader.run_id, "file"]
    rows = metrics(tmp_path / f"performance_metrics_rank1_{leader.run_id}.log")
    assert [(row["event"], row["rank"], row["world_size"], row["run_id"]) for row in rows] == [
        ("run_start", 1, 3, leader.run_id)]
    summary = summarize_json(capsys, str(tmp_path))
    assert [(row["rank"], row["records"]) for row in summary["ranks"]] == [(0, 2), (1, 0)]
    assert (summary["world_size"], summary["ranks_without_records"]) == (3, [1, 2])
    assert cli_main(["summarize", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert ("ranks without records: 1, 2 (of world_size 3): no metrics file with a logging step of theirs in the "
            "directories read (not gathered, or the process ended early)") in " ".join(text.split())


def test_summarize_reads_straggler_records_of_both_layouts():
    from seo_trainlog.read.analysis import RankAnalysis

    base = {"event": "anomaly", "kind": "straggler", "world_size": 2, "message": "m"}
    old = {**base, "global_step": 12, "user_global_step": 10, "rank": 1, "local_rank": 0, "node_rank": 0,
           "host": "writer"}
    new = {**base, "global_step": 10, "rank": 0, "local_rank": 0, "node_rank": 0, "host": "writer",
           "straggler_rank": 1, "straggler_node_rank": 1, "straggler_host": "slow"}
    for record, expected in ((old, (10, 1, None, None)), (new, (10, 1, 1, "slow"))):
        ranks = RankAnalysis()
        ranks.add({"event": "train", "rank": 0, "world_size": 2, "global_step": 10})
        ranks.add({"event": "rank_step", "rank": 1, "world_size": 2, "global_step": 10})
        ranks.add(record)
        summary = ranks.summary()
        [logged] = summary["stragglers"]
        assert (logged["global_step"], logged["straggler_rank"], logged.get("straggler_node_rank"),
                logged.get("straggler_host")) == expected
        assert [row["straggler"] for row in summary["ranks"]] == [False, True]


def test_a_store_that_fails_switches_the_exchange_off_with_one_warning():
    import gc
    from datetime import timedelta

    from torch.distributed import TCPStore

    port = free_port()
    server = TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=1), wait_for_workers=False)
    role = _rank.ProcessRole(rank=1, local_rank=1, world_size=2, node_rank=0, host="h")
    warnings: list[str] = []
    exchange = _rank.TelemetryExchange(client, "seo_trainlog/x/0", role, warnings.append)
    exchange.post(1, {"step_time_s": 0.1})
    client.set("seo_trainlog/x/0/rank/2", "not json")  # a value rank 0 cannot read is skipped
    reader = _rank.TelemetryExchange(client, "seo_trainlog/x/0", _rank.ProcessRole(0, 0, 3, 0, "h"), warnings.append)
    assert reader.collect() == {1: {1: {"step_time_s": 0.1}}}
    del server
    gc.collect()  # the server is gone: the next exchange fails
    exchange.post(2, {"step_time_s": 0.1})
    exchange.post(3, {"step_time_s": 0.1})
    assert len(warnings) == 1 and warnings[0].startswith("the per-rank telemetry exchange through the launcher's "
                                                         "store failed (")
    assert warnings[0].endswith("straggler detection and the all-rank token counts during training are off, "
                                "training goes on")
    assert exchange.enabled is False and [step for step, _ in exchange.recent] == [1, 2, 3]


def test_the_ranks_table_keeps_every_number_whole_at_80_columns(monkeypatch):
    from rich.console import Console

    from seo_trainlog.read.present import rank_table

    rows = [{"rank": rank, "node_rank": rank // 2, "host": "gpu-node-with-a-long-name.cluster.example.org",
             "step_time_s": 0.030271234, "data_wait_pct": 80.5123, "own_data_s": 0.00044371234,
             "pace_s": 0.02948123, "straggler": rank == 3} for rank in range(4)]
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    console.print(rank_table(rows))
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in text
    body = [line for line in lines if line.startswith("│")]
    first_cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in body if line.split("│")[1].strip()]
    assert [cells[:2] + cells[3:] for cells in first_cells] == [
        [str(rank), str(rank // 2), "0.03027", "80.5%", "0.0004437", "0.02948", "STRAGGLER" if rank == 3 else ""]
        for rank in range(4)]
    host = "".join(line.split("│")[3].strip() for line in body[:len(body) // 4])
    assert host == rows[0]["host"]

