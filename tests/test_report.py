"""Text tables: the fast layout of ``render_table`` is pandas' ``to_string(index=False)`` exactly."""

from __future__ import annotations

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.io.report import render_table

_cell = st.one_of(st.text(alphabet=st.characters(codec="ascii", exclude_characters="\n\r\t\x0b\x0c"), max_size=12),
                  st.integers(-10**6, 10**6), st.booleans())
_names = st.lists(st.text(alphabet="abcdefghij_-@ %", min_size=1, max_size=8).filter(lambda n: n.strip() == n), min_size=1, max_size=5, unique=True)


@settings(max_examples=200, deadline=None)
@given(_names.flatmap(lambda names: st.tuples(st.just(names), st.lists(
    st.fixed_dictionaries({n: _cell for n in names}), min_size=1, max_size=6))))
def test_layout_equals_pandas(case):
    names, rows = case
    assert render_table(rows) == pd.DataFrame(rows).to_string(index=False)
    assert render_table(rows, columns=names[::-1]) == pd.DataFrame(rows, columns=names[::-1]).to_string(index=False)


def test_floats_and_missing_cells_go_to_pandas():
    rows = [{"a": 1.5, "b": "x"}, {"a": 2.25}]
    assert render_table(rows) == pd.DataFrame(rows).to_string(index=False)
