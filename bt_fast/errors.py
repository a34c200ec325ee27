"""The errors a user can act on, and how every command-line program reports them.

Library code raises a `UserError` subclass whose message names the file or config key and
says what to do. Command-line programs wrap their work in `cli_errors()`, which prints
`error: <message>` on one line and exits with the error's `exit_code` (2 for bad input, 1 for a
storage fault or a lost worker process met while running, 130 for a Ctrl-C whose code says what it
kept, 128 + N for another stop signal N that ends work the same way); nothing else turns exceptions
into text. They parse their arguments with `CliParser`, whose errors are one line too.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import select
import signal
import sys
import threading
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from bt_fast.files import atomic_write_text, check_output_file, shared_memory_full, size_text


class UserError(RuntimeError):
    """Unusable input or settings; the message names the file or key and what to do."""

    exit_code = 2


class DataError(UserError):
    """Unusable input data; the message names the file or directory and what to do."""


class StorageError(UserError):
    """The file system refused a write the run needed (full, over quota, read-only); nothing
    already complete was lost, and the message says where the last good state is."""

    exit_code = 1


class Interrupted(UserError):
    """Ctrl-C, or another stop signal `signum` that ends work the same way, raised where the code that met it
    knows what is kept of its work; the message says so. Its exit code is the shell's status for the signal:
    130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum


class WorkerLost(UserError):
    """A worker process died while it ran (the out-of-memory killer, for one); the message says what
    finished work is kept."""

    exit_code = 1


def lost_dataloader_worker(err: BaseException) -> str | None:
    """What torch's error says where a DataLoader worker process died ("DataLoader worker (pid 17) is
    killed by signal: Killed.", "DataLoader worker (pid(s) 17) exited unexpectedly"), with what likely
    killed it; None for any other error."""
    text = flat_message(err)
    if not isinstance(err, RuntimeError) or not text.startswith("DataLoader worker (pid"):
        return None
    text = text.rstrip(". ")
    if text.endswith(("killed by signal: Killed", "exited unexpectedly")):
        text += " (the kernel's out-of-memory killer ends a worker this way)"
    return text


def out_of_memory(err: BaseException) -> tuple[str, str] | None:
    """Where `err` says memory ran out, (which memory, how much was asked for): ("GPU", "2.00 GiB") for torch's
    OutOfMemoryError (a device allocator's), ("host", "9.0 MiB") for torch's CPU allocator's RuntimeError
    ("can't allocate memory: you tried to allocate N bytes") or Python's MemoryError; None for any other error.
    The amount is "" where the message gives none. Callers let our own UserErrors through before asking: they
    say what ran out themselves."""
    text = flat_message(err)
    if any(kind.__name__ == "OutOfMemoryError" for kind in type(err).__mro__):  # without importing torch here
        asked = re.search(r"Tried to allocate ([\d.]+ \w+)", text)
        return "GPU", asked.group(1) if asked else ""
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "can't allocate memory" in text):
        asked = re.search(r"tried to allocate (\d+) bytes", text)
        return "host", size_text(int(asked.group(1))) if asked else ""
    return None


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer")  # gloo's transport (a plain RuntimeError)


def lost_peer(err: BaseException) -> str | None:
    """In a rank of a distributed run: the gist of what a collective or the store said where another rank's process
    or machine went away (gloo: "Connection closed by peer [10.0.0.2]:4321"; torch's DistNetworkError from the
    store), None for any other error. The traceback of such an error shows only where this rank was waiting."""
    if not isinstance(err, RuntimeError):
        return None
    text = flat_message(err)
    for sign in _PEER_GONE:
        if sign in text:
            return text[text.index(sign):].split(". ")[0]
    if any(kind.__name__ == "DistNetworkError" for kind in type(err).__mro__):  # without importing torch here
        return text.split(". ")[0]
    return None


def some_of(names: Sequence[str], shown: int = 3) -> str:
    """The first `shown` of `names`, comma-separated, and how many more there are: "a, b, c and 9 more"."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# A terminal's colour and style codes (torch's weights-only unpickling error prints its advice in bold)
_TERMINAL_STYLE = re.compile(r"\x1b\[[0-9;]*m")


def flat_message(err: BaseException, limit: int | None = None) -> str:
    """`err`'s whole message on one line (each run of white space, newlines included, one space; no terminal
    style codes), or its type's name where it has none; with `limit`, one longer than that many characters is
    cut after a whole word, '...' marking the cut."""
    text = " ".join(_TERMINAL_STYLE.sub("", str(err)).split()) or type(err).__name__
    if limit is None or len(text) <= limit:
        return text
    return text[:limit - 3].rsplit(" ", 1)[0] + "..."


def one_line(err: BaseException) -> str:
    """The message of `err` on one line.

    For an error re-raised from a DataLoader worker ("Caught DataError in DataLoader worker
    process 0. Original Traceback ..."), the original error's message.
    """
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()] or [type(err).__name__]
    if lines[0].startswith("Caught ") and len(lines) > 1:
        name, _, message = lines[-1].partition(": ")
        return message if name.endswith("Error") and message else lines[-1]
    return " ".join(lines)


def print_error(err: BaseException | str) -> None:
    print(f"error: {err if isinstance(err, str) else one_line(err)}", file=sys.stderr)


STARTING = "while starting (loading torch)"  # `exit_on_interrupt` around a command's imports: seconds


def _interrupt_again(unraisable) -> None:
    """`sys.unraisablehook` from `exit_on_interrupt` or `cli_errors` on: a Ctrl-C that Python could only print
    as "Exception ignored in ...", where it stopped nothing, is sent again, to be raised where it stops the
    command. Python raises it there when the signal arrives during a weakref callback (importlib's module
    locks, while torch loads), a callback run at a fork (logging's, as a DataLoader starts its workers) or a
    finalizer. Anything else is reported as Python reports it.

    The hook cannot raise either (Python ignores that too), so a thread sends SIGINT to the main thread a
    moment later, as the terminal would: it also wakes a main thread blocked in a system call."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        again = threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        again.daemon = True
        again.start()
    else:
        sys.__unraisablehook__(unraisable)


def _keep_interrupts() -> None:
    """`_interrupt_again` as this process's unraisable hook, unless another's is in place (a test runner's)."""
    if sys.unraisablehook is sys.__unraisablehook__:
        sys.unraisablehook = _interrupt_again


@contextmanager
def exit_on_interrupt(what: str = "", outcome: str = "nothing was written") -> Iterator[None]:
    """Ctrl-C in the block ends the command with one `error:` line, `interrupted <what>; <outcome>`,
    and exit 130, not a KeyboardInterrupt traceback. Around a command's imports (`STARTING`) and around
    its work, `outcome` saying what is left of it."""
    _keep_interrupts()
    try:
        yield
    except KeyboardInterrupt:
        print_error(f"interrupted{' ' + what if what else ''}; {outcome}")
        raise SystemExit(130) from None


# tools.launch sets this for its ranks: "<its pid>:<a directory>". torchrun restarts a failed worker group,
# whose every rank would print the same bad-input error again on every restart.
LAUNCHER_ENV = "BT_FAST_LAUNCHER"


def _launcher() -> tuple[int, str] | None:
    """(pid, directory) of the tools.launch that started this process, or None."""
    pid, _, directory = os.environ.get(LAUNCHER_ENV, "").partition(":")
    return (int(pid), directory) if pid.isdigit() and int(pid) == os.getppid() and directory else None


def leave_for_launcher(err: BaseException) -> bool:
    """In a rank that tools.launch started, a bad-input error (exit code 2, the same on every restart): write its
    line into the launcher's directory as `rank<RANK>` and send the launcher SIGTERM, which stops the worker group
    instead of restarting it; the launcher then prints each distinct line once. False (nothing done) anywhere
    else, for any other error, or if the line cannot be written: the caller prints it itself."""
    launcher = _launcher()
    if launcher is None or getattr(err, "exit_code", 2) != 2:
        return False
    try:
        atomic_write_text(os.path.join(launcher[1], f"{_RANK_FILE}{os.environ.get('RANK', '0')}"), one_line(err))
        os.kill(launcher[0], signal.SIGTERM)
    except OSError:
        return False
    return True


_RANK_FILE = "rank"  # + the rank: the file a rank leaves its input error in
_RANK_0_MARK = "main_rank_here"  # not a `_RANK_FILE`
_LOST_PEER_MARK = "lost_a_peer"


def _mark_launcher(name: str) -> None:
    """Leave the mark `name` in the directory of the tools.launch that started this process, if one did."""
    launcher = _launcher()
    if launcher is not None:
        with suppress(OSError):  # the launcher then says it itself: a line twice, nothing lost
            Path(launcher[1], name).touch()


def mark_rank_0() -> None:
    """In rank 0, if tools.launch started it: say so in the launcher's directory. A launcher of one node among
    several then knows that rank 0's own lines (where a stopped run's checkpoint is) went to its output."""
    _mark_launcher(_RANK_0_MARK)


def rank_0_ran_under(directory: str | Path) -> bool:
    """In tools.launch: whether rank 0 ran among its workers (`mark_rank_0`, in the launcher's `directory`)."""
    return Path(directory, _RANK_0_MARK).exists()


def lost_a_peer_under(directory: str | Path) -> bool:
    """In tools.launch: whether one of its ranks lost another rank and said so (`cli_errors`). A stop signal that
    follows is that failure's consequence (run_pretrain.sh stops its other simulated nodes when one fails)."""
    return Path(directory, _LOST_PEER_MARK).exists()


def ranks_input_errors(directory: str | Path) -> list[str]:
    """The distinct error lines that ranks left in the launcher's `directory` (`leave_for_launcher`), in rank
    order (the writers' hidden temporaries are not theirs yet)."""
    names = [name for name in os.listdir(directory) if name.startswith(_RANK_FILE)]
    names.sort(key=lambda name: int(name[len(_RANK_FILE):]) if name[len(_RANK_FILE):].isdigit() else -1)
    return list(dict.fromkeys(Path(directory, name).read_text(encoding="utf-8") for name in names))


def peer_left_input_error() -> bool:
    """In a rank that tools.launch started: whether a rank has left an input error there. What this rank then
    fails with (a collective whose peer is gone) is that error's consequence, which the launcher prints."""
    launcher = _launcher()
    try:
        return launcher is not None and bool(ranks_input_errors(launcher[1]))
    except OSError:
        return False


@contextmanager
def cli_errors(*also: type[BaseException], launched_rank: bool = False) -> Iterator[None]:
    """Report a UserError (or one of `also`) as one `error:` line on stderr and exit with its
    `exit_code` (2 for `also`); likewise full shared memory (`shared_memory_full`: a worker pool's lock or a
    DataLoader worker's batch) and memory that ran out (`out_of_memory`), exit 2, and a DataLoader worker
    that died, exit 1. With `launched_rank` (bt_fast.train), a bad-input error goes to the launcher instead
    where `leave_for_launcher` can, and any error after another rank's is left unsaid (exit 1), and a lost
    peer (`lost_peer`) is one line (exit 1).
    When the block succeeds, what a command does next is print its result: `drop_unread_output` first."""
    _keep_interrupts()
    try:
        try:
            yield
        except UserError:
            raise
        except (RuntimeError, OSError, MemoryError) as err:
            full, memory = shared_memory_full(err), out_of_memory(err)
            if full is not None:
                raise UserError(f"{full}: free some, give the machine more (docker run --shm-size) or use fewer "
                                f"worker processes, and rerun") from None
            if memory is None:
                raise
            where, asked = memory
            raise UserError(f"out of {where} memory{f' (asking for {asked})' if asked else ''}: free memory, or "
                            f"give the command less to hold at once (smaller batches or images), and rerun") from None
        drop_unread_output()
    except (UserError, *also) as err:
        if not (launched_rank and leave_for_launcher(err)):
            print_error(err)
        raise SystemExit(getattr(err, "exit_code", 2)) from None
    except Exception as err:
        if launched_rank and peer_left_input_error():
            raise SystemExit(1) from None
        gone = lost_peer(err) if launched_rank else None
        if gone is not None:
            _mark_launcher(_LOST_PEER_MARK)
            print_error(f"rank {os.environ.get('RANK', '0')} lost another rank ({gone}): it stopped or its machine "
                        f"went down; its own error line, or its node's launcher, says why")
            raise SystemExit(1) from None
        lost = lost_dataloader_worker(err)
        if lost is None:
            raise
        print_error(f"{lost}; run again with fewer workers")
        raise SystemExit(WorkerLost.exit_code) from None


def ignore_interrupts_while_exiting() -> None:
    """For a command whose work is done: a Ctrl-C while it prints its result or the interpreter shuts
    down (atexit handlers such as tqdm's, loader threads) has nothing left to stop and would only print
    "Exception ignored ... KeyboardInterrupt" tracebacks after the result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def quiet_no_cuda_runtime_warning() -> None:
    """For a command whose work may compile code on the CPU (inductor imports torch's C++-extension helper): keep
    that helper's one warning on a machine with a CUDA toolkit and no CUDA runtime, "No CUDA runtime is found,
    using CUDA_HOME=...", out of the command's lines; it is no finding of the command's."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def drop_unread_output() -> None:
    """For a command whose work is done, before it prints its result (`cli_errors` calls it): if nothing reads
    its stdout any more (a `| head` that has exited, a `| tee` that went with its terminal), point stdout at
    /dev/null. The result would otherwise end the command in a BrokenPipeError traceback and exit 1, its
    work done and written. A pipe with no reader left reports POLLERR to its writer."""
    poller = select.poll()
    try:
        poller.register(sys.stdout.fileno(), select.POLLOUT)
    except (AttributeError, OSError, ValueError):  # no stdout, or not a file descriptor
        return
    if any(events & select.POLLERR for _, events in poller.poll(0)):
        to_devnull(sys.stdout.fileno())


def say(text: str) -> None:
    """`print(text)` for a command still at work (a progress line, a result before its file is written): where
    nothing reads its stdout any more (a `| head` that has exited), the rest of its output goes to /dev/null and
    the work goes on, instead of ending in a BrokenPipeError traceback with its files unwritten."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        to_devnull(sys.stdout.fileno())


def leave_a_lost_terminal(fds: list[int]) -> None:
    """Point each of `fds` (terminals when the command started) that is no terminal any more at /dev/null. A
    terminal that hung up (its window or ssh session closed) answers every write with EIO, and no longer counts
    as one; a SIGHUP sent by hand leaves the terminal as it is."""
    lost = [fd for fd in fds if not os.isatty(fd)]
    if lost:
        to_devnull(*lost)


def to_devnull(*fds: int) -> None:
    """Point each of the file descriptors `fds`, whose output nobody reads any more, at /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)


class _StoreOnce(argparse._StoreAction):
    """argparse's `store`, but an option given twice is an error: argparse keeps the last one silently, so
    `--config a.yaml ... --config b.yaml` trained b alone (config keys given twice are refused likewise)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = vars(namespace).setdefault(_GIVEN, {})
        if self.dest in given and given[self.dest] != values:
            parser.error(f"{option_string} given twice ({given[self.dest]} and {values}); give it once")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


_GIVEN = "_options_given"  # the values _StoreOnce has seen, in the namespace while it is parsed


def option_flag(dest: str) -> str:
    """The command-line option whose argparse `dest` (or keyword, report key) is `dest`: 'max_steps' ->
    '--max-steps'."""
    return "--" + dest.replace("_", "-")


class CliParser(argparse.ArgumentParser):
    """argparse's parser with its errors on one `error:` line (exit 2), like every other error of a command,
    and an option that takes a value refused when given twice with different values."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        vars(namespace).pop(_GIVEN, None)
        return namespace, extras

    def error(self, message: str) -> None:
        self.exit(2, f"error: {message} (see --help)\n")

    def check_range(self, flag: str, value: int, low: int, high: int, unit: str) -> None:
        """The error line for option `flag`'s `value` unless it lies in `low`..`high` (`unit`s)."""
        if not low <= value <= high:
            self.error(f"{flag} must lie in {low}..{high} {unit}, got {value}")

    def refuse_unread(self, args: argparse.Namespace, read_by: Mapping[str, Sequence[str]], running: str,
                      words: Callable[[Sequence[str]], str], instead: Mapping[str, str] | None = None) -> None:
        """The error line for an option given (its value not the parser's default) that only the modes in
        `read_by[option]` read, in a run of mode `running`: it would be ignored. `words(modes)` names modes
        in the line; `instead[option]`, where the running mode reads another option in its place, is added."""
        for name, modes in read_by.items():
            if getattr(args, name) == self.get_default(name) or running in modes:
                continue
            hint = f" ({words([running])} reads {instead[name]})" if instead and name in instead else ""
            self.error(f"{option_flag(name)} applies to {words(modes)} only, not {words([running])}{hint}")


def unresolved_home(path: str) -> str | None:
    """Where os.path.expanduser left the leading `~` of `path` as it was (no such user, or no home directory
    known), what it starts with and what to do; None where it left none."""
    if not path.startswith("~"):
        return None
    user = path.partition("/")[0][1:]
    if user:
        return f"~{user} but there is no user {user}; give an absolute path"
    return "~ but the home directory is unknown (HOME is unset); set HOME or give an absolute path"


def expand_home(text: str) -> str:
    """argparse `type` of an option naming a file or folder: a leading `~` is the home directory, as in a config's
    path keys (`bt_fast.config`), also where the shell leaves it as typed (quoted, or in `--data=~/x`). A `~` that
    names no home is refused, not taken as a folder's name."""
    path = os.path.expanduser(text)
    problem = unresolved_home(path)
    if problem:
        raise argparse.ArgumentTypeError(f"{text} starts with {problem}")
    return path


def home_path(text: str) -> Path:
    """`expand_home`, as a Path."""
    return Path(expand_home(text))


def output_file(text: str) -> Path:
    """argparse `type` of an option naming a file to write (`home_path`): checked when the command starts, so
    that an unwritable path fails at once, not after the work whose result it was to hold."""
    path = home_path(text)
    try:
        check_output_file(path)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write {path} ({err.strerror or err}); give a file path in a "
                                         f"writable directory") from None
    return path


def png_file(text: str) -> Path:
    """argparse `type` of an option naming a PNG to write: `output_file`, ending in .png (the one format
    written; `--out metrics.jsonl` would otherwise have replaced the run's log with an image)."""
    path = output_file(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text} does not end in .png; the image is written as PNG only, so give "
                                         f"a .png file")
    return path
