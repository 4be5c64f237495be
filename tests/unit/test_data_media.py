"""The media a data row names (anchorkd.data.media): what a row names, how each image is decoded, and the
cache of files decoded before. The refusals these lead to, with file:line, are in test_data_validate.py."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from anchorkd.data import media
from anchorkd.data.media import MediaFieldError, MediaRef, row_media

# PIL refuses to open an image above this many pixels (2 x PIL.Image.MAX_IMAGE_PIXELS, its default).
PIL_BOMB_LIMIT = 178_956_970


@pytest.fixture(autouse=True)
def media_cache(tmp_path, monkeypatch) -> Path:
    """Every test keeps its decoded-files cache in its own folder, never in the user's cache."""
    path = tmp_path / "cache" / "media-verified.txt"
    monkeypatch.setenv(media.MEDIA_CACHE_ENV, str(path))
    return path


# --- image files, good and bad ------------------------------------------------------------------------------


def png(path: Path, size=(16, 16), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 7).save(path, format="PNG")
    return path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _chunks(data: bytes):
    position = 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        yield data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        position += 12 + length


def corrupt_stream_png(path: Path) -> Path:
    """A PNG whose compressed pixel data has a run of zeros in the middle, its chunk checksum rewritten to
    match: every chunk is well formed (``verify()`` passes), the data stream is not."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    out = data[:8]
    for kind, body in _chunks(data):
        if kind == b"IDAT":
            middle = len(body) // 2
            body = body[:middle] + bytes(64) + body[middle + 64 :]
        out += _chunk(kind, body)
    path.write_bytes(out)
    return path


def truncated_jpeg(path: Path) -> Path:
    """The first half of a JPEG: ``verify()`` does not read JPEG data at all."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def oversized_png(path: Path, width: int = 20_000, height: int = 10_000) -> Path:
    """A PNG whose header says ``width`` x ``height`` (200 M pixels by default), with a few bytes of data:
    PIL refuses it from the header, so no test ever allocates the image."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(bytes(64))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
    )
    return path


def verify_passes(path: Path) -> bool:
    with Image.open(path) as image:
        image.verify()
    return True


# --- what a row names ---------------------------------------------------------------------------------------


def test_row_media_lists_every_image_and_video_with_its_field():
    record = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Q"}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/b.png"}}]},
            {"role": "user", "content": [{"type": "video", "video": "c.mp4"}]},
            {"role": "assistant", "content": "A"},
        ],
        "images": ["d.png", {"path": "e.png"}, {"bytes": "aGk=", "path": None}],
        "videos": ["f.mp4", ["g0.png", "g1.png"]],
    }
    assert row_media(record) == [
        MediaRef("image", "d.png", "images[0]"),
        MediaRef("image", "e.png", "images[1]"),  # inline bytes are not a file: not listed
        MediaRef("video", "f.mp4", "videos[0]"),
        MediaRef("image", "g0.png", "videos[1][0]"),  # a video given as its frames
        MediaRef("image", "g1.png", "videos[1][1]"),
        MediaRef("image", "a.png", "messages[0].content[0]"),
        MediaRef("image", "https://x/b.png", "messages[1].content[0]"),
        MediaRef("video", "c.mp4", "messages[2].content[0]"),
    ]


def test_a_single_path_is_a_list_of_one():
    record = {"messages": [{"role": "user", "content": "Q"}], "images": "a.png", "videos": "b.mp4"}
    assert row_media(record) == [
        MediaRef("image", "a.png", "images[0]"),
        MediaRef("video", "b.mp4", "videos[0]"),
    ]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"images": 5}, "'images' must be a list of paths"),
        ({"images": [5]}, "image entry 5 is not a path"),
        ({"images": [{"path": 3}]}, "image entry 3 is not a path"),
        ({"images": [""]}, "images[0] must be the path or URL of the image, got ''"),
        ({"videos": {"a": 1}}, "videos[0] must be the path or URL of a video, or a list of frame paths"),
        ({"videos": 7}, "'videos' must be a list of paths"),
        ({"videos": [[1]]}, "videos[0][0] must be the path or URL of the frame, got 1"),
    ],
)
def test_media_fields_of_the_wrong_type_are_named(fields, message):
    with pytest.raises(MediaFieldError) as info:
        row_media({"messages": [{"role": "user", "content": "Q"}], **fields})
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"type": "image"}, "messages[0].content[0]: a block of type 'image' without its 'image' value"),
        (
            {"type": "image", "image": ""},
            "messages[0].content[0]: a block of type 'image' without its 'image' value",
        ),
        ({"type": "image_url", "image_url": {"link": "x"}}, "the 'image_url' block's object has no 'url'"),
        ({"type": "image", "image": 4}, "messages[0].content[0] must be the path or URL of the image, got 4"),
    ],
)
def test_media_blocks_without_a_usable_value_are_named(block, message):
    with pytest.raises(MediaFieldError, match=message.replace("[", r"\[").replace("]", r"\]")):
        row_media({"messages": [{"role": "user", "content": [block]}]})


def test_urls_inline_data_and_files_are_told_apart(tmp_path, monkeypatch):
    assert media.is_url("https://example.com/a.png") and media.is_url(" http://h/a.png")
    assert not media.is_url("httpd/a.png") and not media.is_url("a.png")
    assert media.is_inline("data:image/png;base64,AAAA") and media.is_inline("A" * 2001)
    assert not media.is_inline("images/a.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROOT_IMAGE_DIR", raising=False)
    assert media.local_file("img/a.png") == Path("img/a.png")
    png(tmp_path / "root" / "img" / "a.png")
    monkeypatch.setenv("ROOT_IMAGE_DIR", str(tmp_path / "root"))  # ms-swift's fallback folder
    assert media.local_file("img/a.png") == tmp_path / "root" / "img" / "a.png"


# --- decoding -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16", "1"])
def test_images_ms_swift_can_load_have_no_problem(tmp_path, mode):
    assert media.image_problem(png(tmp_path / f"{mode.replace(';', '')}.png", mode=mode)) is None


def test_a_corrupt_data_stream_is_found_by_decoding(tmp_path):
    broken = corrupt_stream_png(tmp_path / "broken.png")
    assert verify_passes(broken)  # the header-and-checksum check that used to pass it
    problem = media.image_problem(broken)  # zlib's words for it vary with the damage
    assert problem.startswith("OSError: ") and "data stream" in problem


def test_a_truncated_jpeg_is_found_by_decoding(tmp_path):
    cut = truncated_jpeg(tmp_path / "cut.jpg")
    assert verify_passes(cut)
    assert media.image_problem(cut).startswith("OSError: image file is truncated")


def test_an_image_over_the_bomb_limit_is_refused_from_its_header(tmp_path):
    assert media.bomb_limit() == PIL_BOMB_LIMIT
    big = oversized_png(tmp_path / "big.png")
    assert big.stat().st_size < 200
    assert media.image_problem(big) == (
        "200,000,000 pixels, over PIL's decompression-bomb limit of 178,956,970 pixels (2 x "
        "PIL.Image.MAX_IMAGE_PIXELS): PIL refuses to open it; scale it down"
    )


def test_a_file_that_is_no_image_names_the_reason(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert media.image_problem(text).startswith("UnidentifiedImageError: cannot identify image file")


# --- the cache of decoded files -----------------------------------------------------------------------------


def test_cache_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(media.MEDIA_CACHE_ENV, str(tmp_path / "mine.txt"))
    assert media.media_cache_path() == tmp_path / "mine.txt"
    monkeypatch.setenv(media.MEDIA_CACHE_ENV, "off")
    assert media.media_cache_path() is None
    monkeypatch.delenv(media.MEDIA_CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert media.media_cache_path() == tmp_path / "xdg" / "anchorkd" / "media-verified.txt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert media.media_cache_path() == tmp_path / "home" / ".cache" / "anchorkd" / "media-verified.txt"


def test_file_key_changes_with_the_file(tmp_path):
    image = png(tmp_path / "a.png")
    key = media.file_key(image)
    assert media.file_key(image) == key
    link = tmp_path / "link.png"
    link.symlink_to(image)
    assert media.file_key(link) == key  # the resolved path
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert media.file_key(image) != key
    png(tmp_path / "a.png", size=(17, 17))
    assert media.file_key(image) != key


def test_cache_round_trip_skips_torn_lines(media_cache):
    cache = media.VerifiedMediaCache(media_cache)
    cache.add(["a" * 32, "b" * 32])
    with media_cache.open("a") as handle:
        handle.write("c" * 20 + "\n" + "not a key\n")  # a line torn by a concurrent writer
    cache.add(["d" * 32])
    again = media.VerifiedMediaCache(media_cache)
    assert again.keys == {"a" * 32, "b" * 32, "d" * 32}
    assert media_cache.read_text().count("\n") == 5


def test_a_cache_that_cannot_be_written_is_no_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = media.VerifiedMediaCache(blocker / "cache.txt")  # its folder is a file
    cache.add(["a" * 32])
    assert "a" * 32 in cache
    assert blocker.read_text() == "x"


@pytest.fixture
def decode_calls(monkeypatch) -> list[Path]:
    """Records each file the check decodes."""
    calls: list[Path] = []
    real = media.image_problem

    def counting(file):
        calls.append(Path(file))
        return real(file)

    monkeypatch.setattr(media, "image_problem", counting)
    return calls


def test_decoded_files_are_remembered_and_bad_ones_are_not(tmp_path, media_cache, decode_calls):
    good = [png(tmp_path / f"good{i}.png") for i in range(3)]
    bad = corrupt_stream_png(tmp_path / "bad.png")
    files = [*good, bad]
    cache = media.VerifiedMediaCache(media_cache)
    assert list(media.undecodable_images(files, cache)) == [bad]
    assert sorted(decode_calls) == sorted(files)
    assert len(media_cache.read_text().split()) == 3

    decode_calls.clear()
    again = media.undecodable_images(files, media.VerifiedMediaCache(media_cache))  # a new run, same cache
    assert list(again) == [bad]
    assert decode_calls == [bad]  # the good ones cost a stat, not a decode

    decode_calls.clear()
    png(good[1], size=(20, 20))  # rewritten: decoded again
    assert media.undecodable_images(files, media.VerifiedMediaCache(media_cache)) == again
    assert sorted(decode_calls) == sorted([good[1], bad])


def test_without_a_cache_every_file_is_decoded_every_time(tmp_path, monkeypatch, decode_calls):
    monkeypatch.setenv(media.MEDIA_CACHE_ENV, "off")
    image = png(tmp_path / "a.png")
    for _ in range(2):
        assert media.undecodable_images([image], media.VerifiedMediaCache(media.media_cache_path())) == {}
    assert decode_calls == [image, image]


def test_images_are_decoded_on_several_threads_at_once(tmp_path, monkeypatch):
    """The first two decodes wait for each other: with fewer than two at once this would time out."""
    both_started = threading.Barrier(2, timeout=60)
    threads: set[int] = set()
    real = media.image_problem

    def meeting(file):
        threads.add(threading.get_ident())
        if len(threads) <= 2 and Path(file).name in ("0.png", "1.png"):
            both_started.wait()
        return real(file)

    monkeypatch.setattr(media, "image_problem", meeting)
    files = [png(tmp_path / f"{i}.png") for i in range(6)]
    bad = truncated_jpeg(tmp_path / "6.jpg")
    problems = media.undecodable_images([*files, bad], workers=2)
    assert list(problems) == [bad]
    assert len(threads) == 2


def test_results_do_not_depend_on_the_number_of_workers(tmp_path):
    files = [png(tmp_path / f"{i}.png") for i in range(5)]
    files.insert(2, corrupt_stream_png(tmp_path / "c.png"))
    files.append(oversized_png(tmp_path / "big.png"))
    one = media.undecodable_images(files, workers=1)
    assert one == media.undecodable_images(files, workers=3)
    assert list(one) == [files[2], files[-1]]


def test_progress_is_shown_when_asked(tmp_path, capsys):
    files = [png(tmp_path / f"{i}.png") for i in range(3)]
    media.undecodable_images(files, progress=True)
    assert "decoding images" in capsys.readouterr().err
    media.undecodable_images([png(tmp_path / "new.png")])  # few files, not a terminal: no bar
    assert capsys.readouterr().err == ""
