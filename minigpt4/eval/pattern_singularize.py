"""pattern 3.6's English `singularize`, the one the CHAIR reference scorer calls, quirks included.

The reference (LisaAnne/Hallucination utils/chair.py, and OPERA's copy) singularizes every caption token with
`pattern.en.singularize`; its quirks change published numbers ("glass" -> "glas", "bus" -> "bu", "ties" -> "ty"),
so only pattern's own rules give the reference's CHAIR. This module is an attributed copy of just that function's
word tables and rules, from pattern/text/en/inflect.py of PatternLite 3.6 (PyPI `patternlite`, itself a fork of
clips/pattern 3.6), so that `pip install minigpt4-adavib` alone gives a working scorer:

  * `patternlite==3.6` is a 22 MB wheel (65 MB installed, of which this needs one function) that requires `scipy`
    (35 MB, unused here) and NumPy; it was last released in 2020 (classifiers up to Python 3.8);
  * `import pattern.en` builds a WordNet interface that asks NLTK to download data, so even installed it can only
    be used by loading inflect.py by file path around its package.

The tables (`PLURAL_PREPOSITIONS`, `SINGULAR_RULES`, `SINGULAR_UNINFLECTED`, `SINGULAR_UNCOUNTABLE`, `SINGULAR_IE`,
`SINGULAR_IRREGULAR`) are pattern's, unchanged and in pattern's order (the irregular table is searched in order:
the first suffix that matches wins). `singularize` is written here and does what pattern's does, step for step;
tests/test_chair.py compares it with patternlite's on every word of the COCO and shapes-world vocabularies, their
plurals and every table entry, when patternlite is installed (scripts/setup_env.sh installs it for that check).

Licences of the copied tables (both permit redistribution with these notices):

pattern (Copyright (c) 2011-2013 University of Antwerp, Belgium; author Tom De Smedt), BSD 3-clause:
    Redistribution and use in source and binary forms, with or without modification, are permitted provided that
    the following conditions are met:
      * Redistributions of source code must retain the above copyright notice, this list of conditions and the
        following disclaimer.
      * Redistributions in binary form must reproduce the above copyright notice, this list of conditions and the
        following disclaimer in the documentation and/or other materials provided with the distribution.
      * Neither the name of Pattern nor the names of its contributors may be used to endorse or promote products
        derived from this software without specific prior written permission.
    THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED
    WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A
    PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT OWNER OR CONTRIBUTORS BE LIABLE FOR ANY
    DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
    PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
    CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR
    OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH
    DAMAGE.

The singular rules are, per pattern, "adapted from Bermi Ferrer's Inflector for Python
(http://www.bermi.org/inflector/)", Copyright (c) 2006 Bermi Ferrer Martinez:
    Permission is hereby granted, free of charge, to any person obtaining a copy of this software to deal in this
    software without restriction, including without limitation the rights to use, copy, modify, merge, publish,
    distribute, sublicense, and/or sell copies of this software, and to permit persons to whom this software is
    furnished to do so, subject to the following condition:
    THIS SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED
    TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL
    THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF
    CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THIS SOFTWARE OR THE USE OR OTHER
    DEALINGS IN THIS SOFTWARE.
"""
from __future__ import annotations

import re

# What results record as the singularizer (the same function as the reference's, so the same name).
SOURCE = "pattern 3.6 en.inflect.singularize"

# "mothers-in-law" -> "mother-in-law": a hyphenated word whose second part is one of these keeps its tail.
PLURAL_PREPOSITIONS = frozenset((
    "about", "before", "during", "of", "till", "above", "behind", "except", "off", "to", "across", "below", "for",
    "on", "under", "after", "beneath", "from", "onto", "until", "among", "beside", "in", "out", "unto", "around",
    "besides", "into", "over", "upon", "at", "between", "near", "since", "with", "athwart", "betwixt", "beyond",
    "but", "by",
))

# (suffix pattern, replacement), tried in order; the first that matches is applied. Verbatim, including the
# character classes such as [octop|vir] that pattern wrote as alternations.
SINGULAR_RULES = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r'(?i)(.)ae$', '\\1a'),
    (r'(?i)(.)itis$', '\\1itis'),
    (r'(?i)(.)eaux$', '\\1eau'),
    (r'(?i)(quiz)zes$', '\\1'),
    (r'(?i)(matr)ices$', '\\1ix'),
    (r'(?i)(ap|vert|ind)ices$', '\\1ex'),
    (r'(?i)^(ox)en', '\\1'),
    (r'(?i)(alias|status)es$', '\\1'),
    (r'(?i)([octop|vir])i$', '\\1us'),
    (r'(?i)(cris|ax|test)es$', '\\1is'),
    (r'(?i)(shoe)s$', '\\1'),
    (r'(?i)(o)es$', '\\1'),
    (r'(?i)(bus)es$', '\\1'),
    (r'(?i)([m|l])ice$', '\\1ouse'),
    (r'(?i)(x|ch|ss|sh)es$', '\\1'),
    (r'(?i)(m)ovies$', '\\1ovie'),
    (r'(?i)(.)ombies$', '\\1ombie'),
    (r'(?i)(s)eries$', '\\1eries'),
    (r'(?i)([^aeiouy]|qu)ies$', '\\1y'),
    # -f, -fe sometimes take -ves in the plural (e.g., lives, wolves).
    (r"([aeo]l)ves$", "\\1f"),
    (r"([^d]ea)ves$", "\\1f"),
    (r"arves$", "arf"),
    (r"erves$", "erve"),
    (r"([nlw]i)ves$", "\\1fe"),
    (r'(?i)([lr])ves$', '\\1f'),
    (r"([aeo])ves$", "\\1ve"),
    (r'(?i)(sive)s$', '\\1'),
    (r'(?i)(tive)s$', '\\1'),
    (r'(?i)(hive)s$', '\\1'),
    (r'(?i)([^f])ves$', '\\1fe'),
    # -ses suffixes.
    (r'(?i)(^analy)ses$', '\\1sis'),
    (r'(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$', '\\1\\2sis'),
    (r'(?i)(.)opses$', '\\1opsis'),
    (r'(?i)(.)yses$', '\\1ysis'),
    (r'(?i)(h|d|r|o|n|b|cl|p)oses$', '\\1ose'),
    (r'(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$', '\\1ose'),
    (r'(?i)(.)oses$', '\\1osis'),
    # -a
    (r'(?i)([ti])a$', '\\1um'),
    (r'(?i)(n)ews$', '\\1ews'),
    (r'(?i)s$', ''),
)]

SINGULAR_UNINFLECTED = frozenset((
    "bison", "debris", "headquarters", "pincers", "trout", "bream", "diabetes", "herpes", "pliers", "tuna",
    "breeches", "djinn", "high-jinks", "proceedings", "whiting", "britches", "eland", "homework", "rabies",
    "wildebeest", "carp", "elk", "innings", "salmon", "chassis", "flounder", "jackanapes", "scissors", "christmas",
    "gallows", "mackerel", "series", "clippers", "georgia", "measles", "shears", "cod", "graffiti", "mews",
    "species", "contretemps", "mumps", "swine", "corps", "news", "swiss",
))
SINGULAR_UNCOUNTABLE = frozenset((
    "advice", "equipment", "happiness", "luggage", "news", "software", "bread", "fruit", "information",
    "mathematics", "progress", "understanding", "butter", "furniture", "ketchup", "mayonnaise", "research", "water",
    "cheese", "garbage", "knowledge", "meat", "rice", "electricity", "gravel", "love", "mustard", "sand",
))
# Words whose plural only drops the "s". "^pie" and "^tie" are compared as plain text (never match), as in pattern:
# that is why "ties" becomes "ty" in the reference CHAIR.
SINGULAR_IE = frozenset((
    "alergie", "cutie", "hoagie", "newbie", "softie", "veggie", "auntie", "doggie", "hottie", "nightie", "sortie",
    "weenie", "beanie", "eyrie", "indie", "oldie", "stoolie", "yuppie", "birdie", "freebie", "junkie", "^pie",
    "sweetie", "zombie", "bogie", "goonie", "laddie", "pixie", "techie", "bombie", "groupie", "laramie", "quickie",
    "^tie", "collie", "hankie", "lingerie", "reverie", "toughie", "cookie", "hippie", "meanie", "rookie", "valkyrie",
))
SINGULAR_IRREGULAR = {  # searched in this order
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris", "feet": "foot",
    "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie", "graffiti": "graffito",
    "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf", "men": "man", "mongooses": "mongoose",
    "monies": "money", "moves": "move", "mythoi": "mythos", "numena": "numen", "occipita": "occiput",
    "octopodes": "octopus", "opera": "opus", "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis",
    "penises": "penis", "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}


def _apply_rule(pattern: re.Pattern, replacement: str, word: str) -> str:
    """pattern's substitution: a group that took no part in the match is dropped from the replacement."""
    match = pattern.search(word)
    for index, group in enumerate(match.groups(), start=1):
        if group is None:
            replacement = replacement.replace(f"\\{index}", "")
    return pattern.sub(replacement, word)


def singularize(word: str) -> str:
    """The singular pattern 3.6 gives for a noun (pos=NOUN, no custom table), in pattern's order of checks."""
    if "-" in word:
        head, *rest = word.split("-")
        if rest and rest[0] in PLURAL_PREPOSITIONS:  # mothers-in-law -> mother-in-law
            return singularize(head) + "-" + "-".join(rest)
    if word.endswith("'"):  # dogs' -> dog's
        return singularize(word[:-1]) + "'s"
    lower = word.lower()
    # pattern asks whether a table word *ends with* the input, so any suffix of "news" or "rabies" ("s", "es")
    # comes back unchanged.
    if any(entry.endswith(lower) for entry in SINGULAR_UNINFLECTED | SINGULAR_UNCOUNTABLE):
        return word
    if any(lower.endswith(entry + "s") for entry in SINGULAR_IE):
        return lower  # lower-cased, as pattern returns it
    for plural, singular in SINGULAR_IRREGULAR.items():
        if lower.endswith(plural):
            return re.sub("(?i)" + plural + "$", singular, word)
    for pattern, replacement in SINGULAR_RULES:
        if pattern.search(word):
            return _apply_rule(pattern, replacement, word)
    return word
