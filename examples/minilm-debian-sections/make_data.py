"""Build a text-classification set from Debian's package database: each installed package's
description (short and long, as its maintainer wrote it), labelled by its archive Section.

The package name is left out (`lib...-dev` would give the answer away); only the prose is
kept. Sections with fewer than `--min-count` packages are dropped and the largest (`libs`) is
capped at `--cap` so that no class is most of the data.

    python make_data.py OUT_DIR [--status /var/lib/dpkg/status] [--min-count 25] [--cap 100]
writes OUT_DIR/sections.jsonl ({"text": ..., "label": ...} per line) and prints the counts.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from pathlib import Path


def paragraphs(text: str):
    """deb822 paragraphs as dicts; continuation lines (leading space) join their field, and a
    lone ' .' is a paragraph break inside a long description."""
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and key:
                cont = line.strip()
                fields[key] += "\n" + ("" if cont == "." else cont)
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--status", default="/var/lib/dpkg/status")
    ap.add_argument("--min-count", type=int, default=25)
    ap.add_argument("--cap", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    try:
        text = Path(a.status).read_text(encoding="utf-8")
    except OSError as e:
        print(f"make_data: cannot read {a.status} ({e.strerror}); this example needs a Debian-based system",
              file=sys.stderr)
        return 2
    by_section = collections.defaultdict(list)
    for p in paragraphs(text):
        section, desc = p.get("Section"), p.get("Description")
        if section and desc and "installed" in p.get("Status", ""):
            by_section[section.split("/")[-1]].append(" ".join(desc.split()))
    rng = random.Random(a.seed)
    rows = []
    for section, texts in sorted(by_section.items()):
        if len(texts) < a.min_count:
            continue
        texts = sorted(set(texts))
        rng.shuffle(texts)
        rows += [{"text": t, "label": section} for t in texts[:a.cap]]
    if not rows:
        print(f"make_data: no Section in {a.status} has {a.min_count} packages", file=sys.stderr)
        return 2
    rng.shuffle(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sections.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    counts = collections.Counter(r["label"] for r in rows)
    print(f"{len(rows)} descriptions, {len(counts)} sections: "
          + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
