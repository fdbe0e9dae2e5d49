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
