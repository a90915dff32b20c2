"""User errors: one clear line on stderr, exit status 2, no traceback (CONTRACTS.md, Errors)."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A mistake the user can fix: a bad flag, missing data, the wrong kind of run directory.

    The message is one sentence that names the problem and the fix. Bugs raise anything else.
    """


def fail(message: str) -> NoReturn:
    raise UserError(message)


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main``; a ``UserError`` becomes one stderr line and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
