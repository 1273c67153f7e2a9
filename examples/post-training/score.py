"""A stand-in scoring command for the rejection-sampling recipe: reads `gentool sample --json` lines on stdin and
writes them back with a "score" (here the sample's mean log-probability per token under the model that drew it; empty ones last).
Replace it with any program that does the same: a reward model, a test suite, a rule checker."""

import json
import sys

for line in sys.stdin:
    if line.strip():
        row = json.loads(line)
        n = row.get("tokens") or 0
        n = n if isinstance(n, int) else len(n)
        row["score"] = row.get("sum_logprob", 0.0) / n if n else -1e9  # an empty completion is never the best
        print(json.dumps(row))
