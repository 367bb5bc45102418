"""`ssl-sec` command line. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError

EPILOG = """examples:
  ssl-sec pretrain recipes/quickstart.yaml
  ssl-sec pretrain recipes/cifar10/simclr.yaml optim.lr=0.6 loss.sec_eta=0.1 name=sec01
  ssl-sec pretrain recipes/cifar10/simclr.yaml --resume
  ssl-sec knn --checkpoint runs/quickstart/last.pt eval.knn_k=20
  ssl-sec config recipes/cifar10/simclr_sec.yaml loss.sec_ramp=constant
data: data.root in the recipe, else $SSL_SEC_DATA, else ./data (downloaded when missing)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl-sec", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = sub.add_parser("pretrain", help="self-supervised pretraining from a recipe")
    pre.add_argument("recipe", help="recipe YAML, e.g. recipes/cifar10/simclr.yaml")
    pre.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted overrides, e.g. optim.lr=0.3 loss.sec_eta=0.1")
    pre.add_argument("--resume", action="store_true",
                     help="continue the run in out_dir/name from its last.pt")
    pre.add_argument("--max-epochs", type=int, default=None, metavar="N",
                     help="train at most N epochs in this invocation (split long runs)")

    knn = sub.add_parser("knn", help="weighted kNN accuracy of a checkpoint's backbone")
    knn.add_argument("--checkpoint", required=True, help="a .pt written by ssl-sec pretrain")
    knn.add_argument("overrides", nargs="*", metavar="key=value",
                     help="overrides of the checkpoint's config, e.g. eval.knn_k=20 data.root=...")

    cfg = sub.add_parser("config", help="print the resolved config of a recipe and overrides")
    cfg.add_argument("recipe")
    cfg.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            from .config import load_recipe
            from .engine import train

            if args.max_epochs is not None and args.max_epochs < 1:
                raise UserError(f"--max-epochs {args.max_epochs}: must be >= 1")
            result = train(load_recipe(args.recipe, args.overrides), resume=args.resume,
                           max_epochs=args.max_epochs)
            print(json.dumps(result), flush=True)
        elif args.command == "knn":
            from .evaluation.commands import knn_command

            print(json.dumps(knn_command(Path(args.checkpoint), args.overrides)), flush=True)
        elif args.command == "config":
            from .config import load_recipe, to_yaml

            print(to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    except UserError as err:
        print(f"ssl-sec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssl-sec: interrupted; the last completed epoch is in last.pt (use --resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
