"""Errors the user fixes, and how the command line shows them.

A ``UserError`` is a problem with what the user gave maye_pl (a config value, a dataset line, a
resource the engine needs), never a bug: its message already names the key, file:line or resource,
the rule and the fix, so ``python -m maye_pl`` prints that message alone and exits with status 2
(argparse's status for a usage error); a Python traceback would only bury it.
``MAYE_PL_DEBUG=1`` shows the traceback as well.

- ``ConfigError``: a config value breaks a rule. The CLI also raises it for any ValueError a
  constructor raises while it builds the config's objects (every constructor validates its
  arguments, STYLE.md rule 6); a check that can only run later (e.g. against the data module's
  batch size) raises it itself.
- ``maye_pl.data.jsonl.DatasetError``: problems in the dataset files, one ``file:line`` each.
- An engine that cannot start for a known reason (a start-up timeout, a setting the engine
  rejects, more cores asked for than the machine has) raises a subclass of both the engine's error
  and ``UserError``.
"""

from __future__ import annotations

import os

USER_ERROR_EXIT_CODE = 2
"""Exit status of a run stopped by a UserError."""

DEBUG_ENV = "MAYE_PL_DEBUG"
"""Set to 1 to see the traceback of a UserError."""


class UserError(Exception):
    """A problem the user fixes; its message names what, the rule and the fix."""


class ConfigError(UserError, ValueError):
    """A config value (a YAML key or flag) breaks a rule; the message names the key and the fix."""


def find_user_error(error: BaseException) -> UserError | None:
    """The first UserError in ``error``'s chain (itself, then what caused it or was being handled
    when it was raised), or None when the chain holds none."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def debug_enabled() -> bool:
    """Whether ``MAYE_PL_DEBUG`` asks for tracebacks (any value but empty or 0)."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
