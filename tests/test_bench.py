"""The benchmarks' one timing loop: interleaved calls, so load changes fall on every setting alike."""

from jspec import bench


def test_runners_take_turns_on_every_group_every_round():
    calls = []

    def runner(name):
        def run(group):
            calls.append((name, group))
            return f"{name}{group}:{len(calls)}"
        return run

    timed = bench.time_groups_interleaved({"A": runner("A"), "B": runner("B")}, [1, 2], rounds=2, warm_groups=1)
    warm, timed_calls = calls[:2], calls[2:]
    assert warm == [("A", 1), ("B", 1)]
    assert timed_calls == [("A", 1), ("B", 1), ("A", 2), ("B", 2)] * 2  # A, B, A, B, ... per group and round
    assert timed["A"].results == ["A1:3", "A2:5"]  # the first timed round's, one per group
    assert len(timed["B"].runs) == 4 and timed["B"].seconds == sum(timed["B"].runs)
    assert timed["A"].warm_calls == 1 and timed["A"].compile_seconds >= 0
    single = bench.time_interleaved({"x": lambda: 7}, repeats=3)["x"]  # one group: the per-call timings
    assert single.result == 7 and len(single.runs) == 3
