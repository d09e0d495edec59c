"""FSDP2 + compile probe: each engine run in its own process, so no compiled code or dynamo
cache of an earlier run can touch a later one.

Runs the ddp2 bench's LM (d_model 1024, 8 blocks, 32 x 512 tokens per step, 40 + 5 steps)
through ``core.engine`` on one GPU as ``(strategy, compile style, precision)``:
``module`` compiles each block in place (``nn.Module.compile``, what the engine does),
``forward`` compiles only each block's ``forward`` (FSDP2's hooks then stay outside the
compiled frame), ``eager`` compiles nothing. Prints tokens/s, step time and dynamo's frame
and graph counters per run; writes one JSON per run under ``outdir``.

    python -m bench.fsdp2_compile_probe <outdir>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RUNS = [
    ("auto", "module", "bf16"),
    ("fsdp2", "module", "bf16"),
    ("fsdp2", "forward", "bf16"),
    ("fsdp2", "eager", "bf16"),
    ("auto", "forward", "bf16"),
    ("fsdp2", "forward", "fp8"),
    ("auto", "forward", "fp8"),
]


def child(strategy: str, how: str, precision: str, out: str) -> None:
    """One run, in this (fresh) process."""
    import torch
    from torch._dynamo.utils import counters

    import core.engine as eng
    from bench import scale_bench as sb

    if how == "forward":

        def compile_blocks(self, mode=None, backend="inductor", dynamic=None) -> None:  # noqa: ANN001
            if self._blocks_compiled:
                return
            for block in self.transformer_blocks():
                block.forward = torch.compile(
                    block.forward, mode=mode, backend=backend, dynamic=dynamic
                )
            self._blocks_compiled = True

        eng.TaskModule.compile_blocks = compile_blocks
    args = argparse.Namespace(d_model=1024, layers=8, seq=512, warmup=5)
    run = {
        **sb._lm_settings(args, False),
        "batch": 32,
        "accum": 1,
        "steps": 40,
        "compile": how != "eager",
        "strategy": strategy,
    }
    if precision == "fp8":
        run.update(precision="fp8", fp8_min_features=1024)
    counters.clear()
    t0 = time.time()
    sb._lightning_worker(0, 1, run, out)
    r = json.load(open(out))
    r["wall_s"] = time.time() - t0
    r["dynamo"] = {k: dict(counters[k]) for k in ("frames", "stats", "graph_break")}
    r.pop("losses", None)
    with open(out, "w") as fh:
        json.dump(r, fh, indent=1, default=str)


def main(outdir: str, budget_s: float = 470.0) -> None:
    os.makedirs(outdir, exist_ok=True)
    t0 = time.time()
    for strategy, how, precision in RUNS:
        if time.time() - t0 > budget_s:
            print("out of time before", strategy, how, precision)
            break
        out = f"{outdir}/{strategy}_{how}_{precision}.json"
        with open(out + ".log", "w") as log:
            cmd = [sys.executable, "-m", "bench.fsdp2_compile_probe", "--child"]
            subprocess.run(
                [*cmd, strategy, how, precision, out], timeout=150, stdout=log, stderr=log
            )
        try:
            r = json.load(open(out))
        except (OSError, ValueError) as err:
            print(strategy, how, precision, "failed:", err, "(see", out + ".log)", flush=True)
            continue
        print(
            f"{strategy} {how} {precision}: {r['tokens_per_s']:.0f} tokens/s, step"
            f" {r['step_ms']:.1f} ms, {r['dynamo']}",
            flush=True,
        )


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main(sys.argv[1])
