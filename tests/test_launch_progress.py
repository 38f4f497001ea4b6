"""The driver's progress line and the metrics.jsonl tail it reads."""

from __future__ import annotations

import io
import json
import os
import pty

from sparsedist.logging import JsonLinesSink, JsonLinesTail, ProgressLine, read_jsonl, rewind_jsonl


class FakeClock:
    """Seconds we choose, so ETA arithmetic is checked exactly."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def step(epoch, step_, keep=0.5, accuracy=0.4):
    return {"kind": "step", "epoch": epoch, "step": step_, "keep_ratio": keep, "realized_keep": 0.31,
            "accuracy": accuracy, "skipped": False, "event": "hold"}


def epoch_end(epoch, step_, keep=0.5):
    return {"kind": "epoch", "epoch": epoch, "step": step_, "keep_ratio": keep, "realized_keep": 0.3,
            "images_per_sec": 1234.0, "eval": {"val": {"1.00": 0.812, "0.10": 0.5}, "test": {"1.00": 0.805}}}


def read_until_closed(master: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal side is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks).decode()


def test_terminal_gets_one_rewritten_line_per_epoch_with_eta_rho_speed_and_accuracies():
    master, slave = pty.openpty()
    clock = FakeClock()
    with os.fdopen(slave, "w") as terminal:
        progress = ProgressLine(total_epochs=4, stream=terminal, clock=clock)
        assert progress.live
        progress.update(step(0, 10))
        clock.now = 30.0
        progress.update(epoch_end(0, 20))  # epoch 0 took 30 s -> 3 epochs left, 90 s
        clock.now = 40.0
        progress.update(step(1, 30, keep=0.25))  # 10 s into epoch 1 -> 80 s left
    output = read_until_closed(master).replace("\r\n", "\n")  # the terminal turns \n into \r\n
    lines = output.split("\n")
    assert len(lines) == 2  # epoch 0 ended its line; epoch 1's line is still live
    assert lines[0].count("\r\x1b[2K") == 2  # the step line was rewritten in place by the epoch line
    finished = lines[0].rsplit("\r\x1b[2K", 1)[1]
    assert "epoch 1/4" in finished and "ETA 1m30s" in finished and "1,234 img/s" in finished
    assert "rho 0.500 (realized 0.300)" in finished
    assert "val 1.00:0.812 0.10:0.500" in finished and "test 1.00:0.805" in finished
    assert "epoch 2/4" in lines[1] and "ETA 1m20s" in lines[1] and "rho 0.250" in lines[1]


def test_not_a_terminal_prints_nothing():
    stream = io.StringIO()
    progress = ProgressLine(total_epochs=2, stream=stream)
    progress.update(step(0, 1))
    progress.update(epoch_end(0, 2))
    assert stream.getvalue() == ""


def test_tail_returns_only_whole_new_records_and_follows_a_rewind(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    tail = JsonLinesTail(path)
    assert tail.read_new() == []  # the workers have not created it yet
    sink = JsonLinesSink(path)
    sink.write(step(0, 1))
    sink.write(epoch_end(0, 2))
    assert [r["step"] for r in tail.read_new()] == [1, 2]
    with open(path, "a") as handle:
        handle.write(json.dumps(step(1, 3))[:10])  # a record half-written by rank 0
        handle.flush()
        assert tail.read_new() == []
        handle.write(json.dumps(step(1, 3))[10:] + "\n")
    assert [r["step"] for r in tail.read_new()] == [3]
    rewind_jsonl(path, last_epoch=0)  # a restart drops epoch 1 and writes it again
    sink.close()
    with open(path, "a") as handle:
        handle.write(json.dumps(step(1, 3, keep=0.9)) + "\n")
    assert [(r["step"], r["keep_ratio"]) for r in tail.read_new()] == [(1, 0.5), (2, 0.5), (3, 0.9)]


def test_a_mid_epoch_rewind_keeps_the_epochs_steps_up_to_its_batch(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    records = [{"kind": "step", "epoch": 0, "batch": 1, "step": 1}, {"kind": "epoch", "epoch": 0, "step": 1},
               *({"kind": "step", "epoch": 1, "batch": b, "step": 1 + b} for b in (1, 2, 3)),
               {"kind": "epoch", "epoch": 1, "step": 4}, {"kind": "step", "epoch": 2, "batch": 1, "step": 5}]
    with open(path, "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    rewind_jsonl(path, last_epoch=0, partial_batches=2)  # a checkpoint 2 batches into epoch 1
    assert [(r["kind"], r["epoch"], r.get("batch")) for r in read_jsonl(path)] == [
        ("step", 0, 1), ("epoch", 0, None), ("step", 1, 1), ("step", 1, 2)]


def test_records_already_shown_or_in_the_history_are_not_shown_again():
    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as terminal:
        # A resumed run: epoch 0 is history; after a restart the tail reads epochs 0-1 again.
        progress = ProgressLine(total_epochs=3, stream=terminal)
        progress.skip([step(0, 1), epoch_end(0, 2)])
        for record in [step(0, 1), epoch_end(0, 2), step(1, 3), epoch_end(1, 4), step(0, 1), epoch_end(0, 2),
                       step(1, 3), epoch_end(1, 4), step(2, 5)]:
            progress.update(record)
    lines = read_until_closed(master).replace("\r\n", "\n").split("\n")
    assert [line.rsplit("\r\x1b[2K", 1)[1].split("  ")[0] for line in lines] == ["epoch 2/3", "epoch 3/3"]
