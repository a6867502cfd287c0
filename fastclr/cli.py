"""The ``fastclr`` command (also ``python -m fastclr``).

    fastclr pretrain [--config RECIPE] [section.field=value ...]   # SimCLR pretraining (fastclr pretrain --help)
    fastclr eval | linear | finetune | export SOURCE [...]         # a checkpoint or backbone after pretraining
    fastclr distill TEACHER [...]                                  # SimCLR v2's third step
    fastclr data check PATH                                        # find images training cannot use
    fastclr data index PATH                                        # build the sample index ahead of a job
"""
from __future__ import annotations

import argparse
import os
import re
import sys

_LOCAL_RANK = re.compile(r"^--local_rank(=\d+)?$")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # DeepSpeed's launcher puts --local_rank=N right after the program (`deepspeed --module fastclr pretrain`
    # runs `python -m fastclr --local_rank=0 pretrain ...`); the rank comes from LOCAL_RANK in the environment.
    argv = [a for a in argv if not _LOCAL_RANK.match(a)]
    if argv and argv[0] == "pretrain":
        from .tasks.pretrain import main as pretrain

        return pretrain(argv[1:])
    from .tasks import COMMANDS

    if argv and argv[0] in COMMANDS:  # each parses its own arguments (fastclr <command> --help)
        import importlib

        return importlib.import_module(f"fastclr.tasks.{argv[0]}").main(argv[1:])
    parser = argparse.ArgumentParser(prog="fastclr", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(["pretrain", *COMMANDS, "data"]) + "}")
    sub.add_parser("pretrain", help="SimCLR pretraining (fastclr pretrain --help lists its options and recipes)")
    for name, what in COMMANDS.items():
        sub.add_parser(name, help=f"{what} (fastclr {name} --help)".replace("%", "%%"))
    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    from .data import check

    check.add_parser(data)
    idx = data.add_parser("index", help="build the sample index of a dataset ahead of a job (rank 0 builds it "
                          "at the start otherwise)")
    idx.add_argument("path", help="tar shards (file, folder, glob, brace range, list) or a folder of class folders")
    idx.add_argument("--kind", choices=("auto", "folder", "tar"), default="auto")
    idx.add_argument("--rebuild", action="store_true", help="build it again even if a valid one exists")
    args = parser.parse_args(argv)
    return check.main(args) if args.data_command == "check" else _index(args)


def _index(args) -> int:
    """``fastclr data index PATH``: build (or check) the cached sample index and say where it is."""
    from .data import index, sources

    kind = sources.detect_kind(args.path) if args.kind == "auto" else args.kind
    try:
        if kind == "tar":
            files, _, meta = index.tar_table(args.path, rebuild=args.rebuild)
            what = f"{meta['samples']:,} images in {len(files):,} shard{'s' * (len(files) > 1)}"
        elif kind == "folder":
            classes = sources.folder_classes(args.path)
            _, meta = index.folder_table(args.path, classes, rebuild=args.rebuild)
            what = f"{meta['samples']:,} images in {len(classes):,} class folders"
        else:
            raise ValueError(f"'{args.path}' is a file list: it is read as it is and needs no index")
        place = index.cache_file(args.path, kind)
        per_sample = os.path.getsize(place) / max(meta["samples"], 1)
        print(f"{args.path}: {what}; index {place} ({per_sample:.0f} bytes/sample on disk, memory-mapped; built in "
              f"{meta.get('build_seconds', 0):.1f} s)")
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"fastclr data index: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
