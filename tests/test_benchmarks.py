"""The benchmark scripts run end to end (tiny sizes, one round) and report every job with
its throughput, fraction of peak and ratios to its peers. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_py_reports_every_job_and_its_peers():
    out = subprocess.run([sys.executable, "benchmarks/run.py", "--n", "300", "--rounds", "1", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["meta"]["examples"] == 300 and report["meta"]["matmul_peak_gflops"] > 0
    rows = {r["name"]: r for r in report["rows"]}
    for job, peer in [("rbm cd1 784->500 surgery (cpu)", "x_plain_torch"),
                      ("rbm cd1 784->500 surgery_pcd (cpu)", "x_plain_torch"),
                      ("dae 784->1000 b100 surgery", "x_plain_torch_dae"),
                      ("sparse_ae 784->1000 b100 surgery", "x_plain_torch_dae"),
                      ("finetune 784-1000x3-10 b100 surgery (cpu)", "x_plain_torch"),
                      ("stack load (11 MB)", "x_raw_load"),
                      ("forward b1000 graph", "x_nn_sequential")]:
        r = rows[job]
        assert r["samples_per_s"] > 0 and r[peer] > 0, r
    for name, r in rows.items():
        if "frac_peak" in r:
            assert 0 < r["frac_peak"] < 2, (name, r)
    assert "greedy rbm+dae+rbm 784-500x3 (1 epoch each)" in rows


def test_collect_results_gathers_what_a_stopped_run_finished(tmp_path):
    """What a GPU call brings back of an experiment: one JSON line per finished cell, tuning
    trial and stack; a half-written file is skipped with a word on stderr, not a traceback."""
    for folder, key, name, body in (("cells", "c1", "result.json", {"test_error": 1.5}),
                                    ("tuning", "t1", "result.json", {"valid_error": 2.0}),
                                    ("stacks", "s1", "pretrain.json", {"seconds": 3.0})):
        (tmp_path / folder / key).mkdir(parents=True)
        (tmp_path / folder / key / name).write_text(json.dumps(body))
    (tmp_path / "cells" / "c2").mkdir()
    (tmp_path / "cells" / "c2" / "result.json").write_text('{"test_err')
    (tmp_path / "cells" / "c3").mkdir()  # a cell still training: no result yet
    out = subprocess.run([sys.executable, "benchmarks/collect_results.py", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "skipped" in out.stderr and "Traceback" not in out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["kind"], r["key"]) for r in rows] == [("cell", "c1"), ("trial", "t1"), ("stack", "s1")]
    assert rows[0]["test_error"] == 1.5 and rows[2]["seconds"] == 3.0


def test_shards_py_runs_a_grid_both_ways_and_finds_the_same_errors():
    out = subprocess.run([sys.executable, "benchmarks/shards.py", "--n", "300", "--seeds", "2", "--epochs", "1",
                          "--width", "16", "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "shards x one process: " in out.stdout and "same test errors in every cell: True" in out.stdout
