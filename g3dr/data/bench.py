"""``g3dr bench loader``: the shard pipeline against a per-item folder loader, and prep throughput.

The folder loader does per item what the reference code does: PIL-open the JPEG and the 16-bit depth
PNG, Lanczos-resize both to the training resolution, convert to tensors; batches from a torch
DataLoader with the same worker count. Rates are samples/s after the first batch (worker start-up is
excluded for both). The shard pipeline is the training stream of
:mod:`g3dr.data.pipeline` (shuffle buffer, flip) over shards written by ``g3dr prep shards`` from the
same folder. Both read every sample once, on the same machine, in one run each.

Also measured: ``g3dr prep shards`` images/s with 1 and with 2 workers (per worker and the scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

GOAL_SPEEDUP = 5.0


def register_bench(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser("loader", help="shard pipeline vs per-item folder loader; prep images/s",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default="", help="release-layout folder (NAME.jpg + NAME_depth.png); default: "
                        "the release samples of ../shared when present, else synthetic 256px samples")
    parser.add_argument("--n", type=int, default=960, help="samples (the source is repeated to reach N)")
    parser.add_argument("--resolution", type=int, default=128, help="training resolution")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers of both loaders")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=0, help="inputs per shard (default: N / 8)")
    parser.add_argument("--skip-prep-scaling", action="store_true", help="skip the 1 -> 2 worker prep measurement")
    parser.add_argument("--keep", default="", help="keep the work folder here instead of a temporary one")
    parser.set_defaults(handler=run_loader_bench)


def _default_src() -> Path | None:
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "g3dr_release_samples"
    return shared if shared.is_dir() else None


def make_folder(work: Path, src: Path | None, n: int) -> tuple[Path, str]:
    """A release-layout folder of exactly ``n`` pairs (copies of ``src``'s pairs, or synthetic 256px ones)."""
    folder = work / "folder"
    folder.mkdir(parents=True)
    if src is not None:
        pairs = sorted(p for p in src.rglob("*.jpg") if (p.parent / f"{p.stem}_depth.png").is_file())
        if not pairs:
            from g3dr.errors import DataError

            raise DataError(f"no NAME.jpg + NAME_depth.png pairs under {src}")
        for i in range(n):
            image = pairs[i % len(pairs)]
            shutil.copyfile(image, folder / f"s{i:06d}.jpg")
            shutil.copyfile(image.parent / f"{image.stem}_depth.png", folder / f"s{i:06d}_depth.png")
        return folder, str(src)
    from PIL import Image

    from g3dr.data.depth_codec import u16_from_depth
    from g3dr.data.synth import synth_sample

    unique = min(n, 32)  # rendering takes 0.2-0.6 s per 256 px sample: render a few, repeat them like the release pairs
    for i in range(n):
        name = folder / f"s{i:06d}"
        if i < unique:
            rgb, depth, _, _ = synth_sample(0, i, 256)
            Image.fromarray(rgb).save(f"{name}.jpg", quality=90)
            Image.fromarray(u16_from_depth(depth)).save(f"{name}_depth.png")
        else:
            source = folder / f"s{i % unique:06d}"
            shutil.copyfile(f"{source}.jpg", f"{name}.jpg")
            shutil.copyfile(f"{source}_depth.png", f"{name}_depth.png")
    return folder, "synthetic"


class FolderDataset:
    """Per-item loading as in the reference code: PIL open JPEG + depth PNG, Lanczos resize, to tensor."""

    def __init__(self, folder: Path, resolution: int):
        self.images = sorted(folder.glob("*.jpg"))
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        import numpy as np
        import torch
        from PIL import Image

        size = (self.resolution, self.resolution)
        path = self.images[index]
        image = Image.open(path).convert("RGB").resize(size, Image.Resampling.LANCZOS)
        rgb = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
        codes = np.array(Image.open(path.parent / f"{path.stem}_depth.png")).astype(np.float32)
        depth = np.asarray(Image.fromarray(codes, mode="F").resize(size, Image.Resampling.LANCZOS))
        return rgb, torch.from_numpy(depth / 65536.0 * 2.0 + 4.0)[None]


def _steady_rate(batches, size_of) -> float:
    """Samples/s after the first batch (worker start-up excluded for both loaders alike)."""
    iterator = iter(batches)
    next(iterator)
    start, count = time.perf_counter(), 0
    for item in iterator:
        count += size_of(item)
    return count / (time.perf_counter() - start)


def _time_folder(folder: Path, resolution: int, workers: int, batch: int) -> float:
    import torch

    loader = torch.utils.data.DataLoader(FolderDataset(folder, resolution), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    return _steady_rate(loader, lambda item: item[0].shape[0])


def _time_shards(out: Path, resolution: int, workers: int, batch: int, n: int) -> float:
    """The training loader itself (:class:`~g3dr.data.loader.TrainLoader`) for one epoch of ``n`` samples."""
    import itertools

    from g3dr.data.loader import TrainLoader
    from g3dr.data.pipeline import ShardStream, expand_shard_urls

    # A streaming shuffle reads a buffer's worth of samples beyond the epoch; in training that is
    # amortised over epochs of ~1e4-1e6 samples per rank, so the buffer here is a tenth of the epoch.
    stream = ShardStream(urls=expand_shard_urls(str(out)), mode="train", resolution=resolution, batch_size=batch,
                         shuffle_buffer=max(16, n // 10), flip_p=0.5, batches_per_epoch=n // batch, wire=True)
    loader = TrainLoader(stream, workers)
    try:
        return _steady_rate(itertools.islice(loader, n // batch), lambda item: item["rgb"].shape[0])
    finally:
        loader.close()


def _prep(folder: Path, out: Path, resolution: int, workers: int, shard_size: int) -> float:
    from g3dr.data.shard_writer import JobSpec, StoreOptions, run_shard_job
    from g3dr.data.sources import FileSource  # the release-layout source: what prep measures

    source = FileSource(layout="release", src=str(folder), options=StoreOptions(resolutions=(resolution,)))
    result = run_shard_job(source, JobSpec(out=str(out), shard_size=shard_size, workers=workers), progress=False)
    return result.images_per_second


def run_loader_bench(args: argparse.Namespace) -> int:
    import torch

    # DataLoader workers run with one intra-op thread; do the same in this process so that
    # --workers 0 measures the same work (and OpenMP spinning on a busy machine does not).
    torch.set_num_threads(1)
    src = Path(args.src) if args.src else _default_src()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="g3dr-bench-"))
    try:
        folder, source_name = make_folder(work, src, args.n)
        shard_size = args.shard_size or max(1, args.n // 8)
        prep_1 = _prep(folder, work / "shards-1w", args.resolution, 1, shard_size)
        prep_2 = None if args.skip_prep_scaling else _prep(folder, work / "shards-2w", args.resolution, 2, shard_size)
        folder_rate = _time_folder(folder, args.resolution, args.workers, args.batch)
        shard_rate = _time_shards(work / "shards-1w", args.resolution, args.workers, args.batch, args.n)
        result = {
            "bench": "loader", "source": source_name, "n": args.n, "resolution": args.resolution,
            "workers": args.workers, "batch": args.batch, "cpu_count": os.cpu_count(),
            "folder_samples_per_s": round(folder_rate, 1), "shards_samples_per_s": round(shard_rate, 1),
            "speedup": round(shard_rate / folder_rate, 2), "goal_speedup": GOAL_SPEEDUP,
            "meets_goal": shard_rate / folder_rate >= GOAL_SPEEDUP,
            "prep_images_per_s_1_worker": round(prep_1, 1),
            "prep_images_per_s_2_workers": None if prep_2 is None else round(prep_2, 1),
            "prep_images_per_s_per_worker_at_2": None if prep_2 is None else round(prep_2 / 2, 1),
            "prep_scaling_1_to_2": None if prep_2 is None else round(prep_2 / prep_1, 2),
        }
        print(json.dumps(result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0
