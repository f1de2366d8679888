"""Stage options, written once.

A stage's config is a dataclass whose fields are `option(...)`s: default, help text, allowed choices and a check.
The command line (curate/cli.py) and the recipe schema (curate/recipe.py) are generated from it, so an option
is added, documented and checked in one place, and the CLI, the recipe and the stage cannot disagree on a
default. The run options (executor, workers, tasks, ...) are one more such dataclass, `RunOptions`, handed to
a stage whole (DataTrove's executors take their wide arguments once in the same way).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Sequence

from curate.errors import CurateError

META = "curate.option"
Check = Callable[[Any], Optional[str]]  # the problem with a value, or None when it is fine


@dataclass(frozen=True)
class OptionInfo:
    help: str
    flags: tuple[str, ...] = ()  # the CLI's declarations; default `--field-name`
    choices: tuple | None = None
    check: Check | None = None
    cli: bool = True  # offered on the command line
    recipe: bool = True  # a key of the stage's recipe section
    section: str | None = None  # a key of another recipe section (e.g. the teacher's of [teacher])


def option(default: Any, help: str, *flags: str, choices: Sequence | None = None, check: Check | None = None,
           cli: bool = True, recipe: bool = True, section: str | None = None) -> Any:
    """A config field: `default`, `help`, the CLI declarations (`--name` when none are given)."""
    info = OptionInfo(help, tuple(flags), tuple(choices) if choices is not None else None, check, cli, recipe,
                      section)
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(type(default), default), metadata={META: info})
    return field(default=default, metadata={META: info})


@dataclass(frozen=True)
class Option:
    name: str
    type: Any
    default: Any
    info: OptionInfo

    @property
    def flag(self) -> str:
        """The primary CLI flag (`--batch-size`), as messages name the option."""
        return self.info.flags[0].split("/")[0] if self.info.flags else "--" + self.name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def options_of(cls) -> tuple[Option, ...]:
    """The options of a config dataclass, in field order (fields that are not `option`s are left out)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        info = f.metadata.get(META)
        if info is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Option(f.name, hints[f.name], default, info))
    return tuple(out)


# ---------------------------------------------------------------- checks

def at_least(low: float) -> Check:
    return lambda value: None if value is None or value >= low else f"must be >= {low:g}"


def fraction(value) -> str | None:
    """A share of the pool: in (0, 1]."""
    return None if value is None or 0 < value <= 1 else "must be in (0, 1]"


def in_unit_interval(value) -> str | None:
    return None if value is None or 0 <= value <= 1 else "must be in [0, 1]"


def open_unit_interval(value) -> str | None:
    return None if value is None or 0 < value < 1 else "must be in (0, 1)"


positive = at_least(1)
non_negative = at_least(0)


def because(check: Check, why: str) -> Check:
    """`check`, its problem followed by why the bound is there ("must be >= 2: a contrastive batch ...")."""
    def explained(value) -> str | None:
        problem = check(value)
        return f"{problem}: {why}" if problem else None
    return explained


def check_config(cfg, name_of: Callable[[Option], str] = lambda o: o.flag) -> None:
    """Every option's choices and check; a CurateError names the option as `name_of` spells it."""
    for opt in options_of(type(cfg)):
        value = getattr(cfg, opt.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        if opt.info.choices is not None and any(v is not None and v not in opt.info.choices for v in values):
            raise CurateError(f"{name_of(opt)} {value!r}; choose one of {', '.join(map(str, opt.info.choices))}")
        problem = opt.info.check(value) if opt.info.check is not None else None
        if problem:
            raise CurateError(f"{name_of(opt)} {value!r} {problem}")


# ---------------------------------------------------------------- run options

@dataclass(frozen=True)
class RunOptions:
    """How a stage's tasks run (see curate/run/): the same fields for every stage that runs tasks."""

    executor: str = option("local", "local or ray.", choices=("local", "ray"))
    workers: int = option(1, "local executor: processes running the map tasks (1: this process).", check=positive)
    tasks: Optional[int] = option(None, "Tasks the work is cut into (default: embed 1 per rank, one teacher load "
                                  "each; the map/reduce stages 32, the same on every rank).", check=positive)
    retries: int = option(1, "Retries per failed task.", check=non_negative)
    ray_address: Optional[str] = option(None, "auto or HOST:PORT; local Ray when absent.", "--ray-address")
    rank: Optional[int] = option(None, "This rank (default: SLURM_ARRAY_TASK_ID or 0).", check=non_negative,
                                 recipe=False)
    world_size: Optional[int] = option(None, "Number of ranks (default: SLURM_ARRAY_TASK_COUNT or 1).",
                                       check=positive, recipe=False)
    fail_fast: bool = option(False, "Stop at the first failed task.", "--fail-fast")

    def distributed(self) -> bool:
        """Whether map tasks are asked for (an executor other than this process, several workers, tasks, ranks or
        a Slurm array)."""
        from curate.run.mapreduce import wants_tasks

        return wants_tasks(self.executor, self.workers, self.tasks, self.rank, self.world_size)


ALL_RUN_OPTIONS = tuple(o.name for o in options_of(RunOptions))


# ---------------------------------------------------------------- the command line

def typer_parameter(opt: Option, kind: int = inspect.Parameter.KEYWORD_ONLY) -> inspect.Parameter:
    import typer

    annotation = opt.type
    callback = None
    if typing.get_origin(annotation) in (list, List):  # a repeatable option
        item = typing.get_args(annotation)[0]
        annotation = List[item]
        if item in (int, float):  # numbers also comma-separated: --eps 0.01,0.05,0.1
            callback, annotation = number_list_callback(item, opt), List[str]
    help_text = opt.info.help
    if opt.info.choices and not all(str(c) in help_text for c in opt.info.choices):
        help_text += f" One of: {', '.join(map(str, opt.info.choices))}."
    default = typer.Option([str(v) for v in opt.default] if callback else opt.default,
                           *(opt.info.flags or ("--" + opt.name.replace("_", "-"),)), help=help_text,
                           show_default=opt.default not in (None, [], ""), callback=callback)
    return inspect.Parameter(opt.name, kind, default=default, annotation=annotation)


def number_list_callback(item: type, opt: Option):
    """A typer callback turning a repeatable option's strings into numbers (see `split_numbers`); typer calls
    it with the value alone."""
    def callback(values: List[str]):
        return split_numbers(item, opt, values)
    return callback


def split_numbers(item: type, opt: Option, values: list[str]) -> list:
    """A repeatable numeric option's values, each possibly comma-separated, as numbers."""
    out = []
    for value in values or []:
        for part in str(value).split(","):
            if part.strip():
                try:
                    out.append(item(part))
                except ValueError:
                    raise CurateError(f"{opt.flag} {value!r}: {part.strip()!r} is not a number") from None
    return out


@dataclass(frozen=True)
class CommandSpec:
    config: type | None
    run_options: tuple[str, ...]
    inputs: tuple[str, ...]  # the command's own parameters (paths): not options of its config


COMMANDS: dict[str, CommandSpec] = {}  # "embed", "pcme fit", ...: what each generated command was made from


def stage_command(app, name: str, config: type | None = None, run_options: Iterable[str] = (),
                  help: str | None = None, group: str | None = None):
    """Register `fn(inputs..., cfg=Config, opts=RunOptions)` as the command `name`: its own parameters (the
    inputs, written with typer.Argument/Option) followed by one option per config field and per named run
    option, all generated. The config is checked (choices, checks) before `fn` runs."""
    run_options = tuple(run_options)
    unknown = set(run_options) - set(ALL_RUN_OPTIONS)
    if unknown:
        raise ValueError(f"unknown run options {sorted(unknown)}")

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in ("cfg", "opts")]
        generated = [typer_parameter(o) for o in options_of(config) if o.info.cli] if config else []
        generated += [typer_parameter(o) for o in options_of(RunOptions) if o.name in run_options]
        names = {p.name for p in own}
        clash = names & {p.name for p in generated}
        if clash:
            raise ValueError(f"{name}: inputs {sorted(clash)} are also options")

        @functools.wraps(fn)
        def command(**values):
            inputs = {p.name: values.pop(p.name) for p in own}
            kwargs = {}
            if config is not None:
                cfg = config(**{o.name: values.pop(o.name) for o in options_of(config) if o.info.cli})
                check_config(cfg)
                kwargs["cfg"] = cfg
            if run_options or "opts" in inspect.signature(fn).parameters:
                opts = RunOptions(**{n: values.pop(n) for n in run_options})
                check_config(opts)
                kwargs["opts"] = opts
            return fn(**inputs, **kwargs)

        command.__signature__ = inspect.Signature(
            [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in own + generated])
        command.__annotations__ = {}
        app.command(name, help=help)(command)
        COMMANDS[f"{group} {name}" if group else name] = CommandSpec(config, run_options, tuple(p.name for p in own))
        return fn

    return decorate


# ---------------------------------------------------------------- the recipe

def recipe_keys(config: type, section: str | None = None) -> dict[str, Option]:
    """The recipe keys a config gives a section: its options with `recipe`, those of another section
    (`option(..., section=...)`) only when asked for that section."""
    return {o.name: o for o in options_of(config) if o.info.recipe and o.info.section == section}


def value_matches(opt_type, value) -> bool:
    """Whether a TOML value fits an option's annotated type (ints for floats, lists for List[...])."""
    origin = typing.get_origin(opt_type)
    if origin is typing.Union:
        args = [a for a in typing.get_args(opt_type) if a is not type(None)]
        return value is None or any(value_matches(a, value) for a in args)
    if origin in (list, List):
        (item,) = typing.get_args(opt_type) or (Any,)
        return isinstance(value, list) and all(value_matches(item, v) for v in value)
    if opt_type is Any:
        return True
    if opt_type is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if opt_type is float:
        return isinstance(value, (int, float))
    if opt_type is Path:
        return isinstance(value, str)
    return isinstance(value, opt_type)


def type_name(opt_type) -> str:
    origin = typing.get_origin(opt_type)
    if origin is typing.Union:
        return " or ".join(type_name(a) for a in typing.get_args(opt_type) if a is not type(None))
    if origin in (list, List):
        return f"a list of {type_name(typing.get_args(opt_type)[0])}"
    return {Path: "str (a path)"}.get(opt_type, getattr(opt_type, "__name__", str(opt_type)))


def config_from_table(config: type, table: dict, where: str, section: str | None = None,
                      defaults: dict | None = None) -> Any:
    """A config from a recipe table (its keys checked by the caller), type- and value-checked; missing keys
    take `defaults` (e.g. the [run] device) or the option's default."""
    values = {}
    for name, opt in recipe_keys(config, section).items():
        if name in table:
            value = table[name]
            if not value_matches(opt.type, value):
                raise CurateError(f"{where} {name} = {value!r} should be {type_name(opt.type)}")
            values[name] = Path(value) if opt.type is Path and value is not None else value
        elif defaults and name in defaults:
            values[name] = defaults[name]
    cfg = config(**values)
    check_config(cfg, lambda o: f"{where} {o.name} =")
    return cfg


def configure(config: type, **values) -> tuple[Any, RunOptions]:
    """(config, run options) from keyword values, each going to whichever of the two has the field: for callers
    of a stage's `run` from Python, `run(inputs, *configure(ScoreConfig, k=2, tasks=4))`."""
    names = {o.name for o in options_of(config)}
    unknown = set(values) - names - set(ALL_RUN_OPTIONS)
    if unknown:
        raise TypeError(f"{config.__name__} and RunOptions have no option {', '.join(sorted(unknown))}")
    cfg = config(**{k: v for k, v in values.items() if k in names})
    opts = RunOptions(**{k: v for k, v in values.items() if k not in names})
    return cfg, opts
