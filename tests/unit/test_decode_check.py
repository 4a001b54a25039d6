"""The decode-race check (`python -m bench.decode_check`): its harness runs here on the CPU,
and it reads its figures the way the next GPU session will rely on."""

from __future__ import annotations

import json

import pytest
import torch

from bench import decode_check as dc

pytestmark = pytest.mark.filterwarnings("ignore:.*TorchCodec:DeprecationWarning")


def test_the_check_runs_on_a_cpu_and_finds_both_decodes_clean(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert dc.main(["--device", "cpu", "--rounds", "2", "--batch", "4", "--size", "32", "--chain", "3",
                    "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"plain", "quiet"}
    for m in result["modes"].values():
        assert m["images"] == 8 and m["wrong"] == 0 and m["rounds_wrong"] == 0
    assert result["chain_ms"] > 0 and result["decode_ms"] > 0
    assert "harness only" in result["verdict"]
    assert "quiet: 0 of 8 images wrong" in capsys.readouterr().err


def test_an_overwritten_image_is_counted_as_wrong_and_as_fill():
    reference = dc.decode("plain", dc.sample_jpegs(3, 16), torch.device("cpu"))
    decoded = [reference[0], torch.full_like(reference[1], dc.FILL), reference[2].clone()]
    decoded[2][0, 0, 0] ^= 1  # one level off somewhere: wrong, not a fill
    wrong, filled, worst = dc.compare(decoded, reference)
    assert (wrong, filled) == (2, 1) and worst >= 1


def _result(device: str, plain: int, quiet: int, chain_ms: float = 50.0, decode_ms: float = 5.0) -> dict:
    return {"device": device, "chain_ms": chain_ms, "decode_ms": decode_ms,
            "modes": {"plain": {"wrong": plain}, "quiet": {"wrong": quiet}}}


@pytest.mark.parametrize("result, says", [
    (_result("NVIDIA H200", plain=40, quiet=0), "race shown"),
    (_result("NVIDIA H200", plain=40, quiet=3), "does not hold"),
    (_result("NVIDIA H200", plain=0, quiet=1), "does not hold"),
    (_result("NVIDIA H200", plain=0, quiet=0), "another cause"),
    (_result("NVIDIA H200", plain=0, quiet=0, chain_ms=4.0, decode_ms=6.0), "inconclusive"),
    (_result("cpu", plain=0, quiet=0), "harness only"),
])
def test_the_verdict_says_what_the_figures_show(result, says):
    assert says in dc.verdict(result)


def test_without_cuda_the_check_says_so_and_exits_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert dc.main(["--device", "cuda"]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err
