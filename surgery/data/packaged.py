"""English text that ships inside an installable package: no hub, no download at run time.

gensim's wheel (LGPL-2.1; ``pip install --no-deps gensim==4.4.0``, never imported here) carries
test corpora of real English:

* ``builtin:wikipedia`` -- 106 English Wikipedia articles (the head of the 2016 ``enwiki``
  dump, CC BY-SA 3.0), wiki markup stripped; one document per article (~0.7M SmolLM2 tokens).
* ``builtin:news`` -- the Lee corpus (Lee, Pincombe & Welsh 2005): 350 short news articles of
  the Australian Broadcasting Corporation; one document per article (~80k tokens). Recipes use
  it for evaluation only (``bench/quality.py``), never for training.

The package is located with :func:`importlib.util.find_spec` (its code never runs) and every
file is checked against the size it has in the tested release, so a changed upstream file is an
error, not a silently different corpus.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..recipe import DataSource
from .sources import TextSource

GENSIM = "gensim==4.4.0"
_DATA = "test/test_data"
WIKIPEDIA_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILES = ("lee_background.cor", "lee.cor")
SIZES = {WIKIPEDIA_FILE: 1_695_871, "lee_background.cor": 360_082, "lee.cor": 24_658}  # bytes in gensim 4.4.0
LICENCES = {
    "builtin:wikipedia": "English Wikipedia, CC BY-SA 3.0 (gensim 4.4.0 test data, LGPL-2.1 package)",
    "builtin:news": "Lee et al. 2005 news corpus, as distributed with gensim 4.4.0 (LGPL-2.1 package)",
}


def gensim_data_dir() -> Path:
    """gensim's test-data directory, without importing gensim; a DataError saying how to install it."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"builtin:wikipedia and builtin:news read text shipped in the gensim package, which is not installed; "
            f"run: pip install --no-deps {GENSIM}   (about 28 MB; surgery never imports it)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _DATA


def _checked(name: str) -> Path:
    path = gensim_data_dir() / name
    if not path.is_file():
        raise DataError(f"{path} is missing: install {GENSIM} (pip install --no-deps {GENSIM})")
    if path.stat().st_size != SIZES[name]:
        raise DataError(
            f"{path} has {path.stat().st_size} bytes, not the {SIZES[name]} of {GENSIM}: another gensim release is "
            f"installed; pip install --no-deps {GENSIM}"
        )
    return path


class _PackagedSource(TextSource):
    """Documents held in memory once read; ids are stable within the package release."""

    def identity(self) -> dict[str, Any]:
        return {"package": GENSIM, "licence": LICENCES[self.spec.source]}

    @cached_property
    def _docs(self) -> dict[str, str]:
        return self._load()

    def _load(self) -> dict[str, str]:
        raise NotImplementedError

    def doc_ids(self) -> list[str]:
        return sorted(self._docs)

    def read(self, doc_id: str) -> str:
        return self._docs[doc_id]


class NewsSource(_PackagedSource):
    """``builtin:news``: one news article per line of the Lee corpus files."""

    def _load(self) -> dict[str, str]:
        docs = {}
        for name in NEWS_FILES:
            for i, line in enumerate(_checked(name).read_text(encoding="latin-1").splitlines()):  # £ as 0xa3
                if line.strip():
                    docs[f"{name}:{i:04d}"] = line.strip()
        return docs


class WikipediaSource(_PackagedSource):
    """``builtin:wikipedia``: main-namespace articles of the dump, markup stripped (:func:`wiki_to_text`)."""

    def _load(self) -> dict[str, str]:
        xml = bz2.decompress(_checked(WIKIPEDIA_FILE).read_bytes()).decode("utf-8")
        docs = {}
        for page in re.finditer(r"<page>(.*?)</page>", xml, re.S):
            body = page.group(1)
            title = re.search(r"<title>(.*?)</title>", body, re.S)
            ns = re.search(r"<ns>(\d+)</ns>", body)
            text = re.search(r"<text[^>]*>(.*?)</text>", body, re.S)
            if not (title and ns and text) or ns.group(1) != "0":
                continue
            raw = html.unescape(text.group(1))
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            clean = wiki_to_text(raw)
            if len(clean) > 200:
                docs[html.unescape(title.group(1))] = f"{html.unescape(title.group(1))}\n\n{clean}"
        return docs


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every ``open_ ... close`` span, innermost first (templates and tables nest)."""
    pattern = re.compile(re.escape(open_) + r"(?:(?!" + re.escape(open_) + r").)*?" + re.escape(close), re.S)
    while True:
        text, n = pattern.subn("", text)
        if n == 0:
            return text


def wiki_to_text(raw: str) -> str:
    """MediaWiki markup -> plain prose: templates, tables, references, files and categories dropped;
    links kept as their text; headings and lists as plain lines."""
    text = re.sub(r"<!--.*?-->", "", raw, flags=re.S)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://[^\]]*\]", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.M)
    text = re.sub(r"[ \t]+", " ", text)
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


PACKAGED_SOURCES: dict[str, type[_PackagedSource]] = {"builtin:wikipedia": WikipediaSource, "builtin:news": NewsSource}


def open_packaged(spec: DataSource) -> TextSource:
    return PACKAGED_SOURCES[spec.source](spec)
