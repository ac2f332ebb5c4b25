"""What every absl launcher shares: the argv check, quiet logging, one-line errors, tables.

No flags and no model imports here, so any launcher (and the tests) may import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import app, flags, logging

from core.errors import Error


def start(argv: Sequence[str], *, positional: bool = False) -> None:
    """Refuses positional arguments (unless `positional`) and, unless --verbosity was given,
    logs warnings only: Orbax logs every save step by step at INFO. The trainer's progress lines
    are absl INFO records made visible by `train_lib.trainer.show_progress`."""
    if len(argv) > 1 and not positional:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


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
