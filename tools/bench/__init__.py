"""The benchmark, run as `python -m tools.bench`: one module per measurement, one for the report.

`measure` holds what they share (figures, timing, the CPU meter, the environment); `__main__`
parses the options and runs the sections in order.
"""
