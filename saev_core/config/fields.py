"""Range checks of config fields, run when a config is built (CLI, pipeline file, sweep, checkpoint header), so a
bad number fails at once with its flag instead of deep inside torch or the data loader."""

import math
import numbers

AT_LEAST_0 = ("at least 0", lambda v: v >= 0)
AT_LEAST_1 = ("at least 1", lambda v: v >= 1)
POSITIVE = ("a positive finite number", lambda v: v > 0)
ANY = ("a finite number", lambda v: True)
SEED = ("an integer in [0, 2**63)", lambda v: 0 <= v < 2**63)


def check_fields(cfg, prefix: str, rules: dict[str, tuple[str, object]]) -> None:
    """Raise UserError for the first field of ``cfg`` that is not a finite number satisfying its rule (None passes:
    it means "unset"; a tuple is checked element by element). ``prefix`` makes the CLI flag: ``--sae.`` + ``k``."""
    from saev_core.errors import UserError

    for name, (wanted, ok) in rules.items():
        value = getattr(cfg, name)
        for v in value if isinstance(value, tuple) else (value,):
            if v is None:
                continue
            number = isinstance(v, numbers.Real) and not isinstance(v, bool)
            if not (number and math.isfinite(v) and ok(v)):
                flag = prefix + name.replace("_", "-")
                rule = f"values each {wanted}" if isinstance(value, tuple) else wanted
                got = "" if number else f", not a {type(v).__name__}"
                raise UserError(
                    f"{flag} {value!r} must be {rule}{got} ({name}={value!r}). Pass a valid {flag} (in a pipeline "
                    f"file or checkpoint header: the key {name})."
                )
