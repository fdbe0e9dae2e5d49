"""One writer per output directory (surgery.lock): a second run given the --out of a run
still going is refused before it writes anything; a lock left by a run that ended is
taken over; shards of one grid go beside each other, not beside a whole run."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from surgery.errors import OutputError
from surgery.lock import LOCK, hold, holders

RECIPE = ("data: {dataset: synthetic, n_train: 200, n_valid: 50, n_test: 50, side: 6, classes: 3}\n"
          "surgery: {ops: [{op: insert, name: h1, units: 8}, {op: head, classes: 3}]}\n"
          "finetune: {epochs: 1, batch_size: 20}\n")
GRID = ("data: {dataset: synthetic, n_train: 200, n_valid: 50, n_test: 50, side: 6, classes: 3}\n"
        "experiment: {conditions: [none], depths: [1], seeds: [0, 1], hidden: 8}\n"
        "finetune: {epochs: 1, batch_size: 20}\n")


@pytest.fixture
def other_process():
    """A live process of this machine that is not this one, to hold a lock as another run would."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


def fake_lock(out, pid, name=LOCK, shard=None, host=None, command="surgery run other.yaml --out x"):
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": time.time(),
                                        "command": command, "shard": shard}))


@pytest.mark.parametrize("kind", ["single", "grid"])
def test_a_second_run_on_a_busy_out_is_refused_and_an_ended_ones_lock_taken_over(tmp_path, capsys, other_process,
                                                                                 kind):
    from surgery.cli import main

    (tmp_path / "r.yaml").write_text(RECIPE if kind == "single" else GRID)
    out = tmp_path / "out"
    fake_lock(out, other_process.pid)
    before = sorted(p.name for p in out.iterdir())
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: a run writes there now: `surgery run other.yaml --out x` (pid {other_process.pid} on this " \
           "machine, since" in err and "nothing was written" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in out.iterdir()) == before  # not even experiment.json
    assert main(["inspect", str(out)]) in (0, 2)
    other_process.kill()
    other_process.wait()  # the other run has ended: its lock is taken over
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0
    assert not (out / LOCK).exists()  # released at the end
    assert (out / ("result.json" if kind == "single" else "results.csv")).is_file()


def test_inspect_says_which_run_writes_into_a_directory_now(tmp_path, capsys, other_process):
    from surgery.cli import main

    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0
    capsys.readouterr()
    fake_lock(out, other_process.pid, command="surgery run r.yaml --out out")
    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[1].startswith(f"running now: `surgery run r.yaml --out out` (pid {other_process.pid} on this "
                              "machine, since"), said
    assert main(["inspect", str(tmp_path)]) == 0
    assert "out: single run, finished: test" in (line := capsys.readouterr().out) and line.rstrip().endswith(
        "; running now"), line


def test_inspect_writes_the_command_line_of_shards_started_together_once(tmp_path, capsys, other_process):
    from surgery.cli import main

    (tmp_path / "g.yaml").write_text(GRID)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "g.yaml"), "--out", str(out)]) == 0
    capsys.readouterr()
    for i in (2, 10, 1):  # lock files sort 1, 10, 2
        fake_lock(out, other_process.pid, f"{LOCK}-shard-{i}-of-10", shard=[i - 1, 10],
                  command=f"surgery run g.yaml --set x=1 --shard {i}/10 --out out")
    fake_lock(out, other_process.pid, f"{LOCK}-shard-3-of-10", shard=[2, 10], command="surgery run h.yaml --shard 3/10")
    assert main(["inspect", str(out)]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("running now: ")]
    assert said[0].startswith("running now: shards 1/10, 2/10, 10/10 of `surgery run g.yaml --set x=1 --shard I/N "
                              f"--out out` (pids {other_process.pid}, {other_process.pid}, {other_process.pid} on "
                              "this machine, since "), said
    assert said[1].startswith(f"running now: `surgery run h.yaml --shard 3/10` (pid {other_process.pid} "), said
    assert len(said) == 2, said


def test_shards_go_beside_each_other_not_beside_a_whole_run(tmp_path, other_process):
    out = tmp_path / "out"
    fake_lock(out, other_process.pid, f"{LOCK}-shard-1-of-2", shard=[0, 2])
    with hold(out, (1, 2)):  # shard 2/2 beside shard 1/2
        assert json.loads((out / f"{LOCK}-shard-2-of-2").read_text())["shard"] == [1, 2]
    assert [p.name for p, _ in holders(out)] == [f"{LOCK}-shard-1-of-2"]  # its own lock released, the other's kept
    for shard, says in [((0, 2), "shard 1/2 trains there now"), (None, "a shard of its grid trains there now"),
                        ((0, 3), "a shard of 2 trains there now (the shards of one grid share one N)")]:
        with pytest.raises(OutputError, match=r"\(pid \d+ on this machine") as e:
            with hold(out, shard):
                pass
        assert says in str(e.value)
    (out / f"{LOCK}-shard-1-of-2").unlink()
    fake_lock(out, other_process.pid)  # a whole run: no shard beside it
    with pytest.raises(OutputError, match="a run without --shard writes there now"):
        with hold(out, (1, 2)):
            pass


def test_a_lock_held_on_another_machine_is_named_with_how_to_remove_it(tmp_path):
    out = tmp_path / "out"
    fake_lock(out, 1, host="gpu-node-7")
    with pytest.raises(OutputError) as e:
        with hold(out):
            pass
    assert "(pid 1 on the machine 'gpu-node-7', since" in str(e.value)
    assert f"if its run has ended without removing its lock, delete {out / LOCK}" in str(e.value)


def test_a_lock_this_process_left_or_a_damaged_one_is_taken_over(tmp_path):
    out = tmp_path / "out"
    fake_lock(out, os.getpid())  # e.g. a notebook's earlier call that did not end cleanly
    with hold(out):
        assert json.loads((out / LOCK).read_text())["since"] > 0
    (out / LOCK).write_text("{torn")
    with hold(out):
        pass
    assert not (out / LOCK).exists()


def test_pretrain_to_a_stack_another_pretraining_writes_is_refused(tmp_path, capsys, other_process):
    """`surgery pretrain -o STACK` keeps its layers in STACK.layers/ as it goes; a second
    pretraining to the same file would mix its layers with the first's."""
    from surgery.cli import main

    (tmp_path / "p.yaml").write_text("data: {dataset: synthetic, n_train: 200, n_valid: 50, n_test: 50, side: 6}\n"
                                     "pretrain: {layers: [{method: rbm, hidden: 8, epochs: 1}]}\n")
    stack = tmp_path / "s.safetensors"
    fake_lock(tmp_path / "s.layers", other_process.pid, command="surgery pretrain p.yaml -o s.safetensors")
    assert main(["pretrain", str(tmp_path / "p.yaml"), "-o", str(stack)]) == 2
    err = capsys.readouterr().err
    assert "s.layers: a run writes there now: `surgery pretrain p.yaml -o s.safetensors`" in err, err
    assert "give this run its own -o/--output" in err and not stack.exists()
    other_process.kill()
    other_process.wait()
    assert main(["pretrain", str(tmp_path / "p.yaml"), "-o", str(stack)]) == 0
    assert stack.is_file() and not (tmp_path / "s.layers").exists()
