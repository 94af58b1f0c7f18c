"""bench.train runs end to end on a micro shape (its figures are measured elsewhere, not here)."""

import importlib.util
import json

from bench import train as bench_train


def test_bench_train_smoke(tmp_path, capsys):
    variants = ["fastlm-reference"]
    if importlib.util.find_spec("transformers") is not None:
        variants.append("hf-gpt2")
    out = tmp_path / "bench.json"
    assert bench_train.main(["--preset", "tiny", "--batch_size", "2", "--seq_len", "16", "--steps", "1",
                             "--warmup", "0", "--device", "cpu", "--variants", *variants, "--json", str(out)]) == 0
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == set(variants)
    assert all(r["tokens_per_sec"] > 0 and r["mfu"] is None for r in results.values())
    if "hf-gpt2" in results:  # the same architecture: the same number of parameters
        assert results["hf-gpt2"]["params"] == results["fastlm-reference"]["params"]
    assert "tokens/s" in capsys.readouterr().out
