"""`ssl-sec` command line. User errors print one line and exit with code 2."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import traceback

from .cpu_memory import keep_freed_memory
from .errors import UserError
from .evaluation.registry import EVALUATIONS
from .preemption import PREEMPTED_EXIT, Preempted

EPILOG = """examples:
  ssl-sec pretrain recipes/quickstart.yaml
  ssl-sec pretrain recipes/cifar10/simclr.yaml optim.lr=0.6 loss.sec.eta=0.1 name=sec01
  ssl-sec pretrain recipes/cifar10/simclr.yaml --resume
  ssl-sec pretrain recipes/cifar10/simclr.yaml --auto-resume ckpt_every_minutes=5   # cluster jobs
  ssl-sec pretrain recipes/cifar10/simclr.yaml --resume-from runs/cifar10_simclr/prev.pt
  ssl-sec knn --checkpoint runs/quickstart/last.pt eval.knn_k=20
  ssl-sec linear --checkpoint runs/quickstart/last.pt --recipe recipes/linear/cifar.yaml
  ssl-sec linear --checkpoint runs/quickstart/last.pt mode=features optim.epochs=30
  ssl-sec kshot --checkpoint runs/c100_src/last.pt --shots 1 5 --target-classes 50-99
  ssl-sec norms --checkpoint runs/quickstart/last.pt
  ssl-sec shift --checkpoint runs/quickstart/last.pt --splits 8 --pca-dim 32
  ssl-sec export --checkpoint runs/quickstart/last.pt --format torchvision
  ssl-sec config recipes/cifar10/simclr_sec.yaml loss.sec.ramp=constant
data: data.root in the recipe, else $SSL_SEC_DATA, else ./data (downloaded when missing).
exit codes: 0 done; 2 a user error (one line on stderr); 75 stopped by SIGTERM, SIGUSR1 or
SIGINT after writing a checkpoint (continue with --resume); 130 a second Ctrl-C."""


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes are one line too (argparse would add its usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _evaluation(module: str):
    import importlib

    return importlib.import_module(f".evaluation.{module}", __package__)


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; `command` (the first argument) gets its evaluation's own options."""
    p = _Parser(prog="ssl-sec", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pre = sub.add_parser("pretrain", help="self-supervised pretraining from a recipe")
    pre.add_argument("recipe", help="recipe YAML, e.g. recipes/cifar10/simclr.yaml")
    pre.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted overrides, e.g. optim.lr=0.3 loss.sec.eta=0.1")
    start = pre.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in out_dir/name from its last.pt")
    start.add_argument("--auto-resume", action="store_true",
                       help="continue the run when it has a checkpoint, else start it "
                            "(for job scripts that are requeued)")
    start.add_argument("--resume-from", metavar="CKPT", default=None,
                       help="continue the run in out_dir/name from this checkpoint, e.g. "
                            "runs/NAME/prev.pt when last.pt is damaged")
    pre.add_argument("--max-epochs", type=int, default=None, metavar="N",
                     help="train at most N epochs in this invocation (split long runs)")

    for name, (module, text) in EVALUATIONS.items():
        ev = sub.add_parser(name, help=text)
        ev.add_argument("--checkpoint", required=True, help="a .pt written by ssl-sec pretrain")
        ev.add_argument("--no-cache", action="store_true",
                        help="do not read or write <checkpoint dir>/features/")
        if name == command:  # the options of the command that runs (an import of torch)
            evaluation = _evaluation(module)
            evaluation.add_arguments(ev)
            ev.add_argument("overrides", nargs="*", metavar="key=value",
                            help=evaluation.OVERRIDES)
        else:
            ev.add_argument("overrides", nargs="*", metavar="key=value")

    exp = sub.add_parser("export", help="write a checkpoint's backbone weights for torchvision "
                                        "or timm (safetensors by default)")
    exp.add_argument("--checkpoint", help="a .pt written by ssl-sec pretrain")
    exp.add_argument("--format", default=None, choices=("safetensors", "torchvision", "timm"),
                     help="safetensors: no pickle, the source library's key names, recipe, "
                          "provenance and a sha256 digest in its metadata; torchvision: a "
                          "torch state_dict .pt, sealed; timm: safetensors under timm's key "
                          "names (default: what --out's extension names, else safetensors)")
    exp.add_argument("--out", default=None, help="output file (default: beside the checkpoint)")
    exp.add_argument("--force", action="store_true", help="replace an existing output file")
    exp.add_argument("--verify", metavar="FILE", default=None,
                     help="check a file written by 'ssl-sec export' against its digest "
                          "instead of exporting")

    cfg = sub.add_parser("config", help="print the resolved config of a recipe and overrides, "
                                        "or a run's config history (--run DIR)")
    cfg.add_argument("recipe", nargs="?")
    cfg.add_argument("overrides", nargs="*", metavar="key=value")
    cfg.add_argument("--run", metavar="DIR", default=None,
                     help="a run directory: print its config.yaml's changes on resume "
                          "(changes.jsonl), each with its step, and the config in effect now")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(argv[0] if argv else None)
    try:
        args, extra = parser.parse_known_args(argv)
        # key=value overrides may also follow the options (`--resume optim.lr=0.1`).
        if extra and (not hasattr(args, "overrides") or any(x.startswith("-") for x in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help, or a command-line mistake (already printed)
        return done.code if isinstance(done.code, int) else 2
    if extra:
        args.overrides = [*args.overrides, *extra]
    # Before the first tensor: glibc keeps freed blocks for the next step (cpu_memory.py).
    keep_freed_memory()
    try:
        if args.command == "pretrain":
            from .engine import train
            from .recipe import load_recipe

            if args.max_epochs is not None and args.max_epochs < 1:
                raise UserError(f"--max-epochs {args.max_epochs}: must be >= 1")
            resume = (args.resume_from or ("auto" if args.auto_resume else args.resume))
            result = train(load_recipe(args.recipe, args.overrides), resume=resume,
                           max_epochs=args.max_epochs)
            from .distributed import is_main

            if is_main():
                print(json.dumps(result), flush=True)
        elif args.command in EVALUATIONS:
            evaluation = _evaluation(EVALUATIONS[args.command][0])
            result = evaluation.run(args)
            show = getattr(evaluation, "show", json.dumps)
            print(show(result), flush=True)
        elif args.command == "export":
            from .pretrained import export_backbone, verify_export

            if args.verify is not None:
                if args.checkpoint or args.out or args.format or args.force:
                    raise UserError("export --verify FILE takes no other option; verify and "
                                    "export in two commands")
                print(json.dumps(verify_export(args.verify)), flush=True)
            elif args.checkpoint is None:
                raise UserError("export: pass --checkpoint PATH (a .pt written by 'ssl-sec "
                                "pretrain'), or --verify FILE to check an export")
            else:
                print(json.dumps(export_backbone(args.checkpoint, args.format, args.out,
                                                 args.force)), flush=True)
        elif args.command == "config":
            from .config import to_yaml
            from .provenance import history
            from .recipe import load_recipe

            if (args.run is None) == (args.recipe is None):
                raise UserError("config: pass a recipe (and overrides), or --run DIR for a "
                                "run's history, not both")
            if args.run is not None:
                if args.overrides:
                    raise UserError("config --run DIR takes no overrides")
                print(history(args.run), end="")
            else:
                print(to_yaml(load_recipe(args.recipe, args.overrides)), end="")
    except UserError as err:
        _keep(err)
        print(f"ssl-sec: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Preempted as stop:
        _keep(stop)
        print(f"ssl-sec: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT
    except KeyboardInterrupt as stop:
        _keep(stop)
        print("ssl-sec: interrupted; the run's last checkpoint is its last.pt (continue with "
              "--resume)", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, or the device failed (a CUDA error, a lost process)
        _keep(err)
        if type(err).__name__ == "OutOfMemoryError":  # torch's, outside `train` (which says more)
            print(f"ssl-sec: error: out of memory ({_one_line(err).split('. ')[0]}); lower "
                  "the command's batch size (optim.batch_size of the recipe) or free the "
                  "device", file=sys.stderr)
            return 2
        traceback.print_exception(err)
        print(f"ssl-sec: error: the command failed with {type(err).__name__} (traceback "
              "above); nothing was saved after the failure", file=sys.stderr)
        return 1
    return 0


# The exception that ended the command, held until the process exits. Releasing it would
# tear down the frames that hold a DataLoader iterator, and that teardown joins worker
# processes and the pin-memory thread without a time limit: after a CUDA error such a join
# can wait forever (a run on a cluster would then burn its allocation). `run` exits without
# it.
_failure: list[BaseException] = []


def _keep(err: BaseException) -> None:
    _failure[:] = [err]


def run(argv: list[str] | None = None) -> None:
    """The `ssl-sec` command: `main`, then an exit that cannot hang. After a failure the
    DataLoader workers are killed (they ignore SIGTERM, see preemption.py) and the process
    ends at once, skipping the interpreter's teardown (every file that matters is already
    written and closed: checkpoints are fsynced, the logs closed in `train`'s finally)."""
    code = main(argv)
    if code == 0:
        sys.exit(0)
    for child in multiprocessing.active_children():
        child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _one_line(err: Exception) -> str:
    """The message on one line, cut to a readable length."""
    text = " ".join(str(err).split())
    return text if len(text) <= 600 else text[:597] + "..."


if __name__ == "__main__":
    run()
