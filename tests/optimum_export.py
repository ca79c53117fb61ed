"""Run inside the Optimum environment: export a local GPT-2 checkpoint as Optimum does.

Usage: python optimum_export.py CHECKPOINT_DIR OUT_DIR TASK   (TASK: text-generation-with-past or text-generation)
"""

import sys

from optimum.exporters.onnx import main_export

main_export(sys.argv[1], output=sys.argv[2], task=sys.argv[3], device="cpu", do_validation=False)
