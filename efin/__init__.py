"""efin: encoder-first training of LLM-based speech recognition, with draft models for
speculative decoding."""

import sys

from efin.environment import check_torch_pair

try:
    check_torch_pair()
except ImportError as error:
    # `python -m efin.<command>` (argv[0] is "-m" while the module is located): one line
    # naming both versions and the fix, not a traceback. Library imports get the ImportError.
    if sys.argv[:1] == ["-m"]:
        raise SystemExit(f"error: {error}") from None
    raise
