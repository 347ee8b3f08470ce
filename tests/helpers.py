"""Tiny configs and fixtures shared by the tests."""
import os
import subprocess
import sys

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(REPO, "data", "tydi-mini")


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
  import configs.default
  model = configs.default.get_config().model
  model.update(vocab_size=97, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
               max_position_embeddings=64, type_vocab_size=2, position_offset=0, layer_norm_eps=1e-12,
               hidden_dropout=0.0, attention_dropout=0.0)
  model.update(overrides)
  return model


def run_python(code: str, devices: int = 1, timeout: int = 600, env_extra=None) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh interpreter with ``devices`` simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.update(env_extra or {})
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
  if result.returncode != 0:
    raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}")
  return result
