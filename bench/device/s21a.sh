#!/usr/bin/env bash
# Session 21, call 1: maintenance, 5 seeds side by side, students trained 30 epochs
# (teacher 15), each run on 3 of the 16 cores (s20c.sh plus --threads 3).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
mkdir -p $OUT/w
T0=$(date +%s)
for S in 0 1 2 3 4; do
  mkdir -p $OUT/w/m$S
  ( KEEL_BENCH_RESULTS=$OUT/w/m$S timeout 560 python -m bench.scale_bench --device cuda --apps maintenance --skip-growth --teacher-epochs 15 --student-epochs 30 --maint-teacher ensemble --maint-distill-mixup 0 --seed $S --threads 3 --data-dir .carry/cmapss > $OUT/w/m$S.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/w/m$S.log ) &
done
wait
grep -h "rc=" $OUT/w/m*.log
cd $OUT && tar czf results.tgz w && rm -rf w
ls -la $OUT
