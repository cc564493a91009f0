"""The one check that numbers given to the pack are finite (NaN and +-Inf are refused, naming the input).

ComfyUI's min/max checks let NaN through (every comparison with NaN is false), and a NaN strength or learning
rate otherwise becomes a silent all-black video or a failure deep inside sampling."""

import math


def check_finite(value, name, where=""):
    """`value` unchanged when it is a finite number (or not a float at all); else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, float):
        return value
    if not math.isfinite(value):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}input '{name}' is {value}, not a finite number. Give a finite value "
                         "(NaN and infinity are refused).")
    return value


def check_finite_inputs(kwargs, where=""):
    """Every float among a node's inputs (keyword arguments), in order."""
    for name, value in kwargs.items():
        check_finite(value, name, where)
