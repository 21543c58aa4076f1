"""Files we read but did not write (model directories, tokenizers, configs, checkpoints, data from the Hub): checked
before they are read or used, so a hostile or broken file is one line naming it, never a hang, a memory blow-up or a
traceback.

    read_bytes(path, limit) ──► the bytes of a regular file of at most `limit` bytes (a FIFO, /dev/zero, a directory:
                                refused before a byte is read)
    read_json(path, limit)  ──► its JSON;  check_fields(d, spec, where) ──► each key of the right type and range

Each function takes the error class to raise (the caller's own: TokenizerError, DataError, ValueError, ...), so the
caller's one-line path prints it.
"""
import json
import math
import os
import stat
import sys

MiB = 1 << 20
JSON_LIMIT = 64 * MiB  # config.json, tokenizer_config.json, --config, a checkpoint's manifest.json and state.json
TOKENIZER_LIMIT = 1024 * MiB  # tokenizer.json (the Hub's largest are tens of MiB), tokenizer.model, tok*.bin


def kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def check_regular(path, error=ValueError, what: str = ""):
    """Raise error unless path is a regular file (symlinks followed): stat, which never blocks, not open."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise error(f"{what}{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what}{path}: {kind(mode)}, not a regular file")


def read_bytes(path, limit: int, error=ValueError, what: str = "") -> bytes:
    """The bytes of a regular file of at most limit bytes. Opened non-blocking and checked with fstat before any
    read, so a FIFO (which would block forever), a device (/dev/zero: endless) or a directory is refused at once, and
    the file checked is the file read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise error(f"{what}{path}: cannot read ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what}{path}: {kind(st.st_mode)}, not a regular file")
        raise error(f"{what}{path}: {st.st_size} bytes, more than the {limit // MiB} MiB such a file may hold")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{what}{path}: cannot read ({e.strerror})") from None
    if len(data) > limit:  # it grew after fstat
        raise error(f"{what}{path}: more than the {limit // MiB} MiB such a file may hold")
    return data


def read_text(path, limit: int, error=ValueError, what: str = "") -> str:
    try:
        return read_bytes(path, limit, error, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what}{path}: invalid UTF-8 at byte {e.start}") from None


def read_json(path, limit: int = JSON_LIMIT, error=ValueError, what: str = "", want: type | None = dict):
    """The JSON of a regular file of at most limit bytes; want: the type the top level must have (None: any)."""
    text = read_text(path, limit, error, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what}{path}: line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise error(f"{what}{path}: JSON nested too deeply (deeper than {sys.getrecursionlimit()} levels)") from None
    if want is not None and not isinstance(value, want):
        raise error(f"{what}{path}: expected a JSON {JSON_NAMES[want]}, got {JSON_NAMES.get(type(value), 'value')}")
    return value


JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean",
              type(None): "null"}


# ----------------------------------------------------------------------------------------------------------------------
# field checks: a spec maps a key to (test, what it must be); null (None) passes only where the spec allows it

def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def optional(test):
    return lambda v: v is None or test(v)


POSITIVE_INT = (lambda v: is_int(v) and v >= 1, "an integer >= 1")
NATURAL = (lambda v: is_int(v) and v >= 0, "an integer >= 0")
POSITIVE = (lambda v: is_number(v) and v > 0, "a finite number > 0")
NUMBER = (is_number, "a finite number")
BOOL = (lambda v: isinstance(v, bool), "true or false")
STRING = (lambda v: isinstance(v, str), "a string")
OBJECT = (lambda v: isinstance(v, dict), "an object")
LIST = (lambda v: isinstance(v, list), "a list")
STRINGS = (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")
TOKEN_IDS = (lambda v: NATURAL[0](v) or isinstance(v, list) and all(NATURAL[0](x) for x in v),
             "an integer >= 0 or a list of them")


def nullable(spec: tuple) -> tuple:
    return optional(spec[0]), spec[1] + " or null"


def shown(v, width: int = 60) -> str:
    """A value for a message: its repr, cut (a hostile file's values can be megabytes)."""
    r = repr(v)
    return r if len(r) <= width else r[:width] + "..."


def check_fields(d: dict, spec: dict, where, error=ValueError, prefix: str = ""):
    """Raise error naming the first key of spec present in d whose value fails its test."""
    for key, (test, want) in spec.items():
        if key in d and not test(d[key]):
            raise error(f"{where}: {prefix}{key} must be {want}, got {shown(d[key])}")
