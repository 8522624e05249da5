"""A user error under torchrun: said once (by rank 0), and final for the whole launch.

torchrun's agent restarts a failed worker group while ``--max-restarts`` allows, whatever the
exit code: in ``torch.distributed.elastic`` (``SimpleElasticAgent._invoke_run``) every non-zero
exit makes the group FAILED, and a FAILED group is restarted; there is no exit code or call by
which a worker says "do not retry" (a zero exit would be counted a success). So the refusal is
made final here instead: the rank that refuses records its line in the launch's store (the
agent's, which lives as long as the torchrun command), and every restarted group finds it before
it reads or writes anything and refuses at once with the same line, said by rank 0 only. A crash
(a killed rank, a signal) records nothing: the restart continues the run as before.
"""

from __future__ import annotations

import contextlib
import os
import time

from detfit.errors import DetfitError

# How long a rank other than 0 waits for rank 0 to record the same error before saying its own.
WAIT_FOR_RANK0_S = 5.0
MAX_MESSAGE = 64 * 1024  # a recorded line is an error message, never a data dump


class RefusedBefore(DetfitError):
    """An earlier attempt of this torchrun launch refused the request: this attempt refuses too."""

    same_on_every_rank = True


def _key(rank: int) -> str:
    return f"detfit/refusal/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/rank{rank}"


def _world() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError:
        return 1


def refuse_if_refused_before() -> None:
    """In a group torchrun restarted: raise :class:`RefusedBefore` with the line an earlier
    attempt refused with (rank 0's when it recorded one)."""
    from detfit import distributed

    if not distributed.launched_with_torchrun() or distributed.elastic_restart_count() == 0:
        return
    store = distributed.launch_store()
    if store is None:
        return
    for rank in range(_world()):
        try:
            message = store.get(_key(rank)) if store.check([_key(rank)]) else None
        except RuntimeError:  # the store went away: nothing to say
            return
        if message is not None:
            raise RefusedBefore(message.decode("utf-8", "replace"))


def record(message: str) -> None:
    """Record this rank's refusal for the launch's later attempts (nothing outside torchrun)."""
    from detfit import distributed

    if not distributed.launched_with_torchrun():
        return
    store = distributed.launch_store()
    if store is None:
        return
    with contextlib.suppress(RuntimeError):  # the store went away: nothing to record in
        store.set(_key(int(os.environ.get("RANK", 0))), message[:MAX_MESSAGE])


def says_it(exc: DetfitError) -> bool:
    """Whether this process prints ``exc``: rank 0 always; another rank when the error is not
    one every rank raises alike and rank 0 has not recorded one within :data:`WAIT_FOR_RANK0_S`
    (an error only this rank meets, a file missing on its node, is still said)."""
    from detfit import distributed

    if distributed.env_is_main():
        return True
    if exc.same_on_every_rank:
        return False
    store = distributed.launch_store(timeout_s=WAIT_FOR_RANK0_S)
    if store is None:
        return True
    deadline = time.monotonic() + WAIT_FOR_RANK0_S
    try:
        while time.monotonic() < deadline:
            if store.check([_key(0)]):
                return False
            time.sleep(0.05)
    except RuntimeError:
        pass
    return True
