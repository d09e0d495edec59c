"""bench.medical_bench refuses option mixes that would silently do nothing."""

from __future__ import annotations

import pytest

from bench.medical_bench import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--skip-train", "--model-dir", "m"], "evaluates nothing on its own"),
        (["--skip-train", "--model-dir", "m", "--timing", "--tta"], "--skip-train skips"),
        (["--skip-train", "--model-dir", "m", "--lidc", "--minutes", "2"], "--skip-train skips"),
    ],
)
def test_skip_train_refuses_options_it_would_ignore(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
