"""The suite's own scheduling (tests/parallel.py)."""

from __future__ import annotations

from tests import parallel


def test_the_tests_of_no_group_are_handed_out_with_each_modules_spread_over_the_run():
    a = [f"tests/faults/a.py::test_{i}" for i in range(4)]
    b = [f"tests/integration/b.py::test_{i}" for i in range(2)]
    c = ["tests/integration/c.py::test_0"]

    order = parallel.spread(a + b + c)

    assert order == [a[0], b[0], a[1], c[0], a[2], b[1], a[3]]
    assert parallel.spread(a) == a  # one module keeps its order


def test_the_unit_tests_come_last_in_file_order():
    units = ["tests/unit/x.py::test_b", "tests/unit/x.py::test_a", "tests/unit/y.py::test_0"]
    a = [f"tests/faults/a.py::test_{i}" for i in range(2)]
    b = ["tests/integration/b.py::test_0"]

    assert parallel.spread(units + a + b) == [a[0], b[0], a[1], *units]
