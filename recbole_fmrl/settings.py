"""Config keys read straight from the config: a missing or null key means off (0); bad values get a
one-line error naming the key."""


def nonnegative(config, key, off, integer=True):
    """``config[key]`` as an int (``integer``) or float >= 0; ``off`` says what 0 means, for the error."""
    value = config[key] if key in config else 0
    value = 0 if value is None else value
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        raise ValueError(f"{key}: need {'an integer' if integer else 'a number'} >= 0 (0 = {off}), got {value!r}")
    return value if integer else float(value)
