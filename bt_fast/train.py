"""Barlow Twins pretraining.

    python -m bt_fast.train --config configs/demo_cpu.yaml data=data/demo/train key=value ...

One process per device; under torchrun the global batch is split evenly across ranks.
Resumes automatically from `<out_dir>/checkpoint.pth` (written every epoch, at the end, and on
SIGINT / SIGHUP / SIGTERM / SIGUSR1 at the next step boundary; SIGUSR1 also requeues the SLURM job).
Rank 0 also writes metrics.jsonl, config.yaml, metrics.png, summary.json and optionally TensorBoard
events there (`bt_fast.run_log`). The model, the loop and its one host sync per `log_every` steps are
`bt_fast.trainer`'s; this module runs them once per process and is the command line.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from bt_fast.errors import STARTING, exit_on_interrupt, ignore_interrupts_while_exiting

# Loading torch, torchvision and the pipelines takes seconds; Ctrl-C meanwhile is one line, exit 130.
with exit_on_interrupt(STARTING):
    from bt_fast.checkpoint import BACKBONE_NAME, CHECKPOINT_NAME
    from bt_fast.config import Config, load_config
    from bt_fast.distributed import DistContext, init_distributed, process_context, shutdown_distributed
    from bt_fast.errors import (Interrupted, StorageError, UserError, cli_errors, mark_rank_0, print_error,
                                quiet_no_cuda_runtime_warning)
    from bt_fast.files import storage_fault
    from bt_fast.knn import KnnMonitor
    from bt_fast.memory_budget import check_memory
    from bt_fast.preflight import check_passed, check_previous_run, check_run_inputs
    from bt_fast.run_control import stop_exit_code
    from bt_fast.run_lock import RunLock
    from bt_fast.run_log import METRICS_NAME, metrics_missing, plotted_metrics, summarise, write_summary
    from bt_fast.train_args import parse_train_args
    from bt_fast.trainer import Trainer, amp_dtype, check_compiler
    from pipelines.augment import triton_kernels


def train(config: Config) -> dict:
    """Run (or resume) pretraining; returns the summary printed at the end.

    Rank 0 holds out_dir's run lock (`bt_fast.run_lock`) throughout. A run whose checkpoint already
    holds every step trains nothing, rewrites none of its files and reports itself complete with its
    recorded figures; one whose checkpoint is past this command's last step (a lower max_steps or
    epochs) trains and writes nothing and reports that (`past`: the setting it is past). A storage fault
    (out_dir full or read-only) ends in a StorageError naming the last good checkpoint; a Ctrl-C that
    raises (a second one, or one after the loop) in an Interrupted naming the checkpoint on disk, if any.
    """
    check_run_inputs(config)
    ctx = init_distributed(config.device)
    if ctx.is_main:
        mark_rank_0()
    lock, trainer = RunLock(config.out_dir), None
    try:
        if ctx.is_main:
            lock.acquire()
        check_previous_run(config)
        check_the_machine(config, ctx)
        if ctx.is_main and config.warmup_epochs >= config.epochs:
            print(f"warning: warmup_epochs ({config.warmup_epochs}) >= epochs ({config.epochs}): the learning "
                  f"rate never reaches its peak; lower warmup_epochs", file=sys.stderr)
        trainer = Trainer(config, ctx)
        trainer.resume()
        already_complete, past = trainer.step >= trainer.total_steps, _past_the_last_step(config, trainer)
        if not already_complete:
            trainer.fit()
        backbone = trainer.out_dir / BACKBONE_NAME
        if not trainer.stopped_by and not past and not (already_complete and backbone.is_file()):
            backbone = trainer.save_backbone()
        if already_complete:  # the figures of the run that trained, from its log
            metrics = trainer.out_dir / METRICS_NAME
            if ctx.is_main and not past and metrics_missing(trainer.out_dir):  # its end was cut short
                recorded = write_summary(config, trainer.steps_per_epoch, trainer.total_steps, None, ctx.device,
                                         ctx.world_size)
            elif metrics.is_file():
                recorded = summarise(plotted_metrics(metrics, warn=ctx.is_main), trainer.steps_per_epoch,
                                     config.batch_size)
            else:
                recorded = {}
                if ctx.is_main:
                    print(f"warning: {metrics} is missing, so the run's images/s (measured in it) is not known",
                          file=sys.stderr)
            if ctx.is_main and not past and trainer.knn_monitor is not None:
                _say_no_knn_ran(config, trainer, recorded.get("last_knn"))
            images_per_s = recorded.get("images_per_s")
            first_loss = trainer.first_loss if trainer.first_loss is not None else recorded.get("first_loss")
            last_loss = trainer.last_loss if trainer.last_loss is not None else recorded.get("last_loss")
        else:  # the whole run's rate, as summary.json and a rerun give it (a resumed run's earlier segments too)
            images_per_s = (trainer.summary["images_per_s"] if trainer.summary else
                            trainer.images_seen / trainer.train_time if trainer.train_time else None)
            first_loss, last_loss = trainer.first_loss, trainer.last_loss
        return {"steps": trainer.step, "total_steps": trainer.total_steps, "stopped_by": trainer.stopped_by,
                "epoch_steps": trainer.steps_per_epoch * config.epochs,
                "already_complete": already_complete, "past": past, "world_size": ctx.world_size,
                "images_per_s": images_per_s, "first_loss": first_loss, "last_loss": last_loss,
                "checkpoint": str(trainer.out_dir / CHECKPOINT_NAME), "backbone": str(backbone),
                "is_main": ctx.is_main}
    except KeyboardInterrupt:  # a second Ctrl-C, or one after the loop: a checkpoint written by now is on disk
        kept = trainer.checkpoint.kept() if trainer is not None else None
        if kept is None:
            raise
        raise Interrupted(f"interrupted after step {trainer.step} of {trainer.total_steps}; {kept}") from None
    except Exception as err:
        fault = storage_fault(err)
        if fault is None or isinstance(err, UserError):
            raise
        where = trainer.checkpoint.last_good() if trainer is not None else "nothing was written"
        raise StorageError(f"cannot write into {config.out_dir} ({fault.strerror}); {where}") from None
    finally:
        lock.release()
        trainer = None  # DDP's reducer goes first: see shutdown_distributed
        shutdown_distributed()


def _past_the_last_step(config: Config, trainer: Trainer) -> str | None:
    """The setting whose last step the resumed checkpoint is already past ("max_steps=20"), or None."""
    if trainer.step <= trainer.total_steps:
        return None
    if config.max_steps == trainer.total_steps:
        return f"max_steps={config.max_steps}"
    return f"epochs={config.epochs} ({trainer.total_steps} steps)"


def _say_no_knn_ran(config: Config, trainer: Trainer, last_knn: dict | None) -> None:
    """A note where a complete run is rerun asking for a k-NN that its log does not hold at its last step: the
    monitor runs while training, and this rerun trains nothing."""
    if last_knn is not None and last_knn["step"] >= trainer.step:
        return
    print(f"note: no k-NN ran: the run is already complete, and knn_every evaluates while training; evaluate "
          f"its backbone with `python -m tools.evaluate --mode knn --checkpoint {trainer.out_dir / CHECKPOINT_NAME} "
          f"--data {config.knn_train or config.data} --val-data {config.knn_val}`", file=sys.stderr)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def check_the_machine(config: Config, ctx: DistContext) -> None:
    """What a run asks of this machine, checked before anything is built: memory for a step (and FFCV's host
    crop's size), a C++ compiler for what it compiles, CUDA (or Triton's interpreter) for the Triton backend."""
    check_memory(config, ctx, amp_dtype(config, ctx.device))
    check_compiler(config, ctx.device)
    if config.augment.backend == "triton":  # before a first-use conversion, too
        triton_kernels(ctx.device)


def check_only(config: Config) -> None:
    """`--check`: every refusal of `train` before it builds anything, without joining a process group or taking
    out_dir's lock: the run's inputs, then this process's device and what the run asks of the machine; and the
    k-NN monitor's folders, which the run checks as it builds the monitor."""
    check_run_inputs(config)
    ctx = process_context(config.device)
    check_the_machine(config, ctx)
    if config.knn_every and config.knn_val:  # lists both folders, as the monitor does: no image is read
        KnnMonitor(config.knn_train or config.data, config.knn_val, config.augment.image_size, ctx.device, workers=0)


def main(argv: list[str] | None = None, work_done: Callable[[], None] | None = None) -> None:
    """The command line; `work_done` is called once training has returned, before its result is printed."""
    args = parse_train_args(argv)
    quiet_no_cuda_runtime_warning()  # compile_optimizer imports torch's C++-extension helper on the CPU too
    try:
        with cli_errors(launched_rank=True):
            config = load_config(args.config, args.overrides, unique_keys=True)
            if args.check:
                check_only(config)
                print(check_passed(config, machine=True))
                return
            summary = train(config)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print_error(f"interrupted; stopped without writing a checkpoint (the last one, if any, is in "
                    f"{Path(config.out_dir) / CHECKPOINT_NAME if 'config' in locals() else 'out_dir'})")
        sys.exit(130)
    if work_done is not None:
        work_done()
    if not summary.pop("is_main"):
        sys.exit(stop_exit_code(summary["stopped_by"]))
    if summary["stopped_by"]:  # also after the last step, before backbone.pth: the rerun writes it
        then = "finish the run" if summary["steps"] >= summary["total_steps"] else "resume"
        print(f"stopped by {summary['stopped_by']} after step {summary['steps']} of {summary['total_steps']}\n"
              f"checkpoint: {summary['checkpoint']} (run the same command again to {then})")
        # Ctrl-C (130) and a closed terminal (129) end with the shell's status for them, so that
        # `make pretrain && make eval` stops; SIGTERM / SIGUSR1 come from schedulers: a success.
        sys.exit(stop_exit_code(summary["stopped_by"]))
    done = "run already complete" if summary["already_complete"] else "done"
    if summary["past"]:
        done = f"nothing trained (the checkpoint is already past {summary['past']})"
    backbone = summary["backbone"] if not summary["past"] or Path(summary["backbone"]).is_file() else "none written"
    if summary["already_complete"] and not summary["past"] and summary["steps"] < summary["epoch_steps"]:
        done += (f" at max_steps={summary['steps']} (its epochs hold {summary['epoch_steps']} steps: raise max_steps, "
                 f"or set it to 0, to train on)")
    print(f"{done}: {summary['steps']} steps on {summary['world_size']} process(es), "
          f"{_fmt(summary['images_per_s'], '.1f')} images/s, "
          f"loss {_fmt(summary['first_loss'], '.1f')} -> {_fmt(summary['last_loss'], '.1f')}\n"
          f"checkpoint: {summary['checkpoint']}\nbackbone:   {backbone}")


if __name__ == "__main__":
    main(work_done=ignore_interrupts_while_exiting)
