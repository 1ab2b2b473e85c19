"""The ``moraft`` command line as a whole, whatever the command: a flag the parser refuses is one line naming it and
where to get help (no usage dump), and ``--help`` stays complete."""

from __future__ import annotations

import pytest
from helpers import run_cli

from moraft.cli import COMMANDS

OPTION_ERRORS = {
    "unknown option": (["train", "--adapter.rnak", "4"],
                       "moraft train: error: unrecognized arguments: --adapter.rnak 4; see moraft train --help"),
    "bad value type": (["train", "--adapter.r", "four"],
                       "moraft train: error: adapter.r='four' is invalid; expected an integer; see moraft train --help"),
    "bad choice": (["train", "--adapter.compression", "sharpening"],
                   "moraft train: error: adapter.compression='sharpening' is invalid; expected one of sharing, rotation, "
                   "decouple, truncation; see moraft train --help"),
    "optional list": (["train", "--data.weights", "abc"],
                      "moraft train: error: data.weights='abc' is invalid; expected a list of numbers or null; see "
                      "moraft train --help"),
    "missing positional": (["merge", "base"], "moraft merge: error: the following arguments are required: adapter, "
                           "out_dir; see moraft merge --help"),
    "missing command": ([], "moraft: error: a command is needed; expected one of convert-peft-mora, export-lora, "
                        "merge, serve, train, eval, data, distill-data, demo; see moraft --help"),
    "unknown command": (["trian", "--adapter.r", "4"], "moraft: error: 'trian' is not a command; expected one of "
                        "convert-peft-mora, export-lora, merge, serve, train, eval, data, distill-data, demo; see "
                        "moraft --help"),
    "unknown top-level option": (["--verbose"], "moraft: error: unrecognized arguments: --verbose; see moraft --help"),
    "config not YAML": (["train", "--config", "{broken}"], "moraft train: error: --config {broken} does not parse as "
                        "YAML: while parsing a flow sequence, line 2, column 19, did not find expected ',' or ']', line 3, "
                        "column 1; see "
                        "moraft train --help"),
    "config not a mapping": (["train", "--config", "{listed}"], "moraft train: error: --config {listed} is not a "
                             "mapping of options (option: value); see moraft train --help"),
    "config with a bad value": (["train", "--config", "{typed}"], "moraft train: error: adapter.r='four' is invalid; "
                                "expected an integer; see moraft train --help"),
    "config file missing": (["eval", "x", "--config", "/no/run.yaml"], "moraft eval: error: --config: File does not "
                            "exist: '/no/run.yaml'; see moraft eval --help"),
}


@pytest.mark.parametrize("case", list(OPTION_ERRORS))
def test_option_error_is_one_line_and_where_to_get_help(tmp_path, capsys, case):
    argv, expected = OPTION_ERRORS[case]
    files = {"{broken}": "adapter:\n  target_modules: [q_proj\n", "{listed}": "- adapter.r: 4\n",
             "{typed}": "adapter:\n  r: four\n"}
    for place, text in files.items():
        (tmp_path / f"{place[1:-1]}.yaml").write_text(text)
        argv = [str(tmp_path / f"{place[1:-1]}.yaml") if arg == place else arg for arg in argv]
        expected = expected.replace(place, str(tmp_path / f"{place[1:-1]}.yaml"))
    status, out, err = run_cli(argv, capsys)
    assert (status, out, err) == (2, "", expected + "\n")


def test_help_lists_every_command(capsys):
    status, out, err = run_cli(["--help"], capsys)
    assert status == 0 and err == ""
    assert out.startswith("usage: moraft") and "`moraft COMMAND --help` for more" in out
    for name in COMMANDS:
        assert f"\n    {name} " in out, name
