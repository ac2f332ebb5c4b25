"""What every absl launcher shares: the argv check, quiet logging, one-line errors, tables.

No flags and no model imports here, so any launcher (and the tests) may import it.
"""

from __future__ import annotations

import contextlib
import functools
import logging as std_logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from core.errors import Error

# The repository root: a log record made by a file under it is this project's, unless the file
# sits in a hidden directory (.venv) or a site-packages directory (installed libraries).
_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1024)
def _is_project_file(pathname: str) -> bool:
    path = Path(os.path.abspath(pathname))
    if not path.is_relative_to(_ROOT):
        return False
    folders = path.relative_to(_ROOT).parts[:-1]
    return not any(p.startswith(".") or p in ("site-packages", "dist-packages") for p in folders)


def _project_info_and_all_warnings(record: std_logging.LogRecord) -> bool:
    """absl handler filter: warnings and errors of everyone, INFO only from this project."""
    return record.levelno >= std_logging.WARNING or _is_project_file(record.pathname)


def start(argv: Sequence[str], *, positional: bool = False) -> None:
    """Refuses positional arguments (unless `positional`) and sets up logging.

    The trainer's progress lines are absl INFO records, but Orbax (and other libraries) also log
    at INFO through absl / Python logging, every checkpoint save step by step. So unless
    --verbosity (-v) was given, the verbosity is INFO and a filter on absl's handler (the one
    handler that writes every record, to stderr) drops INFO records whose source file is not
    part of this repository (see `_is_project_file`); warnings and errors always pass. With
    --verbosity the filter is not added: `-v 1` shows everything, down to DEBUG."""
    if len(argv) > 1 and not positional:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.INFO)
        logging.get_absl_handler().addFilter(_project_info_and_all_warnings)


def verbose() -> bool:
    """True when the user asked for developer output (`-v 1` or more): tracebacks are kept."""
    return flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turns the library's expected failures (`core.errors.Error`) into `error: <message>` and
    exit status 1; anything else is a bug and keeps its traceback. `-v 1` keeps them all."""
    try:
        yield
    except Error as e:
        if verbose():
            raise
        raise SystemExit(f"error: {e}") from None


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Aligned text table of the rows (missing values blank; tick columns last)."""
    tick_columns = ("mean_ticks", "batch_ticks")
    found = list(dict.fromkeys(k for row in rows for k in row))
    columns = [c for c in found if c not in tick_columns] + [c for c in tick_columns if c in found]
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])
