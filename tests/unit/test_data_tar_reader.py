"""The fast tar reader against Python's tarfile (the independent reference)."""

from __future__ import annotations

import io
import tarfile

import pytest

from g3dr.data.tar_reader import TarReadError, iter_members, iter_samples, split_key


def _tar(fmt: int, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    return buf.getvalue()


MEMBERS = [("a.jpg", b"x" * 700), ("a.depth.png", b""), ("a.cls", b"3"),
           ("dir/sub/b.128.jpg", b"y" * 512), ("dir/sub/b.cls", b"1"),
           ("p" * 120 + "/" + "n" * 60 + ".jpg", b"z" * 1000),  # > 100 chars: GNU L / PAX path / ustar prefix
           ("__index__", b"meta"), ("c.txt", bytes(range(256)) * 3)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_match_tarfile(fmt):
    data = _tar(fmt, MEMBERS)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(iter_members(io.BytesIO(data))) == expected


def test_samples_group_by_key_like_webdataset():
    samples = list(iter_samples(io.BytesIO(_tar(tarfile.GNU_FORMAT, MEMBERS)), "u"))
    assert [s["__key__"] for s in samples] == ["a", "dir/sub/b", "p" * 120 + "/" + "n" * 60, "c"]
    assert samples[0]["depth.png"] == b"" and samples[0]["cls"] == b"3" and samples[1]["128.jpg"] == b"y" * 512
    assert split_key("x/y.z.w") == ("x/y", "z.w") and split_key("noext") is None


def test_truncated_and_corrupt_streams_raise_after_complete_samples():
    data = _tar(tarfile.GNU_FORMAT, MEMBERS)
    seen = []
    with pytest.raises(TarReadError, match="ended inside"):
        for sample in iter_samples(io.BytesIO(data[:4300]), "u"):
            seen.append(sample["__key__"])
    assert seen == ["a"]
    corrupt = bytearray(data)
    corrupt[10] ^= 0x01  # inside the first header's name
    with pytest.raises(TarReadError, match="checksum"):
        list(iter_members(io.BytesIO(bytes(corrupt))))


def test_prep_validate_and_the_asset_commands_read_shards_with_this_reader(tmp_path):
    """One tar reader serves the training pipeline, ``g3dr prep validate`` and ``g3dr batch --shards``: the same
    samples, and a cut shard is an error after the whole samples before the cut."""
    from g3dr.assets.inputs import inputs_from_shards
    from g3dr.data_prep.validate import read_tar_samples
    from g3dr.errors import DataError

    whole = tmp_path / "whole.tar"
    whole.write_bytes(_tar(tarfile.USTAR_FORMAT, MEMBERS))
    expected = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                for s in iter_samples(io.BytesIO(whole.read_bytes()))]
    assert read_tar_samples(whole) == expected
    assert [(r.key, {k: v for k, v in r.sample.items() if k != "__key__"}) for r in inputs_from_shards([whole])] \
        == expected
    cut = tmp_path / "cut" / "cut.tar"
    cut.parent.mkdir()
    cut.write_bytes(whole.read_bytes()[:3 * 512 + 100])  # inside the second member's header
    with pytest.raises(TarReadError):
        read_tar_samples(cut)
    with pytest.raises(DataError, match="cannot read shard"):
        list(inputs_from_shards([cut]))
