"""benchmarks.deploy end to end on a tiny checkpoint: the report is written and its numbers agree with each other."""
import json

import torch

from benchmarks import deploy
from recbole_fmrl.deploy import Recommender
from recbole_fmrl.deploy.export import load_checkpoint
from tests.conftest import write_tiny_dataset
from tests.test_deploy import SIZES, build_and_save, write_titles


def test_deploy_report_runs_and_its_quality_matches_recommend(tmp_path):
    root = tmp_path / "data"
    write_titles(write_tiny_dataset(root, name="tinyt"), "tinyt")
    _, ckpt, _ = build_and_save(root, tmp_path, "text_id")
    output = tmp_path / "results" / "deploy-tiny.md"
    deploy.main(["--checkpoint", str(ckpt), "--artifacts", str(tmp_path / "art"), "--output", str(output),
                 "--reps", "3", "--keeps", "5", "--data-path", str(root)])

    result = json.loads(output.with_suffix(".json").read_text())
    assert [row["size"] for row in result["sizes"]] == SIZES
    assert result["mismatched_rows"] == 0 and result["test_users"] == 40
    for suffix in ("-sizes.png", "-latency.png", "-pareto.png"):
        assert (tmp_path / "results" / f"deploy-tiny{suffix}").stat().st_size > 0
    assert "| 32 |" in output.read_text()
    # the funnel table's first row (the largest size scoring all items) is the size table's largest row
    assert result["funnels"][0]["ndcg@10"] == result["sizes"][-1]["ndcg@10"]

    # the report's size-m quality is what the exported artifact's recommend() gives on the same histories
    state = load_checkpoint(ckpt)
    rec = Recommender.load(tmp_path / "art" / "size-16")
    window, _, targets, _ = deploy.test_histories(state, deploy.parse_args(["--data-path", str(root)]), rec.item_ids)
    answers = rec.recommend([[rec.item_ids[i] for i in h] for h in window], k=10)
    top = torch.tensor([[rec.internal(token) for token in a["items"]] for a in answers])
    ndcg, recall = deploy.rank_metrics(top, targets)
    row = next(r for r in result["sizes"] if r["size"] == 16)
    assert abs(ndcg - row["ndcg@10"]) < 1e-6 and abs(recall - row["recall@10"]) < 1e-6
