"""The ``moraft`` command line as a whole, whatever the command: a flag the parser refuses is one line naming it and
where to get help (no usage dump), ``--help`` stays complete, other libraries' notes stay off the console, and the
command's waiting OpenMP threads spin only briefly before they sleep (``moraft.threads``; the timings are in
benchmarks/threads.py, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import run_cli, tiny_flags

from moraft import threads
from moraft.cli import COMMANDS
from moraft.threads import WAIT_KNOBS

OPTION_ERRORS = {
    "unknown option": (["train", "--adapter.rnak", "4"],
                       "moraft train: error: unrecognized arguments: --adapter.rnak 4; see moraft train --help"),
    "bad value type": (["train", "--adapter.r", "four"],
                       "moraft train: error: adapter.r='four' is invalid; expected an integer; see moraft train "
                       "--help"),
    "bad choice": (["train", "--adapter.compression", "sharpening"],
                   "moraft train: error: adapter.compression='sharpening' is invalid; expected one of sharing, "
                   "rotation, decouple, truncation; see moraft train --help"),
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
                        "YAML: while parsing a flow sequence, line 2, column 19, did not find expected ',' or ']', "
                        "line 3, column 1; see moraft train --help"),
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


# `import moraft` in a process started as the `moraft` command (its console script's sys.argv[0]), then
# `moraft --help`, each `moraft COMMAND --help` and a one-step `moraft train`: what each prints, which of the libraries
# imported only where used it has imported, and the OpenMP spin count the command set
QUIET_PROBE = """
import contextlib, io, json, os, sys
sys.argv[0] = os.path.join(os.path.dirname(sys.executable), "moraft")
LIBRARIES = ("bitsandbytes", "deepspeed")
said = {}
import moraft
said["import moraft"] = {"loaded": [m for m in LIBRARIES if m in sys.modules], "out": "", "err": "",
                         "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}
from moraft.cli import COMMANDS, main
for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS] + [sys.argv[1:]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exit_:
            assert exit_.code in (0, None), err.getvalue()
    said[" ".join(argv) if argv[-1] == "--help" else "a run"] = {
        "loaded": [m for m in LIBRARIES if m in sys.modules], "out": out.getvalue(), "err": err.getvalue()}
print(json.dumps(said))
"""


def test_the_command_is_quiet_and_sets_its_spin_count(tmp_path):
    """bitsandbytes and DeepSpeed are imported only where used (the quantized and ZeRO paths): ``import moraft`` and
    every ``--help`` leave them out; a plain ``moraft train``, where PEFT and accelerate import them because they are
    installed, prints neither one's note ("Failed to load CPU gemm_4bit_forward from kernels-community", "Setting
    accelerator to CPU"). The command sets GOMP_SPINCOUNT=1000 before torch loads OpenMP (moraft.threads)."""
    train = ["train", *tiny_flags(tmp_path / "run"), "--optimization.max_steps", "1"]
    env = {name: value for name, value in os.environ.items() if name not in WAIT_KNOBS}
    done = subprocess.run([sys.executable, "-c", QUIET_PROBE, *train], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    said = json.loads(done.stdout)
    for step, what in said.items():
        if step != "a run":
            assert what["loaded"] == [], step
        assert "kernels-community" not in what["out"] + what["err"] and "Setting accelerator" not in what["out"], step
        if step.endswith("--help"):
            assert what["out"].startswith("usage: moraft") and what["err"] == "", step
    assert len(said) == 2 + len(COMMANDS) + 1 and said["import moraft"]["GOMP_SPINCOUNT"] == "1000"
    trained = said["a run"]
    assert trained["out"].splitlines()[-1] == f"moraft train: saved the adapter and loss.png to {tmp_path / 'run'}"


@pytest.mark.parametrize("argv,orig_argv,expected", [
    (["/venv/bin/moraft", "train"], ["/venv/bin/python", "/venv/bin/moraft", "train"], True),  # the console script
    (["-m"], ["python", "-m", "moraft", "train"], True),  # python -m moraft, torchrun -m moraft (the package import)
    (["-m"], ["python", "-u", "-m", "moraft", "train"], True),
    (["train.py"], ["python", "train.py"], False),  # a program that imports moraft
    (["-c"], ["python", "-c", "import moraft"], False),
    (["-m"], ["python", "-m", "pytest", "moraft"], False),
])
def test_started_as_command(monkeypatch, argv, orig_argv, expected):
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert threads.started_as_command() is expected


def test_the_spin_count_is_the_users_when_set(monkeypatch):
    assert threads.default_environment({"OMP_NUM_THREADS": "4"}) == {"GOMP_SPINCOUNT": "1000"}
    assert threads.default_environment({"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert threads.default_environment({"GOMP_SPINCOUNT": "300000"}) == {}
    # too late once torch is imported (OpenMP has read its variables): nothing is set
    monkeypatch.setattr(sys, "argv", ["/venv/bin/moraft"])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert "torch" in sys.modules and not threads.set_command_defaults() and "GOMP_SPINCOUNT" not in os.environ
