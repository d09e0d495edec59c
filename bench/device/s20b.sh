#!/usr/bin/env bash
# Session 20, call 2: the medical teacher re-created alone (session 13's command).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
mkdir -p $OUT/w keel_outputs
T0=$(date +%s)
python -m bench.medical_bench --prepare keel_outputs/mb --n-series 128 > $OUT/w/med_prep.log 2>&1
echo "prep done $(( $(date +%s) - T0 )) s" | tee -a $OUT/w/med_prep.log
KEEL_BENCH_RESULTS=$OUT/w/med timeout 490 python -m bench.medical_bench --data keel_outputs/mb --model-dir $OUT/w/med_teacher --epochs 60 --n-series 128 --device cuda > $OUT/w/med_teacher.log 2>&1
echo "teacher rc=$? at $(( $(date +%s) - T0 )) s" | tee -a $OUT/w/med_teacher.log
tail -3 $OUT/w/med_teacher.log
free -g | head -2
cd $OUT && tar czf results.tgz w && rm -rf w
ls -la $OUT
