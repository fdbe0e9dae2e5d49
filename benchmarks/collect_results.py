"""Print every finished result of an experiment directory as JSON lines, one per cell,
tuning trial and pretrained stack, so that a run stopped by a time limit (as on a lent GPU
machine, which brings back only a few files) still tells what it finished.

    python benchmarks/collect_results.py DIR > results.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KINDS = (("cells", "result.json", "cell"), ("tuning", "result.json", "trial"), ("stacks", "pretrain.json", "stack"))


def collect(root: Path) -> list[dict]:
    """Each finished cell's and trial's ``result.json`` and each stack's ``pretrain.json``,
    with its kind and key, in a stable order."""
    rows = []
    for folder, name, kind in KINDS:
        for path in sorted(root.glob(f"{folder}/*/{name}")):
            try:
                rows.append({"kind": kind, "key": path.parent.name, **json.loads(path.read_text())})
            except (OSError, json.JSONDecodeError) as e:  # a file being written when the run was stopped
                print(f"collect_results: skipped {path}: {e}", file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="an experiment's output directory")
    args = ap.parse_args()
    if not args.dir.is_dir():
        print(f"collect_results: {args.dir} is not a directory (the run may not have started).", file=sys.stderr)
        return 2
    for row in collect(args.dir):
        print(json.dumps(row, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
