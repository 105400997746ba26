"""Where does the shapes-world co-occurrence hallucination come from: the visual tokens or the language model?

    python scripts/partner_readout.py --answers out/shapes_experiment/base/eval_co_occurrence_probe

For each (anchor, partner) pair, fit a logistic readout "is the partner in the image?" on the projector outputs
(the visual tokens the LLM receives) of the train split of `--train`, then ask it about the trap images of the
probe world's val split (anchor present, partner absent). If the readout mostly says "absent" where the model
itself answers "yes, there is a star", the visual tokens carry what is needed to say no and the bias comes in
after them, in the frozen LLM. The readout is trained on the same biased data, so it can learn the co-occurrence
too: it bounds from above how much of the bias the tokens force, not from below.

With --answers (an evaluate.py output folder of the same model on the probe world) the model's own caption and
POPE counts on the same traps are printed beside the readout (minigpt4/shapes/experiment/readout.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from minigpt4.eval.cooccurrence import partner_traps, world_pairs
from minigpt4.shapes.experiment.readout import readout


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-yaml", default="assets/shapes_base/model.yaml", help="a file with a model: section")
    parser.add_argument("--train", default="data/shapes_world", help="world whose train split fits the readout")
    parser.add_argument("--probe", default="data/shapes_world_probe", help="world whose val split holds the traps")
    parser.add_argument("--answers", help="evaluate.py output folder of the same model on the probe world")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    import yaml

    from minigpt4.models.from_config import build_model

    torch.manual_seed(0)
    model = build_model(yaml.safe_load(Path(args.model_yaml).read_text())["model"]).eval()
    result = readout(model, Path(args.train), Path(args.probe))
    model_counts = partner_traps(args.answers, world_pairs(args.probe)) if args.answers else {}
    print(f"{'pair':<16}{'readout val acc':>16}{'readout: present on traps':>28}"
          + (f"{'model caption names it':>25}{'model POPE yes':>16}" if model_counts else ""))
    for partner, r in result.items():
        line = f"{r['anchor'] + ' -> ' + partner:<16}{100 * r['val_accuracy']:15.1f}%" \
               f"{r['readout_present_on_traps']:>21d}/{r['traps']:<6d}"
        if partner in model_counts:
            c = model_counts[partner]
            line += f"{c['caption_named']:>18d}/{c['caption_traps']:<6d}{c['pope_yes']:>9d}/{c['pope_questions']:<6d}"
            r["model"] = c
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
