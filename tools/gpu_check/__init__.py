"""Check every CUDA code path of bt_fast against a float32 or stated reference, then measure its speed.

    python -m tools.gpu_check [--device cuda|cpu] [--json PATH] [--end-to-end]

Each check prints pass or fail with its measured error and tolerance (or skipped, with the reason);
the exit code is 1 when a check fails. Without CUDA and without `--device`, it says so in one line
and exits 0. `--device cpu` runs every check's code on the CPU with a small model (ResNet-18, a
64-64 projector, 32 px). The run prints only its check lines and tables: what the code under check
prints is held back, and shown only if a check crashes. `--end-to-end` (`make gpu-check`) then runs
`python -m tools.bench --end-to-end` on the same device and prints its table.
"""
