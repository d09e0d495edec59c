#!/usr/bin/env bash
# Session 20, call 4 (diagnostic, 130 s): five maintenance runs at once, 3 torch threads each.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
T0=$(date +%s)
for S in 0 1 2 3 4; do
  ( timeout 130 python -m bench.scale_bench --device cuda --apps maintenance --skip-growth --teacher-epochs 15 --student-epochs 30 --maint-teacher ensemble --maint-distill-mixup 0 --seed $S --data-dir .carry/cmapss --threads 3 --no-record 2>&1 | while IFS= read -r l; do echo "$(( $(date +%s) - T0 )) s: $l"; done | grep -E "maintenance:|max_epochs|Epoch" > /tmp/m$S.log ) &
done
wait
for S in 0 1 2 3 4; do echo "== seed $S"; cat /tmp/m$S.log; done
