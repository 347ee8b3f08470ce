"""A run killed with SIGKILL mid-stage and re-run ends with the uninterrupted run's parameters.

Two cases: the middle of ICT training, and the middle of an adversarial round's training (after its
generation and filtering, which the resumed round reuses).
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REPO

CASES = {
    "ict": ["--config.stages=ict", "--config.ict.num_steps=120", "--config.ict.checkpoint_every=10",
            "--config.ict.keep_checkpoints=20"],
    "round_1": ["--config.stages=finetune,round_1", "--config.adversarial.train.num_steps=100",
                "--config.adversarial.train.checkpoint_every=10", "--config.adversarial.train.keep_checkpoints=20"],
}


def _command(workdir, stage):
  return [sys.executable, "-m", "axl_jax.main", "--config=tests/configs/tiny.py", f"--workdir={workdir}",
          *CASES[stage]]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _final_params(workdir, stage):
  code = (
      "import sys, numpy as np, jax, json\n"
      "from axl_jax import checkpoints\n"
      "manifest = json.load(open(sys.argv[1] + '/' + sys.argv[3] + '/manifest.json'))\n"
      "params, _ = checkpoints.restore_params(manifest['checkpoint'], None)\n"
      "np.save(sys.argv[2], np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)]))\n")
  out = os.path.join(workdir, "final.npy")
  subprocess.run([sys.executable, "-c", code, workdir, out, stage], env=_env(), check=True, timeout=300)
  return np.load(out)


@pytest.mark.parametrize("stage", sorted(CASES))
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, stage):
  reference = str(tmp_path / "reference")
  subprocess.run(_command(reference, stage), cwd=REPO, env=_env(), check=True, timeout=900, capture_output=True)

  interrupted = str(tmp_path / "interrupted")
  process = subprocess.Popen(_command(interrupted, stage), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  first_checkpoint = os.path.join(interrupted, stage, "checkpoints", "10")
  deadline = time.time() + 600
  while not os.path.exists(first_checkpoint) and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert process.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(interrupted, stage, "COMPLETE")), "the kill came after the stage ended"
  saved = sorted(int(n) for n in os.listdir(os.path.join(interrupted, stage, "checkpoints")) if n.isdigit())
  assert saved and saved[-1] < 100

  rerun = subprocess.run(_command(interrupted, stage), cwd=REPO, env=_env(), check=True, timeout=900,
                         capture_output=True, text=True)
  # It really resumed: from the last checkpoint the killed run saved, not from scratch.
  total = {"ict": 120, "round_1": 100}[stage]
  assert f"{stage}: resuming from step {saved[-1]} of {total}" in rerun.stderr
  assert f"Stage {stage} resumes" in rerun.stderr
  np.testing.assert_array_equal(_final_params(interrupted, stage), _final_params(reference, stage))
  if stage == "round_1":
    decisions = [open(os.path.join(w, "round_1", "decisions.jsonl")).read() for w in (reference, interrupted)]
    assert decisions[0] == decisions[1]
    with open(os.path.join(interrupted, "round_1", "manifest.json")) as file:
      assert json.load(file)["metrics"]["steps"] == 100
