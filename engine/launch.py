"""torchrun with the engine's exits: `python -m engine.launch` takes torchrun's arguments and runs
it in this process, but a job that ends badly ends in one line instead of torchrun's traceback.

    python -m engine.launch --standalone --nproc_per_node 2 -m engine.run \
        --config configs/cartpole_d64.toml

The ranks say what happened themselves (a bad config, `interrupted: checkpoint written ...`, a
lost peer). torchrun then raises over it: ChildFailedError (a rank exited non-zero) or
SignalException (the launcher got Ctrl-C or SIGTERM), each printed as a traceback wall. Here the
exit status is the ranks' own: 2 for bad input, 3 when every member failed, 4 for a lost peer,
130 after a stop on request (the ranks wrote their checkpoint), as `python -m engine.run` exits
without torchrun. A rank that crashed or was killed gets one line (`error: rank 1 (pid N) was
killed by SIGKILL`) and the job exits as it did (128 + the signal).

A stop also gets more time: torchrun SIGKILLs its ranks 30 s after passing them a Ctrl-C or
SIGTERM, and a rank acts on it between updates, so a stop that came during a compile (minutes
on a CPU) or before a large replay was written lost its checkpoint set. engine.launch gives
them SHUTDOWN_GRACE_S unless --shutdown-timeout (or TORCH_ELASTIC_SHUTDOWN_TIMEOUT) says
otherwise."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

# Exit statuses of engine.run (engine/run.py), in the order a job reports them when its ranks
# differ: 2 bad input, 3 every member failed, 4 a peer lost, 130 interrupted (checkpoint written).
ENGINE_STATUSES = (2, 3, 4, 130)
# Seconds between a stop and torchrun's SIGKILL. The LunarLander population of 4 (2 x 5.4 GB of
# replay) took 11-25 s to write its set after a stop between updates, and more than 30 s when
# the stop came during its first compiled update: it was killed with its set half written.
SHUTDOWN_GRACE_S = 300


@contextlib.contextmanager
def stop_signals(handler: Callable, signals: tuple[int, ...]) -> Iterator[None]:
    """`handler` for `signals` inside the block, the previous handlers back after it. A training
    run acts on a stop between updates: raising KeyboardInterrupt from the handler (one
    process), or setting a flag that every rank acts on at the same loop step (torchrun). Off
    the main thread signals cannot be set, and they are left alone."""
    previous = []
    for sig in signals:
        try:
            previous.append((sig, signal.signal(sig, handler)))
        except ValueError:
            pass
    try:
        yield
    finally:
        for sig, old in previous:
            if old is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(sig, old)


def interrupt(signum, frame) -> None:
    """A signal handler that ends a run like Ctrl-C: its final checkpoint is written first."""
    raise KeyboardInterrupt


def job_status(codes: list[int]) -> tuple[int, int | None]:
    """The job's exit status from its failed ranks' exit codes, and the index of the failure
    to report in a line (None when the ranks exited with engine statuses and said why
    themselves). torchrun ends the other ranks of a failed job with SIGTERM, so a rank killed
    by SIGTERM is a consequence whenever another rank failed otherwise. A rank that crashed or
    was killed (code -N: 128 + N, as a shell reports it) is the one to report: the others'
    statuses (a lost peer, an interrupt) follow from it."""
    causes = [i for i, c in enumerate(codes) if c != -signal.SIGTERM] or list(range(len(codes)))
    for i in causes:
        if codes[i] not in ENGINE_STATUSES:
            code = codes[i]
            return (128 - code if code < 0 else code or 1), i
    return next(s for s in ENGINE_STATUSES if s in [codes[i] for i in causes]), None


def main(argv: list[str] | None = None) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    args = sys.argv[1:] if argv is None else argv
    if not any(a.startswith(("--shutdown-timeout", "--shutdown_timeout")) for a in args):
        os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_GRACE_S))
    try:
        torchrun(args)
    except SignalException:
        # Ctrl-C or SIGTERM reached the launcher; the ranks stopped on it and said where their
        # checkpoint is. torchrun has already logged the signal in one line. 130 either way, as
        # engine.run exits on Ctrl-C or SIGTERM.
        sys.exit(130)
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        status, odd = job_status([f.exitcode for _, f in failures])
        if odd is not None:
            rank, first = failures[odd]
            how = f"exited with status {first.exitcode}"
            if first.exitcode < 0:
                try:
                    how = f"was killed by {signal.Signals(-first.exitcode).name}"
                except ValueError:
                    how = f"was killed by signal {-first.exitcode}"
            print(f"error: rank {rank} (pid {first.pid}) {how}", file=sys.stderr)
        sys.exit(status)


if __name__ == "__main__":
    main()
