"""The learning-to-rank and vision-transformer benchmarks (benchmarks.ltr, benchmarks.vit): their
data reader, NDCG, and a smoke run of each that reports every row."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch

from benchmarks import ltr, report
from benchmarks.datasets import available
from benchmarks.experiment import COMPARE_ROWS


def _smoke_argv(tmp_path, name: str = "out.json") -> list[str]:
    return ["--smoke", "--json", str(tmp_path / name), "--workdir", str(tmp_path / "work")]


def _through_compare(part: dict, metric: str) -> dict:
    """The table's shared rows are ocdwrap.compare's: the JSON carries the comparison, and each
    shared row's ``metric`` (the mean loss) is the comparison's; returns the comparison."""
    comparison = part["info"]["0"]["ocd"]["comparison"]
    shared = [r for r in COMPARE_ROWS if r in part["rows"]]
    assert {"base", "overfit", "ocd", "ocd_k", "nearest", "compute_matched"} <= set(shared)
    for row in shared:
        assert part["per_seed"]["0"][row][metric] == comparison["rows"][row]["loss"], row
    return comparison


def test_bundled_ranking_data_matches_its_readme() -> None:
    """The copied files are the ones the README names (sha256), and read as documented."""
    readme = (ltr.DATA_DIR / "README.md").read_text()
    sums = dict(re.findall(r"\| (\S+) \| ([0-9a-f]{64}) \|", readme))
    assert set(sums) == {
        "rank.train",
        "rank.train.query",
        "rank.test",
        "rank.test.query",
        "LICENSE",
    }
    for name, digest in sums.items():
        assert hashlib.sha256((ltr.DATA_DIR / name).read_bytes()).hexdigest() == digest, name
    d = ltr.load_ranking()
    assert (len(d["test"].y), d["test"].queries) == (768, 50)
    assert len(d["train"].y) + len(d["val"].y) == 3005
    assert d["train"].queries + d["val"].queries == 201
    assert d["train"].x.shape[1] == 300 and set(d["test"].y.tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}
    # standardised with the training split's statistics
    assert d["train"].x.mean(0).abs().max() < 1e-4


def test_letor_qid_lines_and_query_split(tmp_path) -> None:
    """LETOR's own layout: qid: fields, comments, a vali.txt used as the validation split."""
    lines = {
        "train.txt": [
            "2 qid:10 1:0.5 3:1.0 # doc a",
            "0 qid:10 2:0.25",
            "1 qid:11 1:0.1 2:0.2 3:0.3",
        ],
        "vali.txt": ["1 qid:12 1:1.0", "0 qid:12 3:0.5"],
        "test.txt": ["0 qid:13 1:0.2", "2 qid:13 2:0.4 4:9.0", "1 qid:14 3:0.7"],
    }
    for name, rows in lines.items():
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    d = ltr.load_ranking(tmp_path)
    assert d["train"].query.tolist() == [0, 0, 1] and d["train"].y.tolist() == [2.0, 0.0, 1.0]
    assert d["val"].queries == 1 and d["test"].query.tolist() == [0, 0, 1]
    assert d["test"].x.shape == (3, 3)  # feature 4 is beyond the training width: dropped
    raw = ltr.read_ranking_file(tmp_path / "train.txt")
    assert raw.x[0].tolist() == [0.5, 0.0, 1.0]
    (tmp_path / "bad.txt").write_text("1 1:0.5\n")
    with pytest.raises(ValueError, match="cannot be grouped into queries"):
        ltr.read_ranking_file(tmp_path / "bad.txt")


def test_query_split_keeps_every_query_whole() -> None:
    d = ltr.load_ranking()
    raw = ltr.read_ranking_file(ltr.DATA_DIR / "rank.train")
    sizes = torch.bincount(raw.query).tolist()
    got = sorted(
        torch.bincount(d["train"].query).tolist() + torch.bincount(d["val"].query).tolist()
    )
    assert got == sorted(sizes)


def test_ndcg_conventions() -> None:
    rel = torch.tensor([3.0, 2.0, 0.0, 1.0, 0.0, 0.0])
    query = torch.tensor([0, 0, 0, 0, 1, 1])
    perfect, skipped = ltr.ndcg_at(rel.clone(), rel, query)
    assert perfect == [pytest.approx(1.0)] and skipped == 1  # query 1: no relevant document
    worst, _ = ltr.ndcg_at(-rel, rel, query)
    gains = [1, 0, 3, 7]  # 2^rel - 1 in the reversed order (0, 1, 2, 3 -> positions)
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate([0, 1, 3, 7]))
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(gains, reverse=True)))
    assert worst == [pytest.approx(dcg / idcg)]
    # only the top k count
    top1, _ = ltr.ndcg_at(torch.tensor([0.0, 1.0, 0.5, 0.2]), rel[:4], query[:4], k=1)
    assert top1 == [pytest.approx(3 / 7)]


def test_ranking_score_needs_the_whole_test_split_in_one_batch() -> None:
    d = ltr.load_ranking()
    task = ltr.RankingScore.for_split(d["test"])
    y = d["test"].y
    task.loss_fn(y.clone(), y)
    m = task.metrics({"loss": 0.0, "n": len(y)})
    assert m["mse"] == 0.0 and m["ndcg10"] == pytest.approx(1.0)
    task.loss_fn(y[:10].clone(), y[:10])  # a part of the test split: no predictions to rank
    with pytest.raises(RuntimeError, match="one batch"):
        task.metrics({"loss": 0.0, "n": 10})


def test_ltr_smoke(tmp_path) -> None:
    out = ltr.main(_smoke_argv(tmp_path))
    part = json.loads((tmp_path / "out.json").read_text())
    assert list(part["rows"]) == [r.key for r in ltr.ROWS]
    rows = part["per_seed"]["0"]
    for key, metrics in rows.items():
        assert set(metrics) == {"mse", "rmse", "ndcg10"}, key
        assert 0.0 < metrics["ndcg10"] <= 1.0, key
    # overfitting the first layer on each test document with its true relevance is the bound
    assert rows["overfit"]["mse"] < rows["base"]["mse"]
    assert rows["overfit"]["ndcg10"] > rows["base"]["ndcg10"]
    # NDCG comes from each row's own predictions (rows that differ in MSE differ in NDCG)
    assert len({round(r["ndcg10"], 12) for r in rows.values()}) > 3
    # through compare's metrics=: a per-query Metric (no query of the default data is left out)
    comparison = _through_compare(part, "mse")
    assert rows["ocd"]["ndcg10"] == pytest.approx(comparison["rows"]["ocd"]["metrics"]["ndcg10"])
    hr = part["info"]["0"]["headroom"]
    assert hr["rows"]["overfit"]["loss"] < hr["rows"]["base"]["loss"]
    assert part["rows"]["base"]["paper"] == {"rmse": ".7470"}
    assert "| row |" in report.render(str(tmp_path / "out.json"))
    assert out["command"].startswith("python -m benchmarks.ltr --smoke")
    # --merge: a second run's seed joins the first's
    other = json.loads((tmp_path / "out.json").read_text())
    other["per_seed"] = {"1": other["per_seed"]["0"]}
    other["info"] = {"1": other["info"]["0"]}
    other["settings"]["seeds"] = [1]
    (tmp_path / "s1.json").write_text(json.dumps(other))
    merged = ltr.main(
        ["--smoke", "--json", str(tmp_path / "m.json"), "--merge", str(tmp_path / "out.json"),
         str(tmp_path / "s1.json")]
    )  # fmt: skip
    assert sorted(merged["per_seed"]) == ["0", "1"] and merged["settings"]["seeds"] == [0, 1]
    assert "runs of" in report.render(str(tmp_path / "m.json"))


@pytest.mark.skipif(not available()["fashion_mnist"], reason="dataset-fashion-mnist not installed")
def test_vit_smoke(tmp_path) -> None:
    pytest.importorskip("timm", reason="benchmarks.vit builds timm's VisionTransformer")
    from benchmarks import vit

    out = vit.main(_smoke_argv(tmp_path))
    d = json.loads((tmp_path / "out.json").read_text())
    assert set(d["datasets"]) == {"head", "qkv"} and out["benchmark"] == "vit"
    for target, part in d["datasets"].items():
        rows = part["per_seed"]["0"]
        assert list(part["rows"]) == [
            r.key for r in vit.rows_for(target, vit.parse_args(["--smoke"]))
        ]
        assert all(math.isfinite(m["loss"]) for m in rows.values()), target
        # the wrap reaches the target layer: overfitting it on test lowers the loss
        assert rows["overfit"]["loss"] < rows["base"]["loss"], target
        assert part["info"]["0"]["headroom"]["n"] > 0
        _through_compare(part, "loss")
    head = d["datasets"]["head"]["info"]["0"]["ocd"]
    qkv = d["datasets"]["qkv"]["info"]["0"]
    # the head sees one vector (the class token): rank-one deltas; qkv sees 17 tokens: not
    assert head["collect_summary"]["top_singular_energy"]["mean"] > 0.999
    assert qkv["ocd"]["collect_summary"]["top_singular_energy"]["mean"] < 0.99
    assert qkv["true_delta_rank_energy"]["1"] < qkv["true_delta_rank_energy"]["4"] <= 1.0 + 1e-6
    assert qkv["ocd"]["layer"] == "blocks.3.attn.qkv"
    assert "| row |" in report.render(str(tmp_path / "out.json"))
    summary = report.summary_table([str(tmp_path / "out.json")])
    assert "Fashion-MNIST / ViT, OCD on head" in summary
    assert "Fashion-MNIST / ViT, OCD on blocks.3.attn.qkv" in summary
