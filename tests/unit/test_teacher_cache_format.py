"""The teacher cache's format (anchorkd.trainers.teacher_cache): round trip, keys, refusals, atomic shards."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from anchorkd import io as anchor_io
from anchorkd.errors import ConfigError, DataError
from anchorkd.losses.topk import teacher_topk
from anchorkd.trainers import teacher_cache as tc

SETTINGS = tc.CacheSettings(
    teacher="f" * 64, template="qwen3_vl", max_length=1024, max_pixels=65536, temperature=1.0, k=8
)


def _rows(count: int, seed: int = 0, k: int = 8) -> list[tuple[str, object]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        positions = 3 + index % 4
        logits = 3 * torch.randn(positions, 50, generator=gen)
        rows.append((f"{seed:02d}{index:062d}", teacher_topk(logits, k)))
    return rows


def _write(folder, name, rows, settings=SETTINGS) -> int:
    tc.prepare_folder(folder, SETTINGS)
    pending = tc.ShardRows()
    for key, top in rows:
        pending.add(key, top)
    return tc.write_shard(folder / name, settings, pending)


def test_rows_round_trip_through_shards_of_several_ranks(tmp_path):
    first, second = _rows(5, seed=1), _rows(4, seed=2)
    size = _write(tmp_path, "shard-r0-00000.safetensors", first)
    _write(tmp_path, "shard-r1-00000.safetensors", second)
    cache = tc.TeacherCache.open(tmp_path, SETTINGS)
    assert len(cache) == 9
    for key, top in first + second:
        assert key in cache
        got = cache.row(key)
        assert got.logprobs.dtype == torch.float16 and got.ids.dtype == torch.int32
        assert got.log_tail.dtype == torch.float32
        assert torch.equal(got.logprobs, top.logprobs.half())
        assert torch.equal(got.ids, top.ids.int())
        assert torch.equal(got.log_tail, top.log_tail.float())
    tokens = sum(top.ids.size(0) for _, top in first)
    assert size >= tokens * (6 * SETTINGS.k + 4)  # 6k + 4 bytes per token, plus the header


def test_a_cache_for_other_settings_is_refused_naming_the_key(tmp_path):
    _write(tmp_path, "shard-r0-00000.safetensors", _rows(2))
    for key, value in [("temperature", 2.0), ("k", 16), ("teacher", "0" * 64), ("template", "qwen2_vl"),
                       ("max_length", 2048)]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"custom\.teacher_cache.*{key}: the cache has") as error:
            tc.TeacherCache.open(tmp_path, dataclasses.replace(SETTINGS, **{key: value}))
        assert repr(value) in str(error.value)


def test_a_shard_written_for_other_settings_is_refused(tmp_path):
    _write(tmp_path, "shard-r0-00000.safetensors", _rows(2), settings=dataclasses.replace(SETTINGS, k=9))
    with pytest.raises(ConfigError, match="shard-r0-00000.safetensors was written for other settings"):
        tc.TeacherCache.open(tmp_path)


def test_a_missing_row_is_refused_naming_the_first_one(tmp_path):
    rows = _rows(3)
    _write(tmp_path, "shard-r0-00000.safetensors", rows)
    cache = tc.TeacherCache.open(tmp_path, SETTINGS)
    cache.require([(key, f"row {i}") for i, (key, _) in enumerate(rows)])
    wanted = [(rows[0][0], "data.dataset row 0"), ("a" * 64, "data.dataset row 1"), ("b" * 64, "row 2")]
    with pytest.raises(DataError, match="no entry for data.dataset row 1: run `anchorkd teacher-cache`"):
        cache.require(wanted)


def test_no_cache_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="no teacher cache here"):
        tc.TeacherCache.open(tmp_path / "nothing")


def test_a_killed_shard_write_leaves_no_shard(tmp_path, monkeypatch):
    """The bytes go to a hidden temporary file renamed only when complete: a failure midway leaves nothing
    that the reader (or the next writer) takes for a shard."""
    tc.prepare_folder(tmp_path, SETTINGS)
    real_replace = anchor_io.os.replace

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(anchor_io.os, "replace", killed)
    pending = tc.ShardRows()
    for key, top in _rows(2):
        pending.add(key, top)
    with pytest.raises(KeyboardInterrupt):
        tc.write_shard(tmp_path / "shard-r0-00000.safetensors", SETTINGS, pending)
    monkeypatch.setattr(anchor_io.os, "replace", real_replace)
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*tmp"))
    assert len(tc.TeacherCache.open(tmp_path, SETTINGS)) == 0


def test_prepare_folder_refuses_a_folder_of_other_settings(tmp_path):
    tc.prepare_folder(tmp_path, SETTINGS)
    tc.prepare_folder(tmp_path, SETTINGS)  # same settings: fine
    with pytest.raises(ConfigError, match="max_pixels: the cache has 65536, this run 1024"):
        tc.prepare_folder(tmp_path, dataclasses.replace(SETTINGS, max_pixels=1024))


def _sample(messages, images=()):
    return types.SimpleNamespace(
        messages=messages, tools=None, objects={}, images=list(images), videos=[], audios=[]
    )


def test_row_keys_follow_content_and_media_bytes(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"one")
    messages = [{"role": "user", "content": "<image>describe"}, {"role": "assistant", "content": "a box"}]
    key = tc.row_key(_sample(messages, [str(image)]))
    assert key == tc.row_key(_sample([dict(m) for m in messages], [{"path": str(image), "bytes": None}]))
    assert key != tc.row_key(
        _sample(messages[:1] + [{"role": "assistant", "content": "two boxes"}], [str(image)])
    )
    image.write_bytes(b"two!")  # same path, other bytes (and size)
    assert key != tc.row_key(_sample(messages, [str(image)]))


def test_batch_teacher_places_each_row_on_its_supervised_positions(tmp_path):
    rows = _rows(2, seed=3)
    _write(tmp_path, "shard-r0-00000.safetensors", rows)
    cache = tc.TeacherCache.open(tmp_path, SETTINGS)
    (key_a, top_a), (key_b, top_b) = rows  # 3 and 4 positions
    labels = torch.full((2, 9), -100)
    labels[0, [1, 2, 5]] = 7
    labels[1, [0, 3, 4, 8]] = 7
    teacher = tc.batch_teacher(cache, [(key_a, "row a"), (key_b, "row b")], labels)
    assert teacher.logprobs.shape == (2, 9, SETTINGS.k) and teacher.log_tail.shape == (2, 9)
    assert torch.equal(teacher.ids[0, [1, 2, 5]], top_a.ids.long())
    assert torch.equal(teacher.ids[1, [0, 3, 4, 8]], top_b.ids.long())
    assert torch.equal(teacher.logprobs[1, [0, 3, 4, 8]], top_b.logprobs.half().float())
    assert torch.equal(teacher.log_tail[0, [1, 2, 5]], top_a.log_tail.float())
    assert not teacher.ids[0, [0, 3, 4, 6, 7, 8]].any()  # unsupervised positions: zeros, never read


def test_batch_teacher_refuses_a_row_with_other_positions_or_missing_naming_it(tmp_path):
    rows = _rows(1, seed=4)  # 3 positions
    _write(tmp_path, "shard-r0-00000.safetensors", rows)
    cache = tc.TeacherCache.open(tmp_path, SETTINGS)
    labels = torch.full((1, 6), -100)
    labels[0, :4] = 7
    with pytest.raises(DataError, match=r"row 5 \('hello'\) has 4 supervised positions in this run but 3"):
        tc.batch_teacher(cache, [(rows[0][0], "row 5 ('hello')")], labels)
    with pytest.raises(DataError, match=r"no entry for anchor row \('hi'\)"):
        tc.batch_teacher(cache, [("0" * 64, "anchor row ('hi')")], labels)


def test_row_description_names_the_row_and_the_start_of_its_first_message():
    sample = _sample([{"role": "user", "content": "Describe   every object " + "x" * 80}])
    text = tc.row_description(sample, "training row 3")
    assert text.startswith("training row 3 ('Describe every object xxx") and text.endswith("...)")
