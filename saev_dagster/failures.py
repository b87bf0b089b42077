"""Bad input is a clean Dagster failure: the user's error message, not a traceback."""

import functools
import inspect

import dagster as dg

from saev_core.errors import UserError


def user_errors_fail_cleanly(fn):
    """Decorate an asset, op, check or source body: a ``UserError`` raised anywhere inside it (the pipeline file,
    a saev_core call) becomes ``dagster.Failure`` whose description is the message, which says what to fix. Other
    exceptions pass through with their traceback: they are bugs."""
    if inspect.isgeneratorfunction(fn):  # ops that yield outputs stay generators, or Dagster would not iterate them

        @functools.wraps(fn)
        def body(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as err:
                raise dg.Failure(description=str(err)) from None
    else:

        @functools.wraps(fn)
        def body(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                raise dg.Failure(description=str(err)) from None

    body.fails_cleanly = True  # marks a wrapped body, so a test can check that every body is
    return body
