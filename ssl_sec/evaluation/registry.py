"""The evaluation commands, in one registry: `ssl-sec NAME --checkpoint PATH [options]
[key=value ...]` for each. An entry names the module (under ssl_sec/evaluation/) and the
command's one-line help. The module gives `add_arguments(parser)` (its own options),
`run(args) -> dict` (args.checkpoint, args.overrides, args.no_cache and its options), an
`OVERRIDES` help line, and optionally `show(result) -> str` (default: the result as JSON).

The CLI imports a module only when its command runs, so `ssl-sec --help` stays cheap.
Adding an evaluation is one file and one line here.
"""

EVALUATIONS = {
    "knn": ("knn_command", "weighted kNN accuracy of a checkpoint's backbone"),
    "linear": ("linear", "linear probe of a checkpoint's frozen backbone"),
    "kshot": ("kshot", "few-shot transfer: prototype, 1-NN, logistic probe"),
    "norms": ("norms", "histograms and statistics of ||h|| and ||z||"),
    "shift": ("shift", "ooDML class splits of increasing FID: kNN top-1 and Recall@1 on "
                       "their test classes"),
}
