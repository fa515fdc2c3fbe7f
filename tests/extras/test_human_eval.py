"""extras/human_eval.py (the paper's Table 4): Fleiss' kappa against hand-computed examples and statsmodels, and the
sheets round trip: blind sheets written, filled by the test, checked (a bad cell and a missing row named), unblinded.

References: Fleiss' kappa worked out by hand below (and the ten-item, fourteen-rater example of Fleiss 1971 as
Wikipedia's "Fleiss' kappa" article tabulates it, kappa 0.210), statsmodels' fleiss_kappa, and means counted by hand."""
import csv
import json
import random

import pytest

from extras import human_eval as H


def test_kappa_by_hand():
    # 4 items, 2 raters, scores 1-3: (1,1) (2,2) (3,2) (3,3) -> counts per category (1, 2, 3):
    #   [2,0,0] [0,2,0] [0,1,1] [0,0,2];  P_i = (sum n_ij^2 - 2) / 2 = 1, 1, 0, 1  -> P_bar = 3/4
    #   p_j = 2/8, 3/8, 3/8 -> P_e = 4/64 + 9/64 + 9/64 = 22/64
    #   kappa = (48/64 - 22/64) / (42/64) = 26/42 = 13/21
    assert H.fleiss_kappa([[2, 0, 0], [0, 2, 0], [0, 1, 1], [0, 0, 2]]) == pytest.approx(13 / 21, abs=1e-12)
    # perfect agreement spread over categories: kappa 1; every rating the same category: undefined
    assert H.fleiss_kappa([[2, 0, 0], [0, 0, 2]]) == pytest.approx(1.0)
    assert H.fleiss_kappa([[0, 2, 0], [0, 2, 0]]) is None
    with pytest.raises(ValueError, match="same number"):
        H.fleiss_kappa([[2, 0, 0], [1, 0, 0]])


def test_kappa_fleiss_1971_example():
    """Ten items, fourteen raters, five categories; P_bar = 0.378, P_e = 0.213, kappa = 0.210 (to 3 places)."""
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert round(H.fleiss_kappa(table), 3) == 0.210


def test_kappa_against_statsmodels():
    inter_rater = pytest.importorskip("statsmodels.stats.inter_rater", reason="statsmodels: the reference kappa")
    rng = random.Random(0)
    for raters in (2, 3, 5):
        counts = []
        for _ in range(40):
            row = [0, 0, 0]
            for _ in range(raters):
                row[rng.choice([0, 1, 1, 2, 2, 2])] += 1
            counts.append(row)
        assert H.fleiss_kappa(counts) == pytest.approx(inter_rater.fleiss_kappa(counts, method="fleiss"), abs=1e-12)


def fake_run(d, name, n):
    """A run directory with n Test generations: every system answers the same examples, its reply says which."""
    d.mkdir()
    rows = [{"dialogue_id": i, "personas": [f"i like thing {i} .", "i have a cat ."], "history": [f"hello {i}"],
             "selected_persona": None, "selection_output": None, "response": f"{name} says {i}", "gold": f"gold {i}"}
            for i in range(n)]
    (d / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def read(path):
    return list(csv.reader(path.open(encoding="utf-8")))


def write(path, rows):
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def test_sheets_round_trip(tmp_path, capsys):
    runs = [fake_run(tmp_path / "alpha-run", "alpha", 10), fake_run(tmp_path / "beta-run", "beta", 10)]
    out = tmp_path / "eval"
    H.main(["sheets", "--runs", *map(str, runs), "--names", "ALPHA", "BETA", "--n", "3", "--seed", "1",
            "--out", str(out)])
    s1, s2 = read(out / "sheet-1.csv"), read(out / "sheet-2.csv")
    assert s1 == s2 and s1[0] == ["item", "persona", "history", "reply", "fluency", "coherence", "consistency"]
    assert len(s1) == 1 + 3 * 2
    text = (out / "sheet-1.csv").read_text()
    assert "ALPHA" not in text and "BETA" not in text and "-run" not in text  # blind
    key = json.loads((out / "key.json").read_text())["items"]
    examples = sorted({v["example"] for v in key.values()})
    assert len(examples) == 3 and examples == sorted(random.Random(1).sample(range(10), 3))
    for row in s1[1:]:  # each item shows its system's reply to its example, with that example's persona
        v = key[row[0]]
        assert row[3] == f"{v['system'].lower()} says {v['example']}"
        assert row[1] == f"i like thing {v['example']} .\ni have a cat ." and row[2] == f"hello {v['example']}"
    order = [key[row[0]]["system"] for row in s1[1:]]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # shuffled, not grouped by system

    # annotator 1: ALPHA 3 everywhere, BETA 1; annotator 2: ALPHA 3, BETA 2 for fluency, 1 otherwise.
    for sheet, beta_fluency in ((s1, "1"), (s2, "2")):
        for row in sheet[1:]:
            alpha = key[row[0]]["system"] == "ALPHA"
            row[4:7] = ["3", "3", "3"] if alpha else [beta_fluency, "1", "1"]
    bad = [row[:] for row in s2]
    bad[3][5] = "4"           # sheet-2, spreadsheet row 4, coherence
    missing = bad[:5] + bad[6:]  # and the item of row 6 gone
    write(out / "sheet-1.csv", s1)
    write(out / "sheet-2.csv", missing)
    with pytest.raises(SystemExit) as e:
        H.main(["score", "--dir", str(out)])
    msg = str(e.value)
    assert f"sheet-2.csv: row 4 ({bad[3][0]}), column coherence: '4' is not 1, 2 or 3" in msg
    assert f"sheet-2.csv: {bad[5][0]} is missing (no row)" in msg and "sheet-1.csv" not in msg

    write(out / "sheet-2.csv", s2)
    H.main(["score", "--dir", str(out)])
    table = capsys.readouterr().out
    # means by hand: ALPHA 3 everywhere; BETA fluency (1 + 2) / 2 = 1.5, coherence and consistency 1
    assert "| ALPHA | 3.00 | 3.00 | 3.00 |" in table and "| BETA | 1.50 | 1.00 | 1.00 |" in table
    # fluency: 3 ALPHA items (3,3) -> P = 1, 3 BETA items (1,2) -> P = 0; P_bar = 1/2; p = 3/12, 3/12, 6/12,
    #   P_e = 1/16 + 1/16 + 1/4 = 3/8; kappa = (1/2 - 3/8) / (5/8) = 0.20. coherence, consistency: agreement
    #   everywhere (P_bar = 1) with two categories used -> kappa 1.00
    assert "| Fleiss' kappa | 0.20 | 1.00 | 1.00 |" in table
    assert table.strip().endswith((out / "table4.md").read_text().strip())


def test_sheets_refuse_other_test_sets(tmp_path):
    a = fake_run(tmp_path / "a", "a", 5)
    b = fake_run(tmp_path / "b", "b", 4)
    with pytest.raises(SystemExit, match="4 generations.*has 5: not the same Test set"):
        H.main(["sheets", "--runs", str(a), str(b), "--n", "2", "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit, match="--n 9: the runs have only 5"):
        H.main(["sheets", "--runs", str(a), str(a / "."), "--n", "9", "--out", str(tmp_path / "e")])
