"""The serving commands: --help, what they write, and one line (exit 2) for every input they refuse."""
from __future__ import annotations

import pandas as pd
import pytest

from emclip import embed, export, predict, search
from emclip.serving.cli import run

COMMANDS = {"predict": predict, "embed": embed, "search": search, "export": export}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        COMMANDS[name].main(["--help"])
    assert exit_.value.code == 0
    assert f"python -m emclip.{name}" in capsys.readouterr().out


def _fails(capsys, module, argv) -> str:
    assert run(module.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_predict_writes_the_table_and_refuses_to_overwrite_it(trained_run, tiny_cohort, tmp_path, capsys):
    out = tmp_path / "out" / "predictions.csv"
    assert run(predict.main, [str(trained_run), str(tiny_cohort), "--out", str(out), "--device", "cpu"]) == 0
    table = pd.read_csv(out)
    assert len(table) == len(pd.read_csv(tiny_cohort / "reports.csv"))
    assert "patient_p[normal]" in table.columns and "most_attended_image" in table.columns
    assert "patients" in capsys.readouterr().out
    err = _fails(capsys, predict, [str(trained_run), str(tiny_cohort), "--out", str(out)])
    assert "already exists" in err and "--force" in err
    assert run(predict.main, [str(trained_run), str(tiny_cohort), "--out", str(out), "--force", "--device",
                              "cpu"]) == 0


def test_predict_never_writes_into_the_cohort(trained_run, tiny_cohort, capsys):
    err = _fails(capsys, predict, [str(trained_run), str(tiny_cohort), "--out", str(tiny_cohort / "p.csv")])
    assert "inside the cohort folder" in err
    assert not (tiny_cohort / "p.csv").exists()


def test_predict_names_what_is_wrong(trained_run, tiny_cohort, tmp_path, capsys):
    err = _fails(capsys, predict, [str(tmp_path / "no_model"), str(tiny_cohort), "--out", str(tmp_path / "a.csv")])
    assert "model not found" in err
    (tmp_path / "cohort").mkdir()
    pd.DataFrame({"patient_id": ["A"], "path": ["missing.tif"], "nm_per_pixel": ["abc"]}).to_csv(
        tmp_path / "cohort" / "images.csv", index=False)
    err = _fails(capsys, predict, [str(trained_run), str(tmp_path / "cohort"), "--out", str(tmp_path / "b.csv")])
    assert "images.csv, row 1 (patient A): nm_per_pixel 'abc' is not a number" in err
    err = _fails(capsys, predict, [str(trained_run), str(tiny_cohort), "--out", str(tmp_path / "c.csv"),
                                   "--classes", str(tmp_path / "nope.yaml")])
    assert "prompt file not found" in err
    assert not any((tmp_path / name).exists() for name in ("a.csv", "b.csv", "c.csv"))


def test_predict_scores_the_users_own_classes(trained_run, tiny_cohort, tmp_path):
    classes = tmp_path / "classes.yaml"
    classes.write_text("classes:\n  - name: thin membranes\n    synonyms: [thin glomerular basement membranes]\n"
                       "  - amyloid\ntemplates: ['{}', 'electron micrograph of {}']\n")
    out = tmp_path / "p.csv"
    assert run(predict.main, [str(trained_run), str(tiny_cohort), "--out", str(out), "--classes", str(classes),
                              "--device", "cpu"]) == 0
    table = pd.read_csv(out)
    assert [c for c in table.columns if c.startswith("patient_p[")] == ["patient_p[thin membranes]",
                                                                       "patient_p[amyloid]"]
    assert set(table.patient_pred) <= {"thin membranes", "amyloid"}
