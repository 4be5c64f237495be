"""The anchor-prompt mixer (``anchorkd.trainers.anchor_mix``): the ratio per step, a seeded and resumable
order, every anchor row used once per pass, ranks apart, and micro-batches flagged per row."""

from __future__ import annotations

from collections import Counter

import pytest

from anchorkd.config.schema import anchor_rows_for
from anchorkd.errors import ConfigError
from anchorkd.trainers.anchor_mix import AnchorMixer, interleave, spread


@pytest.mark.parametrize(
    ("domain_rows", "ratio", "anchors"),
    [(3, 0.25, 1), (4, 0.25, 1), (6, 0.25, 2), (8, 0.5, 8), (4, 0.2, 1), (2, 0.75, 6), (9, 0.1, 1)],
)
def test_anchor_rows_per_step_make_the_nearest_share_to_the_ratio(domain_rows, ratio, anchors):
    assert anchor_rows_for(domain_rows, ratio) == anchors
    share = anchors / (anchors + domain_rows)
    for other in (anchors - 1, anchors + 1):
        if other >= 0:
            assert abs(share - ratio) <= abs(other / (other + domain_rows) - ratio)


def test_a_ratio_that_rounds_to_no_anchor_row_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        AnchorMixer.for_step(10, 0.1, 2, seed=0)
    assert info.value.key_path == "custom.anchor.ratio" and "rounds to no anchor row" in str(info.value)


def test_each_buffer_draws_per_buffer_rows_and_every_pass_uses_every_row():
    mixer = AnchorMixer(num_rows=7, per_buffer=3, seed=5)
    stream = [index for buffer in range(14) for index in mixer.draw(buffer)]  # 42 positions = 6 passes
    assert all(len(mixer.draw(b)) == 3 for b in range(4))
    for start in range(0, 42, 7):
        assert sorted(stream[start : start + 7]) == list(range(7))
    assert stream[:7] != stream[7:14]  # each pass has its own order


def test_the_order_depends_only_on_the_seed_and_the_buffer_index():
    straight = AnchorMixer(num_rows=11, per_buffer=2, seed=3)
    expected = [straight.draw(b) for b in range(20)]
    resumed = AnchorMixer(num_rows=11, per_buffer=2, seed=3)  # a new process, starting at buffer 13
    assert [resumed.draw(b) for b in range(13, 20)] == expected[13:]
    assert [AnchorMixer(11, 2, seed=4).draw(b) for b in range(20)] != expected


def test_ranks_draw_disjoint_positions_that_together_cover_the_set():
    ranks = [AnchorMixer(num_rows=8, per_buffer=2, seed=0, rank=r, world_size=2) for r in range(2)]
    drawn = [index for buffer in range(2) for mixer in ranks for index in mixer.draw(buffer)]
    assert Counter(drawn) == Counter(range(8))  # one pass over the set in the first two buffers


def test_spread_and_interleave_flag_each_row():
    assert spread(3, 4) == [1, 1, 1, 0] and spread(5, 2) == [3, 2] and spread(0, 2) == [0, 0]
    chunks, flags = interleave([["d0", "d1"], ["d2", "d3"]], ["a0", "a1", "a2"])
    assert chunks == [["d0", "d1", "a0", "a1"], ["d2", "d3", "a2"]]
    assert flags == [[False, False, True, True], [False, False, True]]
