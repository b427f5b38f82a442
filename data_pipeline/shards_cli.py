"""`manytask shards write|index|inspect`: the command-line face of shard_tools."""

from __future__ import annotations

import argparse


def _write(args: argparse.Namespace) -> int:
    from manytask.data_pipeline.shard_tools import convert_table

    manifests = convert_table(
        args.input, args.out, features=args.features, targets=args.targets,
        samples_per_shard=args.samples_per_shard, chunk_size=args.chunk_size,
        val_fraction=args.val_fraction, seed=args.seed, layout=args.layout,
    )
    for split, m in manifests.items():
        print(f"{args.out}/{split}: {m.total_samples} samples, {len(m.shards)} shards, {m.layout} layout")
    return 0


def _index(args: argparse.Namespace) -> int:
    from manytask.data_pipeline.shard_tools import index_shards

    m = index_shards(args.shards, layout=args.layout)
    print(f"{m.path}: {m.total_samples} samples in {len(m.shards)} shards ({m.layout} layout)")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from manytask.data_pipeline.shard_tools import inspect

    print(inspect(args.shards, samples=args.samples))
    return 0


def add_shards_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shards", help="write, index and inspect WebDataset shards")
    ssub = p.add_subparsers(dest="shards_command", required=True)

    w = ssub.add_parser("write", help="convert CSV / Parquet / NPZ into shards (train/ and val/)")
    w.add_argument("input")
    w.add_argument("out")
    w.add_argument("--features", nargs="+", required=True,
                   help="feature columns: 'col', or 'field=col1,col2' to group columns into one field")
    w.add_argument("--targets", nargs="+", required=True, help="label columns, same syntax")
    w.add_argument("--samples-per-shard", type=int, default=100_000)
    w.add_argument("--chunk-size", type=int, default=1024)
    w.add_argument("--val-fraction", type=float, default=0.1)
    w.add_argument("--layout", choices=["chunk", "sample"], default="chunk")
    w.add_argument("--seed", type=int, default=0)
    w.set_defaults(func=_write)

    i = ssub.add_parser("index", help="write manifest.json for shards from any WebDataset writer")
    i.add_argument("shards", help="directory, brace pattern or glob")
    i.add_argument("--layout", choices=["chunk", "sample"], default=None,
                   help="default: sample (the WebDataset convention)")
    i.set_defaults(func=_index)

    s = ssub.add_parser("inspect", help="print layout, schema, counts and a sample")
    s.add_argument("shards")
    s.add_argument("--samples", type=int, default=1)
    s.set_defaults(func=_inspect)
