"""Errors meant for people: what was wrong (with the value) and how to fix it."""


class UserError(Exception):
    """Bad input from the user. The CLI prints the message and exits 2 without a traceback.

    The message names the problem, with the offending value, and says how to fix it.
    """
