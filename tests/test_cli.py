"""The `longattn` command: the demo runs end to end and prints its table; bench refuses without CUDA."""
import subprocess
import sys

import pytest
import torch

from longattn.cli import main


def test_demo_prints_table(capsys):
    rc = main(["demo", "--lengths", "20,3,33", "--new-tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for word in ("kind", "prefill ms", "decode tok/s", "max |diff| vs dense", "flash", "moba", "nsa", "mla"):
        assert word in out
    assert "exact configurations match the dense model" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_front_door_refuses_without_cuda():
    proc = subprocess.run([sys.executable, "-m", "longattn.cli", "bench", "flash"], capture_output=True, text=True)
    assert proc.returncode == 2 and "need a CUDA GPU" in proc.stderr


def test_demo_with_local_checkpoint(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    rc = main(["demo", "--model", str(tmp_path), "--lengths", "20,33", "--new-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"model: {tmp_path} (llama)" in out and "mla" not in out
