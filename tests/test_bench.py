"""ssni bench's attack rows: the measured PGD time set against the floor --plan predicts."""


def test_attack_row_holds_time_floor_and_their_ratio():
    from ssni.bench_attack import attack_cost

    (row,) = attack_cost(n=1, repeats=1, settings=((2, False, 1, True),))  # SSNI-N demo defense, 2 reverse steps
    assert row["defense"].startswith("DiffPure t*=300 + SSNI-N") and row["score_rows"] == 10
    assert 0 < row["reverse_steps_per_sample"] <= 2 and row["reverse_steps"] == 2
    assert row["seconds_per_sample"] > 0 and row["floor_seconds_per_sample"] > 0
    assert abs(row["over_floor"] - row["seconds_per_sample"] / row["floor_seconds_per_sample"]) < 1e-12
