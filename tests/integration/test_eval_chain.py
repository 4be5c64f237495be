"""The evaluation chain on the real tiny Qwen3-VL through ms-swift: generate -> score -> text -> compare.

The tiny model is random, so its captions are noise; what is checked is the plumbing: the files, their
keys, ids and references carried through, perplexity of the right magnitude, adapters applied.
"""

from __future__ import annotations

import json
import math

import pytest

from anchorkd import cli
from anchorkd.demo.tiny_model import QWEN_VOCAB_SIZE
from anchorkd.eval.evaluate import evaluate_checkpoint

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 8
RECORDS_PER_FILE = 2


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def eval_files(synthetic_data_dir):
    return [synthetic_data_dir / "eval_indoor.jsonl", synthetic_data_dir / "eval_outdoor.jsonl"]


@pytest.fixture(scope="module")
def base_eval_dir(tmp_path_factory, tiny_model_dir, synthetic_data_dir, eval_files):
    """The base model evaluated end to end through the Python API (one model load)."""
    out = tmp_path_factory.mktemp("eval") / "base"
    metrics = evaluate_checkpoint(
        tiny_model_dir,
        None,
        eval_files,
        synthetic_data_dir / "text_eval.jsonl",
        out,
        max_new_tokens=MAX_NEW_TOKENS,
        limit=RECORDS_PER_FILE,
        show_progress=False,
    )
    return out, metrics


@pytest.fixture(scope="module")
def lora_adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter on the tiny model's attention, with non-zero B so that it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    out = tmp_path_factory.mktemp("adapters") / "lora"
    peft_model.save_pretrained(out)
    return out


def test_generate_writes_captions_with_ids_and_references(base_eval_dir, eval_files):
    out, _ = base_eval_dir
    generations = read_jsonl(out / "generations.jsonl")

    expected = [record for path in eval_files for record in read_jsonl(path)[:RECORDS_PER_FILE]]
    assert len(generations) == len(expected) == 2 * RECORDS_PER_FILE
    for generated, record in zip(generations, expected, strict=True):
        assert generated["id"] == record["meta"]["id"]
        assert generated["reference"] == record["messages"][-1]["content"]
        assert generated["prompt"] == record["messages"][0]["content"]
        assert generated["objects"] == record["meta"]["objects"]
        assert (generated["scene"], generated["style"]) == (record["meta"]["scene"], record["meta"]["style"])
        assert isinstance(generated["caption"], str) and generated["caption"].strip()
        assert 0 < generated["generated_tokens"] <= MAX_NEW_TOKENS
    assert not list(out.glob(".*partial*"))

    settings = json.loads((out / "generation_settings.json").read_text())
    assert settings["versions"]["ms-swift"] == "4.6.0"
    assert all(settings["versions"][name] for name in ("anchorkd", "transformers", "torch"))
    assert (settings["greedy"], settings["batch_size"], settings["max_new_tokens"]) == (
        True,
        8,
        MAX_NEW_TOKENS,
    )
    assert settings["template"] == "qwen3_vl"
    assert [f["samples"] for f in settings["data_files"]] == [RECORDS_PER_FILE] * 2
    assert all(len(f["sha256"]) == 64 for f in settings["data_files"])
    assert "git" in settings


def test_score_and_text_results_of_the_base(base_eval_dir):
    out, metrics = base_eval_dir
    scores = json.loads((out / "scores.json").read_text())
    assert {"ood_domain_object_rate", "chair_i", "chair_s", "object_recall", "indomain_f1"} <= set(
        scores["summary"]
    )
    assert len(scores["samples"]) == 2 * RECORDS_PER_FILE

    text = json.loads((out / "text_eval.json").read_text())
    assert text["samples"] == 4 and text["tokens"] > 4 * 3
    assert math.isfinite(text["ppl"]) and text["ppl"] > 1
    # A random model is about uniform over the vocabulary: perplexity of the vocabulary's magnitude.
    assert round(math.log10(text["ppl"])) == round(math.log10(QWEN_VOCAB_SIZE))
    assert text["nll"] == pytest.approx(math.log(text["ppl"]))
    assert metrics["text_ppl"] == text["ppl"] and metrics["chair_i"] == scores["summary"]["chair_i"]


def test_text_gate_against_the_identical_model_passes(tmp_path, tiny_model_dir, synthetic_data_dir):
    out = tmp_path / "text"
    status = cli.main(
        ["eval", "text", "--model", str(tiny_model_dir), "--base", str(tiny_model_dir)]
        + ["--data", str(synthetic_data_dir / "text_eval.jsonl"), "--out", str(out)]
    )

    assert status == 0
    document = json.loads((out / "text_eval.json").read_text())
    assert document["ppl_change_pct"] == 0.0 and document["regressed"] is False


def test_adapter_run_and_comparison_report(
    tmp_path, tiny_model_dir, synthetic_data_dir, eval_files, lora_adapter_dir, base_eval_dir
):
    base_dir, base_metrics = base_eval_dir
    lora_dir = tmp_path / "lora"
    model_args = ["--model", str(tiny_model_dir), "--adapter", str(lora_adapter_dir)]

    generate = ["eval", "generate", *model_args, "--data", str(eval_files[1]), "--out", str(lora_dir)]
    assert cli.main([*generate, "--limit", "1", "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    settings = json.loads((lora_dir / "generation_settings.json").read_text())
    assert settings["adapter"] == str(lora_adapter_dir.resolve())
    assert len(read_jsonl(lora_dir / "generations.jsonl")) == 1

    assert cli.main(["eval", "score", "--generations", str(lora_dir / "generations.jsonl")]) == 0
    text = ["eval", "text", *model_args, "--base", str(tiny_model_dir)]
    status = cli.main([*text, "--data", str(synthetic_data_dir / "text_eval.jsonl"), "--out", str(lora_dir)])
    document = json.loads((lora_dir / "text_eval.json").read_text())
    assert document["base"]["ppl"] == pytest.approx(base_metrics["text_ppl"])
    assert document["ppl"] != pytest.approx(document["base"]["ppl"])
    assert status == (3 if document["regressed"] else 0)

    report = tmp_path / "report"
    runs = ["--run", f"base={base_dir}", "--run", f"lora={lora_dir}"]
    assert cli.main(["eval", "compare", *runs, "--out", str(report)]) == 0
    for name in ("report.md", "report.json", "hallucination.png", "quality.png", "text_ppl_change.png"):
        assert (report / name).is_file(), name
    runs_metrics = json.loads((report / "report.json").read_text())["runs"]
    assert runs_metrics["base"]["text_ppl_change_pct"] == 0.0
    assert runs_metrics["lora"]["text_ppl_change_pct"] == pytest.approx(document["ppl_change_pct"])
