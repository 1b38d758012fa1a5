"""Run-config overrides as text: the one parser of `k=v` pairs, and the one writer of them.

The launcher (`--run-config`, so `make run RUN_CONFIG=...`), `deploy.local_cluster` and every bench script
read overrides here, so a value means the same wherever it is typed. Values are TOML, as with
`flwr run --run-config`: a quoted value may hold spaces and `=` (`clip2fl-prompt="a photo of a {}"`,
`data-dir='/my data'`). Unlike Flower's parser (`flwr.common.config.parse_config_args`), which this
does not reuse, a bare word is taken as a string (`strategy=fedavg`), a TOML file may come before the
pairs that override it, and text that is not a pair is an error naming it: Flower's refuses bare words and
drops such text silently (`k="a" photo seed=1` gives k = "a" and seed = 1 there; `photo` is lost).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from flcore.config import ConfigError

# key=value, where value is a TOML basic string ("..." with escapes), a literal string ('...'), a bare word
# not starting with a quote, or nothing; it must end at whitespace or at the end of the text.
PAIR = re.compile(r"""(?P<key>[A-Za-z0-9_.-]+)=(?P<value>"(?:[^"\\\n]|\\.)*"|'[^'\n]*'|[^\s"']\S*|)(?=\s|$)""")
SPACE = re.compile(r"\s*")
SCALARS = (bool, int, float)  # what a bare word may become; anything else TOML reads in one stays a string
EXAMPLE = "clip2fl-prompt=\"a photo of a {}\" data-dir='/my data' seed=1"


def parse_pairs(text: str) -> dict[str, Any]:
    """`k=v k2=v2` with TOML values, a bare word taken as a string; malformed text is a ConfigError naming it."""
    out: dict[str, Any] = {}
    pos = _skip_space(text, 0)
    while pos < len(text):
        match = PAIR.match(text, pos)
        if match is None:
            raise ConfigError(_why_not_a_pair(text[pos:], out))
        out[match["key"]] = _value(match["key"], match["value"])
        pos = _skip_space(text, match.end())
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Each item `k=v` pairs (see `parse_pairs`) or a TOML file's path, later ones winning."""
    out: dict[str, Any] = {}
    for item in items:
        out.update(read_toml(Path(item)) if item.endswith(".toml") and "=" not in item else parse_pairs(item))
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """A `--run-config` TOML file; a missing or malformed one is a ConfigError naming it."""
    try:
        return tomllib.loads(path.expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--run-config file '{path}' cannot be read ({err.strerror or err}).") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--run-config file '{path}' is not valid TOML ({err}).") from err


def format_overrides(values: Mapping[str, Any]) -> str:
    """`k=v ...` that `parse_pairs` (and Flower, for values without a `"` inside) reads back as `values`:
    each value written as TOML, so a string keeps its spaces, quotes and backslashes."""
    return " ".join(
        f"{key}={tomli_w.dumps({'v': value}).removeprefix('v = ').rstrip()}" for key, value in values.items()
    )


def toml_document(values: Mapping[str, Any]) -> str:
    """`values` as a TOML file, the form `flwr run --run-config <file>` reads without re-splitting any value."""
    return tomli_w.dumps(dict(values))


def _skip_space(text: str, pos: int) -> int:
    return SPACE.match(text, pos).end()


def _value(key: str, raw: str) -> Any:
    """A quoted value is a TOML string (an invalid one is an error); a bare word becomes a bool, an integer or a
    float where TOML reads it as one, and stays the word itself otherwise (an empty value is "")."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as err:
        if raw.startswith(("'", '"')):
            raise ConfigError(
                f"--run-config key '{key}' = {raw} is not a valid TOML string ({err}); a backslash in a "
                f"double-quoted value starts an escape: write paths with single quotes, e.g. {key}='C:\\data'."
            ) from err
        return raw
    return value if raw.startswith(("'", '"')) or isinstance(value, SCALARS) else raw


def _why_not_a_pair(rest: str, before: Mapping[str, Any]) -> str:
    """What is wrong at the start of `rest`, the text the pair pattern did not match."""
    word = rest.split(maxsplit=1)[0]
    key, sep, value = word.partition("=")
    if not sep:
        after = f" (after key '{list(before)[-1]}')" if before else ""
        return (
            f"--run-config expects key=value pairs, got {word!r}{after}: a value with spaces needs quotes, "
            f"e.g. {EXAMPLE}."
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
        return f"--run-config key {key!r} is not allowed: expected letters, digits, '-', '_' or '.' before '='."
    return (
        f"--run-config key '{key}': the value {rest[len(key) + 1 :]!r} opens a quote it does not close, or has "
        f"text right after its closing quote; expected one quoted string, e.g. {EXAMPLE}."
    )
