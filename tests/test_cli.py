"""The `jspec` command line."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert "unknown option(s) ['num_draft_tokens']" in capsys.readouterr().err


def test_console_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "jspec", "strategies"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "greedy" in done.stdout.split()
