"""Two processes on 127.0.0.1 (2 simulated CPU devices each, gloo collectives), a mesh over the 4 devices: greedy,
speculative (fixed and auto depth) and sampling outputs on both processes equal a single-process decode, auto depth
deciding on the same measured costs in both; process-local prompts gathered
with jspec.distributed.gather_prompts come back in process order."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jspec

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from mesh_checks import PROMPTS, random_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def processes() -> list[dict]:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", PYTHONPATH=str(TESTS.parent))
    env.pop("XLA_FLAGS", None)
    port = free_port()
    running = [subprocess.Popen([sys.executable, str(TESTS / "multihost_worker.py"), str(pid), str(port)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    results = []
    try:
        for process in running:
            stdout, stderr = process.communicate(timeout=600)
            lines = [line for line in stdout.splitlines() if line.startswith("RESULTS ")]
            assert process.returncode == 0 and lines, f"worker exit {process.returncode}:\n{stderr[-4000:]}"
            results.append(json.loads(lines[-1][len("RESULTS "):]))
    finally:
        for process in running:
            process.kill()
    return results


def test_two_processes_see_one_mesh_of_four_devices(processes):
    for result in processes:
        assert (result["process_count"], result["devices"], result["local"]) == (2, 4, 2)


@pytest.mark.parametrize("name", ["greedy", "speculative", "sample"])
def test_every_process_gets_the_single_process_output(processes, name):
    target, draft = random_model(0), random_model(1, num_layers=1)
    options = {"greedy": {}, "speculative": dict(draft=draft, num_draft_tokens=3), "sample": dict(temperature=0.8)}[name]
    expected = jspec.decode(target, PROMPTS, name, max_new_tokens=10, key=5, **options)
    for result in processes:
        assert result[name] == np.asarray(expected.tokens).tolist()


def test_auto_depth_decides_on_the_same_costs_in_every_process(processes):
    """Each process times its own steps; deciding on different costs, processes would compile different programs
    (PlainSteps in one, the auto-depth loop in another, or other depths) and wait on each other's collectives. Every
    process decodes with process 0's costs and prior, and gives greedy decoding's tokens; a process decoding alone
    does not wait for the others."""
    assert len(processes[0]["auto_costs"]) == 1 and len(processes[0]["auto_priors"]) == 1
    assert processes[0]["auto_costs"] == processes[1]["auto_costs"]
    assert processes[0]["auto_priors"] == processes[1]["auto_priors"]
    expected = np.asarray(jspec.decode(random_model(0), PROMPTS, max_new_tokens=10, key=5).tokens).tolist()
    assert processes[0]["auto"] == processes[1]["auto"] == expected
    # a decode that process 0 runs alone, on its own devices, measures and decodes without process 1 (no broadcast)
    assert processes[0]["local_auto"] == [row[:6] for row in expected] and "local_auto" not in processes[1]


def test_process_local_prompts(processes):
    expected = np.asarray(jspec.decode(random_model(0), PROMPTS, max_new_tokens=10).tokens).tolist()
    assert processes[0]["gathered_rows"] == processes[1]["gathered_rows"] == PROMPTS
    assert processes[0]["local_rows"] == expected[:3]
    assert processes[1]["local_rows"] == expected[3:]
