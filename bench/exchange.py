"""What the hosts' per-batch length exchange costs: ``distributed.global_max`` round trips through the
coordination service, measured with N local processes (a pod's are across the network: add its latency).

    python bench/exchange.py [--processes 2] [--steps 2000]
"""
import argparse
import os
import socket
import subprocess
import sys

WORKER = r'''
import sys, time
from axl_jax import distributed
distributed.initialize(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
steps = int(sys.argv[4])
distributed.barrier("start")
started = time.perf_counter()
for step in range(steps):
  distributed.global_max(f"bench/{step}", [step % 7, step % 11])
  distributed.forget(f"bench/{step - 64}")
elapsed = time.perf_counter() - started
distributed.barrier("end")
print(f"{elapsed / steps * 1e6:.0f}", flush=True)
'''


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--steps", type=int, default=2000)
  args = parser.parse_args()
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=repo)
  running = [subprocess.Popen([sys.executable, "-c", WORKER, f"127.0.0.1:{port}", str(args.processes), str(i),
                               str(args.steps)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(args.processes)]
  micros = [int(p.communicate(timeout=600)[0].split()[-1]) for p in running]
  print(f"{args.processes} processes, {args.steps} exchanges: {max(micros)} us per batch (slowest process), "
        f"per process {micros}")


if __name__ == "__main__":
  main()
