"""Import a model released in the reference implementation's format as a ``dphubert`` fairseq checkpoint.

    python -m dphubert_fairseq.import_reference REF.pth OUT.pt [--json SUMMARY.json]
    dphubert-import REF.pth OUT.pt [--json SUMMARY.json]

REF.pth is a ``{"state_dict", "config"}`` file as the paper's reference implementation writes its pruned models (HuBERT / wav2vec2
or WavLM style; ``formats/reference/reading.py``). OUT.pt is an ungated ``dphubert`` model that computes the
same hidden states, written with ``save_model``: stock fairseq loads it (once the plugin is imported),
fine-tunes it, and ``dphubert-export --format reference`` writes it back. The fine-tuning head (``aux``) and
the reference's distillation projections are left out; the summary lists what was left out or reinterpreted.
"""

import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, List, Optional

from .atomic_files import atomic_write_text
from .checkpoint_io import save_model
from .export import check_destinations, format_summary, summarize
from .formats.reference import model_from_reference


def import_reference(reference: str, out: str, json_path: Optional[str] = None) -> Dict[str, Any]:
    """Read ``reference``, write the ``dphubert`` checkpoint ``out`` (and the summary as JSON); returns the
    summary."""
    check_destinations(
        reference, [(out, "output", "the output checkpoint's"), (json_path, "--json", "the --json summary's")]
    )
    model = model_from_reference(reference)
    summary = summarize(model)
    summary["source"] = os.path.abspath(reference)
    summary["format"] = "reference"
    summary["notes"] = list(model.reference_notes)
    save_model(model, out, extra_state={"import_summary": summary})
    if json_path:
        atomic_write_text(json_path, json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dphubert-import",
        description="Import a model in the format of the paper's reference implementation (its "
        "{state_dict, config} .pth, as its released pruned models) as a dphubert fairseq checkpoint.",
    )
    parser.add_argument("reference", help="the reference-format file (.pth)")
    parser.add_argument("out", help="where to write the dphubert fairseq checkpoint (.pt)")
    parser.add_argument("--json", dest="json_path", help="also write the summary as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = import_reference(args.reference, args.out, args.json_path)
    except ValueError as err:  # every DPHuBERTError is one
        print(f"dphubert-import: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    for note in summary["notes"]:
        print(f"note: {note}")
    print(f"wrote {args.out}" + (f" and {args.json_path}" if args.json_path else ""))
    return 0


if __name__ == "__main__":  # python -m imports the package first: patches and registrations are in place
    sys.exit(main())
