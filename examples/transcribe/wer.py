#!/usr/bin/env python3
"""Word error rate: Levenshtein distance over normalised words, divided by the reference length.

Normalisation: lower case; every character other than a-z, 0-9 and an apostrophe inside a word
becomes a space; pocketsphinx's alternative-pronunciation suffixes ("read(2)") and filler tags
("<sil>", "[noise]") are removed. Numbers are not spelled out: write references in words.

    wer.py REFERENCE_FILE HYPOTHESIS_FILE      # prints WER, errors and the alignment counts
    wer.py --text "reference words" "hypothesis words"
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

_FILLER = re.compile(r"<[^>]*>|\[[^\]]*\]|\(\d+\)")
_NON_WORD = re.compile(r"[^a-z0-9']+")


def normalise(text: str) -> list[str]:
    text = _FILLER.sub(" ", text.lower())
    words = []
    for w in _NON_WORD.sub(" ", text).split():
        w = w.strip("'")
        if w:
            words.append(w)
    return words


@dataclass
class WerResult:
    substitutions: int
    deletions: int
    insertions: int
    reference_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        return (
            self.errors / self.reference_words if self.reference_words else float(self.errors > 0)
        )

    def __add__(self, other: WerResult) -> WerResult:
        return WerResult(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.reference_words + other.reference_words,
        )

    def __str__(self) -> str:
        return (
            f"WER {100 * self.wer:.1f}% ({self.errors}/{self.reference_words}: "
            f"{self.substitutions} sub, {self.deletions} del, {self.insertions} ins)"
        )


def align(ref: list[str], hyp: list[str]) -> WerResult:
    """Minimum edit distance with unit costs; ties broken towards substitutions."""
    # Each cell: (cost, substitutions, deletions, insertions)
    prev = [(j, 0, 0, j) for j in range(len(hyp) + 1)]
    for i in range(1, len(ref) + 1):
        cur = [(i, 0, i, 0)]
        for j in range(1, len(hyp) + 1):
            c, s, d, n = prev[j - 1]
            if ref[i - 1] == hyp[j - 1]:
                best = (c, s, d, n)
            else:
                best = (c + 1, s + 1, d, n)
            c, s, d, n = prev[j]
            if c + 1 < best[0]:
                best = (c + 1, s, d + 1, n)
            c, s, d, n = cur[j - 1]
            if c + 1 < best[0]:
                best = (c + 1, s, d, n + 1)
            cur.append(best)
        prev = cur
    _, s, d, n = prev[-1]
    return WerResult(s, d, n, len(ref))


def wer(reference: str, hypothesis: str) -> WerResult:
    return align(normalise(reference), normalise(hypothesis))


def _selfcheck():
    assert normalise("Hello, World! It's <sil> read(2) [noise]") == [
        "hello",
        "world",
        "it's",
        "read",
    ]
    assert wer("a b c d", "a b c d").errors == 0
    r = wer("the cat sat on the mat", "the cat sat on mat")
    assert (r.substitutions, r.deletions, r.insertions) == (0, 1, 0), r
    r = wer("the cat sat", "a cat sat down")
    assert (r.substitutions, r.deletions, r.insertions) == (1, 0, 1), r
    r = wer("one two three", "")
    assert r.deletions == 3 and abs(r.wer - 1.0) < 1e-9
    r = wer("", "extra")
    assert r.insertions == 1 and r.wer == 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reference")
    p.add_argument("hypothesis")
    p.add_argument("--text", action="store_true", help="arguments are texts, not file names")
    args = p.parse_args(argv)
    _selfcheck()
    if args.text:
        ref, hyp = args.reference, args.hypothesis
    else:
        with open(args.reference, encoding="utf-8") as f:
            ref = f.read()
        with open(args.hypothesis, encoding="utf-8") as f:
            hyp = f.read()
    print(wer(ref, hyp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
