"""`--run-config` text (flcore/run_config.py): quoting, bare words, errors, and the values' way into `flwr run`."""

import shlex
from types import SimpleNamespace

import pytest
from flwr.common.config import parse_config_args

from bench import compare
from flcore.config import ConfigError
from flcore.run_config import format_overrides, parse_overrides, parse_pairs, toml_document
from server_app import launch
from server_app.preflight import client_resources
from tests.helpers import make_run_plan

PROMPT = 'clip2fl-prompt="a photo of a {}"'  # the syntax docs/stage2-methods.md shows
TRICKY = {
    "clip2fl-prompt": "a photo of a {}",
    "data-dir": "/my data/it's here",
    "note": 'say "hi" = C:\\temp\\x',
    "emoji": "a photo 📷 of a {}",
    "lines": "one\ntwo",
    "seed": 7,
    "lr": 0.1,
    "augment": False,
    "number-as-text": "7",
}


def test_quoted_values_keep_their_spaces_with_double_or_single_quotes():
    got = parse_pairs(PROMPT + " data-dir='/my data/x' other=\"it's\"")
    assert got == {"clip2fl-prompt": "a photo of a {}", "data-dir": "/my data/x", "other": "it's"}


def test_equals_signs_and_escapes_inside_values():
    got = parse_pairs(r"""a="k=v" b=x=y c="say \"hi\"" d='C:\my data\x' e="tab\there" """)
    assert got == {"a": "k=v", "b": "x=y", "c": 'say "hi"', "d": r"C:\my data\x", "e": "tab\there"}


def test_several_keys_bare_words_numbers_and_bools():
    got = parse_pairs('  strategy=fedavg seed=3 lr=1e-2 augment=false device=cuda:0 tag="7" empty=  ')
    assert got == {
        "strategy": "fedavg",
        "seed": 3,
        "lr": 0.01,
        "augment": False,
        "device": "cuda:0",
        "tag": "7",  # quoted: a string, not a number
        "empty": "",
    }
    assert isinstance(got["seed"], int) and isinstance(got["augment"], bool)
    assert parse_pairs("version=1.2.3 day=2024-01-01 items=[1,2]") == {
        "version": "1.2.3",
        "day": "2024-01-01",  # TOML would read a date or a list; the run config holds scalars, so the word stays
        "items": "[1,2]",
    }


def test_a_toml_file_in_a_folder_with_spaces_then_pairs_overriding_it(tmp_path):
    preset = tmp_path / "my presets" / "run.toml"
    preset.parent.mkdir()
    preset.write_text('seed = 3\nclip2fl-prompt = "a {}"\n')
    got = parse_overrides([str(preset), f"{PROMPT} seed=4", "data-dir='/data/a b'"])
    assert got == {"seed": 4, "clip2fl-prompt": "a photo of a {}", "data-dir": "/data/a b"}


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("clip2fl-prompt=a photo of a {}", ["'photo'", "after key 'clip2fl-prompt'", "quotes"]),
        ("seed", ["'seed'", "key=value"]),
        ('clip2fl-prompt="a photo of a {}', ["'clip2fl-prompt'", "does not close"]),
        ("data-dir='/a b'c seed=1", ["'data-dir'", "after its closing quote"]),
        ("=3", ["key ''", "before '='"]),
        ('data-dir="C:\\data"', ["'data-dir'", "not a valid TOML string", "single quotes"]),
    ],
)
def test_malformed_text_is_an_error_naming_the_key_and_the_problem(text, names):
    with pytest.raises(ConfigError) as err:
        parse_pairs(text)
    for name in names:
        assert name in str(err.value)


def test_format_overrides_reads_back_the_same_values_here_and_in_flower():
    assert parse_pairs(format_overrides(TRICKY)) == TRICKY
    no_double_quote = {k: v for k, v in TRICKY.items() if '"' not in str(v)}  # Flower's pattern stops at any "
    assert parse_config_args([format_overrides(no_double_quote)]) == no_double_quote


def test_the_file_flwr_run_reads_gives_flower_the_same_values(tmp_path):
    path = tmp_path / "run-config.toml"
    path.write_text(toml_document(TRICKY), encoding="utf-8")
    assert parse_config_args([str(path)]) == TRICKY


@pytest.fixture
def fake_flower(monkeypatch):
    """The launcher up to `flwr run`, with no Flower process: what the `flwr run` command line would hand
    Flower, read with Flower's own parser."""
    seen = {}

    def flwr(cmd, **kwargs):
        seen["run-config"] = parse_config_args([cmd[cmd.index("--run-config") + 1]])
        seen["federation-config"] = parse_config_args([cmd[cmd.index("--federation-config") + 1]])

    def federation_only(cfg, simulation):  # the checks without the data: not what is tested here
        return SimpleNamespace(federation=client_resources(simulation.declared, simulation.overrides))

    class NoWatchdog:
        @staticmethod
        def start(pids):
            return NoWatchdog()

        def close(self):
            pass

    monkeypatch.setattr(launch, "start_superlink", lambda home, port, env: SimpleNamespace(pid=0))
    monkeypatch.setattr(launch, "Watchdog", NoWatchdog)
    monkeypatch.setattr(launch, "check_before_start", federation_only)
    monkeypatch.setattr(launch, "stop", lambda proc: None)
    monkeypatch.setattr(launch.subprocess, "run", flwr)
    monkeypatch.setattr(
        launch, "last_run", lambda env, connection, earlier=(): {"run-id": 1, "status": "finished:completed"}
    )
    return seen


def test_a_prompt_with_spaces_reaches_the_validated_config_and_flower(fake_flower):
    argv = ["--run-config", f"{PROMPT} num-server-rounds=2"]
    assert launch.main(argv) == 0
    # (validated config, overrides sent) as the launcher's checks compute them, in their child process
    cfg, sent = launch.resolve(parse_overrides(argv[1:]), launch.project_settings()[0])
    assert cfg["clip2fl-prompt"] == sent["clip2fl-prompt"] == "a photo of a {}"
    assert fake_flower["run-config"]["clip2fl-prompt"] == "a photo of a {}"
    assert fake_flower["run-config"]["num-server-rounds"] == 2
    assert fake_flower["federation-config"]["num-supernodes"] == cfg["num-clients"]


def test_make_run_hands_run_config_to_the_launcher_verbatim(tmp_path):
    """Quotes of either kind inside RUN_CONFIG survive the recipe's shell line."""
    value = f"{PROMPT} data-dir='/my data' note=\"it's\""
    dry = make_run_plan(tmp_path, f"RUN_CONFIG={value}", "PRESET=cifar10-lt")
    (line,) = [line for line in dry.splitlines() if "server_app.launch" in line]
    argv = shlex.split(line)
    assert argv[argv.index("--run-config") + 1] == "conf/cifar10-lt.toml"
    assert argv[len(argv) - 1 - argv[::-1].index("--run-config") + 1] == value


def test_compare_hands_the_launcher_values_with_spaces_intact(tmp_path):
    from bench.runs import launch_command

    cell = compare.Cell("clip2fl", 10.0, 7, tmp_path / "a cell")
    overrides = {"strategy": "clip2fl", "clip2fl-prompt": "a photo of a {}", "imbalance-factor": 10.0, "seed": 7}
    command = launch_command(cell.dir, overrides)
    texts = [command[i + 1] for i, arg in enumerate(command) if arg == "--run-config"]
    assert parse_overrides(texts) == {**overrides, "output-dir": str(tmp_path / "a cell")}
