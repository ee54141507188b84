from pipeline.promote import decide


def test_first_version_is_promoted():
    d = decide(1, 5.0, None, None, tolerance=0.05)
    assert d.promote and "first" in d.reason


def test_better_or_within_tolerance_is_promoted():
    assert decide(2, 4.0, 1, 5.0, 0.05).promote
    assert decide(2, 5.2, 1, 5.0, 0.05).promote  # 4% worse, within 5%


def test_worse_beyond_tolerance_is_kept_out():
    d = decide(2, 5.3, 1, 5.0, 0.05)
    assert not d.promote and "worse" in d.reason and d.current_version == 1


def test_same_version_is_not_promoted_again():
    d = decide(3, 5.0, 3, 5.0, 0.05)
    assert not d.promote and "already" in d.reason


def test_a_version_of_another_data_set_never_keeps_the_alias():
    d = decide(4, 50.0, 3, 5.0, 0.05, not_comparable="was trained on the data set 'customers'")
    assert d.promote and "customers" in d.reason and "does not compare" in d.reason
