"""The pmapped step: 1 device equals 4 devices on the same global batch; the loss matches float64."""
import json
import os
import tempfile

import numpy as np
import pytest

from tests.helpers import run_python

# Plain SGD without clipping: the update is exactly -lr * grad, so a gradient that is summed rather
# than averaged over the devices (4x too large) shows up in both grad_norm and the parameters. AdamW
# with clipping would hide it (Adam's update ignores a uniform scale of the gradient), and so would a
# warm-up schedule whose first learning rate is 0.
STEP_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from tests.helpers import tiny_model_config
from axl_jax import encoder, train_step as ts
model_config = tiny_model_config()
params = encoder.init_params(model_config, jax.random.key(0))
initial = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(params)])
optimizer = optax.sgd(0.02)
state = ts.create_train_state(params, optimizer)
step = ts.make_parallel_train_step(encoder.BiEncoder(model_config), optimizer, temperature=0.5,
                                   grad_cache_chunks=CHUNKS)
rng = np.random.default_rng(1)
queries, group = 8, 3
lengths_q = rng.integers(2, 9, queries); lengths_p = rng.integers(2, 13, queries * group)
batch = {"query_ids": rng.integers(1, 97, (queries, 8)).astype(np.int32), "query_lengths": lengths_q.astype(np.int32),
         "passage_ids": rng.integers(1, 97, (queries * group, 12)).astype(np.int32),
         "passage_lengths": lengths_p.astype(np.int32)}
sharded = ts.shard_batch(batch, jax.local_device_count())
if PUT:  # as the trainer's loader threads hand it over: already split over the devices
  sharded = ts.put_on_devices(sharded)
  placed = [[shard.device for shard in sorted(array.addressable_shards, key=lambda s: s.index[0].start)]
            for array in sharded.values()]
  assert all(devices == jax.local_devices() for devices in placed), placed
losses, grad_norms = [], []
for _ in range(3):
  state, metrics = step(state, sharded, jax.random.key(3))
  losses.append(float(metrics["loss"]))
  grad_norms.append(float(metrics["grad_norm"]))
flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.params)])
np.save(OUT, flat)
print(json.dumps({"losses": losses, "grad_norms": grad_norms, "devices": jax.local_device_count(),
                  "change": float(np.abs(flat - initial).max()), "skipped": int(state.skipped_steps)}))
"""


def _run(devices, out, chunks=1, put=False):
  result = run_python(f"OUT={out!r}\nCHUNKS={chunks}\nPUT={put}\n" + STEP_SCRIPT, devices=devices)
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_one_device_equals_four_devices():
  with tempfile.TemporaryDirectory() as tmp:
    one = _run(1, os.path.join(tmp, "one.npy"))
    four = _run(4, os.path.join(tmp, "four.npy"))
    assert one["devices"] == 1 and four["devices"] == 4
    assert one["skipped"] == four["skipped"] == 0
    assert min(one["grad_norms"]) > 1e-3  # the gradient is not ~0, so its scale is visible
    assert one["change"] > 1e-3  # the steps really moved the parameters
    # The first step's gradient is at identical parameters: its norm alone catches a wrong scale.
    np.testing.assert_allclose(one["grad_norms"], four["grad_norms"], rtol=1e-4)
    np.testing.assert_allclose(one["losses"], four["losses"], rtol=1e-5, atol=1e-6)
    params_one = np.load(os.path.join(tmp, "one.npy"))
    params_four = np.load(os.path.join(tmp, "four.npy"))
    np.testing.assert_allclose(params_one, params_four, rtol=1e-4, atol=1e-5)
    # The trainer's batches arrive already on the devices (slice i on device i): the same steps exactly.
    placed = _run(4, os.path.join(tmp, "placed.npy"), put=True)
    assert placed["losses"] == four["losses"] and placed["grad_norms"] == four["grad_norms"]
    np.testing.assert_array_equal(np.load(os.path.join(tmp, "placed.npy")), params_four)


def test_grad_cache_step_equals_the_plain_step():
  # GradCache: 8 queries x 3 passages in 4 sub-batches of 2 queries on one device, and in 2 sub-batches of 1
  # query on each of 4 devices, train the parameters the plain step trains (3 SGD steps, no clipping).
  with tempfile.TemporaryDirectory() as tmp:
    plain = _run(1, os.path.join(tmp, "plain.npy"))
    cached = _run(1, os.path.join(tmp, "cached.npy"), chunks=4)
    spread = _run(4, os.path.join(tmp, "spread.npy"), chunks=2)
    assert plain["change"] > 1e-3 and min(plain["grad_norms"]) > 1e-3
    for other, name in ((cached, "cached"), (spread, "spread")):
      np.testing.assert_allclose(other["grad_norms"], plain["grad_norms"], rtol=1e-5)
      np.testing.assert_allclose(other["losses"], plain["losses"], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(np.load(os.path.join(tmp, f"{name}.npy")), np.load(os.path.join(tmp, "plain.npy")),
                                 rtol=1e-5, atol=1e-6)


def test_loss_matches_float64_reference():
  import jax.numpy as jnp
  from axl_jax.loss import contrastive_loss
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(3, 4))
  passages = rng.normal(size=(6, 4))  # groups of 2: positives at rows 0, 2, 4
  loss, accuracy = contrastive_loss(jnp.asarray(queries, jnp.float32), jnp.asarray(passages, jnp.float32), 0.5)
  scores = queries @ passages.T / 0.5
  log_softmax = scores - np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1, keepdims=True)) - scores.max(1, keepdims=True)
  labels = np.array([0, 2, 4])
  expected = -log_softmax[np.arange(3), labels].mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  assert float(accuracy) == pytest.approx(np.mean(scores.argmax(1) == labels))
