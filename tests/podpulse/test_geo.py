import numpy as np

from podpulse import geo


def test_every_state_has_urban_and_rural_postcodes_that_map_back():
    state_of, urban_of = geo.postcode_table()
    for i, s in enumerate(geo.STATES):
        for ranges, urban in ((s.urban, True), (s.rural, False)):
            assert ranges, s.code
            for lo, hi in ranges:
                assert (state_of[lo:hi + 1] == i).all(), (s.code, lo, hi)
                assert (urban_of[lo:hi + 1] == urban).all(), (s.code, lo, hi)


def test_known_postcodes():
    cases = {"2000": ("NSW", True), "3000": ("VIC", True), "4000": ("QLD", True),
             "6000": ("WA", True), "5000": ("SA", True), "7000": ("TAS", True),
             "2600": ("ACT", True), "0800": ("NT", True), "2830": ("NSW", False),
             "0870": ("NT", False), "6430": ("WA", False)}
    state, urban = geo.lookup(np.array([int(p) for p in cases]))
    got = {p: (geo.STATE_CODES[s], bool(u)) for p, s, u in zip(cases, state, urban)}
    assert got == cases


def test_unknown_postcodes_have_no_state():
    state, urban = geo.lookup(np.array([0, 1000, 9999, -5, 12000]))
    assert (state == -1).all() and not urban.any()
