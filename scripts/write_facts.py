"""Write the knowledge task ``facts-N`` (``smt.eval.knowledge``) as training and held-out files a fit reads.

    python scripts/write_facts.py --facts 80 --out runs/new-facts/data
    smt fit --config configs/smollm2-new-facts.yaml

``train.json`` holds every fact in three question wordings; ``val.json`` and ``test.json`` ask every fact in a
wording never trained on (the validation loss of the fit is the answers' NLL there). Records are LLM-Adapters
fields (``instruction``/``output``/``answer``), trained with the ``gsm8k`` template (``Question: …\\nAnswer:``).
"""

from __future__ import annotations

import argparse
import sys

from smt.eval.knowledge import write_facts


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, write the three files, print where they went."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=80, help="number of facts, a multiple of 4 (default %(default)s)")
    parser.add_argument("--out", default="runs/new-facts/data", help="folder for train/val/test.json (%(default)s)")
    args = parser.parse_args(argv)
    try:
        written = write_facts(args.facts, args.out)
    except ValueError as err:
        print(f"write_facts: error: --facts: {err}", file=sys.stderr)
        return 2
    print("write_facts: " + ", ".join(f"{split} {path}" for split, path in written.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
