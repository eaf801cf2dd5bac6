"""ssni bench's attack rows: the measured PGD time set against the floor --plan predicts."""


def test_attack_row_holds_time_floor_and_their_ratio():
    from ssni.bench_attack import attack_rows

    (row,) = attack_rows(n=1, repeats=1, settings=((2, False, 1, True),))  # SSNI-N demo defense, 2 reverse steps
    assert row["defense"].startswith("DiffPure t*=300 + SSNI-N") and row["score_rows"] == 10
    assert 0 < row["reverse_steps_per_sample"] <= 2 and row["reverse_steps"] == 2
    assert row["seconds_per_sample"] > 0 and row["floor_seconds_per_sample"] > 0
    assert abs(row["over_floor"] - row["seconds_per_sample"] / row["floor_seconds_per_sample"]) < 1e-12


def test_the_bench_times_with_the_plans_timer():
    """One timer for ``ssni bench`` and the plan's units: one warm-up call unless told not to, then the best
    of ``repeats`` calls."""
    from ssni import bench
    from ssni.evaluate.units import best_time

    calls = []
    assert best_time(lambda: calls.append(1), repeats=3) >= 0 and len(calls) == 4
    assert best_time(lambda: calls.append(1), repeats=2, warmup=False) >= 0 and len(calls) == 6
    assert bench.best_time is best_time and not hasattr(bench, "_timed")
