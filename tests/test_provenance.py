"""An experiment directory records the commands that made it and the report says what they
cost: every run's entry in ``experiment.json`` (also one that was interrupted), carried
through ``surgery compare``, kept whole when shards write at once."""

import json
import multiprocessing
import sys

import pytest
import yaml

from surgery.cli import main
from surgery.provenance import cost_markdown, recorded, update_record
from surgery.results import read_results

SMALL = {
    "name": "small",
    "data": {"dataset": "synthetic", "n_train": 200, "n_valid": 100, "n_test": 100},
    "experiment": {"conditions": ["none", "dae"], "depths": [1, 2], "seeds": [0, 1], "hidden": 8,
                   "pretrain_epochs": 1},
    "finetune": {"epochs": 1, "batch_size": 50, "device": "cpu", "progress": False,
                 "optimizer": {"name": "sgd", "lr": 0.1}},
}


def _commands(out):
    return recorded(json.loads((out / "experiment.json").read_text()))


def _run(monkeypatch, recipe, out, *more):
    argv = ["run", str(recipe), "--out", str(out), *more]
    monkeypatch.setattr(sys, "argv", ["surgery", *argv])  # what a console run's command line is
    return main(argv)


def test_each_run_of_an_experiment_is_recorded_with_its_end(tmp_path, monkeypatch, capsys):
    rp = tmp_path / "small.yaml"
    rp.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "out"
    assert _run(monkeypatch, rp, out) == 0
    assert _run(monkeypatch, rp, out, "--set", "experiment.seeds=[0, 1, 2]") == 0  # one seed more
    first, second = _commands(out)
    assert first["command"] == f"surgery run {rp} --out {out}"
    assert second["command"].endswith("--set 'experiment.seeds=[0, 1, 2]'")
    for e in (first, second):
        assert e["outcome"] == "finished" and e["seconds"] >= 0 and e["device"] == "cpu"
        assert e["threads"] >= 1 and e["surgery"] and e["torch"] and e["started"].startswith("20")
    report = (out / "report.md").read_text()
    cost = report[report.index("## Cost"):report.index("## Figures")]
    assert f"`{first['command']}`: " in cost and f"`{second['command']}`: " in cost
    assert "over 12 runs" in cost and "over 3 greedy stacks" in cost  # dae's stacks of seeds 0-2
    said = capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "made by 2 commands" in capsys.readouterr().out and not said.err.count("Traceback")


def test_an_interrupted_run_is_recorded_as_such_and_the_earlier_entries_kept(tmp_path, monkeypatch):
    rp = tmp_path / "small.yaml"
    rp.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "out"
    assert _run(monkeypatch, rp, out, "--set", "experiment.conditions=[none]") == 0

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("surgery.cells.CellRunner.run_populations", stop)
    assert _run(monkeypatch, rp, out) == 130  # the CLI's status for Ctrl-C
    done, stopped = _commands(out)
    assert done["outcome"] == "finished" and stopped["outcome"] == "interrupted"
    assert isinstance(stopped["seconds"], float)


def _single(tmp_path, **extra):
    r = {k: v for k, v in SMALL.items() if k != "experiment"}
    r = {**r, "pretrain": {"layers": [{"method": "dae", "hidden": 8, "epochs": 1}]}, **extra}
    path = tmp_path / "single.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def test_a_single_run_and_a_search_record_their_commands_and_a_search_s_trials_do_not(
        tmp_path, monkeypatch, capsys):
    rp, out = _single(tmp_path), tmp_path / "one"
    assert _run(monkeypatch, rp, out) == 0
    monkeypatch.setattr("surgery.finetune.Trainer.fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert _run(monkeypatch, rp, out) == 130  # run again over it, stopped by Ctrl-C
    monkeypatch.undo()
    assert _run(monkeypatch, rp, out, "--set", "finetune.epochs=2") == 0
    assert _run(monkeypatch, rp, out, "--set", "finetune.epochs=2", "--resume") == 0  # finished: trains nothing
    commands = recorded(json.loads((out / "commands.json").read_text()))
    assert [(e["command"], e["outcome"]) for e in commands] == [
        (f"surgery run {rp} --out {out}", "finished"), (f"surgery run {rp} --out {out}", "interrupted"),
        (f"surgery run {rp} --out {out} --set finetune.epochs=2", "finished")]
    assert all(e["device"] == "cpu" and isinstance(e["seconds"], float) for e in commands)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert ("made by 3 commands" in (said := capsys.readouterr().out.splitlines()[-1])
            and said.endswith("(commands.json lists them all)"))
    # surgery finetune --model: a single run too
    argv = ["finetune", str(rp), "--model", str(out / "assembled.safetensors"), "--out", str(tmp_path / "ft")]
    monkeypatch.setattr(sys, "argv", ["surgery", *argv])
    assert main(argv) == 0
    (entry,) = recorded(json.loads((tmp_path / "ft" / "commands.json").read_text()))
    assert entry["command"] == "surgery " + " ".join(argv) and entry["outcome"] == "finished"
    # a search: one entry in its directory, none in its trials'
    sp = _single(tmp_path, search={"trials": 2, "params": {
        "finetune.optimizer.lr": {"type": "float", "low": 0.01, "high": 0.5, "log": True}}})
    argv = ["search", str(sp), "--out", str(tmp_path / "s")]
    monkeypatch.setattr(sys, "argv", ["surgery", *argv])
    assert main(argv) == 0
    (entry,) = recorded(json.loads((tmp_path / "s" / "commands.json").read_text()))
    assert entry["command"] == "surgery " + " ".join(argv) and entry["outcome"] == "finished"
    trials = list((tmp_path / "s" / "trials").iterdir())
    assert len(trials) == 2 and not any((t / "commands.json").exists() for t in trials)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "s")]) == 0
    assert "made by 1 command (" in capsys.readouterr().out.splitlines()[-1]


def test_inspect_says_when_no_command_has_ended_yet():
    from surgery.provenance import commands_line

    running = {"command": "surgery run r.yaml --out x", "started": "2026-12-07T12:07:02+0000"}
    assert "(none ended yet)" in commands_line([running]) and "no end recorded yet" in commands_line([running])
    done = {**running, "seconds": 90.0, "outcome": "finished"}
    assert "(1.5 min of wall time)" in commands_line([done, running])
    # a command of pages (a merge's --set experiment.paper.differences=...) is shown by its ends
    long = {**done, "command": "surgery compare a b --set 'experiment.paper.differences=" + "x" * 2000 + " end.'"}
    line = commands_line([long])
    assert "`surgery compare a b --set 'experiment.paper.differences=xx" in line and "xx end.'`" in line
    assert "[... 1762 characters ...]" in line and len(line) < 550


def test_compare_carries_each_directory_s_commands(tmp_path, monkeypatch, capsys):
    rp = tmp_path / "small.yaml"
    rp.write_text(yaml.safe_dump(SMALL))
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    assert _run(monkeypatch, rp, a, "--set", "experiment.conditions=[none]") == 0
    assert _run(monkeypatch, rp, b, "--set", "experiment.conditions=[dae]") == 0
    monkeypatch.setattr(sys, "argv", ["surgery", "compare", str(a), str(b), "--out", str(merged)])
    assert main(["compare", str(a), str(b), "--out", str(merged)]) == 0
    made = _commands(merged)
    assert [e.get("dir") for e in made] == [str(a), str(b), None]
    assert made[2]["command"] == f"surgery compare {a} {b} --out {merged}" and "device" not in made[2]
    assert [e["command"] for e in made[:2]] == [_commands(a)[0]["command"], _commands(b)[0]["command"]]
    assert f"in `{a}`" in (merged / "report.md").read_text()
    capsys.readouterr()
    assert main(["inspect", str(merged)]) == 0
    assert "made by 3 commands" in capsys.readouterr().out


def test_pretraining_time_counts_each_stack_once():
    rows = [  # a depth-d cell records its stack's first d layers' share of the stack's time
        {"condition": "dae", "depth": 1, "seed": 0, "pretrain_seconds": 10.0, "finetune_seconds": 5.0,
         "path": "runs/a/cells/k1"},
        {"condition": "dae", "depth": 2, "seed": 0, "pretrain_seconds": 20.0, "finetune_seconds": 5.0,
         "path": "runs/a/cells/k2"},
        {"condition": "dae", "depth": 2, "seed": 0, "pretrain_seconds": 30.0, "finetune_seconds": 5.0,
         "path": "runs/b/cells/k2"},  # the same seed's stack, pretrained again in another directory
        {"condition": "none", "depth": 2, "seed": 0, "pretrain_seconds": 0.0, "finetune_seconds": 45.0,
         "path": "runs/a/cells/k3"},
        {"condition": "rbm", "depth": 1, "seed": 0, "pretrain_seconds": 3.0, "finetune_seconds": 0.0,
         "path": "runs/a/cells/k4"},
        {"condition": "rbm-lr2", "depth": 1, "seed": 0, "pretrain_seconds": 3.0, "finetune_seconds": 0.0,
         "path": "runs/a/cells/k5"},  # rbm's stack, fine-tuned at another lr
    ]
    text = "\n".join(cost_markdown(rows, []))
    assert "fine-tuning 1.0 min over 6 runs" in text and "pretraining 53.0 s over 3 greedy stacks" in text
    assert "Commands that wrote" not in text


def _append(path, n, tag, barrier):
    barrier.wait(60)  # both writers start together
    for i in range(n):
        update_record(path, lambda meta, i=i: {**meta, "commands": [*recorded(meta), {"command": f"{tag}{i}"}]})


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_writers_at_once_keep_every_entry(tmp_path):
    path = tmp_path / "experiment.json"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append, args=(path, 100, tag, barrier), daemon=True) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    names = [e["command"] for e in recorded(json.loads(path.read_text()))]
    assert sorted(names) == sorted(f"{t}{i}" for t in "ab" for i in range(100))


def test_results_made_before_commands_were_recorded_still_report(tmp_path, monkeypatch):
    rp = tmp_path / "small.yaml"
    rp.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "out"
    assert _run(monkeypatch, rp, out, "--set", "experiment.conditions=[none]") == 0
    meta = json.loads((out / "experiment.json").read_text())
    del meta["commands"]  # as an experiment.json written before 2026-12-07
    (out / "experiment.json").write_text(json.dumps(meta))
    assert main(["compare", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Cost" in report and "Commands that wrote" not in report
    assert len(read_results(out)) == 4


def test_a_file_system_without_locks_still_gets_the_record(tmp_path, monkeypatch):
    import errno

    import surgery.provenance as provenance

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    if provenance.fcntl is not None:
        monkeypatch.setattr(provenance.fcntl, "flock", refuse)
    path = tmp_path / "experiment.json"
    _append(path, 2, "x", type("NoWait", (), {"wait": lambda self, timeout: None})())
    assert [e["command"] for e in recorded(json.loads(path.read_text()))] == ["x0", "x1"]
