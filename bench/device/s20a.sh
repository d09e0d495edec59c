#!/usr/bin/env bash
# Session 20, call 1: the medical teacher re-created (session 13's command; the old one was
# lost with the machine), beside 5 maintenance seeds with 30-epoch students.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv
mkdir -p $OUT/w keel_outputs
T0=$(date +%s)
( python -m bench.medical_bench --prepare keel_outputs/mb --n-series 128 > $OUT/w/med_prep.log 2>&1
  echo "prep done $(( $(date +%s) - T0 )) s" >> $OUT/w/med_prep.log
  KEEL_BENCH_RESULTS=$OUT/w/med timeout 555 python -m bench.medical_bench --data keel_outputs/mb --model-dir $OUT/w/med_teacher --epochs 60 --n-series 128 --device cuda > $OUT/w/med_teacher.log 2>&1
  echo "teacher rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/w/med_teacher.log ) &
for S in 0 1 2 3 4; do
  mkdir -p $OUT/w/m$S
  ( KEEL_BENCH_RESULTS=$OUT/w/m$S timeout 560 python -m bench.scale_bench --device cuda --apps maintenance --skip-growth --teacher-epochs 15 --student-epochs 30 --maint-teacher ensemble --maint-distill-mixup 0 --seed $S --data-dir .carry/cmapss > $OUT/w/m$S.log 2>&1; echo "rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/w/m$S.log ) &
done
wait
free -g | head -2
cd $OUT && tar czf results.tgz w && rm -rf w
ls -la $OUT
