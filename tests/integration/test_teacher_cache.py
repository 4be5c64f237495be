"""``anchorkd teacher-cache`` on the tiny model: the cache pass, its figures, and its rows against the teacher.

The oracle is the teacher's full logits from a plain forward (the student with its LoRA adapter disabled:
the stage-2 demo's base-anchor teacher) on the trainer's own micro-batch of the row, shifted by slicing.
"""

from __future__ import annotations

import gkd_harness as h
import pytest
import torch

from anchorkd.config import ConfigLoader
from anchorkd.trainers import teacher_cache as tc

pytestmark = pytest.mark.integration

K = 8
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory):
    return h.make_env(tiny_model_dir, synthetic_data_dir, quick_overrides, tmp_path_factory.getbasetemp())


def test_the_cache_holds_the_teachers_top_k_at_every_supervised_position(env, tmp_path, capsys):
    overrides = env.overrides("teacher_cache", extra=(f"rlhf.temperature={TEMPERATURE}",))
    with h.preserved_environment():
        config = ConfigLoader.resolve(h.STAGE2_GKD_DEMO, overrides)
        h.seed_everything()
        stats = tc.write_teacher_cache(config, tmp_path / "cache", k=K, batch_size=3)
        again = tc.write_teacher_cache(config, tmp_path / "cache", k=K)

    trainer = h.build(h.STAGE2_GKD_DEMO, overrides).trainer
    rows = list(trainer.train_dataset)
    cached_rows = len(rows) + len(trainer.eval_dataset)  # the validation rows too: a cached run evaluates
    assert len(trainer.eval_dataset) > 0
    # The validation rows repeat two training rows (gkd_harness.write_short_data): written once.
    assert stats.rows == cached_rows and stats.rows_written == len(rows) > 3
    assert stats.rows_cached == cached_rows - len(rows)
    assert again.rows_written == 0 and again.rows_cached == cached_rows  # the second pass computes nothing
    assert 6 * K + 4 <= stats.bytes_per_token <= 6 * K + 4 + 16  # + the shard header (row keys), per token
    with capsys.disabled():
        print(
            f"\nteacher cache, tiny model, k={K}: {stats.rows_per_second:.2f} rows/s, "
            f"{stats.bytes_per_token:.1f} bytes per supervised token ({stats.supervised_tokens} tokens)"
        )

    cache = tc.TeacherCache.open(tmp_path / "cache", tc.cache_settings_for(config, K, tmp_path / "cache"))
    assert cache.settings.temperature == TEMPERATURE and cache.settings.k == K
    for index in (0, len(rows) - 1):
        key = tc.row_key(trainer.to_samples([rows[index]])[0])
        batch = h.prepare(trainer, [rows[index]])
        logits = h.teacher_logits(trainer, batch)[0, :-1].double()
        supervised = batch["model_inputs"]["labels"][0, 1:] != -100
        tempered = logits[supervised] / TEMPERATURE
        expected = (tempered.log_softmax(-1)).topk(K, -1)
        cached = cache.row(key)
        assert cached.ids.shape == (int(supervised.sum()), K)
        assert torch.equal(cached.ids.long(), expected.indices)
        torch.testing.assert_close(cached.logprobs.double(), expected.values, rtol=2e-3, atol=2e-3)
        tail = torch.log1p(-expected.values.exp().sum(-1))
        torch.testing.assert_close(cached.log_tail.double(), tail, rtol=1e-4, atol=1e-5)
