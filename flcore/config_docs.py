"""The run-config reference, docs/configuration.md, generated from the schema.

`flcore.config.SCHEMA` is the one source of truth for every run-config key. This module turns it into
the Markdown page users read, one table per topic of `flcore.config.SECTIONS`, so the page cannot drift
from the code: a test compares docs/configuration.md with `markdown()`.
Regenerate after changing the schema:

    python -m flcore.config_docs > docs/configuration.md
"""

from __future__ import annotations

from flcore.config import SCHEMA, SECTIONS, Option

REGENERATE = "python -m flcore.config_docs > docs/configuration.md"

# What a value may be, for keys whose schema entry carries no rule of its own (free text, or choices
# that live in another package). Keys with a rule or choices in the schema take their text from it.
ALLOWED_TEXT = {
    "data-dir": "a path",
    "strategy": "a name in `STRATEGIES` (`strategies/registry.py`)",
    "output-dir": "a path",
    "align-teacher": "`tiny` or an open_clip model name",
    "align-pretrained": "an open_clip tag in the local cache, or a file",
    "align-logits-file": "a `.npy` / `.pt` file",
    "pretrain-teacher": "`tiny`, a model id in the local HF cache, or a local folder",
    "pretrain-data": "`digits`, an image folder, or a `.json`/`.jsonl` file",
    "pretrain-image-dir": "a path",
    "pretrain-cache-dir": "a path",
    "resume": "a path",
}

# The rules that tie several keys together (`flcore.config._check_relations`), in words.
RELATIONS = (
    "`data-dir` must be an existing folder for every `dataset` but `digits`.",
    "`imbalance-factor` must be 1 for `dataset=imagenet-lt` (its published index is already long-tailed).",
    "`few-threshold` must be <= `many-threshold`.",
    "With `align=true`, a non-empty `align-logits-file` must be an existing file.",
    "`pretrain-grad-accum` must divide `pretrain-batch-size`.",
    "With `pretrain=true`, `pretrain-data` must be `digits` or an existing folder or file.",
    "`min-replies` must be <= the clients sampled per round (`num-clients` x `fraction-train`, at least 1).",
    "`image-size` must be <= 64 with `model=resnet8`.",
    "`amp` other than `off` needs a CUDA device: refused with `device=cpu`, and before anything starts where "
    "the device resolves to the CPU (docs/gpu.md).",
)

HEADER = f"""\
<!-- Generated from flcore.config.SCHEMA by flcore/config_docs.py: do not edit by hand. -->
# Run configuration

This page is generated from the schema `flcore.config.SCHEMA`. After changing the schema, regenerate it:

    {REGENERATE}

`tests/test_config.py` fails while the page and the schema disagree.

Every key is declared in `[tool.flwr.app.config]` of `pyproject.toml` with the schema's default (a test
keeps the two equal) and is checked by `flcore/config.py` before anything starts: a bad value stops the
run with the key, the value and what is allowed, e.g.
`error: run-config key 'imbalance-factor' = 0.5 is not allowed: expected a number >= 1` (exit code 2).

Override keys with `make run RUN_CONFIG="num-server-rounds=10 seed=1"` (values are TOML; bare words are
taken as strings), or with `flwr run . <federation> --run-config "dataset='cifar10' seed=1"` (quote strings
TOML-style there). A value with spaces is quoted either way:
`make run RUN_CONFIG='clip2fl-prompt="a photo of a {{}}" data-dir="/my data"'`. The paper's settings as ready
commands: [paper-settings.md](paper-settings.md).
"""


def _default(value: object) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _allowed(key: str, option: Option) -> str:
    if option.allowed:
        return option.allowed
    if option.choices:
        return ", ".join(option.choices)
    if key in ALLOWED_TEXT:
        return ALLOWED_TEXT[key]
    if isinstance(option.default, bool):
        return "true / false"
    return "text" if isinstance(option.default, str) else "a number"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _text(text: str) -> str:
    """Prose for a table cell: pipes escaped, and `<`, which Markdown would take for an HTML tag."""
    return _cell(text).replace("<", "&lt;")


def _table(keys: list[str]) -> list[str]:
    rows = ["| key | default | allowed | description |", "|---|---|---|---|"]
    for key in keys:
        option = SCHEMA[key]
        cells = (_cell(f"`{key}`"), _cell(_default(option.default)), _cell(_allowed(key, option)), _text(option.help))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def markdown() -> str:
    """The whole content of docs/configuration.md."""
    stale = sorted(set(ALLOWED_TEXT) - set(SCHEMA))
    if stale:
        raise KeyError(f"ALLOWED_TEXT names keys the schema no longer has: {', '.join(stale)}")
    lines = [HEADER.rstrip("\n")]
    for title, options in SECTIONS.items():
        lines += ["", f"## {title}", ""]
        lines += _table(list(options))
    lines += ["", "## Rules between keys", ""]
    lines += [f"- {rule}" for rule in RELATIONS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
