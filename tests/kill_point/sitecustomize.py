"""Test helper: a process started with this directory and the repository on PYTHONPATH SIGKILLs itself at a
chosen point, so that tests kill -9 a run at a deterministic step instead of racing a timer.

BT_KILL_AT_LOSS=N: the process dies while computing its N-th Barlow Twins loss, i.e. inside step N,
after steps 1..N-1 have finished on every rank. BT_KILL_RANK (default 0) names the rank that dies;
under torchrun only the first attempt dies (TORCHELASTIC_RESTART_COUNT 0), so a restart runs through.
It says so on stderr first ("kill_point: SIGKILL inside step N").
"""
import os

if (os.environ.get("BT_KILL_AT_LOSS") and os.environ.get("RANK", "0") == os.environ.get("BT_KILL_RANK", "0")
        and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
    import signal
    import sys

    import bt_fast.loss  # before bt_fast.trainer binds the name

    _real_loss = bt_fast.loss.barlow_twins_loss
    _calls = 0

    def _loss_then_die(*args, **kwargs):
        global _calls
        _calls += 1
        if _calls == int(os.environ["BT_KILL_AT_LOSS"]):
            print(f"kill_point: SIGKILL inside step {_calls}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return _real_loss(*args, **kwargs)

    bt_fast.loss.barlow_twins_loss = _loss_then_die
