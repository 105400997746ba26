"""Evaluation and training runs that cannot go as asked (issue 22): a batch larger than the training data, a device
that is not one or is not there, a bootstrap whose arrays cannot fit, CHAIR lists that name no COCO image or one
image twice, a full disk under the answers or the lock file, and decodings that cannot be run as asked (VCD with
OPERA, OPERA with other beams or 1 beam; issue 25). One line and exit 2, never a traceback; a mistake in the config
is refused before any model is built or output folder made."""
from __future__ import annotations

import contextlib
import errno
import json
import os
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import torch
from _hostile import GOOD_RGB, Case, Env, Exits2, Holds, Raises, no_model_build, write_file

from hostile.configs import train_main
from minigpt4.common.output_dir import OutputDirError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_gpu():
    """The machine as one without a GPU looks to torch (the rows hold on a GPU machine too)."""
    return patch.object(torch.cuda, "is_available", lambda: False)


def _fail(*_: Any, **__: Any) -> None:
    raise ENOSPC


def _eval_folders(env: Env) -> None:
    for folder in ("val2014", "annotations", "pope"):
        (env.tmp / folder).mkdir(exist_ok=True)


def evaluate_refused(options: list[str], env: Env, files: dict[str, str] | None = None) -> tuple[int, str]:
    """evaluate.py with `options` (and `files` written into the case's folder first, "{tmp}" its path) on a model
    that must not be built; the output folder must not be made either."""
    import evaluate

    _eval_folders(env)
    for name, text in (files or {}).items():
        write_file(env, name, text)
    out = env.tmp / "out"
    base = [f"model.tokenizer_path={env.shared.tokenizer_dir}", f"eval.image_dir={env.tmp}/val2014",
            f"eval.chair.coco_annotations={env.tmp}/annotations", f"eval.output_dir={out}", "eval.device=cpu"]
    cfg = write_file(env, "recipe.yaml", "eval: {}\n")
    with no_model_build():
        rc = evaluate.main(["--cfg-path", str(cfg), "--options", *base,
                            *(option.replace("{tmp}", str(env.tmp)) for option in options)])
    assert not out.exists()
    return rc, ""


def evaluate_without_gpu(option: str, env: Env) -> tuple[int, str]:
    with _no_gpu():
        return evaluate_refused([option], env)


def train_without_gpu(option: str, env: Env) -> tuple[int, str]:
    with _no_gpu():
        return train_main(option, env)


def chair_list(name: str, text: str, env: Env) -> tuple[int, str]:
    return evaluate_refused(["eval.tasks=[chair]", f"eval.chair.images={{tmp}}/{name}"], env, {name: text})


def chair_list_accepted_forms(env: Env) -> bool:
    """Every accepted form names its image: bare ids, zero-padded and val2014 names, any case of the suffix."""
    from minigpt4.eval.benchmark_runs import chair_items
    from minigpt4.eval.protocol_runs import resolve_run
    from minigpt4.eval.settings import ChairSettings, EvalSettings

    _eval_folders(env)
    names = ["COCO_val2014_000000000001.jpg", "000000000002.jpg", "000000000003.JPEG", "000000000004.png"]
    for name in names:
        (env.tmp / "val2014" / name).write_bytes(GOOD_RGB)
    path = write_file(env, "images.txt", "1\n000000000002.jpg\n000000000003.JPEG\n000000000004.png\n1\n")  # 1 again
    settings = EvalSettings(image_dir=str(env.tmp / "val2014"), chair=ChairSettings(images=str(path)))
    items = chair_items(settings, resolve_run(settings, "chair", "vicuna_v0"))
    assert [(it.key, Path(it.image).name) for it in items] == [("1", names[0]), ("2", names[1]), ("3", names[2]),
                                                                ("4", names[3])]
    return True


def sampled_folder_with(file_name: str, env: Env) -> tuple[int, str]:
    _eval_folders(env)
    (env.tmp / "val2014" / "COCO_val2014_000000000001.jpg").write_bytes(GOOD_RGB)
    (env.tmp / "val2014" / file_name).write_bytes(GOOD_RGB)
    return evaluate_refused(["eval.tasks=[chair]", "eval.chair.num_images=1"], env)


# ------------------------------------------------------------------------------------------- full disks


def _tiny_eval_config(env: Env) -> Path:
    """A two-image, four-question POPE evaluation of a tiny random model, as a YAML file."""
    import yaml

    from minigpt4.common.tiny_models import tiny_model_config

    _eval_folders(env)
    for i in (1, 2):
        (env.tmp / "val2014" / f"COCO_val2014_{i:012d}.jpg").write_bytes(GOOD_RGB)
    rows = [{"question_id": q, "image": f"COCO_val2014_{1 + q % 2:012d}.jpg", "text": "Is there a dog?",
             "label": "yes" if q % 2 else "no"} for q in range(4)]
    (env.tmp / "pope" / "random.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"model": tiny_model_config(env.shared.tokenizer_dir, "linear"),
           "eval": {"tasks": ["pope"], "output_dir": str(env.tmp / "out"), "image_dir": str(env.tmp / "val2014"),
                    "device": "cpu", "batch_size": 2, "bootstrap": 0,
                    "vis_processor": {"name": "blip2_image_eval", "image_size": 28},
                    "pope": {"dir": str(env.tmp / "pope"), "splits": ["random"], "max_new_tokens": 2}}}
    return write_file(env, "eval.yaml", yaml.safe_dump(cfg))


def evaluate_disk_full_at_answers(env: Env) -> tuple[int, str]:
    import evaluate
    from minigpt4.eval import generate

    cfg = _tiny_eval_config(env)
    bar = generate.tqdm  # the one line on stderr must be the error (a progress bar would come first)
    with patch.object(generate, "append_answers", _fail), patch.object(generate, "free_bytes", lambda path: 100), \
            patch.object(generate, "tqdm", lambda **kwargs: bar(**{**kwargs, "disable": True})):
        rc = evaluate.main(["--cfg-path", str(cfg)])
    assert not (env.tmp / "out" / "metrics.json").exists()
    return rc, ""


class _CountingModel:
    """Just enough of a model for run_pope: answers "yes" and counts what it was asked."""

    end_sym = "###"
    tokenizer = staticmethod(lambda text, add_special_tokens=False: SimpleNamespace(input_ids=text.split()))

    def __init__(self):
        self.asked = 0

    def generate(self, prompts, images, **_):
        self.asked += len(prompts)
        return ["Yes."] * len(prompts)


def _pope_settings(env: Env):
    from minigpt4.eval.settings import EvalSettings, PopeSettings

    _tiny_eval_config(env)
    return EvalSettings(image_dir=str(env.tmp / "val2014"), batch_size=1, bootstrap=0,
                        vis_processor={"name": "blip2_image_eval", "image_size": 16},
                        pope=PopeSettings(dir=str(env.tmp / "pope"), splits=["random"]))


def answers_disk_full(env: Env) -> None:
    """The disk fills at the third batch's append: raised as one OutputDirError naming the file and the bytes."""
    from minigpt4.eval import generate
    from minigpt4.eval.plan import plan_tasks
    from minigpt4.eval.task_runs import run_pope

    real, calls = generate.append_answers, []

    def fill_at_third(handle, data):
        calls.append(len(data))
        if len(calls) == 3:
            raise ENOSPC
        real(handle, data)

    with patch.object(generate, "append_answers", fill_at_third), patch.object(generate, "free_bytes", lambda path: 10):
        run_pope(_CountingModel(), plan_tasks(_pope_settings(env)), str(env.tmp / "out"))


def resume_after_full_disk(env: Env) -> bool:
    """After the full disk of answers_disk_full, the same run again asks only the two unanswered questions and
    the answers file holds each of the four once."""
    from minigpt4.eval.plan import plan_tasks
    from minigpt4.eval.task_runs import run_pope

    with contextlib.suppress(OutputDirError):
        answers_disk_full(env)
    model = _CountingModel()
    result = run_pope(model, plan_tasks(_pope_settings(env)), str(env.tmp / "out"))
    answers = (env.tmp / "out" / "pope_random_answers.jsonl").read_text().splitlines()
    keys = [json.loads(line)["key"] for line in answers]
    assert model.asked == 2 and sorted(keys) == ["0", "1", "2", "3"] and result["n"] == 4, (model.asked, keys)
    return True


def evaluate_lock_fails(where: str, env: Env) -> tuple[int, str]:
    """The disk is full when the lock file is created (`where` = "open") or when its line is written ("pwrite")."""
    import evaluate
    from minigpt4.common import output_dir

    real_open = os.open

    def open_fails_for_lock(path, flags, *rest):
        if str(path).endswith("/.lock"):
            raise ENOSPC
        return real_open(path, flags, *rest)

    failing_write = (patch.object(os, "open", open_fails_for_lock) if where == "open"
                     else patch.object(os, "pwrite", _fail))
    _eval_folders(env)
    options = [f"model.tokenizer_path={env.shared.tokenizer_dir}", f"eval.image_dir={env.tmp}/val2014",
               "eval.tasks=[pope]", f"eval.output_dir={env.tmp}/out", "eval.device=cpu"]
    with failing_write, patch.object(output_dir, "free_bytes", lambda path: 0), no_model_build():
        rc = evaluate.main(["--cfg-path", str(write_file(env, "recipe.yaml", "eval: {}\n")), "--options", *options])
    assert not (env.tmp / "out" / ".lock").exists()
    return rc, ""


SAME_IMAGE_JSON = json.dumps([{"image_id": 3001}, {"image_id": 3002}, {"image_id": "COCO_val2014_000000003001.jpg"}])
FORMS = "is not a COCO image id (3001) or an image file name ending in one (000000003001.jpg"

EVALUATION_CASES = [
    Case("config/train/run.batch_size-larger-than-the-dataset", partial(train_main, "run.batch_size=1000"),
         Exits2(("run.batch_size = 1000: the training dataset has", "samples, fewer than run.batch_size × "
                 "run.grad_accum_steps (2) × 1 rank(s) = 2000", "lower run.batch_size"), prefix="error: ")),
    Case("config/train/run.device=cuda-without-a-gpu", partial(train_without_gpu, "run.device=cuda"),
         Exits2(("run.device = 'cuda' but torch sees no GPU on this machine; use cpu",))),
    Case("config/evaluate/eval.decoding=vcd+opera", partial(evaluate_refused, ["eval.decoding=vcd+opera"]),
         Exits2(("eval.decoding = 'vcd+opera': VCD (eval.vcd) and OPERA (eval.opera) cannot decode together",))),
    Case("config/evaluate/opera-with-another-eval.num_beams",
         partial(evaluate_refused, ["eval.decoding=opera", "eval.num_beams=3"]),
         Exits2(("eval.num_beams = 3 but eval.opera.num_beams = 5: under eval.decoding = opera the beams are "
                 "eval.opera.num_beams",))),
    Case("config/evaluate/eval.opera.num_beams=1", partial(evaluate_refused, ["eval.decoding=opera",
                                                                               "eval.opera.num_beams=1"]),
         Exits2(("eval.opera.num_beams = 1; expected an integer >= 2 (OPERA is a beam search",))),
    Case("config/evaluate/eval.device=banana", partial(evaluate_refused, ["eval.device=banana"]),
         Exits2(("eval.device = 'banana'; expected one of cuda, cpu, auto",))),
    Case("config/evaluate/eval.device=cuda-without-a-gpu", partial(evaluate_without_gpu, "eval.device=cuda"),
         Exits2(("eval.device = 'cuda' but torch sees no GPU on this machine",))),
    Case("config/evaluate/eval.bootstrap-too-large-to-fit",
         partial(evaluate_refused, ["eval.tasks=[pope]", "eval.bootstrap=100000000"]),
         Exits2(("eval.bootstrap = 100000000: resampling the 500 images of POPE that many times needs arrays of "
                 "about 745.1 GiB; expected an integer from 0 to 536870 for this run (arrays up to 4.0 GiB",))),
    Case("config/evaluate/chair-list/same-image-twice/text", partial(chair_list, "images.txt", "3001\n3002\n"
                                                                      "000000003001.jpg\n"),
         Exits2(("images.txt: '3001' (line 1) and '000000003001.jpg' (line 3) name the same image (COCO id 3001); "
                 "keep one of them",))),
    Case("config/evaluate/chair-list/same-image-twice/json", partial(chair_list, "images.json", SAME_IMAGE_JSON),
         Exits2(("images.json: '3001' ([0]) and 'COCO_val2014_000000003001.jpg' ([2]) name the same image",))),
    Case("config/evaluate/chair-list/webp", partial(chair_list, "images.txt", "3001\n000000003002.webp\n"),
         Exits2(("eval.chair.images: ", "images.txt, line 2: '000000003002.webp' " + FORMS,))),
    Case("config/evaluate/chair-list/two-ids-on-a-line", partial(chair_list, "images.txt", "3001 3002\n"),
         Exits2(("images.txt, line 1: '3001 3002' " + FORMS,))),
    Case("config/evaluate/chair-list/letters", partial(chair_list, "images.txt", "3001\ncat\n"),
         Exits2(("images.txt, line 2: 'cat' " + FORMS,))),
    Case("config/evaluate/chair-list/json-float-id", partial(chair_list, "images.json", '[{"image_id": 3001.5}]'),
         Exits2(("images.json, [0]: '3001.5' " + FORMS,))),
    Case("config/evaluate/chair-list/accepted-forms", chair_list_accepted_forms,
         Holds("ids, zero-padded and COCO_val2014_ names, .jpg/.jpeg/.png in any case; an entry repeated as it is "
               "counts once")),
    Case("config/evaluate/chair-sample/file-not-named-by-id", partial(sampled_folder_with, "holiday.jpg"),
         Exits2(("eval.image_dir: ", "val2014: 'holiday.jpg' " + FORMS,))),
    Case("output/disk-full/evaluate-answers", evaluate_disk_full_at_answers,
         Exits2(("cannot append 2 answer(s) to ", "/out/pope_random_answers.jsonl.part0: No space left on device; "
                 "it needs about", "(100 B free there); the answers written before are kept: free space there and "
                 "run the same command again to resume"), prefix="error: ")),
    Case("output/disk-full/answers-append", answers_disk_full,
         Raises(OutputDirError, ("cannot append 1 answer(s) to {tmp}/out/pope_random_answers.jsonl.part0: No space "
                                 "left on device; it needs about", "(10 B free there)"))),
    Case("output/disk-full/answers-append-then-resume", resume_after_full_disk,
         Holds("the rerun asks only the two unanswered questions; every answer is in the file once")),
    Case("output/disk-full/evaluate-lock-file", partial(evaluate_lock_fails, "open"),
         Exits2(("cannot write the lock file ", "/out/.lock (eval.output_dir): No space left on device; it needs "
                 "about", "B (0 B free there); free space there or choose another eval.output_dir"),
                prefix="error: ")),
    Case("output/disk-full/evaluate-lock-line", partial(evaluate_lock_fails, "pwrite"),
         Exits2(("cannot write the lock file ", "/out/.lock (eval.output_dir): No space left on device; it needs "
                 "about"), prefix="error: ")),
]
