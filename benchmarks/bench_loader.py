"""Loader throughput against a sequential numpy read of the same bytes, on a planted store of realistic shape.

    .venv/bin/python benchmarks/bench_loader.py [--n-imgs 10000] [--batch-size 16384] [--buffer-chunks 32]
        [--patches patches|cls|meanpool] [--dtype float32|float16] [--dtype-pairs 3]

Plants one ViT-B/32-like layer (50 tokens = CLS + 49 patches, d_vit 768, ``--dtype``, default float32; 10,000
images = 1.5 GB in float32, half that in float16) in a temporary folder on local disk, with the store's own layout
(~4 MB inner chunks of whole images, 16 chunks per shard), then measures in one run:

  (a) the shuffled loader in token mode ``--patches`` (default patches), one full epoch (no val split): vectors/s
      and MB/s of store bytes covered (patches: every token is read, each patch straight into its batch row and the
      CLS tokens into a junk row, so 49/50 of the bytes are handed out; cls reads one vector per image, meanpool
      whole chunks);
  (b) np.fromfile of every shard file of the layer, in order: the same bytes, read sequentially.

Both run in two page-cache states. hot: every file was read just before, so both read from memory; (b) runs before
and after (a) and the faster is the reference; the loader runs three epochs (the first pays one-time costs: the
process's first large allocations, batch arrays the loader reuses from then on, and thread start-up). cold: before
each run the files' pages are dropped from the page cache with posix_fadvise(DONTNEED) (no root needed), so both
read from the disk. The ratio is (a) over the (b) of the same state; the goal is >= 0.9. compute_stats (one float64
pass, hot, same token mode) is timed too.

Then float16 vs float32 side by side (``--dtype-pairs`` N, 0 skips it): the other dtype's store is planted from the
same numbers, and N pairs of epochs run alternately (float32 then float16, swapped every other pair), hot and then
cold; the best epoch of each is reported as vectors/s and store MB/s, with the float16 / float32 ratio of vectors/s.
A float16 store is half the bytes; its batches are still float32 (converted as they are handed out).
"""

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from saev_core import config  # noqa: E402
from saev_core.store import ActivationStore, write_store  # noqa: E402
from saev_core.store.loader import ActivationLoader  # noqa: E402
from saev_core.store.stats import compute_stats  # noqa: E402

N_PATCHES, D_VIT, CHUNKS_PER_SHARD = 49, 768, 16


def plant(root: str, n_imgs: int, dtype: str = "float32") -> ActivationStore:
    """The same numbers (seed 0) for either dtype; the store's own ~4 MB chunks, 16 per shard."""
    n_tokens = N_PATCHES + 1
    imgs_per_chunk = (4 * 1024 * 1024) // (n_tokens * D_VIT * np.dtype(dtype).itemsize)
    rng = np.random.default_rng(0)
    return write_store(
        root,
        lambda start, end: rng.standard_normal((1, end - start, n_tokens, D_VIT), dtype=np.float32).astype(dtype),
        shape=(n_imgs, n_tokens, D_VIT),
        imgs_per_shard=CHUNKS_PER_SHARD * imgs_per_chunk,
        fingerprint="bench",
        resolved_layers=(10,),
        dtype=dtype,
    )


def shard_files(store: ActivationStore) -> list[str]:
    folder = os.path.join(store.path, "layer_-2")
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f != "zarr.json")


def sequential_read(files: list[str]) -> float:
    start = time.perf_counter()
    for path in files:
        np.fromfile(path, dtype=np.uint8)
    return time.perf_counter() - start


def drop_page_cache(files: list[str]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loader_epoch(loader: ActivationLoader) -> tuple[int, float, float]:
    """Vectors, seconds for the epoch, seconds to the first batch."""
    start, n, first = time.perf_counter(), 0, None
    for batch in loader:
        n += len(batch)
        first = first or time.perf_counter() - start
    return n, time.perf_counter() - start, first


def print_table(table: list[tuple]) -> None:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    table.insert(1, tuple("-" * w for w in widths))
    print()
    for r in table:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def compare_dtypes(args, tmp: str, store: ActivationStore) -> None:
    """float16 vs float32 stores of the same numbers, epochs alternating, best of args.dtype_pairs each."""
    other = "float16" if args.dtype == "float32" else "float32"
    stores = {args.dtype: store, other: plant(os.path.join(tmp, other), args.n_imgs, other)}
    loaders, files = {}, {}
    for dtype, st in stores.items():
        cfg = config.DataLoadConfig(
            shard_root=st.path, layer=-2, patches=args.patches, val_frac=0.0, buffer_chunks=args.buffer_chunks
        )
        loaders[dtype] = ActivationLoader(
            st, cfg, batch_size=args.batch_size, seed=0, n_read_threads=args.n_read_threads
        )
        files[dtype] = shard_files(st)
    n_vectors = args.n_imgs * (N_PATCHES if args.patches == "patches" else 1)
    times: dict[tuple[str, str], list[float]] = {(d, c): [] for d in stores for c in ("hot", "cold")}
    for dtype in stores:  # warm up: first-touch allocation of each loader's batch arrays; files into the cache
        sequential_read(files[dtype])
        loader_epoch(loaders[dtype])
    for cache in ("hot", "cold"):
        for k in range(args.dtype_pairs):
            for dtype in ["float32", "float16"] if k % 2 == 0 else ["float16", "float32"]:
                if cache == "cold":
                    drop_page_cache(files[dtype])
                else:
                    sequential_read(files[dtype])
                n, seconds, _ = loader_epoch(loaders[dtype])
                assert n == n_vectors, n
                times[dtype, cache].append(seconds)
    table = [
        (
            f"dtype, cache (best of {args.dtype_pairs})",
            "store GB",
            "s",
            "vectors/s",
            "store MB/s",
            "f16/f32 vectors/s",
        )
    ]
    for cache in ("hot", "cold"):
        best = {d: min(times[d, cache]) for d in stores}
        for dtype in ("float32", "float16"):
            gb = stores[dtype].nbytes() / 1e9
            ratio = f"{best['float32'] / best['float16']:.2f}" if dtype == "float16" else ""
            table.append(
                (
                    f"{dtype}, {cache}",
                    f"{gb:.2f}",
                    f"{best[dtype]:.2f}",
                    f"{n_vectors / best[dtype]:,.0f}",
                    f"{gb * 1e3 / best[dtype]:,.0f}",
                    ratio,
                )
            )
    print_table(table)
    spread = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in times.items()}
    print(
        f"\nfloat16 vs float32, same numbers, {args.patches}, batch {args.batch_size}, buffer {args.buffer_chunks} "
        f"chunks, {args.n_read_threads} read threads; epoch seconds per (dtype, cache): {spread}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-imgs", type=int, default=10_000, help="images to plant (153.6 kB each)")
    parser.add_argument("--batch-size", type=int, default=16_384)
    parser.add_argument("--buffer-chunks", type=int, default=32)
    parser.add_argument("--n-read-threads", type=int, default=2)
    parser.add_argument("--patches", default="patches", choices=["patches", "cls", "meanpool"], help="token mode")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="the store's dtype")
    parser.add_argument(
        "--dtype-pairs",
        type=int,
        default=3,
        help="pairs of float16/float32 epochs in the side-by-side comparison (0: skip it)",
    )
    parser.add_argument("--dir", default=None, help="where the temporary store goes (default: the system temp dir)")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-loader-", dir=args.dir)
    try:
        t0 = time.perf_counter()
        store = plant(os.path.join(tmp, args.dtype), args.n_imgs, args.dtype)
        files = shard_files(store)
        itemsize = np.dtype(args.dtype).itemsize
        gb = store.n_imgs * store.n_tokens * D_VIT * itemsize / 1e9
        chunk_mb = store.layout.imgs_per_chunk * store.n_tokens * D_VIT * itemsize / 1e6
        print(
            f"planted {store.n_imgs} images x {store.n_tokens} tokens x {D_VIT} {args.dtype} = {gb:.2f} GB in "
            f"{len(files)} shards of {store.layout.imgs_per_shard} images, chunks of {store.layout.imgs_per_chunk} "
            f"images ({chunk_mb:.1f} MB), in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs."
        )
        cfg = config.DataLoadConfig(
            shard_root=store.path, layer=-2, patches=args.patches, val_frac=0.0, buffer_chunks=args.buffer_chunks
        )
        loader = ActivationLoader(store, cfg, batch_size=args.batch_size, seed=0, n_read_threads=args.n_read_threads)
        n_vectors = store.n_imgs * (N_PATCHES if args.patches == "patches" else 1)

        def epoch() -> tuple[float, float]:
            n, seconds, first = loader_epoch(loader)
            assert n == n_vectors, n
            return seconds, first

        sequential_read(files)  # hot: everything read once before timing
        seq_hot = [sequential_read(files)]
        hot = [epoch(), epoch(), epoch()]
        seq_hot.append(sequential_read(files))

        drop_page_cache(files)
        seq_cold = [sequential_read(files)]
        drop_page_cache(files)
        cold = epoch()
        drop_page_cache(files)
        seq_cold.append(sequential_read(files))

        sequential_read(files)
        t0 = time.perf_counter()
        compute_stats(store, -2, args.patches)
        t_stats = time.perf_counter() - t0

        ref_hot, ref_cold = min(seq_hot), min(seq_cold)
        rows = [
            ("(b) np.fromfile in order, hot (best of 2)", ref_hot, None, ref_hot),
            ("(a) loader, hot, epoch 0", *hot[0], ref_hot),
            ("(a) loader, hot, epoch 1", *hot[1], ref_hot),
            ("(a) loader, hot, epoch 2", *hot[2], ref_hot),
            ("(b) np.fromfile in order, cold (best of 2)", ref_cold, None, ref_cold),
            ("(a) loader, cold, epoch 3", *cold, ref_cold),
            ("compute_stats, hot (float64, one pass)", t_stats, None, ref_hot),
        ]
        table = [("measurement", "s", "1st batch s", "vectors/s", "MB/s", "ratio")]
        for name, seconds, first, ref in rows:
            rate = "" if name.startswith("(b)") else f"{n_vectors / seconds:,.0f}"
            first = "" if first is None else f"{first:.2f}"
            table.append((name, f"{seconds:.2f}", first, rate, f"{gb * 1e3 / seconds:,.0f}", f"{ref / seconds:.2f}"))
        print_table(table)
        print(
            f"\nMB/s: store bytes covered per second ({gb:.2f} GB). ratio: over (b) in the same cache state; goal "
            f">= 0.9. Loader: {args.dtype} store, {args.patches}, batch {args.batch_size}, buffer "
            f"{args.buffer_chunks} chunks, {args.n_read_threads} read threads."
        )
        if args.dtype_pairs > 0:
            compare_dtypes(args, tmp, store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
