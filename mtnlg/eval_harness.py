"""The old spelling of ``python -m mtnlg.eval.harness`` (the lm-evaluation-harness adaptor moved into
``mtnlg.eval``): it says where the command went instead of failing with "No module named"."""

import sys

if __name__ == "__main__":
    print("python -m mtnlg.eval_harness: error: renamed to `python -m mtnlg.eval.harness` (same arguments)",
          file=sys.stderr)
    raise SystemExit(2)
