"""torchrun for bt_fast: check the training config once, launch, and end in one line.

    python -m tools.launch [torchrun options] -m bt_fast.train [--config FILE] [key=value ...]

Used by `run_pretrain.sh` wherever it starts torchrun. Seven things differ from plain torchrun:

- torchrun's options are read first, as every bt_fast command reads its own (`CliParser`): an unknown
  one, one given twice with two values, or a number or value torchrun would fail on (`--nnodes 0`,
  `--max-restarts -1`, `--rdzv-endpoint localhost:99999`, `--redirects 9`, ...) or a rendezvous host that does
  not resolve here is one `error:` line, exit 2, before anything else is checked.
- The config and the paths it names are checked here next. torchrun restarts a failed worker
  group up to --max-restarts times, which would print a config error that many times. With
  `--check` that check (and the process count) is all it does; `--help` after `-m bt_fast.train` is
  bt_fast.train's, once; before it, the launcher's.
- When torchrun is stopped by a signal (SLURM's SIGTERM or SIGUSR1, Ctrl-C, a closed terminal's
  SIGHUP), it passes the signal on to the workers, which checkpoint at the next step boundary, and
  then raises. Here that ends as a single-process run does: exit 0 (130 for SIGINT, 129 for SIGHUP)
  when this launch wrote a checkpoint, with rank 0's "stopped by ... after step N" as the last
  line. On several nodes a launcher whose node ran no rank 0 says where the checkpoint is, as rank 0
  printed on another machine; where every node runs on this machine (a rendezvous at a loopback
  address: run_pretrain.sh's simulated nodes) rank 0's lines are the only ones. torchrun's warnings
  narrating the stop are left out. A SIGQUIT (Ctrl-\\) ends the ranks at once, without a checkpoint:
  one line, exit 131. Under `nohup` a SIGHUP is left ignored, so the run goes on, as a single process
  does (torchrun would catch it all the same).
- A rank that fails on bad input (an error with exit code 2: empty data, too little memory, ...) would fail
  the same way on every restart. It leaves its error line here and stops the launch
  (`bt_fast.errors.leave_for_launcher`), which prints each distinct line once and exits 2. On several
  nodes it also closes the rendezvous, so the other nodes' launchers end too (one line, exit 2) instead
  of restarting their ranks and waiting there for this node. Where node 0 stops, the others say in one
  line that they cannot reach its rendezvous; torch's C++ warnings about each failed call to the store
  (with their stack dumps) are left out of the launcher's output, not of the ranks'.
- A worker group that failed for good otherwise ends in one line naming the rank and its error; the
  workers' own `error:` lines are above it.
- Without `--log-dir`, torchrun's per-rank error files go into a temporary directory that is
  removed at the end; plain torchrun leaves a `torchelastic_*` directory in the temporary
  directory after every launch.
- Where the environment does not set them: `TORCHRUN_DEFAULTS` for restarts and stops, and one OpenMP
  thread per rank, as torchrun sets it, without its four-line banner (`set_torchrun_defaults`).
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from bt_fast.errors import (LAUNCHER_ENV, STARTING, CliParser, UserError, cli_errors, exit_on_interrupt,
                            lost_a_peer_under, one_line, print_error, rank_0_ran_under, ranks_input_errors)

# torch's C++ client of node 0's store logs each failed call as a warning with a stack dump, about a hundred lines on
# every other node once node 0 has stopped; this launcher says what happened in one line. Read once, as torch loads:
# the ranks it starts keep their own C++ warnings, and a level the user set stays.
_QUIET_STORE_CLIENT = "TORCH_CPP_LOG_LEVEL" not in os.environ
if _QUIET_STORE_CLIENT:
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
with exit_on_interrupt(STARTING):
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import (RendezvousParameters, registry as rendezvous_registry,
                                                      rendezvous_handler_registry)
    from torch.distributed.elastic.rendezvous.api import (RendezvousClosedError, RendezvousConnectionError,
                                                          RendezvousError, RendezvousTimeoutError)
    from torch.distributed.elastic.rendezvous.utils import _parse_rendezvous_config, parse_rendezvous_endpoint

    from bt_fast.checkpoint import CHECKPOINT_NAME
    from bt_fast.config import Config, load_config
    from bt_fast.distributed import resolve_device
    from bt_fast.files import check_writable_directory
    from bt_fast.preflight import check_batch_split, check_passed, check_run_inputs
    from bt_fast.run_control import STOP_SIGNALS, stop_exit_code
    from bt_fast.train_args import parse_train_args
if _QUIET_STORE_CLIENT:
    del os.environ["TORCH_CPP_LOG_LEVEL"]

TRAIN_MODULE = ("-m", "bt_fast.train")
USAGE = "python -m tools.launch [torchrun options] -m bt_fast.train [train arguments]"

# What torch's elastic agent logs, as warnings, while it passes a stop signal on to the workers.
SHUTDOWN_NARRATION = {
    "torch.distributed.elastic.agent.server.api": "Received %s death signal, shutting down workers",
    "torch.distributed.elastic.multiprocessing.api": "Sending process %s closing signal %s",
}


class _Without(logging.Filter):
    def __init__(self, template: str):
        super().__init__()
        self.template = template

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != self.template


def quiet_shutdown_narration() -> None:
    for name, template in SHUTDOWN_NARRATION.items():
        logging.getLogger(name).addFilter(_Without(template))


def launcher_parser() -> CliParser:
    """torchrun's options (its parser's, defaults from its PET_* variables included), read by a `CliParser`: an
    unknown option or one given twice with two values is one `error:` line, where torchrun's parser printed its
    usage block or kept the last value."""
    parser = CliParser(prog="python -m tools.launch", usage=USAGE, description=__doc__.splitlines()[0])
    for action in torchrun.get_args_parser()._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue  # the training script: `-m bt_fast.train` and its arguments, split off before
        if action.nargs == 0:  # a flag
            parser.add_argument(*action.option_strings, dest=action.dest, action="store_const", const=action.const,
                                default=action.default, help=action.help)
        else:
            parser.add_argument(*action.option_strings, dest=action.dest, type=action.type, default=action.default,
                                choices=action.choices, help=action.help)
    return parser


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, bt_fast.train arguments) around `-m bt_fast.train`; without it, the launcher's --help
    or a usage error."""
    for i in range(len(argv) - 1):
        if tuple(argv[i:i + 2]) == TRAIN_MODULE:
            return argv[:i], argv[i + 2:]
    parser = launcher_parser()
    if {"-h", "--help"} & set(argv):
        parser.parse_args(argv)
    parser.error(f"no training command: give `-m bt_fast.train` and its arguments after the torchrun options "
                 f"({USAGE})")


def training_config(options: argparse.Namespace) -> Config:
    config = load_config(options.config, options.overrides, unique_keys=True)
    check_run_inputs(config)
    return config


def check_processes_per_node(value: str) -> int:
    """The processes per node `--nproc-per-node` starts; a UserError in one line where torchrun would fail on it
    with an assertion or a traceback."""
    try:
        count = torchrun.determine_local_world_size(value)
    except ValueError as err:
        raise UserError(f"--nproc-per-node {value}: {err}; give a number of processes, or auto, cpu or gpu") from None
    if count < 1:
        raise UserError(f"--nproc-per-node must be at least 1, got {value}")
    return count


def check_launcher_numbers(options: argparse.Namespace) -> tuple[int, int]:
    """(processes per node, nodes if their number is fixed else 0) of torchrun's `options`; a UserError in one line
    for a number torchrun would fail on with an assertion or a traceback (`--max-restarts -1`, `--nnodes abc`), or
    that would end this launcher's own checks in one (`--nnodes 0`: a division by zero)."""
    per_node = check_processes_per_node(options.nproc_per_node)
    try:
        min_nodes, max_nodes = torchrun.parse_min_max_nnodes(options.nnodes)
    except (ValueError, RuntimeError):
        raise UserError(f"--nnodes {options.nnodes}: give a number of nodes, or a range MIN:MAX of them") from None
    if min_nodes < 1 and ":" not in options.nnodes:
        raise UserError(f"--nnodes must be at least 1, got {options.nnodes}")
    if not 1 <= min_nodes <= max_nodes:
        raise UserError(f"--nnodes {options.nnodes}: give a range MIN:MAX with 1 <= MIN <= MAX")
    for flag, value in (("--max-restarts", options.max_restarts), ("--node-rank", options.node_rank),
                        ("--shutdown-timeout", options.shutdown_timeout)):
        if value is not None and value < 0:
            raise UserError(f"{flag} must be at least 0, got {value}")
    if not (math.isfinite(options.monitor_interval) and options.monitor_interval > 0):
        raise UserError(f"--monitor-interval must be a positive number of seconds, got {options.monitor_interval}")
    if options.master_port is not None and not 1 <= options.master_port <= 65535:
        raise UserError(f"--master-port must be a port number, 1..65535, got {options.master_port}")
    return per_node, max_nodes if min_nodes == max_nodes else 0


# The --rdzv-conf options that torch's rendezvous backends read as integers or flags (dynamic_rendezvous.create_handler,
# the c10d and etcd stores, the static backend's timeout), and what they must be; any other is text to them.
RENDEZVOUS_CONF_TYPES = {**dict.fromkeys(("join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout",
                                          "keep_alive_interval", "keep_alive_max_attempt", "read_timeout", "timeout"),
                                         "an integer"), "is_host": "true or false"}
STD_STREAMS = ("give 0, 1, 2 or 3 (nothing, stdout, stderr, both), or that for each local rank, as LOCAL_RANK:N,... "
               "(for example 0:3,1:2)")


def check_resolves(host: str, what: str) -> None:
    """A UserError in one line where `host` does not resolve here: torchrun would wait for it silently, or retry
    for minutes and end in a traceback. `what` names it."""
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):  # UnicodeError: a label over 63 characters
        raise UserError(f"{what} does not resolve on this host; give the host name or address of node 0") from None


def check_launcher_values(options: argparse.Namespace) -> None:
    """A UserError in one line for a value of torchrun's `options` that torchrun would end in a traceback once it
    started (`--rdzv-endpoint localhost:99999`, `--redirects 9`, `--log-dir` a file, ...), read by torch's own parsers
    so that the rules are torch's; or for a rendezvous host that does not resolve here."""
    for flag, value in (("--redirects", options.redirects), ("--tee", options.tee)):
        try:
            Std.from_str(value)
        except ValueError:
            raise UserError(f"{flag} {value}: {STD_STREAMS}") from None
    if options.local_ranks_filter:
        try:
            [int(rank) for rank in options.local_ranks_filter.split(",")]  # as torchrun.config_from_args reads it
        except ValueError:
            raise UserError(f"--local-ranks-filter {options.local_ranks_filter}: give local ranks separated by commas "
                            f"(for example 0,1)") from None
    if options.log_dir:
        try:
            check_writable_directory(options.log_dir)
        except OSError as err:
            raise UserError(f"--log-dir {options.log_dir} is no directory that can be written "
                            f"({err.strerror or err}); give one") from None
    check_rendezvous(options)


def check_rendezvous(options: argparse.Namespace) -> None:
    """`check_launcher_values` for the rendezvous: --rdzv-conf, and without --standalone (its own rendezvous)
    --rdzv-backend, --rdzv-endpoint and the host the nodes meet at. torch reads the configuration and lists the backends
    with parts that are not public (`_parse_rendezvous_config`, the registry's `_registry`): used here only."""
    try:
        conf = _parse_rendezvous_config(options.rdzv_conf)
    except ValueError:
        raise UserError(f"--rdzv-conf {options.rdzv_conf}: give KEY=VALUE,... (for example "
                        f"join_timeout=900,is_host=true)") from None
    typed = RendezvousParameters("c10d", "", "", 1, 1,
                                 **{key: value for key, value in conf.items() if key in RENDEZVOUS_CONF_TYPES})
    for key, kind in RENDEZVOUS_CONF_TYPES.items():
        try:
            typed.get_as_bool(key) if kind == "true or false" else typed.get_as_int(key)
        except ValueError:
            raise UserError(f"--rdzv-conf {options.rdzv_conf}: {key} must be {kind}, got {conf[key]}") from None
    if options.standalone:
        return  # torchrun's own rendezvous on this machine: the backend, endpoint and master address are not read
    backends = rendezvous_handler_registry._registry  # the registered backends, which torch lists nowhere public
    if options.rdzv_backend not in backends:
        raise UserError(f"--rdzv-backend {options.rdzv_backend} is no rendezvous backend; give one of "
                        f"{', '.join(sorted(backends))}")
    static = options.rdzv_backend == "static"
    if not options.rdzv_endpoint:
        if static:  # the rendezvous is at --master-addr
            check_resolves(options.master_addr, f"--master-addr {options.master_addr}")
        return
    try:
        host, port = parse_rendezvous_endpoint(options.rdzv_endpoint, -1)
    except ValueError:
        port = None
    if port is None or (static and port == -1):  # the static backend takes no default port
        raise UserError(f"--rdzv-endpoint {options.rdzv_endpoint}: give HOST:PORT, the host name or address of node 0 "
                        f"and a port number up to 65535")
    check_resolves(host, f"--rdzv-endpoint {options.rdzv_endpoint}: {host}")


# Set where the environment does not: elastic restarts otherwise reuse the rendezvous store and read the previous
# attempt's addresses (pytorch/pytorch#135712, #167288): "connection refused" on every restart; and torchrun lets the
# ranks write their checkpoint for this many seconds after a stop signal before its SIGKILL (torch before 2.13: 30).
TORCHRUN_DEFAULTS = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}


def set_torchrun_defaults(per_node: int) -> None:
    """`TORCHRUN_DEFAULTS`, and with several ranks per node one OpenMP thread each: torchrun's own choice, made
    here without the four-line banner torchrun prints about it. A value the user set stays."""
    for name, value in TORCHRUN_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if per_node > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    launcher_args, train_args = split_command(list(sys.argv[1:] if argv is None else argv))
    with cli_errors():  # before the config: a wrong launcher option is named even where the config is wrong too
        launcher_options = launcher_parser().parse_args(launcher_args)
        per_node, nodes = check_launcher_numbers(launcher_options)
        check_launcher_values(launcher_options)
    with cli_errors(), exit_on_interrupt("while checking the config"):
        train_options = parse_train_args(train_args)  # --help is bt_fast.train's, printed here once
        config = training_config(train_options)
    checkpoint = Path(config.out_dir) / CHECKPOINT_NAME
    started = time.time()
    options = torchrun.parse_args([*launcher_args, *TRAIN_MODULE, *train_args])
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:  # under nohup: torchrun would catch it all the same and
        # stop the ranks; left ignored, the ranks inherit the ignore and the run goes on, as a single process does
        options.signals_to_handle = ",".join(name for name in options.signals_to_handle.split(",")
                                             if name.strip() != "SIGHUP")
    with cli_errors():
        # each rank would fail to find its device (no GPU, or fewer GPUs than ranks on the node)
        resolve_device(config.device, local_rank=per_node - 1)
        if nodes:  # the world size is known: each rank would refuse it, once per restart
            check_batch_split(config.batch_size, per_node * nodes)
    if train_options.check:
        print(check_passed(config, machine=False))
        return 0
    set_torchrun_defaults(per_node)
    quiet_shutdown_narration()
    own_log_dir = not options.log_dir
    if own_log_dir:
        options.log_dir = tempfile.mkdtemp(prefix="torchelastic_")
    rank_errors = Path(tempfile.mkdtemp(prefix="bt_fast_launch_"))
    os.environ[LAUNCHER_ENV] = f"{os.getpid()}:{rank_errors}"
    try:
        return _run(options, checkpoint, started, rank_errors)
    finally:
        shutil.rmtree(rank_errors, ignore_errors=True)
        if own_log_dir:
            shutil.rmtree(options.log_dir, ignore_errors=True)


def reported_input_errors(directory: Path) -> bool:
    """Print, once each and in rank order, the distinct error lines that ranks left in `directory`
    (`bt_fast.errors.ranks_input_errors`); whether there were any."""
    lines = ranks_input_errors(directory)
    for line in lines:
        print_error(line)
    return bool(lines)


def close_rendezvous(options: argparse.Namespace) -> None:
    """Close the run's rendezvous, as torchrun does when a node fails for good but not when it is stopped by a
    signal: the other nodes, whose ranks lost their peers, then stop at their next rendezvous instead of
    waiting in it for this node until the join timeout."""
    config, _, _ = torchrun.config_from_args(options)
    if config.max_nodes == 1:
        return
    params = RendezvousParameters(backend=config.rdzv_backend, endpoint=config.rdzv_endpoint, run_id=config.run_id,
                                  min_nodes=config.min_nodes, max_nodes=config.max_nodes,
                                  local_addr=config.local_addr, **config.rdzv_configs)
    try:
        rendezvous_registry.get_rendezvous_handler(params).shutdown()
    except (RendezvousError, RuntimeError, OSError):  # node 0's store is gone: the others cannot wait in it either
        pass


def nodes_on_this_machine(options: argparse.Namespace) -> bool:
    """Whether every node runs on this machine: their rendezvous is at a loopback address, as for the simulated nodes
    of run_pretrain.sh (LOCAL_NODES=1), whose launchers and ranks share its output. No name is looked up."""
    if not options.rdzv_endpoint:  # the static rendezvous's --master-addr, say
        return False
    try:
        host = parse_rendezvous_endpoint(options.rdzv_endpoint, 29400)[0]
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _run(options: argparse.Namespace, checkpoint: Path, started: float, rank_errors: Path) -> int:
    """torchrun with `options`; the launcher's exit code, having said how it ended where torchrun would not.
    `rank_errors` is where ranks leave their input errors, and rank 0 its mark (`bt_fast.errors.mark_rank_0`)."""
    try:
        torchrun.run(options)
    except SignalException as stop:
        if reported_input_errors(rank_errors):  # the SIGTERM came from that rank
            close_rendezvous(options)
            return 2
        name = signal.Signals(stop.sigval).name
        if stop.sigval not in STOP_SIGNALS:  # SIGQUIT (Ctrl-\): the ranks quit at once, as it asks
            print_error(f"stopped by {name}: the ranks quit without writing a checkpoint; the command resumes from "
                        f"{checkpoint if checkpoint.is_file() else 'the start'}")
            return 128 + stop.sigval
        code = stop_exit_code(name)
        if checkpoint.is_file() and checkpoint.stat().st_mtime >= started:
            if (torchrun.parse_min_max_nnodes(options.nnodes)[1] == 1 or rank_0_ran_under(rank_errors)
                    or nodes_on_this_machine(options)):
                return code  # rank 0 ran here, or its output is this launcher's, and it has said where it stopped
            print(f"stopped by {name}\ncheckpoint: {checkpoint} (run the same command again to resume)")
            return code
        # No checkpoint of this launch's: a failure to a scheduler, whatever the signal; the shell's status for it,
        # as a rank stopped in its first-use conversion gives (the ranks' lines say what that kept). A rank that lost
        # another has said so, and where the cause is: the stop is its consequence, not news.
        if not lost_a_peer_under(rank_errors):
            print_error(f"stopped by {name} before this launch wrote a checkpoint; training resumes from "
                        f"{checkpoint if checkpoint.is_file() else 'the start'}")
        return 128 + stop.sigval
    except RendezvousConnectionError as err:  # node 0 unreachable, or its store could not open its port
        cause = one_line(err.__cause__) if err.__cause__ is not None else one_line(err)
        print_error(f"cannot reach the rendezvous at {options.rdzv_endpoint} ({cause}); node 0's launcher holds it: "
                    f"check that it runs (it ends when the run stops there: see its error) and that MASTER_ADDR and "
                    f"MASTER_PORT name node 0 and a free port")
        return 1
    except RendezvousClosedError:
        print_error("another node stopped the run (its launcher says why), so this node stops too")
        return 2
    except RendezvousTimeoutError:
        nodes = torchrun.parse_min_max_nnodes(options.nnodes)[0]
        print_error(f"not all {nodes} nodes joined the rendezvous at {options.rdzv_endpoint} in time; start each of "
                    f"the others with its NODE_RANK and the same MASTER_ADDR and MASTER_PORT (make pretrain NODES= "
                    f"prints their commands)")
        return 1
    except KeyboardInterrupt:  # before torchrun handles the signals: while the nodes gather
        print_error("interrupted while the nodes gathered; nothing was trained by this launch")
        return 130
    except ChildFailedError as failed:
        if reported_input_errors(rank_errors):
            return 2
        rank, failure = failed.get_first_failure()
        reason = " ".join(str(failure.message).split()) if isinstance(failure.message, str) else ""
        print_error(f"training failed on rank {rank} (exit code {failure.exitcode})"
                    f"{': ' + reason if reason and not reason.startswith('To enable traceback') else ''}; "
                    f"the workers' own error lines are above")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
