"""What every absl launcher shares: `run` (absl's `app.run` with one-line command-line errors),
the argv check, quiet logging, one-line errors, tables.

No flags and no model imports here, so any launcher (and the tests) may import it.

Exit statuses: 2 for a bad command line (a flag, a config file, a preset, a `--config.` override,
app.UsageError), 1 for a library `core.errors.Error` (a config value that cannot work, a bad file,
...); `-v 1` (or `--verbosity=1`) keeps every traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import logging as std_logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import config_dict, config_flags
from ml_collections.config_flags import config_flags as config_flags_lib
from ml_collections.config_flags import config_path

from core.errors import Error

# The folder that holds this project's packages: the repository root in a checkout,
# site-packages when installed. A log record is this project's when it was made by a file in one
# of the project's packages there (so neither .venv nor the installed libraries beside it count).
_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = (
    "bench",
    "configs",
    "core",
    "ctm_jax",
    "inference_scaling",
    "launch",
    "parscale_jax",
    "tasks",
    "train_lib",
)


@functools.lru_cache(maxsize=1024)
def _is_project_file(pathname: str) -> bool:
    path = Path(os.path.abspath(pathname))
    if not path.is_relative_to(_ROOT):
        return False
    parts = path.relative_to(_ROOT).parts
    return len(parts) > 1 and parts[0] in PROJECT_PACKAGES


def packaged_configs() -> dict[str, Path]:
    """The config files that ship with the package: name -> configs/<name>.py."""
    folder = _ROOT / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.py")) if p.stem not in ("__init__", "common")}


def resolve_config_argument(value: str) -> str:
    """`--config` by name: `ctm_maze:cpu` (or `configs/ctm_maze.py:cpu` where no such file is
    in the working directory, e.g. outside a checkout) -> the packaged configs/ctm_maze.py with
    the same preset. Any other path is kept as it is; a bare name that is no packaged config
    raises ValueError listing the names."""
    path, sep, preset = value.partition(":")
    if not path or os.path.exists(path):
        return value
    configs = packaged_configs()
    if re.fullmatch(r"(?:\./)?configs/\w+\.py", path):
        # A checkout-relative path run from elsewhere; a missing one is ml_collections' error.
        packaged = configs.get(Path(path).stem)
        return value if packaged is None else f"{packaged}{sep}{preset}"
    if not re.fullmatch(r"\w+", path):
        return value  # a path that does not exist: ml_collections names it
    name = path
    if name not in configs:
        raise ValueError(
            f"config {path!r} is neither a file nor a packaged config; packaged: "
            f"{', '.join(configs)}"
        )
    return f"{configs[name]}{sep}{preset}"


def _resolve_config_arguments(argv: list[str], flag_values: Sequence[flags.FlagValues]) -> None:
    """Rewrites every config flag's value in `argv` through `resolve_config_argument`."""
    names = {flag.name for flag in _config_flags(flag_values)}
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        for name in names:
            m = re.fullmatch(rf"(--?{re.escape(name)}=)(.*)", arg, re.S)
            if m:
                argv[i] = m.group(1) + resolve_config_argument(m.group(2))
            elif arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
                argv[i + 1] = resolve_config_argument(argv[i + 1])


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


# ------------------------------------------------------------------------------------------------
# Command-line errors: `run`, the replacement of absl's `app.run`

USAGE_STATUS = 2  # exit status of a bad command line (a library Error exits with 1)

# Config flags defined through `define_config_file`: name -> default `path[:preset]`.
_CONFIG_DEFAULTS: dict[str, str] = {}


def fail(message: str, status: int = USAGE_STATUS) -> NoReturn:
    """Prints `error: <message>` (one line) on stderr and exits with `status`."""
    print(f"error: {_one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def define_config_file(name: str, default: str, help_string: str) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_file` with a default config that `run` loads with the command
    line (as if `--NAME=DEFAULT` came first), not at import: ml_collections loads a default while
    the flag is defined, so a typo'd `--NAME.field` there would fail before `run` could name it."""
    _CONFIG_DEFAULTS[name] = default
    return config_flags.DEFINE_config_file(
        name, None, f"{help_string} (default: {default})", lock_config=True
    )


def run(
    main: Callable[[list[str]], Any],
    *,
    flags_parser: Callable[..., Any] | None = None,
    flag_values: Sequence[flags.FlagValues] = (flags.FLAGS,),
) -> None:
    """`absl.app.run(main)` whose command-line errors are one line: a flag that is unknown,
    missing or of the wrong type, a config file that is missing, has a syntax error or raises, an
    unknown preset, a `--config.` override of a field that does not exist or of the wrong type,
    and an `app.UsageError` from main print `error: <message>` and exit with status 2.

    `flags_parser` (default: absl's FLAGS) parses the command line as in `app.run`; it may raise
    any of those errors; `flag_values` are the FlagValues it parses into (their flags' types are
    named in the messages). With `-v 1` (or `--verbosity=1`) they keep their tracebacks."""
    parse = flags_parser or flags.FLAGS

    def parse_command_line(argv: list[str]) -> Any:
        argv = list(argv)
        for name, default in _CONFIG_DEFAULTS.items():
            if _flag_argument(argv, name) is None:
                argv.insert(1, f"--{name}={default}")
        try:
            _resolve_config_arguments(argv, flag_values)
        except ValueError as e:
            if verbose() or _verbosity(argv) >= 1:
                raise
            fail(str(e))
        with flag_errors(argv, flag_values):
            parsed = parse(argv)
            load_configs(flag_values)
        return parsed

    def main_with_usage_errors(argv: list[str]) -> Any:
        with usage_errors():
            return main(argv)

    app.run(main_with_usage_errors, flags_parser=parse_command_line)


def load_configs(flag_values: Sequence[flags.FlagValues] = (flags.FLAGS,)) -> None:
    """Raises the error of a config file that failed to load: ml_collections keeps an OSError
    (missing file, ...) for the first use of the config, which would be deep inside main."""
    for flag in _config_flags(flag_values):
        if flag.value is not None:
            getattr(flag.value, "lock", None)  # an unloaded config raises its OSError here


@contextlib.contextmanager
def flag_errors(
    argv: Sequence[str], flag_values: Sequence[flags.FlagValues] = (flags.FLAGS,)
) -> Iterator[None]:
    """Turns any failure to parse `argv` (argv[0] first) into `flag_values` into one line
    `error: <message>` and exit status 2 (`describe_flag_error`); `-v 1` in argv (or already
    parsed) keeps the traceback."""
    try:
        yield
    except Exception as e:
        if verbose() or _verbosity(argv) >= 1:
            raise
        fail(describe_flag_error(e, argv, flag_values))


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turns `app.UsageError` (a wrong command line found by main) into `error: <message>` and
    exit status 2, instead of absl's usage text; `-v 1` keeps absl's."""
    try:
        yield
    except app.UsageError as e:
        if verbose():
            raise
        fail(str(e))


def describe_flag_error(
    error: BaseException,
    argv: Sequence[str],
    flag_values: Sequence[flags.FlagValues] = (flags.FLAGS,),
) -> str:
    """The one-line message of a failure to parse the command line `argv`: names the flag, the
    config file or the config field, and what was expected and received."""
    if isinstance(error, flags.UnrecognizedFlagError):
        given = error.flagvalue or f"--{error.flagname}"
        tip = re.search(r"Did you mean: (.+) \?$", str(error))
        close = tip.group(1).split(",") if tip else []
        if not close:  # absl only compares prefixes: --tsk finds no --task
            close = difflib.get_close_matches(
                error.flagname, [n for fv in flag_values for n in fv if len(n) > 1]
            )
        if close:
            names = " or ".join(f"--{n.strip()}" for n in close[:3])
            return f"unknown flag {given}; did you mean {names}?"
        return f"unknown flag {given}"
    for flag in _config_flags(flag_values):
        argument = _flag_argument(argv, flag.name)
        if argument is not None:
            message = _config_error(error, flag, argument, argv)
            if message is not None:
                return message
    if isinstance(error, flags.IllegalFlagValueError):
        return _illegal_value(error, flag_values)
    if isinstance(error, flags.Error):
        return "; ".join(_flags_with_values(line) for line in str(error).splitlines())
    return f"{type(error).__name__}: {error}"


def _one_line(message: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(message).strip())


def _verbosity(argv: Sequence[str]) -> int:
    """The last `-v N` / `--verbosity=N` of argv (before `--`), 0 if none: absl parses it along
    with every other flag, so a flag error can come first."""
    level = 0
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        m = re.fullmatch(r"--?(?:v|verbosity)(?:=(.*))?", arg)
        if m:
            value = m.group(1) if m.group(1) is not None else "".join(argv[i + 1 : i + 2])
            with contextlib.suppress(ValueError):
                level = int(value)
    return level


def _flag_argument(argv: Sequence[str], name: str) -> str | None:
    """The value of the last `--name=VALUE` / `--name VALUE` in argv (before `--`), or None."""
    found = None
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        m = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg, re.S)
        if m:
            found = m.group(1) if m.group(1) is not None else "".join(argv[i + 1 : i + 2])
    return found


def _config_flags(flag_values: Sequence[flags.FlagValues]) -> list[flags.Flag]:
    found = {id(fv[n]): fv[n] for fv in flag_values for n in fv}
    return [f for f in found.values() if config_flags_lib.is_config_flag(f)]


def _find_flag(name: str, flag_values: Sequence[flags.FlagValues]) -> flags.Flag | None:
    return next((fv[name] for fv in flag_values if name in fv), None)


def _chain(error: BaseException | None) -> list[BaseException]:
    """The error, then what it was raised from (or while handling), innermost last."""
    chain: list[BaseException] = []
    while error is not None and not any(error is e for e in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _line_in(error: BaseException, path: str) -> int | None:
    """The line of `path` nearest to where `error` was raised, if it passed through that file."""
    tb, line = error.__traceback__, None
    while tb is not None:
        if _same_file(tb.tb_frame.f_code.co_filename, path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _config_error(
    error: BaseException, flag: flags.Flag, argument: str, argv: Sequence[str]
) -> str | None:
    """The message of a config file `--NAME=PATH[:PRESET]` that failed to load or to take a
    `--NAME.field=VALUE` override; None if `error` is not about this config flag."""
    where = f"--{flag.name}={argument}"
    path = argument.split(":", 1)[0]
    chain = _chain(error)
    if any(isinstance(e, OSError) for e in chain) and not os.path.isfile(path):
        relative = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        what = "is a directory" if os.path.isdir(path) else "not found"
        return f"{where}: config file {path} {what}{relative}"
    for e in chain:
        if isinstance(e, SyntaxError) and e.filename and _same_file(e.filename, path):
            return f"{where}: {path}, line {e.lineno}: {type(e).__name__}: {e.msg}"
    # What the config file raised: ml_collections re-raises a ValueError/TypeError of the file as
    # 'Error whilst parsing config file: <traceback>' (an absl flag error about --NAME=...), and
    # keeps an OSError as 'Configuration is not available because of an earlier failure ...'.
    wrappers = ("Error whilst parsing config file", "Configuration is not available")
    own = [e for e in chain if not isinstance(e, flags.Error) and not str(e).startswith(wrappers)]
    raised = next((e for e in own if _line_in(e, path) is not None), None)
    wrapped = str(error).startswith((f"flag {where}:", wrappers[1]))
    if raised is None and own and wrapped:
        raised = own[0]  # e.g. get_config() called with a preset it does not take
    if raised is not None:
        message = str(raised).strip()
        if isinstance(raised, OSError) and message.startswith("Failed loading config file"):
            message = message.splitlines()[-1].strip()  # '[Errno 2] ...' of a file it opened
        if isinstance(raised, ValueError | Error):
            return f"{where}: {_one_line(message)}"  # e.g. an unknown preset, with the valid ones
        line = _line_in(raised, path)
        at = f"{path}, line {line}: " if line is not None else ""
        return f"{where}: {at}{type(raised).__name__}: {_one_line(message)}"
    return _bad_override(flag, argument, argv)


def _bad_override(flag: flags.Flag, argument: str, argv: Sequence[str]) -> str | None:
    """The message of the first `--NAME.a.b=VALUE` of argv whose field the config does not have
    (loaded again: the failed parse kept nothing), with the closest existing field."""
    prefix = re.compile(rf"--?(?:no)?{re.escape(flag.name)}\.")
    paths = [a.split("=", 1)[0].split(".", 1)[1] for a in argv[1:] if prefix.match(a)]
    if not paths:
        return None
    try:
        config = flag.parser.parse(argument)
    except Exception:
        return None
    for path in paths:
        message = _missing_field(config, flag.name, path)
        if message is not None:
            return message
    return None


def _fields(node: Any) -> list[Any] | None:
    if isinstance(node, config_dict.ConfigDict | Mapping):
        return list(node.keys())
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [f.name for f in dataclasses.fields(node)]
    if isinstance(node, list | tuple):
        return list(range(len(node)))
    return None


def _missing_field(config: Any, name: str, path: str) -> str | None:
    """`--NAME.PATH: NAME.a has no field 'b'; did you mean --NAME.a.c?` or None if PATH exists."""
    flag = f"--{name}.{path}"
    try:
        parts = config_path.split(path)
    except ValueError:
        return f"{flag}: {path!r} is not a field path (expected --{name}.section.field=VALUE)"
    node, walked = config, [name]
    for i, part in enumerate(parts):
        where = ".".join(walked)
        fields = _fields(node)
        if fields is None:
            kind = type(node).__name__
            return f"{flag}: {where} is a value ({kind}), not a section with a field {part!r}"
        if part not in fields:
            close = difflib.get_close_matches(str(part), [str(f) for f in fields], n=1)
            rest = "".join(f".{p}" for p in parts[i + 1 :])
            if close:
                guess = f"--{where}.{close[0]}{rest}"
                return f"{flag}: {where} has no field {part!r}; did you mean {guess}?"
            listed = ", ".join(map(str, fields)) or "none"
            return f"{flag}: {where} has no field {part!r} (its fields: {listed})"
        node = node[part]
        walked.append(str(part))
    return None


def _illegal_value(
    error: flags.IllegalFlagValueError, flag_values: Sequence[flags.FlagValues]
) -> str:
    """A value absl refused: a required flag left out, a value of the wrong type or not among the
    allowed ones, a validator's complaint."""
    message = str(error)
    required = re.findall(
        r"^flag --(\S+)=None: Flag --\1 must have a value other than None\.$", message, re.M
    )
    if required and len(required) == len(message.splitlines()):
        flag = _find_flag(required[0], flag_values)
        if len(required) == 1 and flag is not None:
            help_text = flag.help or ""
            help_text = re.sub(
                r";\s*repeat this option to specify a list of values$", "", help_text
            )
            return f"missing required flag --{required[0]}: {help_text}".rstrip(": ")
        return "missing required flags " + " and ".join(f"--{n}" for n in required)
    m = re.match(r"flag --([^=\s]+)=", message)
    context = error.__context__
    flag = _find_flag(m.group(1), flag_values) if m else None
    if m and flag is not None and context is not None:
        name, detail = m.group(1), str(context)
        value = message[m.end() :].removesuffix(f": {detail}")
        expected = _expected(flag.parser, value)
        if expected is not None:
            return f"--{name}={value} is invalid: expected {expected}, got {value!r}"
        return f"--{name}={value} is invalid: {_one_line(detail)}"
    return "; ".join(_flags_with_values(line) for line in message.splitlines())


def _flags_with_values(line: str) -> str:
    """absl's 'flag --a=1: ...' / 'flags a=1, b=2: ...' (validators) as '--a=1, --b=2: ...'."""
    m = re.match(r"flags (.*?): (.*)$", line)
    if m:
        named = ", ".join(f"--{pair}" for pair in m.group(1).split(", "))
        return f"{named}: {m.group(2)}"
    return re.sub(r"(^|, )flag --", r"\1--", line)


def _expected(parser: flags.ArgumentParser, value: str) -> str | None:
    """What `parser` accepts, when `value` is not even of its type (None: a bound or the like)."""
    if isinstance(parser, flags.EnumParser | flags.EnumClassParser):
        return "one of " + ", ".join(
            parser.enum_values if isinstance(parser, flags.EnumParser) else parser.member_names
        )
    if isinstance(parser, flags.BooleanParser):
        return "a bool (true or false)"
    kinds = ((flags.IntegerParser, "an int"), (flags.FloatParser, "a float"))
    for kind, text in kinds:
        if isinstance(parser, kind):
            try:
                parser.convert(value)
            except (TypeError, ValueError):
                return text
            return None
    return None


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
