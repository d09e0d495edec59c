"""The ``keel`` CLI end to end, in-process, against the session's registered store."""

from __future__ import annotations

import pandas as pd

from core.examples.synthetic import COLUMNS, make_frame
from pipelines.cli import build_parser, main


def test_parser_has_generic_commands_and_app_subcommands():
    parser = build_parser()
    args = parser.parse_args(
        ["score", "--model", "models:/x@champion", "--input", "a", "--output", "b"]
    )
    assert args.command == "score" and args.chunk_rows == 50_000
    args = parser.parse_args(["models", "rollback", "keel-x"])
    assert (args.command, args.action, args.name) == ("models", "rollback", "keel-x")


def test_models_list_show_and_score(registered_store, tmp_path, capsys):
    _, uri, report = registered_store
    assert main(["--tracking-uri", uri, "models", "list"]) == 0
    out = capsys.readouterr().out
    assert "keel-synthetic" in out and "champion" in out
    assert main(["--tracking-uri", uri, "models", "show", "keel-synthetic"]) == 0
    assert "roc_auc" in capsys.readouterr().out
    frame = make_frame(120, 3)[COLUMNS]
    src = tmp_path / "in.csv"
    frame.to_csv(src, index=False)
    dst = tmp_path / "out.parquet"
    rc = main(
        [
            "--tracking-uri",
            uri,
            "score",
            "--model",
            "models:/keel-synthetic@champion",
            "--input",
            str(src),
            "--output",
            str(dst),
            "--chunk-rows",
            "50",
            "--no-progress",
        ]
    )
    assert rc == 0
    scored = pd.read_parquet(dst)
    assert len(scored) == 120 and scored["probability"].between(0, 1).all()
    assert '"rows_rejected": 0' in capsys.readouterr().out
