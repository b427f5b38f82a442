"""`manytask shards write|index|inspect|verify`: the command-line face of shard_tools and
table_to_shards."""

from __future__ import annotations

import argparse

SPEC_HELP = """column specs: [FIELD=]COLUMNS[:KIND][:OPTION...]   (COLUMNS: col, c1,c2 or a glob f*)
  city                          string column -> vocabulary id (as city:cat); numbers pass through
  city:cat:min_count=5:max_vocab=1000
                                id from the training split's vocabulary; 0 = unseen / empty
  user_id:hash=1048576          id 1 + hash(value) mod 1048575; 0 = empty; no vocabulary pass
  genres:multi:k=4:sep=|        [4] ids of a list column or 'A|B' text; 0 = padding, 1 = unseen
  age:num                       float32 standardised with the training mean/std; missing = error
  age:num:raw                   float32 as is
  income:num:fill=0             missing -> 0 (or fill=mean) + field income_missing (1 = filled)
  price:num:log                 log1p(value), then standardised
  ideal=cut:eq=Ideal            1 / 0 (missing -> -1, a masked label)
targets: floats keep NaN (no label), a string target gets class ids 0..C-1 (unseen -> -1).
ids are stored as int8 / int16 / int32, the narrowest type of their id space (recorded).
vocabularies: OUT/<split>/vocab/<field>.txt, one value per line; all recorded in manifest.json."""


def _write(args: argparse.Namespace) -> int:
    from manytask.data_pipeline.table_to_shards import convert_table

    manifests = convert_table(
        args.input, args.out, features=args.features, targets=args.targets,
        samples_per_shard=args.samples_per_shard, chunk_size=args.chunk_size,
        val_fraction=args.val_fraction, seed=args.seed, layout=args.layout, force=args.force,
        min_count=args.min_count, max_vocab=args.max_vocab, batch_rows=args.batch_rows,
    )
    for split, m in manifests.items():
        print(f"{args.out}/{split}: {m.total_samples} samples, {len(m.shards)} shards, {m.layout} layout")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from manytask.data_pipeline.shard_tools import verify

    count, problems = verify(args.shards)
    for line in problems:
        print(line)
    print(f"{args.shards}: {count} shards, " + (f"{len(problems)} problems" if problems else "all verified"))
    return 1 if problems else 0


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

    w = ssub.add_parser(
        "write", help="convert CSV / Parquet / NPZ into shards (train/ and val/)",
        description="Stream a table (a file, a directory or a glob of CSV / TSV / Parquet files, "
        "or one NPZ) into OUT/train and OUT/val: shards, manifest.json and vocabulary files. "
        "Vocabularies and statistics come from the training split only.",
        epilog=SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    w.add_argument("input", help="table file, directory of table files, or glob ('parts/*.parquet')")
    w.add_argument("out")
    w.add_argument("--features", nargs="+", required=True, metavar="SPEC",
                   help="input fields, one column spec each (see below)")
    w.add_argument("--targets", nargs="+", required=True, metavar="SPEC",
                   help="label fields, same syntax")
    w.add_argument("--min-count", type=int, default=1,
                   help="default for every vocabulary: values seen fewer times map to the unseen id")
    w.add_argument("--max-vocab", type=int, default=0,
                   help="default for every vocabulary: keep the N most frequent values (0 = all)")
    w.add_argument("--force", action="store_true", help="overwrite a non-empty OUT")
    w.add_argument("--batch-rows", type=int, default=131_072,
                   help="rows read per record batch (memory is bounded by one batch)")
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

    v = ssub.add_parser("verify", help="check every shard's size and checksums against manifest.json")
    v.add_argument("shards", help="directory with manifest.json, or its path")
    v.set_defaults(func=_verify)

    s = ssub.add_parser("inspect", help="print layout, schema, preprocessing, counts and a sample")
    s.add_argument("shards")
    s.add_argument("--samples", type=int, default=1)
    s.set_defaults(func=_inspect)
