"""A real ``mlflow models serve`` on loopback answers like batch scoring does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.examples.synthetic import COLUMNS, make_frame

MLFLOW = Path(sys.executable).with_name("mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_rest_answers_match_batch_scoring(registered_store, tmp_path):
    import mlflow

    _, uri, _ = registered_store
    port = _free_port()
    # the server execs uvicorn from the venv, which must be on PATH as it is for an activated venv
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{MLFLOW.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            str(MLFLOW),
            "models",
            "serve",
            "-m",
            "models:/keel-synthetic@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(
                    f"server did not come up: {(tmp_path / 'serve.log').read_text()[-2000:]}"
                )
            time.sleep(1)
        frame = make_frame(40, 11)[COLUMNS]
        body = json.dumps(
            {"dataframe_split": json.loads(frame.to_json(orient="split", index=False))}
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
        served = pd.DataFrame(answer["predictions"])
        mlflow.set_tracking_uri(uri)
        batch = mlflow.pyfunc.load_model("models:/keel-synthetic@champion").predict(frame)
        np.testing.assert_allclose(
            served["probability"].to_numpy(), batch["probability"].to_numpy(), rtol=1e-5
        )
        # a request whose columns do not match the signature is refused, not guessed at
        bad = json.dumps({"dataframe_split": {"columns": ["x0"], "data": [[1.0]]}}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=bad,
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 400
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
