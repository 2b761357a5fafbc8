"""`python -m dpnet.scaling`: measure this machine, then predict data-parallel step times.

    python -m dpnet.scaling fit [--out FILE] [--quick]
    python -m dpnet.scaling predict --model threelayer --batch-size 128 --ranks 1,2,4,...,1024 \
        [--ranks-per-node K] [--link 1gbit|10gbit|shm] [--weak] [--json] [--plot FILE.png] [--fit FILE]
"""

import argparse
import json
import sys

from ..memory import keep_freed_memory
from .measure import MODELS, default_path, load_fit, machine_key, measure_fit, save_fit
from .model import NETWORK_LINKS, predict

DEFAULT_RANKS = ",".join(str(2 ** i) for i in range(11))  # 1 .. 1024


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dpnet.scaling", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="measure this machine and save the fit")
    fit.add_argument("--out", help=f"fit file (default {default_path()})")
    fit.add_argument("--quick", action="store_true", help="a short, smaller measurement (for tests)")
    pred = sub.add_parser("predict", help="step time, images/s and efficiency from the fit")
    pred.add_argument("--model", choices=MODELS, default="threelayer")
    pred.add_argument("--batch-size", type=int, default=128, help="global batch (per rank with --weak)")
    pred.add_argument("--ranks", default=DEFAULT_RANKS, help="rank counts, comma-separated")
    pred.add_argument("--ranks-per-node", type=int, default=1, help="K ranks on each node (shared memory)")
    pred.add_argument("--link", choices=NETWORK_LINKS + ("shm",), default="1gbit",
                      help="the network between nodes; shm: every rank on one node")
    pred.add_argument("--weak", action="store_true", help="weak scaling: --batch-size images per rank")
    pred.add_argument("--json", action="store_true", help="print dpnet's choice of reducer per rank count as JSON")
    pred.add_argument("--plot", help="draw the curves into this PNG (needs matplotlib)")
    pred.add_argument("--fit", help=f"fit file (default {default_path()})")
    args = parser.parse_args(argv)
    if args.command == "predict":
        try:
            args.ranks = [int(n) for n in args.ranks.split(",")]
        except ValueError:
            parser.error(f"--ranks must be integers separated by commas, got {args.ranks!r}")
        if min(args.ranks) < 1 or args.batch_size < 1 or args.ranks_per_node < 1:
            parser.error("--ranks, --batch-size and --ranks-per-node must be positive")
    return args


def pick_fit(path):
    """This machine's fit from `path`; a file holding one other machine's fit gives that one."""
    fit = load_fit(path)
    if fit is not None:
        return fit
    try:
        with open(path) as fh:
            fits = json.load(fh)
    except (OSError, ValueError):
        raise SystemExit(f"no fit at {path}: run `python -m dpnet.scaling fit` first")
    if len(fits) == 1:
        key, fit = next(iter(fits.items()))
        print(f"predict: {path} has no fit of this machine ({machine_key()}); using {key}'s", file=sys.stderr)
        return fit
    raise SystemExit(f"{path} has no fit of this machine ({machine_key()}); it has: {', '.join(fits)}")


def check_links(fit, link):
    """The fit must hold what predicting over `link` needs."""
    needed = ["shm", "mpi-local"] + ([] if link == "shm" else [link])
    missing = [name for name in needed if name not in fit["links"]]
    if missing:
        raise SystemExit(f"the fit has no measurement of {', '.join(missing)} (its links: {', '.join(fit['links'])})")


def print_table(rows, args):
    mode = f"weak, {args.batch_size} per rank" if args.weak else f"strong, global batch {args.batch_size}"
    where = "one node" if args.link == "shm" else f"{args.ranks_per_node} rank(s) per node, {args.link} links"
    print(f"{args.model}, {mode}, {where}\nper reducer: step ms, images/s, efficiency; * dpnet's choice; "
          f"+o: overlapped with backward")
    variants = [(r["reducer"], r["overlap"]) for r in rows if r["ranks"] == rows[0]["ranks"] and not r["auto"]]
    print(f"{'ranks':>6s}" + "".join(f"{r + (' +o' if o else ''):>24s}" for r, o in variants))
    for ranks in args.ranks:
        mine = [r for r in rows if r["ranks"] == ranks]
        chosen = next(r for r in mine if r["auto"])
        cells = []
        for r in (r for r in mine if not r["auto"]):
            star = "*" if (r["reducer"], r["overlap"]) == (chosen["reducer"], chosen["overlap"]) else " "
            cells.append(f"{1e3 * r['step_s']:.1f} {r['images_per_s']:.0f} {r['efficiency']:.0%}{star}")
        print(f"{ranks:6d}" + "".join(f"{c:>24s}" for c in cells))


def plot(rows, args, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('--plot needs matplotlib: pip install "dpnet[plot]"')
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    variants = sorted({(r["reducer"], r["overlap"]) for r in rows if not r["auto"]})
    colours = {reducer: f"C{i}" for i, reducer in enumerate(sorted({v[0] for v in variants}))}
    for reducer, overlap in variants:
        mine = [r for r in rows if (r["reducer"], r["overlap"], r["auto"]) == (reducer, overlap, False)]
        style = dict(linestyle="--" if overlap else "-", color=colours[reducer],
                     label=reducer + (" + overlap" if overlap else ""))
        left.plot([r["ranks"] for r in mine], [r["images_per_s"] for r in mine], **style)
        right.plot([r["ranks"] for r in mine], [r["efficiency"] for r in mine], **style)
    ranks = sorted({r["ranks"] for r in rows})
    base = rows[0]["images_per_s"] / rows[0]["efficiency"] / rows[0]["ranks"]
    left.plot(ranks, [base * n for n in ranks], ":", color="gray", label="ideal")
    for ax, name in ((left, "images/s"), (right, "efficiency")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.legend(fontsize=7)
    mode = f"weak, {args.batch_size}/rank" if args.weak else f"strong, batch {args.batch_size}"
    where = "one node" if args.link == "shm" else f"{args.ranks_per_node}/node, {args.link}"
    fig.suptitle(f"{args.model}: {mode}, {where} (predicted)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "fit":
        keep_freed_memory()  # the steps as python -m dpnet.train runs them
        fit = measure_fit(quick=args.quick)
        print(f"saved to {save_fit(fit, args.out)}")
        return 0
    fit = pick_fit(args.fit or default_path())
    check_links(fit, args.link)
    per_node = max(args.ranks) if args.link == "shm" else args.ranks_per_node
    link = NETWORK_LINKS[0] if args.link == "shm" else args.link
    rows = predict(fit, args.model, args.batch_size, args.ranks, per_node, link, args.weak)
    if args.json:
        keys = ("ranks", "reducer", "images_per_rank", "step_s", "images_per_s", "efficiency", "comm_s",
                "compute_s", "optimizer_s")
        print(json.dumps([{k: r[k] for k in keys} for r in rows if r["auto"]], indent=1))
    else:
        print_table(rows, args)
    if args.plot:
        plot(rows, args, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
