#!/usr/bin/env python3
"""Golden vectors from real hivemind 1.1.12, for apiary-wire's tests.

Run in the cached hivemind venv (`cargo xtask golden` does it):

    python golden.py --out crates/wire/tests/golden      # regenerate every committed golden file
    python golden.py <part> ARGS...                      # a part's own command line (large cases made at
                                                         # test time, checks of Apiary-made bytes)

Each part lives beside this file as golden_<part>.py and has generate(out_dir: Path) and cli(argv).
Everything is seeded: running it twice writes the same files, except where hivemind itself is
non-deterministic (RSA-PSS salts, random ids), which those parts record as such.
"""
import argparse
import importlib
import os
import sys
from pathlib import Path

PARTS = ["proto", "msgpack", "records", "tensors"]

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HIVEMIND_QUIET", "1")


def main():
    if len(sys.argv) > 1 and sys.argv[1] in PARTS:
        part = importlib.import_module(f"golden_{sys.argv[1]}")
        part.cli(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--only", nargs="*", choices=PARTS, default=PARTS)
    args = p.parse_args()
    for name in args.only:
        part = importlib.import_module(f"golden_{name}")
        (args.out / name).mkdir(parents=True, exist_ok=True)
        part.generate(args.out / name)
        print(f"golden: wrote {args.out / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
