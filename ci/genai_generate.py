"""One timed generation in onnxruntime-genai's generator; run by ci/genai_bench.py with the builder's venv.

    python ci/genai_generate.py MODEL_FOLDER PROMPT_JSON NEW_TOKENS

PROMPT_JSON holds the prompt's token ids (tokenized once by the parent, so every variant reads the same
tokens). Greedy decoding; prints one JSON line: prefill seconds (append_tokens of the prompt), decode
tokens/s (generate_next_token, the first new token included), the tokens, and this process's peak RSS.
Only onnxruntime-genai and the standard library are imported: this runs in the builder's own environment.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    import onnxruntime_genai as og

    folder, prompt_file, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompt = json.loads(Path(prompt_file).read_text())
    model = og.Model(folder)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    prefill = time.perf_counter() - start
    count = 0
    start = time.perf_counter()
    while not generator.is_done() and count < new_tokens:
        generator.generate_next_token()
        count += 1
    decode = time.perf_counter() - start
    tokens = [int(t) for t in generator.get_sequence(0)][len(prompt):]
    print(json.dumps({"prefill_s": prefill, "decode_tps": count / decode, "tokens": tokens,
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
