"""`python -m dpnet.data`: fetch CIFAR-10 and convert it to one HDF5 file.

    python -m dpnet.data download [--dir D] [--force]   # -> D/cifar-10-batches-py
    python -m dpnet.data prepare --src FOLDER --out cifar10.h5
"""

import argparse
import os
import sys

from .cifar import DataError, load_cifar10
from .download import FOLDER, MD5, URL, DownloadError, default_dir, download_cifar10
from .hdf5 import write_hdf5

PROG = "python -m dpnet.data"


def _summary(data):
    return f"{len(data['x_train'])} train / {len(data['x_test'])} test images"


def download(args):
    target = download_cifar10(args.dir, url=args.url, md5=args.md5, force=args.force)
    data = load_cifar10(target)
    print(f"CIFAR-10 ready in {target} ({_summary(data)})")
    if os.path.abspath(target) == os.path.abspath(os.path.join(default_dir(), FOLDER)):
        print("python -m dpnet.train finds it there by itself")
    else:
        print(f"train on it with: python -m dpnet.train --data {target}")


def prepare(args):
    src = args.src or os.path.join(default_dir(), FOLDER)
    if os.path.isdir(os.path.join(src, FOLDER)):  # the download folder itself was given
        src = os.path.join(src, FOLDER)
    if os.path.exists(args.out) and not args.force:
        raise DataError(f"{args.out} already exists; pass --force to replace it")
    data = load_cifar10(src)
    write_hdf5(data, args.out)
    print(f"wrote {args.out} ({_summary(data)}, {os.path.getsize(args.out) / 2**20:.1f} MiB) from {src}")
    print(f"train on it with: python -m dpnet.train --data {args.out}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch and unpack CIFAR-10 (python format), MD5-checked")
    d.add_argument("--dir", help=f"folder to put {FOLDER} in (default: {default_dir()}, where "
                                 "dpnet.train looks)")
    d.add_argument("--force", action="store_true", help="replace a valid existing copy")
    d.add_argument("--url", default=URL, help="archive URL, or a local path to an archive downloaded "
                                              "elsewhere (default: %(default)s)")
    d.add_argument("--md5", default=MD5, help="expected MD5 of the archive, empty to skip the check (default: %(default)s)")
    d.set_defaults(run=download)
    p = sub.add_parser("prepare", help="convert cifar-10-batches-py into one checksummed HDF5 file")
    p.add_argument("--src", help=f"the {FOLDER} folder, or the folder holding it (default: the "
                                 "download location)")
    p.add_argument("--out", required=True, help="HDF5 file to write, e.g. cifar10.h5")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(run=prepare)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        args.run(args)
        return 0
    except (DownloadError, DataError, OSError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted, nothing was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
