"""The training progress line on a fake clock: compilation and checkpoint saves are shown
apart and kept out of the step time, and the ETA follows the recent steps' median."""

import pytest

from ul2x.trainer.reporting import Progress

METRICS = dict(loss=1.0, accuracy=0.5, learning_rate=1e-3, grad_norm=1.0)
STEP_S = 0.125  # exact in binary, so the ETAs below are exact


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _run(clock, steps: int, seconds: float = STEP_S):
  clock.now += steps * seconds


def test_eta_leaves_out_compilation_and_saves(capsys):
  clock = FakeClock()
  progress = Progress(1000, tokens_per_step=100, flops_per_step=1e9, peak_flops=1e12,
                      clock=clock)
  progress.mark(0)
  with progress.paused("compile"):
    clock.now += 50.0
  _run(clock, 1)
  assert progress.report(1, METRICS)["step_time"] == pytest.approx(STEP_S)
  line = capsys.readouterr().out
  # 999 steps of 0.125 s; counting the compilation as step time said 13:52:30.
  assert "step 125 ms" in line and "ETA 0:02:04  compile 50.0 s" in line, line

  _run(clock, 99)
  progress.report(100, METRICS)
  assert "ETA 0:01:52" in capsys.readouterr().out
  with progress.paused("save"):  # a checkpoint at step 100
    clock.now += 30.0
  _run(clock, 100)
  progress.report(200, METRICS)
  line = capsys.readouterr().out
  assert "step 125 ms" in line and "ETA 0:01:40  save 30.0 s" in line, line

  _run(clock, 100, seconds=1.0)  # one slow stretch moves the median little
  progress.report(300, METRICS)
  line = capsys.readouterr().out
  assert "step 1000 ms" in line and "ETA 0:01:27" in line and " s\n" not in line, line
  with progress.paused("save", pause=False):  # not due: nothing paused, nothing shown
    clock.now += 1.0
  progress.report(301, METRICS)
  assert "step 1000 ms" in capsys.readouterr().out
