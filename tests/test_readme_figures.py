"""Every figure the README's results quote is found in the committed JSON it cites.

The convention (README.md, section "Results"): each paragraph that quotes a measured figure
names the committed run it comes from as a path ``docs/results/NAME.json`` (or a glob of them,
``docs/results/headroom_*.json``); each row of a table names its own, or the table takes those of
the paragraph right above it. This test splits the section into paragraphs and table rows, takes
the figures each quotes, and checks that each one is in the union of the JSONs it names, to the
precision shown.

* A *figure* is a number written with a decimal point, or followed by a unit of measure
  (``%``, ``dB``, ``x``, ``s``, ``min``; a list or range shares its last number's: "73 / 52 /
  58 %", "7-25 %"), or next to ``±``. Counts and settings written as integers ("20,000 training
  samples", "three seeds", "r = 4") are not figures; numbers inside code spans (commands) or
  glued to a name (LeNet5, ResNet-18, NDCG@10, OCD(5), 5e-4) are not read.
* *Found* means: some number of the JSONs, formatted with as many decimals as the README shows,
  reads the same (sign included). The numbers of a JSON are its numeric leaves, every number
  written inside its strings (its rendered tables and notes, the paper's figures), and the usual
  derived forms: 100 x a number (a share written as a percentage); the mean and the sample sd of
  each list of numbers and of each quantity recorded once per seed (``{"0": {...}, "1": ...}``):
  mean ± sd over seeds; and, for a figure written as a ratio (``x``), the ratio of two numbers of
  one record (against a baseline measured in the same run). "a ± b" must be found as a pair: a
  mean with its sd (of one list, one ``{"mean", "sd"}`` record, or written so in one string).

What it catches: a figure typed by hand, or left stale after its JSON was rerun. Four-decimal
figures are specific (changing the last digit of one is caught almost always); a figure of one
or two digits ("17 %") is found in almost any JSON, so for those the check mostly verifies that
the paragraph names its JSON.

Paragraphs that quote figures of no committed JSON are listed in ``NO_JSON`` with the reason;
the test fails when such a paragraph starts naming one, so the list only shrinks.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import statistics
from typing import Any, NamedTuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# Paragraphs (by their opening words) whose figures no committed JSON holds yet, and why.
NO_JSON = {
    "On a machine whose two cores are shared": "an observation of one epoch's time under "
    "oversubscription, not a committed run",
}

JSON_PATH = re.compile(r"docs/results/[\w.*\-]+\.json")
NUMBER = re.compile(
    r"(?P<pre>.?)(?P<sign>[−+-]?)(?P<num>\d[\d,]*(?:\.\d+)?|\.\d+)"
    r"(?:\s?(?P<unit>%|dB\b|x\b|s\b|min\b))?(?P<after>[A-Za-z@(]?)"
)


class Figure(NamedTuple):
    written: str
    value: float
    decimals: int
    unit: str | None
    sd: Figure | None = None  # the figure after "±", when this one is a mean


def results_section() -> str:
    text = open(README).read()
    start = text.index("\n## Results")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def paragraphs() -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", results_section()) if p.strip()]


def _plain(text: str) -> str:
    text = re.sub(r"`[^`]*`", " ", text)  # commands and paths
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    return " ".join(text.replace("**", "").split())


def figures(paragraph: str) -> list[Figure]:
    """The figures of ``paragraph`` (see the module docstring), each mean with its sd."""
    text = _plain(paragraph)
    found = [
        m
        for m in NUMBER.finditer(text)
        # glued to a name: LeNet5, ResNet-18, NDCG@10, OCD(5), 5e-4, 165k-parameter
        if not m["after"] and not (m["pre"] and (m["pre"].isalpha() or m["pre"] in "@/._"))
    ]
    gaps = [text[a.end() : b.start() + len(b["pre"])].strip() for a, b in zip(found, found[1:])] + [
        ""
    ]
    # a unit shared by a list or a range: "73 / 52 / 58 %", "7-25 %", "0.0373 ± 0.0015 dB"
    units = [m["unit"] for m in found]
    for i in range(len(found) - 2, -1, -1):
        if not units[i] and units[i + 1] and gaps[i] in ("/", "-", "–", "±"):
            units[i] = units[i + 1]
    out: list[Figure] = []
    for i, (m, unit) in enumerate(zip(found, units)):
        pre, sign, num = m["pre"], m["sign"], m["num"]
        pm = gaps[i] == "±" or (i > 0 and gaps[i - 1] == "±")
        if "." not in num and not unit and not pm:
            continue  # a count or a setting
        negative = sign in ("−", "-") and not pre.isdigit()  # "7-25 %" is a range
        value = float(num.replace(",", ""))
        decimals = len(num.split(".")[1]) if "." in num else 0
        fig = Figure(m.group(0).strip(" ("), -value if negative else value, decimals, unit)
        if out and i > 0 and gaps[i - 1] == "±":
            out[-1] = out[-1]._replace(sd=fig)
        out.append(fig)
    return out


# --------------------------------------------------------------------------- a JSON's numbers

STRING_NUMBER = r"[−-]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:e[−-]?\d+)?"
STRING_PAIR = re.compile(rf"({STRING_NUMBER})\s*±\s*({STRING_NUMBER})")


def _float(tok: str) -> float | None:
    try:
        return float(tok.replace("−", "-").replace(",", ""))
    except ValueError:
        return None


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _leaves(o: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of ``o`` by path."""
    if _is_num(o):
        return {prefix: float(o)}
    if isinstance(o, dict):
        return {k: v for key, sub in o.items() for k, v in _leaves(sub, f"{prefix}/{key}").items()}
    return {}


class Numbers(NamedTuple):
    """A JSON's numbers: ``values`` (leaves, numbers in strings, means and sds of lists, each
    also x 100), ``pairs`` (mean, sd) (of lists, of ``{"mean", "sd"}`` records, written
    "a ± b" in strings; also x 100) and ``ratios`` (of two numbers of one record)."""

    values: set[float]
    pairs: set[tuple[float, float]]
    ratios: set[float]


def json_numbers(obj: Any) -> Numbers:
    values: set[float] = set()
    pairs: set[tuple[float, float]] = set()
    ratios: set[float] = set()

    def walk(o: Any) -> None:
        if _is_num(o):
            values.add(float(o))
        elif isinstance(o, str):
            values.update(v for v in map(_float, re.findall(STRING_NUMBER, o)) if v is not None)
            for a, b in STRING_PAIR.findall(o):
                if _float(a) is not None and _float(b) is not None:
                    pairs.add((_float(a), _float(b)))
        elif isinstance(o, dict):
            if len(o) >= 2 and all(str(k).isdigit() for k in o):  # per seed: mean ± sd
                flat = [_leaves(v) for v in o.values()]
                for key in set.intersection(*(set(f) for f in flat)):
                    walk([f[key] for f in flat])
            leaves = [float(v) for v in o.values() if _is_num(v)]
            ratios.update(a / b for a in leaves for b in leaves if b)
            if _is_num(o.get("mean")) and _is_num(o.get("sd")):
                pairs.add((float(o["mean"]), float(o["sd"])))
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            nums = [float(v) for v in o if _is_num(v)]
            if len(nums) >= 2:
                m, sd = statistics.fmean(nums), statistics.stdev(nums)
                values.update((m, sd))
                pairs.add((m, sd))
            for v in o:
                walk(v)

    walk(obj)
    return Numbers(
        values | {100 * v for v in values},
        pairs | {(100 * a, 100 * b) for a, b in pairs},
        ratios,
    )


def _fmt(v: float, decimals: int) -> str:
    s = f"{v:.{decimals}f}"
    return s[1:] if s.startswith("-") and not s.strip("-0.") else s  # no "-0.0"


_CACHE: dict[str, Numbers] = {}


def numbers_of(path: str) -> Numbers:
    if path not in _CACHE:
        with open(os.path.join(ROOT, path)) as f:
            _CACHE[path] = json_numbers(json.load(f))
    return _CACHE[path]


_FORMATTED: dict[tuple[tuple[str, ...], str, int], set[str]] = {}


def _formatted(paths: list[str], kind: str, decimals: int) -> set[str]:
    """The ``kind`` numbers (values, or values and ratios) of the JSONs at ``paths``, each
    formatted with ``decimals`` decimals."""
    key = (tuple(paths), kind, decimals)
    if key not in _FORMATTED:
        nums = [numbers_of(p) for p in paths]
        pool = set().union(*(n.values for n in nums))
        if kind == "ratios":
            pool = pool.union(*(n.ratios for n in nums))
        _FORMATTED[key] = {_fmt(v, decimals) for v in pool}
    return _FORMATTED[key]


def missing(text: str, paths: list[str]) -> list[str]:
    """The figures of ``text`` that none of the JSONs at ``paths`` holds."""
    pairs = set().union(*(numbers_of(p).pairs for p in paths))
    out = []
    for f in figures(text):
        kind = "ratios" if f.unit == "x" else "values"
        if _fmt(f.value, f.decimals) not in _formatted(paths, kind, f.decimals):
            out.append(f.written)
        elif f.sd is not None:
            want = (_fmt(f.value, f.decimals), _fmt(f.sd.value, f.sd.decimals))
            if want not in {(_fmt(a, f.decimals), _fmt(b, f.sd.decimals)) for a, b in pairs}:
                out.append(f"{f.written} ± {f.sd.written} (not as a mean ± sd)")
    return out


# --------------------------------------------------------------------------- the checks


def cited(text: str) -> list[str]:
    """The committed JSONs ``text`` names (globs expanded)."""
    out: set[str] = set()
    for p in JSON_PATH.findall(text):
        found = glob.glob(os.path.join(ROOT, p)) if "*" in p else [os.path.join(ROOT, p)]
        out.update(os.path.relpath(f, ROOT) for f in found)
        if not found:
            out.add(p)  # reported as missing
    return sorted(out)


def checked() -> list[tuple[str, list[str]]]:
    """Each paragraph, and each row of a table, that quotes figures, with the JSONs it names
    (a row naming none: those of the paragraph above its table)."""
    out: list[tuple[str, list[str]]] = []
    above: list[str] = []
    for block in paragraphs():
        lines = block.split("\n")
        if not all(line.startswith("|") for line in lines):
            if figures(block):
                out.append((block, cited(block)))
            above = cited(block)
            continue
        for row in lines[2:]:  # the header and the |---| line quote no figure
            if figures(row):
                out.append((row, cited(row) or above))
    return out


def _opening(text: str) -> str | None:
    return next((k for k in NO_JSON if text.startswith(k)), None)


def test_the_listed_paragraphs_are_there() -> None:
    paras = paragraphs()
    for opening in NO_JSON:
        assert any(p.startswith(opening) for p in paras), f"no paragraph opens with {opening!r}"


CHECKED = checked()


@pytest.mark.parametrize(
    "text, paths", CHECKED, ids=[" ".join(t.split()[:4]).strip("|* ") for t, _ in CHECKED]
)
def test_each_figure_is_in_the_json_it_cites(text: str, paths: list[str]) -> None:
    opening = _opening(text)
    if opening is not None:
        assert not paths, (
            f"the paragraph {opening!r} now names {paths}: remove it from NO_JSON so that its "
            "figures are checked"
        )
        return
    head = " ".join(text.split())[:80]
    assert paths, f"{head!r}... quotes figures but names no docs/results/*.json"
    for p in paths:
        assert os.path.exists(os.path.join(ROOT, p)), f"{p} (cited by {head!r}...) is not there"
    lost = missing(text, paths)
    assert not lost, f"{head!r}...: figures not found in {paths}: {lost}"


def test_the_checker_reads_figures_as_documented() -> None:
    text = (
        "LeNet5 on ResNet-18 (`--json runs/x.json`, 20,000 images, seeds 0–2): CE 0.0373 ± "
        "0.0015, −2.7 / 5 %, 7-25 %, NDCG@10 0.7442, 2.6x, 12.7 dB, OCD(5) 4 s"
    )
    got = [(f.value, f.decimals, f.unit) for f in figures(text)]
    assert got == [
        (0.0373, 4, None),
        (0.0015, 4, None),
        (-2.7, 1, "%"),
        (5.0, 0, "%"),
        (7.0, 0, "%"),
        (25.0, 0, "%"),
        (0.7442, 4, None),
        (2.6, 1, "x"),
        (12.7, 1, "dB"),
        (4.0, 0, "s"),
    ]
    assert figures(text)[0].sd == figures(text)[1]
    nums = json_numbers(
        {"rows": {"0": {"loss": 0.0355}, "1": {"loss": 0.0381}}, "t": "a 1.5 ± 0.25"}
    )
    assert ("0.0368", "0.0018") in {(_fmt(a, 4), _fmt(b, 4)) for a, b in nums.pairs}
    assert (1.5, 0.25) in nums.pairs and 150.0 in nums.values
