"""Run inside a runtime-only environment: greedy tokens of one variant, as JSON on stdout.

Usage: python runtime_greedy.py PACKAGE VARIANT PROMPTS_JSON NEW_TOKENS (VARIANT "auto" lets load() choose).
Errors are one line on stderr (the library's own message) and exit 2.
"""

import json
import sys


def main() -> None:
    import onnxruntime

    import gpt2deploy
    from gpt2deploy.errors import Gpt2DeployError

    package, variant, prompts, new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    try:
        model = gpt2deploy.load(package, variant=None if variant == "auto" else variant, device="cpu")
        result = model.generate_ids(prompts, max_new_tokens=new, do_sample=False, ignore_eos=True)
    except Gpt2DeployError as e:
        print(str(e), file=sys.stderr)
        sys.exit(2)
    heavy = sorted(m for m in ("torch", "transformers", "onnx") if m in sys.modules)
    out = {
        "variant": model.variant,
        "reason": model.selection_reason,
        "tokens": [list(map(int, t)) for t in result.tokens],
        "onnxruntime": onnxruntime.__version__,
        "heavy_imports": heavy,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
