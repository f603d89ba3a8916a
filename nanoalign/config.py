"""
A stage's configuration: a dataclass whose fields, with their trailing comments, become the command
line (`--field value`, with its --help text), checked before any work; and the hash of a config that
the pipeline stores to know when a stage is done.
"""

import argparse
import dataclasses
import hashlib
import inspect
import json
import re


def field_help(cls) -> dict:
    """Each config field's comment, which becomes its --help text: the comment on the field's own
    line, or else the comment lines just above it."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above = []
        for line in inspect.getsource(klass).splitlines():
            field = re.match(r"\s+(\w+)\s*:[^=#]+=[^#]*(?:#\s*(.*))?$", line)
            if line.strip().startswith("#"):
                above.append(line.strip().lstrip("#").strip())
            elif field:
                helps[field.group(1)] = field.group(2) or " ".join(above)
                above = []
            else:
                above = []
    return helps


def parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def field_parser(f):
    """The string -> value conversion of one config field."""
    if f.type in (bool, "bool"):
        return parse_bool
    if "None" in str(f.type):  # e.g. `str | None`: the string "none" means None
        base = {"int": int, "float": float}.get(str(f.type).split("|")[0].strip(), str)
        return lambda s: None if s.lower() == "none" else base(s)
    return {"int": int, "float": float, "str": str}.get(f.type, f.type if callable(f.type) else str)


def parse_config(cls, argv=None, doc: str | None = None):
    """Build a config dataclass from `--field value` flags (`--field-name` works too). Unknown flags
    and wrong types stop with the field named (argparse); then the dataclass's own `validate()`
    rejects impossible values before any work."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        convert = field_parser(f)
        names = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])  # once if equal
        # a bare `--resume` means `--resume true`
        bare = {"nargs": "?", "const": True} if convert is parse_bool else {}
        parser.add_argument(*names, dest=f.name, type=convert, default=default, **bare,
                            metavar=type(default).__name__ if default is not None else "X",
                            help=f"{helps.get(f.name, '')} (default: {default})".replace("%", "%%"))
    cfg = cls(**vars(parser.parse_args(argv)))
    try:
        if getattr(cfg, "dtype", ""):  # "": the default of whoever reads it (a pipeline preset)
            check_dtype(cfg.dtype)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    return cfg


def check(cond: bool, field: str, msg: str):
    """Config validation: raise ValueError('--field: msg') when cond is false."""
    if not cond:
        raise ValueError(f"--{field}: {msg}")


def config_hash(cfg, roots: dict | None = None) -> str:
    """Hash of a config. roots {placeholder: path}: those path prefixes are replaced first, so that
    a run directory moved or copied elsewhere keeps its hashes."""
    d = dataclasses.asdict(cfg)
    for tag, root in (roots or {}).items():
        d = {k: v.replace(root, tag) if isinstance(v, str) and root else v for k, v in d.items()}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


DTYPES = ("float32", "bfloat16", "float64")


def check_dtype(dtype: str):
    """float16 would need a gradient scaler (its 5-bit exponent underflows small gradients), which
    nanoalign leaves out: bfloat16 has float32's range, on every GPU since Ampere."""
    hint = " (float16 needs a gradient scaler: use bfloat16)" if dtype == "float16" else ""
    check(dtype in DTYPES, "dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}{hint}")
