"""User errors: one clear line on stderr, exit status 2, no traceback (docs/reference.md, Errors)."""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable, NoReturn


class UserError(Exception):
    """A mistake the user can fix: a bad flag, missing data, the wrong kind of run directory.

    The message is one sentence that names the problem and the fix. Bugs raise anything else.
    """


def fail(message: str) -> NoReturn:
    raise UserError(message)


DISK_FULL_EXIT_CODE = 74  # EX_IOERR (sysexits.h)


def is_disk_full(error: BaseException | None) -> bool:
    """A full disk or an exceeded quota: the storage faults that stop a run with DISK_FULL_EXIT_CODE."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main``; a ``UserError`` becomes one stderr line and exit status 2, a full disk
    (or quota) anywhere one line and exit status 74 (training's checkpoints say more: shared/checkpoints.py)."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if not is_disk_full(err):
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {os.strerror(err.errno).lower()}{where}; free some space and run the command again "
              f"(with --resume to continue a training run from its last checkpoint)", file=sys.stderr)
        sys.exit(DISK_FULL_EXIT_CODE)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
