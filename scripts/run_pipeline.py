"""Run the whole EFIN chain for the target LLM and its draft, then score every artifact on test
(see efin/pipeline.py for the options).

    python scripts/run_pipeline.py name=exp1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # efin from this checkout

from efin.pipeline import main  # noqa: E402

if __name__ == "__main__":
    main()
