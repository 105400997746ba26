"""Hostile configs through train.py / evaluate.py (and demo.py): unknown keys, wrong types, missing paths,
out-of-range and non-finite values, YAML errors, a top level or a section of any YAML type but a mapping, demo.py's
--port / --host; one line, exit 2, before any model is built."""
from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

from _hostile import TINY_RECIPE, Case, Env, Exits2, Holds, Raises, no_model_build, write_file

from minigpt4.common.config import merge


def train_main(option: str, env: Env, recipe: str | bytes | None = None) -> tuple[int, str]:
    """train.py on the tiny recipe (or on `recipe`, the text of a recipe file) plus `option`."""
    import train

    out = env.tmp / "out"
    options = env.shared.tiny_data_options() + [f"run.output_dir={out}", option]
    cfg_path = TINY_RECIPE if recipe is None else str(write_file(env, "recipe.yaml", recipe))
    with no_model_build():
        rc = train.main(["--cfg-path", cfg_path, "--options", *options])
    assert not out.exists()  # stopped before any model or output was made
    return rc, ""


def evaluate_main(option: str, env: Env, recipe: str | bytes = "eval: {}\n") -> tuple[int, str]:
    import evaluate

    for folder in ("val2014", "annotations"):
        (env.tmp / folder).mkdir()
    out = env.tmp / "out"
    options = [f"model.tokenizer_path={env.shared.tokenizer_dir}", f"eval.image_dir={env.tmp}/val2014",
               f"eval.chair.coco_annotations={env.tmp}/annotations", f"eval.output_dir={out}", "eval.device=cpu",
               option]
    cfg = write_file(env, "recipe.yaml", recipe)  # no --cfg-path would mean the embedded shapes-world config
    with no_model_build():
        rc = evaluate.main(["--cfg-path", str(cfg), "--options", *options])
    assert not out.exists()
    return rc, ""


TINY_TEXT = Path(TINY_RECIPE).read_text(encoding="utf-8")
SEED_LINE = TINY_TEXT[: TINY_TEXT.index("  seed: 42\n")].count("\n") + 1  # 1-based line of run.seed


def yaml_with_bom(env: Env) -> bool:
    import train

    recipe = write_file(env, "recipe.yaml", b"\xef\xbb\xbf" + TINY_TEXT.encode())
    cfg = merge(train.TrainConfig, str(recipe))
    assert cfg.run.seed == 42 and cfg.model.arch == "minigpt4"  # "model" read as itself, not as "\ufeffmodel"
    return True


def internal_error_in_train(env: Env) -> None:
    import train
    from minigpt4.datasets import builders

    def broken(*_, **__):
        raise RuntimeError("an internal bug, not a user mistake")

    original, builders.build_train_dataset = builders.build_train_dataset, broken
    try:
        train.main(["--cfg-path", TINY_RECIPE, "--options", *env.shared.tiny_data_options(),
                    f"run.output_dir={env.tmp / 'out'}"])
    finally:
        builders.build_train_dataset = original


def evaluate_with_files(files: dict[str, str], option: str, env: Env) -> tuple[int, str]:
    """evaluate_main after writing `files` into the case's folder ("{tmp}" in a text or the option is that folder)."""
    for name, text in files.items():
        path = env.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("{tmp}", str(env.tmp)))
    return evaluate_main(option.replace("{tmp}", str(env.tmp)), env)


POPE_SPLIT_FILES = {f"pope/{split}.jsonl": json.dumps({"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
                                                       "text": "Is there a dog?", "label": "yes"}) + "\n"
                    for split in ("random", "popular", "adversarial")}


def _case_id(option: str) -> str:
    key, value = option.split("=", 1)
    value = re.sub(r"[^\w.-]+", "_", value)[:16].strip("_")
    return f"{key}={value}"


def _train(option, *fragments):
    return Case(f"config/train/{_case_id(option)}", partial(train_main, option), Exits2(fragments))


def _evaluate(option, *fragments):
    return Case(f"config/evaluate/{_case_id(option)}", partial(evaluate_main, option), Exits2(fragments))


CONFIG_CASES = [
    _train("model.vit_pth=x", "unknown key 'model.vit_pth'", "vit_path"),  # the valid keys are listed
    _train("run.bogus=1", "bogus"),
    _train("datasets.caption_json.annpath=x", "datasets.caption_json.annpath", "unknown option"),
    _train("datasets.laoin.shards=x.tar", "datasets.laoin", "unknown dataset builder"),
    _train("run.batch_size=two", "run.batch_size"),
    _train("model.max_txt_len=long", "model.max_txt_len"),
    _train("model.max_txt_len=0", "model.max_txt_len must be >= 1"),
    _train("model.vib.beta=-1", "model.vib.beta must be >= 0"),
    _train("model.llm_path=/no/such/vicuna", "model.llm_path: path not found: /no/such/vicuna"),
    _train("datasets.caption_json.image_dir=/no/such/images", "datasets.caption_json.image_dir", "not found"),
    _train("model.mm_projector_type=mlp2x_gelu", "model.mm_projector_type = 'mlp2x_gelu'", "linear, vib"),
    # the CNN encoder's keys (visual_tokens: cnn_grid, models/cnn_encoder.py) belong to it alone, and it to them
    _train("model.cnn_path=/no/such/lite0", "model.cnn_path is read only by model.visual_tokens = 'cnn_grid'"),
    _train("model.grid_group=7", "model.grid_group is for model.visual_tokens = 'cnn_grid'"),
    _train("model.visual_tokens=cnn_grid", "model.qformer is not used by model.visual_tokens = 'cnn_grid'"),
    _train("model.prompt_template=smollm", "model.prompt_template = 'smollm'", "smollm2"),
    _train("model.vib.entropy_of=length", "model.vib.entropy_of = 'length'", "pooled, length_free"),
    Case("config/train/grid-group-not-a-divisor", partial(train_main, "model.grid_group=5",
                                                          recipe="model: {visual_tokens: cnn_grid}\n"),
         Exits2(("model.grid_group = 5", "49 positions", "a divisor of 49"))),
    _train("datasets.caption_json.on_bad_image=ignore", "datasets.caption_json.on_bad_image", "skip, error"),
    _evaluate("eval.bogus=1", "eval.bogus"),
    _evaluate("eval.batch_size=0", "eval.batch_size = 0; expected an integer >= 1"),
    _evaluate("eval.bootstrap=many", "eval.bootstrap"),
    _evaluate("eval.pope.splits=[randm]", "eval.pope.splits: unknown split 'randm'"),
    _evaluate("eval.pope.version=coco-2014", "eval.pope.version = 'coco-2014'", "coco-2023-08"),
    _evaluate("eval.prompt_format='USER: <Img><ImageHere></Img> Is there a dog? ASSISTANT:'",
              "eval.prompt_format", "has no {question} field"),
    _evaluate("eval.image_dir=/no/such/val2014", "eval.image_dir: path not found"),
    _evaluate("eval.on_bad_image=ignore", "eval.on_bad_image = 'ignore'; expected error or skip"),
    _evaluate("model.mm_projector_type=qformer", "model.mm_projector_type = 'qformer'"),
    _evaluate("eval.chair.num_images=0", "eval.chair.num_images = 0"),
    # benchmark files are read before the model is built: empty ones and names leaving eval.image_dir stop there
    Case("config/evaluate/pope-questions-empty",
         partial(evaluate_with_files, {**POPE_SPLIT_FILES, "pope/random.jsonl": ""}, "eval.pope.dir={tmp}/pope"),
         Exits2(("pope/random.jsonl: no questions",))),
    Case("config/evaluate/chair-image-list-empty", partial(evaluate_with_files, {"images.json": "[]"},
                                                           "eval.chair.images={tmp}/images.json"),
         Exits2(("images.json lists no images",))),
    Case("config/evaluate/chair-image-dir-without-images", partial(evaluate_with_files, {}, "eval.tasks=[chair]"),
         Exits2(("eval.image_dir:", "has no .jpg/.jpeg/.png file to sample CHAIR images from",))),
    _evaluate("eval.allow_outside_image_dir=maybe", "eval.allow_outside_image_dir"),
    _train("datasets.caption_json.allow_outside_image_dir=maybe",
           "datasets.caption_json.allow_outside_image_dir: expected true or false, got 'maybe'"),
    Case("config/evaluate/pope-image-outside-image-dir",
         partial(evaluate_with_files, {**POPE_SPLIT_FILES, "pope/popular.jsonl": json.dumps(
             {"question_id": 1, "image": "../../../home/x.jpg", "text": "Is there a dog?", "label": "yes"})},
                 "eval.pope.dir={tmp}/pope"),
         Exits2(("pope/popular.jsonl: question_id 1", "'../../../home/x.jpg' is outside the image folder",
                 "eval.allow_outside_image_dir"))),
    # learning rates and other float settings: in range and finite (NaN passes every `x <= 0` test)
    _train("run.init_lr=-1e-4", "run.init_lr must be a finite number > 0, got -0.0001"),
    _train("run.init_lr=0", "run.init_lr must be a finite number > 0, got 0"),
    _train("run.init_lr=nan", "run.init_lr must be a finite number > 0, got 'nan'"),
    _train("run.init_lr=.inf", "run.init_lr = inf; expected a finite number"),
    _train("run.init_lr=true", "run.init_lr must be a finite number > 0, got True"),
    _train("run.min_lr=-1e-6", "run.min_lr must be a finite number >= 0"),
    _train("run.warmup_lr=nan", "run.warmup_lr must be a finite number >= 0, got 'nan'"),
    _train("run.warmup_ratio=1.5", "run.warmup_ratio must be a finite number >= 0 and <= 1 or null"),
    _train("run.max_grad_norm=.nan", "run.max_grad_norm = nan; expected a finite number"),
    _train("run.adam_eps=0", "run.adam_eps must be a finite number > 0"),
    _train("model.vib.beta=nan", "model.vib.beta = nan; expected a finite number"),
    _train("model.vib.beta=inf", "model.vib.beta = inf; expected a finite number"),
    _train("datasets.caption_json.vis_processor.std=[0.26,.nan,0.27]",
           "datasets.caption_json.vis_processor.std[1] = nan; expected a finite number"),
    _evaluate("model.vib.beta=-inf", "model.vib.beta = -inf; expected a finite number"),
    _evaluate("eval.vis_processor.mean=[.nan,0.45,0.4]", "eval.vis_processor.mean[0] = nan"),
    # --options items
    Case("config/train/options-item-without-equals", partial(train_main, "run.init_lr"),  # would be null
         Exits2(("--options 'run.init_lr': expected key=value",))),
    Case("config/evaluate/options-item-without-equals", partial(evaluate_main, "eval.batch_size"),
         Exits2(("--options 'eval.batch_size': expected key=value",))),
    _train("run..init_lr=1e-4", "--options 'run..init_lr=1e-4': expected key=value"),
    _train("run.max_steps=[1,", "--options 'run.max_steps=[1,': the value is not valid YAML"),
    # recipe files
    Case("config/yaml/duplicate-key", partial(train_main, "run.seed=1", recipe=TINY_TEXT.replace(
        "  seed: 42\n", "  seed: 42\n  seed: 7\n")),
         Exits2((f"recipe.yaml:{SEED_LINE + 1}:3: duplicate key 'seed' (in the mapping that starts on line "
                 f"{SEED_LINE - 1})",))),
    Case("config/yaml/duplicate-section", partial(train_main, "run.seed=1", recipe=TINY_TEXT + "run: {seed: 7}\n"),
         Exits2(("recipe.yaml:", "duplicate key 'run'"))),
    Case("config/yaml/syntax-error", partial(train_main, "run.seed=1", recipe=TINY_TEXT.replace(
        "  max_epoch: 1\n", "  max_epoch: [1\n")), Exits2(("recipe.yaml:", "YAML syntax error"))),
    Case("config/yaml/tab-indent", partial(train_main, "run.seed=1", recipe=TINY_TEXT.replace(
        "  seed: 42", "\tseed: 42")),
         Exits2((f"recipe.yaml:{SEED_LINE}:1: a tab character; YAML indents and separates with spaces only",))),
    Case("config/yaml/top-level-list", partial(train_main, "run.seed=1", recipe="- model: {}\n- run: {}\n"),
         Exits2(("recipe.yaml:1: the top level is a list; expected a mapping",))),
    Case("config/yaml/top-level-scalar", partial(train_main, "run.seed=1", recipe="tiny_cpu\n"),
         Exits2(("recipe.yaml:1: the top level is a single value ('tiny_cpu')",))),
    Case("config/yaml/not-utf8", partial(train_main, "run.seed=1", recipe=TINY_TEXT.encode().replace(
        b"# The embedded", b"# The \xe9mbedded")), Exits2(("recipe.yaml:1: not UTF-8 text",))),
    Case("config/yaml/evaluate-tab", partial(evaluate_main, "eval.batch_size=2", recipe="eval:\n\tbatch_size: 2\n"),
         Exits2(("recipe.yaml:2:1: a tab character",))),
    Case("config/yaml/utf8-bom", yaml_with_bom, Holds("read as UTF-8, the mark dropped")),
    # and a bug of this project's own is still a traceback, not a one-line "error:"
    Case("config/train/internal-error-keeps-traceback", internal_error_in_train,
         Raises(RuntimeError, ("an internal bug, not a user mistake",))),
]


# ------------------------------------------------------------------------- top level of any YAML type (issue 22)


def demo_main(args: list[str], env: Env) -> tuple[int, str]:
    """demo.py's main with `args`; a model build would fail the row (everything here stops before one)."""
    from minigpt4.cli import demo

    with no_model_build():
        return demo.main(args), ""


def demo_with_config(text: str, env: Env) -> tuple[int, str]:
    return demo_main(["--cfg-path", str(write_file(env, "recipe.yaml", text))], env)


def demo_on_a_taken_port(env: Env) -> tuple[int, str]:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, _ = demo_main(["--port", str(port), "--cfg-path", str(env.tmp / "never-read.yaml")], env)
    return rc, ""


EXPECTED_MAPPING = "expected a mapping of sections (model:, run:, datasets:, eval:)"
# (row name, file text, what the message says the top level is)
TOP_LEVELS = [
    ("empty-file", "", ": the file holds no YAML document (empty, or comments only)"),
    ("comments-only", "# model: {}\n", ": the file holds no YAML document (empty, or comments only)"),
    ("null", "null\n", ":1: the top level is null (an empty document)"),
    ("tilde", "~\n", ":1: the top level is null (an empty document)"),
    ("empty-document", "---\n...\n", ":2: the top level is null (an empty document)"),
    ("integer", "3\n", ":1: the top level is a number (3)"),
    ("float", "1.5e-4\n", ":1: the top level is a number (1.5e-4)"),
    ("boolean", "yes\n", ":1: the top level is a boolean (yes)"),
    ("date", "2024-01-31\n", ":1: the top level is a date (2024-01-31)"),
    ("quoted-string", '"model"\n', ":1: the top level is a single value ('model')"),
    ("block-string", "|\n  model: {}\n", ":1: the top level is a single value ('model: {}\\n')"),
    ("binary", "!!binary aGVsbG8=\n", ":1: the top level is binary data (!!binary)"),
    ("flow-list", "[model, run]\n", ":1: the top level is a list"),
    ("ordered-map", "!!omap [model: {}, run: {}]\n", ":1: the top level is a list"),
    ("set", "!!set {model, run}\n", ":1: the top level is a mapping tagged !!set, not a plain mapping"),
    ("custom-tag", "!recipe {model: {}}\n", ":1: the top level is a mapping tagged !recipe, not a plain mapping"),
]
CONFIG_CASES += [
    Case(f"config/yaml/top-level-{name}/{program}", partial(main, "run.seed=1" if program == "train" else
                                                             "eval.batch_size=2", recipe=text),
         Exits2((f"recipe.yaml{says}", EXPECTED_MAPPING)))
    for name, text, says in TOP_LEVELS for program, main in (("train", train_main), ("evaluate", evaluate_main))
] + [
    Case(f"config/yaml/top-level-{name}/demo", partial(demo_with_config, text),
         Exits2((f"recipe.yaml{says}", EXPECTED_MAPPING), prefix="error: "))
    for name, text, says in TOP_LEVELS
] + [
    # a section that is not a mapping (OmegaConf: "Merge error: int is not a subclass of ModelConfig")
    Case("config/yaml/model-section-a-number", partial(train_main, "run.seed=1", recipe="model: 3\n"),
         Exits2(("recipe.yaml: model: expected a mapping of its settings", "got the value 3"))),
    Case("config/yaml/eval-section-a-list", partial(evaluate_main, "eval.batch_size=2", recipe="eval: [1, 2]\n"),
         Exits2(("recipe.yaml: eval: expected a mapping of its settings", "got a list (2 items)"))),
    Case("config/yaml/vib-subsection-a-string", partial(train_main, "run.seed=1", recipe="model:\n  vib: adaptive\n"),
         Exits2(("recipe.yaml: model.vib: expected a mapping of its settings", "got the value 'adaptive'"))),
    Case("config/yaml/model-section-empty/demo", partial(demo_with_config, "model:\n"),
         Exits2(("recipe.yaml: model: expected a mapping of its settings", "got null"), prefix="error: ")),
    Case("config/yaml/model-section-a-list/demo", partial(demo_with_config, "model: [arch, minigpt4]\n"),
         Exits2(("recipe.yaml: model: expected a mapping of its settings", "got a list"), prefix="error: ")),
    Case("config/options/section-a-number", partial(train_main, "model=3"),
         Exits2(("--options: model: expected a mapping of its settings",))),
    # keys and values YAML has but a config does not
    Case("config/yaml/null-key", partial(train_main, "run.seed=1", recipe="~: 1\n"),
         Exits2(("recipe.yaml: at the top level: Incompatible key type 'NoneType'",))),
    Case("config/yaml/set-value", partial(evaluate_main, "eval.batch_size=2", recipe="eval: {pope: !!set {a}}\n"),
         Exits2(("recipe.yaml: under 'eval.pope'", "not a supported primitive type"))),
    # demo.py --port / --host: checked before the model is loaded
    Case("config/demo/port-out-of-range", partial(demo_main, ["--port", "70000"]),
         Exits2(("--port 70000: expected a TCP port number from 1 to 65535",), prefix="error: ")),
    Case("config/demo/port-zero", partial(demo_main, ["--port", "0"]),
         Exits2(("--port 0: expected a TCP port number from 1 to 65535",), prefix="error: ")),
    Case("config/demo/port-negative", partial(demo_main, ["--port", "-5"]),
         Exits2(("--port -5: expected a TCP port number",), prefix="error: ")),
    Case("config/demo/port-in-use", demo_on_a_taken_port,
         Exits2(("another program already listens on 127.0.0.1:", "choose another --port"), prefix="error: ")),
    Case("config/demo/host-not-of-this-machine", partial(demo_main, ["--host", "192.0.2.1", "--port", "7861"]),
         Exits2(("--host '192.0.2.1': not an address of this machine",), prefix="error: ")),
]
