"""The ``fastclr`` command (also ``python -m fastclr``).

    fastclr pretrain [--config RECIPE] [section.field=value ...]   # SimCLR pretraining (fastclr pretrain --help)
    fastclr eval | linear | finetune | export SOURCE [...]         # a checkpoint or backbone after pretraining
    fastclr distill TEACHER [...]                                  # SimCLR v2's third step
    fastclr data check PATH                                        # find images training cannot use
"""
from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    return check.main(args)


if __name__ == "__main__":
    sys.exit(main())
