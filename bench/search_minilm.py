"""Mixed-precision strategy search on all-MiniLM-L6-v2: ``bench/search.py --model minilm`` (kept for
``qgraph bench search`` and old command lines; see bench/search.py for what it measures).

    python bench/search_minilm.py [--quick] [--trials 50] [--workers 2] [--json out.json] [--out DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search import main

if __name__ == "__main__":
    sys.exit(main(["--model", "minilm", *sys.argv[1:]]))
