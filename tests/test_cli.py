"""The `jspec` command line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import jspec
from jspec import cli


def test_generate_json_matches_decode(capsys):
    assert cli.main(["generate", "--model", "random:random-tiny", "--prompt", "ab", "--prompt", "c", "--max-new-tokens", "5", "--strategy", "sample", "--temperature", "0.7", "--seed", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = jspec.decode(jspec.load("random:random-tiny"), ["ab", "c"], "sample", max_new_tokens=5, key=3, temperature=0.7)
    assert printed["tokens"] == want.sequences() and printed["stats"]["model_calls"] == 5


def test_generate_streams_text_and_stats(capsys):
    assert cli.main(["generate", "--model", "random:random-tiny", "--prompt", "def f(x):", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f(x):") and "model_calls=4" in captured.err and "random weights" in captured.err


def test_default_model_is_the_shipped_demo(capsys):
    assert cli.main(["generate", "--prompt", "def f(x):", "--max-new-tokens", "8", "--strategy", "speculative", "--draft", "demo-code-draft"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f(x):") and "draft_calls=" in captured.err and "random weights" not in captured.err


def test_bad_option_is_a_clear_error(capsys):
    assert cli.main(["generate", "--model", "random:random-tiny", "--prompt", "a", "--set", "num_draft_tokens=4"]) == 2
    err = capsys.readouterr().err
    assert "--set num_draft_tokens: strategy 'greedy' has no option 'num_draft_tokens'" in err
    assert "it is an option of jacobi, prompt_lookup, self_speculative, sjd, speculative" in err


# --- user errors: one line on stderr naming the argument, exit status 2, never a traceback ---------------------

TINY = ["generate", "--model", "random:random-tiny", "--prompt", "ab", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def bad_dirs(tmp_path_factory) -> dict[str, str]:
    """A Hugging Face directory whose tokenizer.json is garbage, an empty directory, a directory of someone's files."""
    from jspec.checkpoint.hf import save_hf

    root = tmp_path_factory.mktemp("bad")
    save_hf(jspec.load("random:random-tiny"), root / "garbage-tokenizer")
    (root / "garbage-tokenizer" / "tokenizer.json").write_text("{not json")
    (root / "empty").mkdir()
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("my notes\n")
    return {name: str(root / name) for name in ("garbage-tokenizer", "empty", "mine")}


BAD_INPUTS = [  # (argv, or a function of the bad_dirs fixture giving it; what the one line must contain)
    (["generate", "--model", "no-such-model", "--prompt", "a"], "name_or_path: 'no-such-model'"),
    (lambda d: ["generate", "--model", d["empty"], "--prompt", "a"], "holds neither a jspec checkpoint"),
    (lambda d: ["generate", "--model", d["garbage-tokenizer"], "--prompt", "a"], "garbage-tokenizer/tokenizer.json' cannot be read"),
    (TINY + ["--strategy", "nope"], "--strategy: unknown strategy 'nope'"),
    (TINY + ["--threshold", "0.9"], "--threshold: strategy 'greedy' has no option 'threshold' (it is an option of block_diffusion, "),
    (TINY + ["--strategy", "sample", "--draft-steps", "2"], "--draft-steps: strategy 'sample' has no option 'draft_steps' (it is an option of freedave"),
    (TINY + ["--set", "bogus=1"], "--set bogus: strategy 'greedy' has no option 'bogus' (no registered strategy takes it)"),
    (TINY + ["--set", "temperature"], "--set: expected NAME=VALUE"),
    (TINY + ["--strategy", "self_speculative"], "--skip-layers: strategy 'self_speculative' needs option 'skip_layers'"),
    (TINY + ["--strategy", "self_speculative", "--skip-layers", "99"], "skip_layers:"),
    (TINY + ["--strategy", "sample", "--temperature", "-1"], "temperature:"),
    (TINY + ["--strategy", "sample", "--set", "top_p='high'"], "top_p:"),
    (TINY + ["--strategy", "speculative"], "draft:"),
    (TINY + ["--strategy", "dllm_static"], "block_size:"),
    (TINY + ["--stop-token", "100000"], "stop_tokens:"),
    (TINY[:-1] + ["-1"], "--max-new-tokens: expected an int >= 0"),
    (TINY[:-1] + ["many"], "argument --max-new-tokens: invalid int value: 'many'"),  # argparse
    (TINY + ["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (TINY + ["--tree", "3,x"], "argument --tree: expected comma-separated ints"),
    (["generate"], "one of the arguments --prompt --prompt-class is required"),
    (["generate", "--prompt-class", "12"], "--prompt-class: expected a digit 0-9, got 12"),
    (["generate", "--prompt-class", "3", "--prompt", "x"], "argument --prompt: not allowed with argument --prompt-class"),
    (TINY[:3] + ["--prompt-class", "3"], "--model (--prompt-class needs an image model): 'random-tiny' is not an image model"),
    (TINY + ["--png", "x.png"], "--model (--png needs an image model): 'random-tiny' is not an image model"),
    (TINY + ["--mesh", "data=x"], "--mesh: expected the form data=N,model=M"),
    (TINY + ["--mesh", "data=2"], "--mesh: data: 2 does not divide the 1 devices"),
    (["train", "--recipe", "no-such-recipe"], "recipe: no recipe or file 'no-such-recipe'"),
    (lambda d: ["build-demo", "--assets", d["mine"]], "assets_dir (--assets): directory '"),
    (lambda d: ["build-demo", "--assets", d["mine"], "--into-package"], "assets_dir: "),
]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of `jspec argv` run in this process (argparse errors exit through SystemExit)."""
    try:
        status = cli.main(argv)
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_user_errors_are_one_line_and_exit_2(argv, expected, bad_dirs, capsys):
    argv = argv(bad_dirs) if callable(argv) else argv
    status, err = run_cli(argv, capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith(f"jspec {argv[0]}: error: ") and "Traceback" not in err, err
    assert expected in err, err


def test_user_error_through_the_entry_point_has_no_traceback(bad_dirs):
    done = subprocess.run(
        [sys.executable, "-m", "jspec", "generate", "--model", bad_dirs["garbage-tokenizer"], "--prompt", "a"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "tokenizer.json' cannot be read" in done.stderr


def test_build_demo_refusal_leaves_the_directory_intact(bad_dirs, capsys, tmp_path):
    status, err = run_cli(["build-demo", "--out-root", str(tmp_path), "--assets", bad_dirs["mine"]], capsys)
    assert status == 2 and "--overwrite" in err
    assert sorted(p.name for p in Path(bad_dirs["mine"]).iterdir()) == ["notes.txt"]
    assert (Path(bad_dirs["mine"]) / "notes.txt").read_text() == "my notes\n"
    assert list(tmp_path.iterdir()) == []  # refused before any training


def test_strategies_lists_guarantee_and_options_with_defaults(capsys):
    from jspec.strategies.base import _REGISTRY, _option_names

    assert cli.main(["strategies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == jspec.strategy_names()
    for name, line in zip(jspec.strategy_names(), lines):
        options = _option_names(_REGISTRY[name])
        assert all(f"{option}=" in line or f"{option} (required)" in line for option in options), line
        assert line.endswith("options: none") == (not options)
    assert "lossless" in lines[jspec.strategy_names().index("speculative")]
    assert "threshold=0.9" in lines[jspec.strategy_names().index("dllm_threshold")]


def test_every_flag_has_help_and_defaults_show():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, subparser in subparsers.items():
        for action in subparser._actions:
            assert action.help, f"jspec {name} {action.option_strings}: no help text"
    assert "(default: 64)" in " ".join(subparsers["generate"].format_help().split())
    assert "(default: runs)" in " ".join(subparsers["build-demo"].format_help().split())


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "jspec", "strategies"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "greedy" in done.stdout.split()


def test_num_draft_tokens_auto(capsys):
    assert cli.main([*TINY, "--strategy", "prompt_lookup", "--num-draft-tokens", "auto", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    want = jspec.decode(jspec.load("random:random-tiny"), ["ab"], "greedy", max_new_tokens=4)
    assert printed["tokens"] == want.sequences()
    with pytest.raises(SystemExit) as exited:
        cli.main([*TINY, "--strategy", "prompt_lookup", "--num-draft-tokens", "many"])
    assert exited.value.code == 2 and "expected an int or auto, got 'many'" in capsys.readouterr().err
