"""extras/figures.py (the paper's Figures 3 and 4) and the DPO option that keeps the checkpoints Figure 4 needs.

References: the checkpoint files themselves (read with safetensors, not through the code under test), the documented
rule of the Random strategy (one persona drawn with random.Random(f"{seed}:{dialogue_id}:{len(history)}")), the
PNG format's signature and header, and Python's csv module."""
import csv
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpo
import model as modeling
import pal
from conftest import _args, collate_sft, sft_features, tiny_gpt2
from extras import figures


def ckpt_steps(out_dir: Path) -> list[int]:
    return sorted(int(d.name.split("-")[1]) for d in (out_dir / "ckpt").glob("step-*"))


def test_keep_steps_are_written_and_never_deleted(tmp_path, one_thread):
    """Without keep_steps only the latest checkpoint survives a run without evaluations; with keep_steps=(1, 2) the
    checkpoints of steps 1 and 2 are written although save_every is off, and they stay, holding those steps' weights
    (they differ from each other and from the last)."""
    feats = sft_features(8)
    for keep, expected in [((), [4]), ((1, 2), [1, 2, 4])]:
        out = tmp_path / f"keep{len(keep)}"
        cfg = dpo.TrainConfig(mode="sft", out_dir=str(out), batch_size=2, max_steps=4, warmup_steps=0, lr=1e-2,
                              keep_steps=keep, progress=False)
        dpo.train(tiny_gpt2(), cfg, feats, collate_sft, export=False)
        assert ckpt_steps(out) == expected
    w = {s: load_file(str(out / "ckpt" / f"step-{s:06d}" / "trainable.safetensors")) for s in (1, 2, 4)}
    name = next(iter(w[1]))
    assert not torch.equal(w[1][name], w[2][name]) and not torch.equal(w[2][name], w[4][name])


def test_keep_steps_option_checked(tmp_path, tiny_model_dir, data_dir):
    with pytest.raises(SystemExit, match="--keep-steps 5,x: expected positive step numbers"):
        pal.main(["all", *_args(tmp_path / "r", tiny_model_dir, data_dir, "--keep-steps", "5,x")])


def png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, data_dir):
    """The tiny pipeline with 3 DPO steps, keeping the checkpoints of steps 1 and 2."""
    run = tmp_path_factory.mktemp("fig") / "pal"
    pal.main(["all", *_args(run, tiny_model_dir, data_dir, "--dpo-steps", "3", "--keep-steps", "1,2")])
    return run


def test_fig3_from_one_run(trained_run, capsys):
    pytest.importorskip("matplotlib", reason="the PNG (matplotlib is a test requirement)")
    figures.main(["fig3", "--run", str(trained_run)])
    out = trained_run / "figures"
    for variant in ("random", "not_select"):  # inference only: nothing trained there
        assert (out / "fig3" / variant / "results.json").exists()
        assert not (out / "fig3" / variant / "sft").exists() and not (out / "fig3" / variant / "dpo").exists()
    random_rows = pal.read_jsonl(out / "fig3" / "random" / "generations.jsonl")
    for r in random_rows:  # the Random strategy's documented draw, seed 0
        expect = random.Random(f"0:{r['dialogue_id']}:{len(r['history'])}").choice(r["personas"])
        assert r["selected_persona"] == expect and r["selection_output"] is None
    assert all(r["selected_persona"] is None for r in pal.read_jsonl(out / "fig3" / "not_select" / "generations.jsonl"))
    pal_rows = pal.read_jsonl(trained_run / "generations.jsonl")
    assert all(r["selection_output"] is not None for r in pal_rows)

    table = list(csv.reader((out / "fig3.csv").read_text().splitlines()))
    assert table[0] == ["Inference", "BLEU-1", "BLEU-2", "ROUGE-L", "Entropy", "C.score"]
    assert [row[0] for row in table[1:]] == ["PAL (Select then Generate)", "Random", "Not Select"]
    res = pal.read_json(trained_run / "results.json")
    assert float(table[1][1]) == pytest.approx(res["bleu1"], abs=1e-4) and table[1][5] == ""  # no --nli: no C.score
    assert "| Not Select |" in (out / "fig3.md").read_text()
    w, h = png_size(out / "fig3.png")
    assert w > 600 and h > 200


def test_fig4_scores_the_kept_checkpoints(trained_run, monkeypatch):
    """Each step generates with exactly that checkpoint's weights (compared with the safetensors file), step 0 with
    the SFT model; a step whose checkpoint is gone is refused, naming --keep-steps."""
    pytest.importorskip("matplotlib", reason="the PNG (matplotlib is a test requirement)")
    seen = {}
    real = pal.select_then_generate

    def spy(model, tok, examples, lang, **kw):
        seen[kw["desc"]] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return real(model, tok, examples, lang, **kw)

    monkeypatch.setattr(pal, "select_then_generate", spy)
    figures.main(["fig4", "--run", str(trained_run), "--steps", "2,0,1,3"])
    assert sorted(seen) == ["step 0", "step 1", "step 2", "step 3"]
    for s in (1, 2, 3):
        saved = load_file(str(trained_run / "dpo" / "ckpt" / f"step-{s:06d}" / "trainable.safetensors"))
        assert set(saved) == set(seen[f"step {s}"])
        for n, t in saved.items():
            torch.testing.assert_close(seen[f"step {s}"][n], t, atol=0, rtol=0)
    sft = modeling.load_model(trained_run / "sft" / "final")
    for n, p in sft.named_parameters():
        torch.testing.assert_close(seen["step 0"][n], p.detach(), atol=0, rtol=0)

    out = trained_run / "figures"
    table = list(csv.reader((out / "fig4.csv").read_text().splitlines()))
    assert [row[0] for row in table] == ["DPO steps", "0", "1", "2", "3"]
    assert png_size(out / "fig4.png")[0] > 600
    seen.clear()
    figures.main(["fig4", "--run", str(trained_run), "--steps", "1,2"])  # done already: only redrawn
    assert not seen
    with pytest.raises(SystemExit, match=r"no checkpoint for step\(s\) \[5\].*--keep-steps 1,5"):
        figures.main(["fig4", "--run", str(trained_run), "--steps", "1,5"])
