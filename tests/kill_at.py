"""`python tests/kill_at.py POINT STEP paxlite-args...`: runs `paxlite ARGS` in this process and
kills it with SIGKILL (kill -9: no handler, no cleanup) at an exact point of step STEP:

  torn_log  half-way through writing metrics.jsonl's line for STEP (main thread)
  in_write  inside the background write of checkpoint STEP: every array written, the
            directory not yet sealed nor renamed into place (Orbax's commit thread)

The kill is real; only its timing is chosen, which an outside `kill -9` cannot do reliably.
"""

import os
import signal
import sys

from paxlite import checkpoint, cli, metrics


def die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
  point, step, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
  if point == "torn_log":
    write = metrics.MetricsWriter.write

    def torn(self, at, values):
      if at == step:
        self._file.write('{"step": %d, "loss": 1.' % at)
        self._file.flush()
        die()
      write(self, at, values)

    metrics.MetricsWriter.write = torn
  elif point == "in_write":
    seal = checkpoint.Checkpointer._seal

    def killed_seal(self):
      if self._writing == step:
        die()
      seal(self)

    checkpoint.Checkpointer._seal = killed_seal
  else:
    raise SystemExit(f"unknown kill point {point!r}")
  return cli.main(args)


if __name__ == "__main__":
  sys.exit(main())
