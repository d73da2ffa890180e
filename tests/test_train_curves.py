"""train.curves: the training-curve figure from a run's metrics_log.csv (steps and validation rows interleaved)."""
import matplotlib
import pandas as pd
import pytest

from emclip.train.curves import read_log, training_curves

matplotlib.use("Agg")


def _log(run, with_recall=True):
    """metrics_log.csv as training writes it: one row per step (loss, lr, logit_scale), one per validation."""
    rows = [{"step": s, "loss": 2.0 - 0.1 * s, "lr": 1e-3, "logit_scale": 14.0 + s, "val_loss": None}
            for s in range(10)]
    rows += [{"step": s, "loss": None, "val_loss": 1.8 - 0.1 * s, **({"val_recall": 0.2 + 0.05 * s}
                                                                       if with_recall else {})} for s in (4, 9)]
    run.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(run / "metrics_log.csv", index=False)


@pytest.mark.parametrize("with_recall", [True, False])
def test_training_curves_writes_a_png_from_the_log(tmp_path, with_recall):
    import matplotlib.pyplot as plt
    run = tmp_path / "some-run"
    _log(run, with_recall)
    log = read_log(run)
    assert len(log) == 12 and log.loss.notna().sum() == 10 and log.val_loss.notna().sum() == 2
    fig = training_curves(run, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig._suptitle.get_text() == "some-run" and len(fig.axes) == 4
    assert len(fig.axes[3].lines) == (1 if with_recall else 0)          # validation recall only when logged
    plt.close(fig)


def test_without_out_nothing_is_written(tmp_path):
    import matplotlib.pyplot as plt
    _log(tmp_path / "run")
    plt.close(training_curves(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics_log.csv"]
