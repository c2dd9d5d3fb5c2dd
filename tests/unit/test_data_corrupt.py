"""Corrupt data at scale (issue 10 item 10): a truncated tar, a duplicate key in the middle of a shard and an
undecodable sample are skipped and counted by reason in the train and eval loaders, with 0 and 2 worker
processes (the counts travel with the batches to this process); inputs = delivered + skipped; past
``data.max_skip_fraction`` (after ``data.skip_check_min_samples``) the job stops with a clear DataError.
Also the exact-mode guard: fewer shards than ranks x workers is a DataError unless opted in."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest

from g3dr.config import load_config
from g3dr.data import build_eval_loader, build_train_loader
from g3dr.data.counts import DataCounts
from g3dr.data.synth import write_synthetic_shards
from g3dr.data.tar_reader import iter_samples
from g3dr.distributed import DistEnv
from g3dr.errors import DataError
from g3dr_test_support import load_test_helper

SHARD = 6
N = 22  # shards of 6, 6, 6, 4 samples


def _key(i: int) -> str:
    return f"synth_{i:07d}"


_tar = load_test_helper("tar_members")
_members, _write = _tar.read_members, _tar.write_members


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """Four shards written by the real writer, three of them then corrupted:

    - ``cut``  (keys 6-11): truncated in the middle of key 8's JPEG -> 2 whole samples + 1 cut = 3 inputs;
    - ``dup``  (keys 12-17): key 12's members written again after key 14 -> 7 inputs, 1 duplicate;
    - ``bad``  (keys 18-21): key 19's JPEG replaced by its first 100 bytes -> 4 inputs, 1 undecodable.
    """
    root = tmp_path_factory.mktemp("corrupt")
    write_synthetic_shards(str(root / "src"), N, (32,), seed=2, shard_size=SHARD, progress=False)
    src = sorted((root / "src").glob("synth-*.tar"))
    assert len(src) == 4
    good = src[0]

    cut = root / "cut.tar"
    with tarfile.open(src[1]) as tar:
        target = next(m for m in tar if m.name == f"{_key(8)}.32.jpg")
        offset = target.offset_data + target.size // 2  # mid-member
    cut.write_bytes(src[1].read_bytes()[:offset])

    members = _members(src[2])
    first = [m for m in members if m[0].startswith(_key(12) + ".")]
    after = max(i for i, m in enumerate(members) if m[0].startswith(_key(14) + "."))
    dup = root / "dup.tar"
    _write(dup, members[:after + 1] + first + members[after + 1:])

    members = [(name, data[:100] if name == f"{_key(19)}.32.jpg" else data) for name, data in _members(src[3])]
    bad = root / "bad.tar"
    _write(bad, members)

    # The inputs physically present in each file, counted with Python's tarfile (independent of our reader):
    # a sample is an input when any of its members starts in the file.
    def inputs(path: Path) -> int:
        keys = []
        with tarfile.open(path, ignore_zeros=True) as tar:
            try:
                for member in tar:
                    keys.append(member.name.split(".")[0])
            except tarfile.ReadError:
                pass
        # the cut member's header was read by tarfile too; consecutive runs of one key = one sample
        return sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)

    delivered = {_key(i) for i in [*range(0, 6), 6, 7, *range(12, 18), 18, 20, 21]}
    return {"good": str(good), "cut": str(cut), "dup": str(dup), "bad": str(bad),
            "inputs": {name: inputs(p) for name, p in (("good", good), ("cut", cut), ("dup", dup), ("bad", bad))},
            "delivered": delivered, "root": root, "src": src}


def _cfg(*overrides: str):
    return load_config(None, ["data.source=shards", "data.shards=unused.tar", "data.resolution=32",
                              "renderer.plane_resolutions=[32,16]", "model.channel_mults=[1,2]",
                              "train.micro_batch_size=2", "train.global_batch_size=2", "data.shuffle_buffer=8",
                              "data.max_skip_fraction=1.0", *overrides])


def test_the_corrupt_inputs_are_what_the_fixture_says(shards):
    assert shards["inputs"] == {"good": 6, "cut": 3, "dup": 7, "bad": 4}


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_skips_and_counts_every_bad_sample_once(shards, workers):
    urls = [shards[name] for name in ("good", "cut", "dup", "bad")]
    loader = build_eval_loader(_cfg(f"data.num_workers={workers}"), DistEnv(), shards=urls, batch_size=4)
    keys = [k for batch in loader for k in batch["key"]]
    assert len(keys) == len(set(keys)) and set(keys) == shards["delivered"]
    counts = loader.counts
    assert counts.skipped == {"incomplete_sample": 1, "duplicate_key": 1, "undecodable_sample": 1}
    assert counts.shard_errors == {"truncated_shard": 1}
    inputs = sum(shards["inputs"].values())
    assert counts.read == inputs == counts.delivered + counts.skipped_total == len(keys) + 3
    first = " | ".join(counts.first_bad)
    assert f"incomplete_sample: {_key(8)} in {shards['cut']}" in first
    assert f"duplicate_key: {_key(12)} in {shards['dup']}" in first and _key(19) in first
    # a second pass counts afresh
    assert sum(len(b["key"]) for b in loader) == len(keys) and loader.counts.read == inputs


@pytest.mark.parametrize("workers", [0, 2])
def test_train_skips_and_counts_bad_samples(shards, workers):
    urls = ",".join(shards[name] for name in ("cut", "dup", "bad"))
    # 8 batches per epoch; a shuffle buffer of 1 consumes each sample as soon as it is read
    cfg = _cfg(f"data.num_workers={workers}", f"data.shards={urls}", "data.epoch_length=16", "data.shuffle_buffer=1")
    loader = build_train_loader(cfg, DistEnv())
    it = iter(loader)
    keys: list[str] = []
    while len(keys) < 200 and (len(keys) < 20 or len(loader.counts.skipped) < 3):  # into epoch 1, every reason met
        keys += next(it)["key"]
    loader.close()
    counts = loader.counts
    assert counts.delivered == len(keys) and loader.epoch >= 1
    assert counts.read == counts.delivered + counts.skipped_total  # inputs reconcile at every batch boundary
    assert set(counts.skipped) == {"incomplete_sample", "duplicate_key", "undecodable_sample"}
    assert all(v >= 1 for v in counts.skipped.values())
    assert counts.shard_errors.get("truncated_shard", 0) >= counts.skipped["incomplete_sample"] - 1
    assert _key(8) not in keys and _key(19) not in keys  # the cut and the undecodable samples never arrive
    metrics = loader.data_metrics()
    assert metrics["data/skipped"] == counts.skipped_total and metrics["data/read"] == counts.read
    assert metrics["data/skip_fraction"] == pytest.approx(counts.skipped_total / counts.read)


@pytest.fixture(scope="module")
def half_bad(shards) -> list[str]:
    """Two shards where every other sample's JPEG is broken (50% bad)."""
    out = []
    for index, src in enumerate(shards["src"][:2]):
        members = []
        for name, data in _members(src):
            broken = name.endswith(".jpg") and int(name.split(".")[0].split("_")[1]) % 2 == 1
            members.append((name, data[:50] if broken else data))
        path = shards["root"] / f"half-{index}.tar"
        _write(path, members)
        out.append(str(path))
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_past_the_fraction_the_job_stops_with_a_clear_error(half_bad, workers, mode):
    overrides = [f"data.num_workers={workers}", "data.max_skip_fraction=0.2", "data.skip_check_min_samples=4",
                 f"data.shards={','.join(half_bad)}", "data.epoch_length=24"]
    if mode == "eval":
        loader = build_eval_loader(_cfg(*overrides), DistEnv())
    else:
        loader = build_train_loader(_cfg(*overrides), DistEnv())
    with pytest.raises(DataError) as info:
        for _ in zip(range(100), loader):
            pass
    message = str(info.value)
    assert "too much bad data" in message and "data.max_skip_fraction=0.2" in message
    assert "undecodable_sample" in message and "samples read were skipped" in message
    bad = re.findall(r"undecodable_sample: synth_(\d{7}) in \S*half-\d\.tar", message)  # first bad keys + shards
    assert bad and all(int(i) % 2 == 1 for i in bad)
    assert "g3dr prep validate" in message
    assert "Traceback" not in message  # a worker's error arrives as its own message


def test_one_bad_sample_early_does_not_stop_a_run(shards):
    urls = [shards["good"], shards["bad"]]  # 1 bad of 10: 10%
    cfg = _cfg("data.max_skip_fraction=0.01", "data.skip_check_min_samples=1000", "data.num_workers=0")
    loader = build_eval_loader(cfg, DistEnv(), shards=urls)
    assert sum(len(b["key"]) for b in loader) == 9 and loader.counts.skipped == {"undecodable_sample": 1}
    strict = build_eval_loader(_cfg("data.max_skip_fraction=0.01", "data.skip_check_min_samples=10",
                                    "data.num_workers=2"), DistEnv(),
                               shards=urls)
    with pytest.raises(DataError, match=r"1 of 10 samples read were skipped \(10.00%\)"):
        list(strict)


def test_counts_check_boundaries():
    counts = DataCounts(read=99, delivered=98, skipped={"undecodable_sample": 1})
    counts.check(0.01, 100)  # below the minimum count
    counts.read, counts.delivered = 100, 99
    counts.check(0.01, 100)  # exactly at the fraction: allowed
    counts.skipped["duplicate_key"] = 1
    counts.read = 101
    with pytest.raises(DataError, match="2 of 101"):
        counts.check(0.01, 100)
    counts.check(1.0, 1)  # 1.0 never stops
    merged = DataCounts().merge(counts).merge(counts)
    assert merged.read == 202 and merged.skipped == {"undecodable_sample": 2, "duplicate_key": 2}
    assert DataCounts.from_dict(merged.to_dict()) == merged


def test_a_repeated_member_name_is_a_second_sample_with_the_same_key(shards):
    members = _members(Path(shards["good"]))
    again = [m for m in members if m[0].startswith(_key(0) + ".")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in again + again + members[len(again):]:  # key 0 twice in a row
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    keys = [s["__key__"] for s in iter_samples(io.BytesIO(buf.getvalue()))]
    assert keys == [_key(0), _key(0), *[_key(i) for i in range(1, 6)]]


# --------------------------------------------------------------------------------------------------
# Exact mode: shards < ranks x workers
# --------------------------------------------------------------------------------------------------


def test_exact_mode_with_too_few_shards_fails_at_startup_naming_counts_and_fixes(shards):
    urls = shards["src"][:3]
    cfg = _cfg("data.num_workers=2")
    with pytest.raises(DataError) as info:
        build_eval_loader(cfg, DistEnv(rank=0, world_size=2), shards=[str(u) for u in urls])
    message = str(info.value)
    assert "3 shard(s) for 2 rank(s) x 2 reader(s) per rank (data.num_workers=2) = 4 readers" in message
    for fix in ("reshard into at least 4", "data.num_workers=1", "eval_few_shards=fewer_workers",
                "eval_few_shards=read_all"):
        assert fix in message
    with pytest.raises(DataError, match="run on at most 1 rank"):
        build_eval_loader(_cfg("data.num_workers=0"), DistEnv(rank=0, world_size=2), shards=[str(urls[0])])


@pytest.mark.parametrize("policy", ["fewer_workers", "read_all"])
def test_exact_mode_opt_ins_still_see_every_sample_once(shards, policy, caplog):
    urls = [str(u) for u in shards["src"][:3]]  # 18 samples in 3 shards, 2 ranks x 2 workers
    cfg = _cfg("data.num_workers=2", f"data.eval_few_shards={policy}")
    with caplog.at_level("WARNING", logger="g3dr.data"):
        loaders = [build_eval_loader(cfg, DistEnv(rank=r, world_size=2), shards=urls, batch_size=4) for r in (0, 1)]
    assert "exact pass: 3 shard(s)" in caplog.text
    assert [lo.num_workers for lo in loaders] == ([1, 1] if policy == "fewer_workers" else [2, 2])
    keys = [k for lo in loaders for b in lo for k in b["key"]]
    assert sorted(keys) == [_key(i) for i in range(18)]
    assert sum(lo.counts.read for lo in loaders) == 18


def test_a_worker_whose_samples_are_all_bad_stops_the_job_from_its_process(shards):
    """The worker's own check fires (its batches never come); its DataError arrives here as its message."""
    members = [(name, data[:50] if name.endswith(".jpg") else data) for name, data in _members(shards["src"][3])]
    all_bad = shards["root"] / "all-bad.tar"
    _write(all_bad, members)
    cfg = _cfg("data.num_workers=2", "data.max_skip_fraction=0.2", "data.skip_check_min_samples=3")
    loader = build_eval_loader(cfg, DistEnv(), shards=[shards["good"], str(all_bad)], batch_size=2)
    with pytest.raises(DataError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith("too much bad data in reader 1 of rank 0: 3 of 3 samples read were skipped")
    assert "Traceback" not in message and "all-bad.tar" in message



def test_the_reader_names_the_sample_lost_at_a_break(shards):
    """Where a tar stream breaks decides which sample is lost; the complete ones before it are yielded."""
    from g3dr.data.tar_reader import TarReadError

    path = Path(shards["src"][0])
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar}
    jpg2 = members[f"{_key(2)}.32.jpg"]  # key 2's second member (the writer sorts: 32.depth.png, 32.jpg, cls, json)
    first2 = min((m for m in members.values() if m.name.startswith(_key(2) + ".")), key=lambda m: m.offset)
    assert first2.name == f"{_key(2)}.32.depth.png"
    last5 = max(members.values(), key=lambda m: m.offset)
    end5 = last5.offset_data + last5.size + (-last5.size % 512)

    def read(blob: bytes):
        keys = []
        with pytest.raises(TarReadError) as info:
            for sample in iter_samples(io.BytesIO(blob), "u"):
                keys.append(sample["__key__"])
        return keys, info.value

    cases = {
        "mid-member": (jpg2.offset_data + 10, [_key(0), _key(1)], _key(2), "truncated"),
        # a break in a header: the sample before it may lack members, so it is the one counted as lost
        "inside a header": (first2.offset + 100, [_key(0)], _key(1), "truncated"),
        "inside the next sample's first member": (first2.offset_data + 1, [_key(0), _key(1)], _key(2), "truncated"),
        "at the end, without the zero blocks": (end5, [_key(i) for i in range(5)], _key(5), "truncated"),
    }
    for what, (cut, kept, lost, kind) in cases.items():
        keys, err = read(data[:cut])
        assert (keys, err.partial_key, err.kind) == (kept, lost, kind), what
    # a corrupt header (checksum) is a break in a header too
    corrupt = bytearray(data)
    corrupt[first2.offset + 5] ^= 0x01
    keys, err = read(bytes(corrupt))
    assert (keys, err.partial_key, err.kind) == ([_key(0)], _key(1), "corrupt")
    assert list(iter_samples(io.BytesIO(b""))) == []  # an empty stream is no tar at all: nothing, no error


def test_training_on_nothing_usable_stops_even_without_a_skip_limit(shards):
    """max_skip_fraction=1.0 never stops on the fraction, but a reader with no usable sample must not spin."""
    members = [(name, data[:50] if name.endswith(".jpg") else data) for name, data in _members(shards["src"][3])]
    all_bad = shards["root"] / "all-bad-train.tar"
    _write(all_bad, members)
    loader = build_train_loader(_cfg("data.num_workers=0", f"data.shards={all_bad}", "data.epoch_length=8"), DistEnv())
    loader.stream.max_bad_in_row = 20
    with pytest.raises(DataError, match="20 samples in a row were skipped in reader 0 of rank 0: no usable data"):
        next(iter(loader))
    # a shard whose only sample is cut counts as empty: after 2 x shards + 10 of them in a row, a DataError
    cut = shards["root"] / "cut-first.tar"
    cut.write_bytes(Path(shards["src"][3]).read_bytes()[:700])  # inside the first sample
    loader = build_train_loader(_cfg("data.num_workers=0", f"data.shards={cut}", "data.epoch_length=8"), DistEnv())
    with pytest.raises(DataError, match="12 shards in a row gave no samples"):
        next(iter(loader))
